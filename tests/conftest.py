import fcntl
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


@pytest.fixture(scope="session")
def cifar10_smoke_run(tmp_path_factory) -> Path:
    """`python -m act_lightning.train experiment=cifar10 debug=smoke data=synthetic` (W&B logger, Inception
    FID, LPIPS), trained once per session: the CLI's smoke test and the evaluation tests read this run.
    Under xdist the test processes share it through the session's temporary folder: the first to need it
    trains it under a lock, the others wait for it and read it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-<n>/, the folder of this session's test processes
    done = root / "cifar10_smoke_run.done"  # holds the folder of the finished run
    with open(root / "cifar10_smoke_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            run = tmp_path_factory.mktemp("cifar10_smoke") / "run"
            result = run_cli(["experiment=cifar10", "debug=smoke", "data=synthetic"], run)
            assert result.returncode == 0, result.stderr[-3000:]
            done.write_text(str(run))
    return Path(done.read_text())


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
