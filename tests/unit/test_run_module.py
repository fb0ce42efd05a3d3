"""tests.conftest.run_module, which runs the commands in the test process: it gives what a new interpreter
would (exit status, stdout, stderr) and leaves the test process as it was."""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    CONF,
    ROOT,
    _Captured,
    _exit_status,
    compose,
    entry_point,
    refusal,
    run_cli,
    run_module,
)


def _state() -> dict:
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    root = logging.getLogger()
    return {
        "environ": {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"},
        "cwd": os.getcwd(),
        "argv": list(sys.argv),
        "executable": sys.executable,
        "threads": torch.get_num_threads(),
        "tf32": (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32),
        "precision": torch.get_float32_matmul_precision(),
        "signals": {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)},
        "root": (root.level, list(root.handlers)),
        "levels": {n: logging.getLogger(n).level for n in ("hydra", "lightning", "lightning.pytorch")},
        "warnings": list(warnings.filters),
        "hydra": (GlobalHydra.instance().is_initialized(), HydraConfig.initialized()),
        "stdout": (sys.stdout, sys.stderr),
    }


def test_a_refusal_is_its_exit_status_and_one_line_and_the_process_is_left_as_it_was(tmp_path):
    for module in ("export", "train"):  # imported first: what an import sets stays, as with any import
        entry_point(module)
    before = _state()
    # a command line of another command's options: Hydra says so (status 1); then a refused launch (2)
    wrong = run_module("export", [f"hydra.run.dir={tmp_path / 'h'}", "iterations=3"], env={"ACT_X": "1"})
    assert wrong.returncode == 1 and "iterations" in wrong.stderr and wrong.stdout == ""
    line = refusal(run_module("train", ["debug=smoke", "hydra.run.dir=/sys/act-test-run"]))
    assert line.startswith("error: hydra.run.dir=/sys/act-test-run: cannot write into /sys (")
    assert _state() == before and "ACT_X" not in os.environ


def test_a_training_run_leaves_threads_tf32_logging_and_signals_as_they_were(tmp_path):
    before = _state()
    threads = f"threads={torch.get_num_threads() + 1}"  # set by the command, put back after it
    args = ["debug=smoke", "data=synthetic", "eval=null", "iterations=1", threads, "tf32=true"]
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finished at iteration 1" in result.stdout  # Hydra's log, to stdout
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert _state() == before


def test_help_is_on_stdout_with_status_0():
    cwd = os.getcwd()
    result = run_module("convert_diffusers", ["--help"], cwd=ROOT / "conf")
    assert os.getcwd() == cwd
    assert result.returncode == 0 and "DIR OUT" in result.stdout and result.stderr == ""
    assert result.args[:3] == [sys.executable, "-m", "act_lightning.convert_diffusers"]


def test_what_is_written_to_the_descriptors_and_through_earlier_handlers_is_captured():
    handler = logging.StreamHandler(sys.stderr)  # bound to the stream the test process had before
    log = logging.getLogger("tests.run_module")
    log.addHandler(handler)
    log.propagate = False
    try:
        with _Captured() as out:
            print("printed")
            os.write(1, b"fd 1\r\n")
            os.write(2, b"fd 2\n")
            log.warning("logged")
    finally:
        log.removeHandler(handler)
    assert out.stdout == "printed\nfd 1\n"  # text=True's newlines
    assert out.stderr == "fd 2\nlogged\n"
    assert handler.stream is sys.stderr


@pytest.mark.parametrize(
    "call, status, said",
    [
        (lambda: None, 0, ""),
        (lambda: sys.exit(), 0, ""),
        (lambda: sys.exit(3), 3, ""),
        (lambda: sys.exit(256 + 5), 5, ""),
        (lambda: sys.exit("error: words"), 1, "error: words\n"),
        (lambda: 1 / 0, 1, "ZeroDivisionError"),
    ],
)
def test_the_exit_status_is_the_interpreters(call, status, said):
    with _Captured() as out:
        assert _exit_status(call) == status
    assert said in out.stderr and (said or out.stderr == "")


def test_every_command_is_known_by_what_its_main_block_calls():
    for module in ("train", "evaluate", "sample", "edit", "export", "convert_reference", "convert_diffusers"):
        assert callable(entry_point(module))


# -- own_process: a child of the warm interpreter (tests.helpers_warm) --------------------------------------

PROBE = """
import json, os, sys
fresh = "act_lightning" in sys.modules or any(m.startswith("tests") for m in sys.modules)
from tests.helpers_warm import PRELOAD  # what the commands import (the libraries add warning filters)
for name in PRELOAD:
    __import__(name)
import torch, warnings
print(json.dumps({
    "argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "x": os.environ.get("ACT_X"),
    "ours_imported_before": fresh, "threads": torch.get_num_threads(),
    "filters": [repr(f) for f in warnings.filters],
}))
print("to fd 2", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.slow
def test_a_child_of_the_warm_interpreter_starts_as_a_new_interpreter_does(tmp_path):
    import subprocess

    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {
        "ACT_X": "1",
        "PYTHONWARNINGS": "ignore::UserWarning,error::FutureWarning",
        "PYTHONPATH": str(ROOT),
    }
    warm = run_module(script, ["3"], cwd=tmp_path, env=env, own_process=True)
    full = {**os.environ, **env}
    new = subprocess.run(
        [sys.executable, script, "3"], cwd=tmp_path, env=full, capture_output=True, text=True
    )
    assert warm.returncode == new.returncode == 3, warm.stderr[-3000:]
    assert warm.stdout == new.stdout and warm.stderr == new.stderr == "to fd 2\n"
    seen = __import__("json").loads(warm.stdout)
    assert seen["argv"] == [str(script), "3"] and seen["cwd"] == str(tmp_path) and seen["x"] == "1"
    assert seen["path0"] == str(tmp_path) and not seen["ours_imported_before"]


@pytest.mark.slow
def test_a_command_in_the_warm_interpreter_its_failures_and_its_timeout(tmp_path):
    import subprocess

    # (the probe above compares a child with a new interpreter; here: a command by its module name)
    helped = run_module("convert_diffusers", ["--help"], cwd=ROOT / "conf", own_process=True)
    assert helped.returncode == 0 and "DIR OUT" in helped.stdout and helped.stderr == ""
    script = tmp_path / "fail.py"
    script.write_text(
        "import gc, time, sys\n"
        "if sys.argv[1] == 'frozen':\n    sys.exit(0 if gc.get_freeze_count() > 100_000 else 5)\n"
        "if sys.argv[1] == 'sleep':\n    time.sleep(60)\n1 / 0\n"
    )
    failed = run_module(script, ["raise"], own_process=True)
    assert failed.returncode == 1 and "Traceback" in failed.stderr and "ZeroDivisionError" in failed.stderr
    with pytest.raises(subprocess.TimeoutExpired):
        run_module(script, ["sleep"], own_process=True, timeout=2)
    again = run_module(script, ["raise"], own_process=True)  # the server is still there for the next one
    assert again.returncode == 1
    # what the server imported is frozen (gc.freeze): the child's collections and its exit skip it (a new
    # interpreter, which ACT_TESTS_SUBPROCESS=1 starts, has frozen nothing)
    frozen = run_module(script, ["frozen"], own_process=True)
    warm = os.environ.get("ACT_TESTS_SUBPROCESS") != "1"
    assert frozen.returncode == (0 if warm else 5), frozen.stderr[-3000:]


# -- the launcher: what commands start as `sys.executable` is a child of the warm interpreter too ----------

STARTED = """
import json, os, sys
warm = "torch" in sys.modules  # imported before this script ran: a child of the warm interpreter
rank = None
if sys.argv[1] == "3":  # the run that compares ranks (Lightning's import: 8 s in a new interpreter here)
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    rank = rank_zero_only.rank
print(json.dumps({
    "argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "x": os.environ.get("ACT_X"),
    "ppid": os.getppid(), "rank": rank, "in": sys.stdin.read(),
    "ours_imported_before": "act_lightning" in sys.modules, "warm": warm,
    "streams": [
        [type(s.buffer).__name__, s.write_through, s.line_buffering] for s in (sys.stdout, sys.stderr)
    ],
}))
print("to fd 2", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""


def _launcher() -> str:
    from tests.helpers_warm import WarmInterpreter

    if os.environ.get("ACT_TESTS_SUBPROCESS") == "1":
        pytest.skip("ACT_TESTS_SUBPROCESS=1: no warm interpreter")
    launcher = WarmInterpreter.executable()
    if launcher == sys.executable:
        pytest.skip(
            "the launcher cannot run here (its folder is mounted noexec): commands start new interpreters"
        )
    return launcher


@pytest.mark.slow
def test_what_a_command_starts_with_sys_executable_sees_what_a_new_interpreter_would(tmp_path):
    """The launcher's child against the real interpreter, with the same script, input and environment:
    same output, exit status, parent (the starter), Lightning rank (LOCAL_RANK, as DDP's ranks have it)."""
    import json
    import subprocess

    launcher = _launcher()
    script = tmp_path / "started.py"
    script.write_text(STARTED)
    env = {**os.environ, "ACT_X": "1", "LOCAL_RANK": "1", "PYTHONPATH": str(ROOT)}
    seen = {}
    for name, python in (("warm", launcher), ("new", sys.executable)):
        how = {"cwd": tmp_path, "env": env, "capture_output": True, "text": True}
        seen[name] = subprocess.run([python, str(script), "3"], input="stdin text", **how)
    warm, new = seen["warm"], seen["new"]
    assert warm.returncode == new.returncode == 3, warm.stderr[-3000:]
    assert warm.stderr == new.stderr == "to fd 2\n"
    out, fresh = (json.loads(r.stdout) for r in (warm, new))
    assert out.pop("warm") and not fresh.pop("warm")  # the launcher's child did not import torch itself
    assert out == fresh
    assert out["ppid"] == os.getpid() and out["rank"] == 1 and out["in"] == "stdin text"
    assert out["argv"] == [str(script), "3"] and out["path0"] == str(tmp_path)
    assert not out["ours_imported_before"]
    # as `python -m`, by module name (what Lightning starts): the same child, run as a module
    module = subprocess.run([launcher, "-m", "started", "0"], input="", **how)
    assert module.returncode == 0 and json.loads(module.stdout)["argv"][0] == str(script)
    # `-u` (torchrun's workers are `python -u -m ...`): a child too, writing through as the real one does
    env.pop("PYTHONUNBUFFERED", None)  # (how's environment) without it, only -u makes them write through
    pythons = {"warm": launcher, "new": sys.executable}
    buffered, written_through = (
        [["BufferedWriter", False, False], ["BufferedWriter", False, True]],
        [["FileIO", True, False]] * 2,
    )
    for flags, streams in (([], buffered), (["-u"], written_through)):
        ran = {
            name: subprocess.run([py, *flags, str(script), "0"], input="", **how)
            for name, py in pythons.items()
        }
        assert ran["warm"].returncode == ran["new"].returncode == 0, ran["warm"].stderr[-3000:]
        out, fresh = (json.loads(ran[name].stdout) for name in pythons)
        assert out.pop("warm") and not fresh.pop("warm") and out == fresh and fresh["streams"] == streams
    # what the launcher does not run itself runs in the real interpreter
    real = subprocess.run(
        [launcher, "-c", "import sys; print(sys.executable)"], capture_output=True, text=True
    )
    assert real.returncode == 0 and real.stdout.strip() == sys.executable


def test_the_launcher_passes_descriptors_signals_and_exit_by_signal_and_takes_its_child_along(tmp_path):
    import subprocess
    import time

    launcher = _launcher()
    script = tmp_path / "signals.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "os.write(int(sys.argv[2]), f'{os.getpid()}\\n'.encode())\n"  # a descriptor passed on (pass_fds)
        "if sys.argv[1] == 'handle':\n"
        "    signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))\n"
        "elif sys.argv[1] == 'die':\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(60)\n"
    )

    def start(how: str) -> tuple[subprocess.Popen, int]:
        r, w = os.pipe()
        proc = subprocess.Popen([launcher, str(script), how, str(w)], pass_fds=[w])
        os.close(w)
        with os.fdopen(r) as f:
            return proc, int(f.readline())

    def catches_sigterm(pid: int) -> bool:  # its handler is in place (Linux: the caught-signals mask)
        status = Path(f"/proc/{pid}/status").read_text()
        mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
        return bool(int(mask, 16) >> (signal.SIGTERM - 1) & 1)

    proc, child = start("handle")
    deadline = time.monotonic() + 30  # the child sets its handler, and the launcher its forwarder, after
    while not (catches_sigterm(proc.pid) and catches_sigterm(child)):  # the pid is written: not a sleep
        assert time.monotonic() < deadline, "the handlers were not in place within 30 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # forwarded to the child, whose handler exits with 7
    assert proc.wait(30) == 7
    proc, _ = start("die")  # a child killed by a signal: the launcher is, by the same one
    assert proc.wait(30) == -signal.SIGTERM
    proc, child = start("sleep")
    assert child != proc.pid  # a child of the warm interpreter, not the launcher turned interpreter (exec)
    proc.kill()  # kill -9 of the launcher: its child goes too
    proc.wait(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the child {child} outlived its killed launcher")


def test_compose_gives_each_caller_a_copy_of_its_own_at_its_own_run_dir(tmp_path):
    """tests.conftest.compose composes each set of overrides once per test process and hands out copies: a
    copy is the config a fresh compose gives, with the caller's run_dir wherever it is interpolated, and
    what one test changes in its copy is not what the next one gets."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    import act_lightning  # noqa: F401  (its resolvers: act.lazy_beta2)

    overrides = ["debug=smoke", "data=synthetic", "eval=null"]
    first = compose(overrides, run_dir=str(tmp_path / "a"))
    first.model.optimizer.lr = 123.0
    first.data.batch_size = 7
    second = compose(overrides, run_dir=str(tmp_path / "b"))
    with initialize_config_dir(str(CONF), version_base="1.3"):
        fresh = hydra_compose("train", overrides=[f"run_dir={tmp_path / 'b'}", *overrides])
    assert OmegaConf.to_yaml(second, resolve=True) == OmegaConf.to_yaml(fresh, resolve=True)
    assert OmegaConf.is_struct(second) and second.data.batch_size == fresh.data.batch_size != 7
    assert second.model.optimizer.lr == fresh.model.optimizer.lr != 123.0
    assert str(tmp_path / "b") in second.callbacks.checkpoint.dirpath
    own = compose([*overrides, f"run_dir={tmp_path / 'c'}"], run_dir=str(tmp_path / "d"))
    assert own.run_dir == str(tmp_path / "c")  # an override of run_dir wins, as in a fresh compose


def test_a_config_file_changed_on_disk_is_read_again(tmp_path):
    """The tests' OmegaConf.load keeps each config text's parse (tests.conftest): a changed file is a new
    text, parsed anew, and a config built from a kept parse is a copy, not the kept object."""
    from omegaconf import OmegaConf

    path = tmp_path / "c.yaml"
    path.write_text("a: 1\nb: [1, 2]\n")
    first = OmegaConf.load(path)
    first.b.append(3)
    assert OmegaConf.load(path) == {"a": 1, "b": [1, 2]}
    path.write_text("a: 2\n")
    assert OmegaConf.load(path) == {"a": 2}
