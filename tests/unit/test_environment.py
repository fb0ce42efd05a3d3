"""What a run records of its environment: versions, and the commit of a git checkout."""

import importlib.metadata
import platform
import shutil
import subprocess

import pytest
import torch

import act_lightning
from act_lightning.environment import (
    PACKAGES,
    describe,
    environment,
    git_commit,
    latest_environment,
    launch_environments,
)
from tests.conftest import ROOT

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


@needs_git
def test_the_commit_of_a_checkout_and_whether_its_tracked_files_changed(tmp_path):
    assert git_commit(tmp_path) is None  # not a checkout (an installed wheel's folder)
    _git(tmp_path, "init", "-q")
    assert git_commit(tmp_path) is None  # no commit yet
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert git_commit(tmp_path) == head.stdout.strip() and len(head.stdout.strip()) == 40
    (tmp_path / "new.py").write_text("")  # untracked: not part of what the commit names
    assert git_commit(tmp_path) == head.stdout.strip()
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == head.stdout.strip() + "+dirty"


def test_git_missing_gives_no_commit(tmp_path, monkeypatch):
    (tmp_path / ".git").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert git_commit(tmp_path) is None


def test_the_versions_are_this_processs():
    env = environment()
    assert env["act_lightning"] == act_lightning.__version__ and env["torch"] == torch.__version__
    assert all(type(v) is str for v in env.values() if v is not None)  # checkpoints load weights_only
    assert env["python"] == platform.python_version() and env["cuda"] == torch.version.cuda
    assert {name: env[name] for name in PACKAGES} == {n: importlib.metadata.version(n) for n in PACKAGES}
    if shutil.which("git") and (ROOT / ".git").exists():  # the tests run from a checkout
        assert env["commit"].removesuffix("+dirty") == git_commit(ROOT).removesuffix("+dirty")


def test_the_log_line_names_each_version():
    env = {
        "act_lightning": "0.3.0",
        "commit": "0123456789abcdef0123456789abcdef01234567+dirty",
        "python": "3.11.7",
        "torch": "2.14.1+cu130",
        "cuda": "13.0",
        **dict.fromkeys(PACKAGES, "1.0"),
        "diffusers": None,
    }
    line = describe(env)
    assert line.startswith(
        "act_lightning 0.3.0 (commit 0123456789ab+dirty), Python 3.11.7, torch 2.14.1+cu130"
    )
    assert "(CUDA 13.0), lightning 1.0, torchmetrics 1.0" in line and "diffusers" not in line
    assert describe({**env, "commit": None, "cuda": None}).startswith(
        "act_lightning 0.3.0, Python 3.11.7, torch 2.14.1+cu130, "
    )


def test_what_trained_a_checkpoint_is_its_last_launchs_environment():
    first, second = {"act_lightning": "0.2.0"}, {"act_lightning": "0.3.0"}
    history = [{"iteration": 0, "environment": first}, {"iteration": 4, "environment": second}]
    assert latest_environment(history) == second
    assert latest_environment([{"iteration": 0}]) is None  # written before runs recorded it
    assert latest_environment(None) is None  # a converted reference checkpoint has no history


def test_each_launchs_environment_is_listed_with_the_iteration_it_started_at():
    first, second = {"torch": "2.13.0", "commit": "a"}, {"torch": "2.14.1", "commit": "b"}
    history = [
        {"iteration": 0},
        {"iteration": 4, "environment": first},
        {"iteration": 9, "environment": second},
    ]
    assert launch_environments(history) == [
        {"iteration": 4, "torch": "2.13.0", "commit": "a"},
        {"iteration": 9, "torch": "2.14.1", "commit": "b"},
    ]
    assert launch_environments(None) == []
