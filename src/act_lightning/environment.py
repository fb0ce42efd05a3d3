"""What a run was trained or measured with: this library's version (and its commit, where it runs from a git
checkout), Python, torch and its CUDA, Lightning, and the packages behind the networks and the metrics.
Kept per launch in the run's history (`act_history` in every checkpoint), written to the launch's log, and
in `evaluate`'s JSON: a number is comparable only with what produced it."""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import subprocess
from pathlib import Path

import torch

import act_lightning

# distribution names: what trains (lightning, diffusers: the networks' blocks) and what measures (FID)
PACKAGES = ("lightning", "diffusers", "torchmetrics", "torch-fidelity", "hydra-core")


def git_commit(root: Path) -> str | None:
    """The commit checked out at `root`, with "+dirty" when tracked files differ from it; None where
    `root` is not a git checkout's top (an installed wheel) or git is missing or fails."""
    if not (root / ".git").exists():
        return None
    try:
        git = ["git", "-C", str(root)]
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        status = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = status.returncode != 0 or bool(status.stdout.strip())
    return head.stdout.strip() + ("+dirty" if dirty else "")


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def environment() -> dict[str, str | None]:
    """{name: version} of this process (computed once). Reads no accelerator: asking CUDA for its
    devices would initialise it before Lightning's launcher starts (or forks) the processes."""
    package = Path(act_lightning.__file__).resolve().parent
    checkout = package.parents[1]  # src/act_lightning -> the repository, for an editable install
    return {
        "act_lightning": act_lightning.__version__,
        "commit": git_commit(checkout) if (checkout / "pyproject.toml").is_file() else None,
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a plain str: torch's own TorchVersion would need unpickling
        "cuda": None if torch.version.cuda is None else str(torch.version.cuda),
        **{name: _version(name) for name in PACKAGES},
    }


def latest_environment(history: list[dict] | None) -> dict[str, str | None] | None:
    """The environment of a run's latest launch (the last entry of `history`, a checkpoint's
    `act_history`): what trained it. None for a history written before runs recorded it, or none at all
    (a checkpoint of convert_reference)."""
    return (history or [{}])[-1].get("environment")


def launch_environments(history: list[dict] | None) -> list[dict]:
    """Each launch's environment with the iteration it started at, oldest first (launches whose history
    entry predates the record are left out): for the loggers' config, which a resumed run updates, so
    that the newest launch's `environment` does not hide what trained the run before it."""
    return [
        {"iteration": h.get("iteration"), **h["environment"]} for h in history or [] if h.get("environment")
    ]


def describe(env: dict[str, str | None]) -> str:
    """One line for a log: act_lightning 0.3.2 (commit 1a2b3c4d5e6f), Python 3.11.7, torch 2.14.1 (CUDA
    13.0), lightning 2.6.1, ..."""
    commit = env.get("commit")
    if commit:
        short = commit.removesuffix("+dirty")[:12] + ("+dirty" if commit.endswith("+dirty") else "")
        parts = [f"act_lightning {env['act_lightning']} (commit {short})"]
    else:
        parts = [f"act_lightning {env['act_lightning']}"]
    cuda = f" (CUDA {env['cuda']})" if env.get("cuda") else ""
    parts += [f"Python {env['python']}", f"torch {env['torch']}{cuda}"]
    parts += [f"{name} {env[name]}" for name in PACKAGES if env.get(name)]
    return ", ".join(parts)
