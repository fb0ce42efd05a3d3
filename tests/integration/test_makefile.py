"""The Makefile targets the README names that no other test runs: `make help` and `make lint` run as they
are; `make test-oldest` (it downloads the oldest releases) and `make train PYTHON=...` (it creates and fills a
virtual environment) are read as `make -n` lists their commands, with the variables substituted."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.helpers_readme import makefile_targets


def _make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _listed(*args: str) -> list[list[str]]:
    """The commands `make -n ARGS` would run, split as the shell splits them (continuations joined)."""
    result = _make("-n", *args)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.replace("\\\n", " ").splitlines() if line.strip()]


def test_make_help_lists_every_target_with_its_description():
    result = _make("help")
    assert result.returncode == 0, result.stderr
    listed = dict(re.findall(r"^  make (\S+) +(\S.*)$", result.stdout, flags=re.M))
    phony = re.search(r"^\.PHONY: (.*)$", (ROOT / "Makefile").read_text(), flags=re.M).group(1).split()
    assert set(listed) == makefile_targets() == set(phony)
    assert "ruff" in listed["lint"] and "oldest" in listed["test-oldest"]


def test_make_lint_passes_on_this_checkout():
    """The README's `make lint` (ruff's check and format check over src, tests and benchmarks), with the
    tools of the environment the tests run in: the suite fails where the code would fail the linter."""
    venv = Path(sys.executable).parent.parent
    if not (venv / "bin" / "ruff").is_file():
        pytest.skip(f"no ruff beside {sys.executable} (make install puts it in .venv)")
    result = _make("lint", "STAMP=", f"VENV={venv}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "All checks passed" in result.stdout and "already formatted" in result.stdout


def test_each_reproduce_call_trains_in_a_folder_of_its_own_and_reports_that_folder():
    """A second `make reproduce-mini` found the first one's finished jobs in multirun/reproduce-mini and
    reported them again as new."""
    for target, key in (("reproduce-mini", "hydra.sweep.dir="), ("reproduce-init", "init_sweep=")):
        commands = _listed(target, "STAMP=")
        swept = next(a for c in commands for a in c if a.startswith(key)).split("=", 1)[1]
        assert re.fullmatch(
            r"multirun/(reproduce-mini|init)/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d(/pretrain)?", swept
        ), swept
        reported = next(c for c in commands if "act_lightning.report" in c)
        assert reported[reported.index("act_lightning.report") + 1].startswith(
            swept.removesuffix("/pretrain")
        )
    given = _listed("reproduce-mini", "STAMP=", "MINI_DIR=multirun/reproduce-mini/stopped")
    assert "hydra.sweep.dir=multirun/reproduce-mini/stopped" in given[0]  # continuing one that was stopped


def test_make_test_oldest_runs_make_tests_suite_with_the_oldest_releases_beside_the_pinned_torch():
    oldest = _listed("test-oldest", "OLDEST=/tmp/oldest")
    suite = _listed("test", "STAMP=", "PY=/tmp/oldest/bin/python")
    assert oldest[0][:3] == ["test", "-x", "/tmp/oldest/bin/python"] and oldest[0][-2:] == [
        "venv",
        "/tmp/oldest",
    ]
    pinned = next(c for c in oldest if c[-1] == "/tmp/oldest/torch.txt")  # printf ... > torch.txt
    pins = pinned[2:-2]
    assert pins and all(p.startswith(("torch==", "torchvision==")) for p in pins)
    assert next(c for c in oldest if c[:1] == ["/tmp/oldest/bin/python"] and set(pins) <= set(c))
    uv = next(c for c in oldest if c[0] == "/tmp/oldest/bin/uv")
    assert uv[uv.index("--resolution") + 1] == "lowest-direct"
    assert uv[uv.index("--constraint") + 1] == "/tmp/oldest/torch.txt"
    assert uv[uv.index("--python") + 1] == "/tmp/oldest/bin/python" and uv[-2:] == ["-e", ".[dev]"]
    # numpy 1.24 and scipy 1.10 have no wheel for Python 3.12: from source they fail to build there
    wheels_only = {uv[i + 1] for i, a in enumerate(uv) if a == "--only-binary"}
    assert {"numpy", "scipy", "pillow", "matplotlib", "scikit-learn"} <= wheels_only
    assert oldest[-1] == suite[-1]  # the same pytest command, in .venv-oldest's interpreter


def test_make_train_makes_the_venv_with_the_python_given_and_installs_with_uv_or_pip_once(tmp_path):
    venv = tmp_path / "venv"
    args = ["train", "PYTHON=python3.12", f"VENV={venv}", f"PY={venv}/bin/python", f"STAMP={venv}/.installed"]
    commands = _listed(*args)
    assert commands[0] == ["test", "-x", f"{venv}/bin/python", "||", "python3.12", "-m", "venv", str(venv)]
    torch_spec = (
        re.search(r"^TORCH_DEFAULT := (.*)$", (ROOT / "Makefile").read_text(), flags=re.M).group(1).split()
    )
    pip = [f"{venv}/bin/python", "-m", "pip", "install", "--quiet"]
    # uv, the default: pip brings uv into the venv, then one resolution of the pinned torch with the package
    # (so no other torch can be picked), byte-compiled as pip's installs are
    uv = [
        f"{venv}/bin/uv",
        "pip",
        "install",
        "--quiet",
        "--python",
        f"{venv}/bin/python",
        "--compile-bytecode",
    ]
    assert commands[1:3] == [[*pip, "--upgrade", "pip", "uv"], [*uv, *torch_spec, "-e", ".[dev]"]]
    assert commands[-1] == [f"{venv}/bin/python", "-m", "act_lightning.train"]
    # INSTALLER=pip: pip's own settings (a pip.conf's index), torch first, then the package
    with_pip = _listed(*args, "INSTALLER=pip")
    assert with_pip[1:4] == [[*pip, "--upgrade", "pip"], [*pip, *torch_spec], [*pip, "-e", ".[dev]"]]
    assert with_pip[0] == commands[0] and with_pip[-1] == commands[-1]
    refused = _make("-n", *args, "INSTALLER=poetry")
    assert refused.returncode != 0 and "INSTALLER must be uv or pip, got 'poetry'" in refused.stderr
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").write_text("")
    (venv / ".installed").touch()  # newer than pyproject.toml: nothing to install
    assert _listed(*args) == [commands[-1]]


def test_a_torch_spec_given_is_kept_for_the_reinstalls_after_it(tmp_path):
    """TORCH_SPEC=... applied to the first install only, and the reinstall that a change of pyproject.toml
    brings put the pinned build back (gigabytes, over a build chosen for a CUDA driver). It is kept in
    .venv/torch-spec; a spec other than the kept one installs again."""
    venv = tmp_path / "venv"
    args = ["train", f"VENV={venv}", f"PY={venv}/bin/python", f"STAMP={venv}/.installed"]
    train = [f"{venv}/bin/python", "-m", "act_lightning.train"]
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").touch()
    assert _listed(*args) == [train]  # installed: nothing to do
    other = "torch==2.9.1 torchvision==0.24.1"
    commands = _listed(*args, f"TORCH_SPEC={other}")  # another build asked for: installed, and kept
    uv = next(c for c in commands if c[0] == f"{venv}/bin/uv")
    assert set(other.split()) <= set(uv) and not any(c.startswith("torch==2.14") for c in uv)
    assert ["printf", "%s\\n", other, ">", f"{venv}/torch-spec"] in commands
    (venv / "torch-spec").write_text(other + "\n")
    assert _listed(*args, f"TORCH_SPEC={other}") == [train]  # the kept one: nothing to do
    os.utime(venv / ".installed", (0, 0))  # older than pyproject.toml: installed again, with the kept build
    uv = next(c for c in _listed(*args) if c[0] == f"{venv}/bin/uv")
    assert set(other.split()) <= set(uv) and not any(c.startswith("torch==2.14") for c in uv)
