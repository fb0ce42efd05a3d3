import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")  # tests never reach the network
os.environ.setdefault("WANDB_SILENT", "true")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several test processes share the cores: one thread each (and in the training runs they start), or
    # their thread pools oversubscribe the machine and every process slows to a crawl.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose(overrides: list[str] | None = None, run_dir: str = "/tmp/act-test-run"):
    """The training config as `python -m act_lightning.train <overrides>` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        return hydra_compose("train", overrides=[f"run_dir={run_dir}", *(overrides or [])])


def run_cli(args: list[str], run_dir: Path, timeout: int = 600):
    """Runs the training CLI in a subprocess, as a user would."""
    import subprocess

    cmd = [sys.executable, "-m", "act_lightning.train", *args, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cfg_factory(tmp_path):
    def make(overrides=None):
        return compose(overrides, run_dir=str(tmp_path / "run"))

    return make


def refusal(result) -> str:
    """The one line a command says when it refuses bad input (exit status 2, no traceback)."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]
