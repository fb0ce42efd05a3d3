import ast
import copy
import fcntl
import gc
import importlib
import importlib.util
import io
import logging
import os
import random
import runpy
import shlex
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any

import pytest

from tests.helpers_warm import WarmInterpreter

os.environ["WANDB_MODE"] = "offline"  # tests never reach the network, whatever the shell exported
os.environ.setdefault("WANDB_SILENT", "true")


def pytest_configure(config):
    """One cache folder per test session (the digits classifier's weights, act_lightning.metrics.digits),
    shared by its worker processes and the commands they start, never the user's ~/.cache: each session
    trains the classifier once, then reads it."""
    if not os.environ.get("PYTEST_XDIST_WORKER") and "ACT_LIGHTNING_CACHE" not in os.environ:
        config._act_cache = tempfile.mkdtemp(prefix="act-tests-cache-")
        os.environ["ACT_LIGHTNING_CACHE"] = config._act_cache
    # One warm interpreter (tests.helpers_warm) for the session's test processes, importing while they
    # collect; they start their commands' processes from it.
    if not os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("ACT_TESTS_SUBPROCESS") != "1":
        WarmInterpreter.share()


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: it sees the gpu markers added here
def pytest_collection_modifyitems(config, items):
    """Every test skipped without CUDA carries the `gpu` marker (`-m gpu` selects them all: the device
    check's cuda_tests). The long tests (marked slow) first, the rest in file order after them: the
    workers (xdist's worksteal) take their tests from the front and give tests away from the back, so the
    last ones left, which decide when the suite ends, are short and the two workers finish together."""
    for item in items:
        reasons = [str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif")]
        if any(r.startswith(("needs a CUDA device", "needs CUDA")) for r in reasons):
            item.add_marker(pytest.mark.gpu)
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_collection_finish(session):
    """What collection imported (torch, Lightning, Hydra, diffusers, the tests) lives as long as the test
    process: out of the collector's sight (gc.freeze), so that the collections while the tests run do not
    walk it again and again. torch's settings as the tests will start with them are taken here."""
    _PRISTINE[:] = [TorchSettings()]
    gc.freeze()


def pytest_unconfigure(config):
    gc.freeze()  # nothing the tests made needs collecting now: the process's exit skips that walk (~2 s)
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        WarmInterpreter.stop()
    folder = getattr(config, "_act_cache", None)
    if folder:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop("ACT_LIGHTNING_CACHE", None)


if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several test processes share the cores: one thread each (and in the training runs they start), or
    # their thread pools oversubscribe the machine and every process slows to a crawl.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
# What the tests' commands run with: W&B offline (tests never reach the network), warnings not printed
COMMAND_ENV = {"WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}


def _parse_each_config_text_once() -> None:
    """Composing a config (about 770 times a suite: `compose` below, which copies the 130 repeats, and
    every command run in a test process) parses the same few dozen YAML files again each time, with
    PyYAML's pure-Python parser: a quarter of a compose's 0.2 s. OmegaConf.load keeps what each text parsed
    to, keyed by the text itself (a file changed since parses anew), and builds the config from a copy of
    it, as it would from a fresh parse: the same config, the same errors (a text that fails to parse is not
    kept)."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf._utils import get_yaml_loader

    load = OmegaConf.load
    parsed: dict[str, Any] = {}

    def cached_load(file_):
        if isinstance(file_, (str, Path)):
            with open(os.path.abspath(file_), encoding="utf-8") as f:
                text = f.read()
        elif hasattr(file_, "read"):
            text = file_.read()
        else:
            return load(file_)  # its own TypeError
        if not isinstance(text, str):
            return load(io.StringIO(text.decode("utf-8")))
        if text not in parsed:
            obj = yaml.load(text, Loader=get_yaml_loader())
            if obj is not None and not isinstance(obj, (list, dict, str)):
                return load(io.StringIO(text))  # OmegaConf's own error
            parsed[text] = obj
        obj = copy.deepcopy(parsed[text])
        return OmegaConf.create() if obj is None else OmegaConf.create(obj)

    OmegaConf.load = staticmethod(cached_load)


_parse_each_config_text_once()


def _torch_before(major: int, minor: int) -> bool:
    from importlib.metadata import version

    return tuple(int(p) for p in version("torch").split("+")[0].split(".")[:2]) < (major, minor)


# benchmarks/capture_check.py (and bench_train.py's report of CUDA-graph skips) patch inductor's CUDA-graph
# internals as torch 2.11 (the GPU machine's) and 2.14 have them; 2.9.1 and 2.7.1 name and return them
# otherwise (2.10: untried). The library itself does not depend on them.
needs_inductor_2_11 = pytest.mark.skipif(
    _torch_before(2, 11), reason="the CUDA-graph check patches inductor internals of torch >= 2.11"
)


_COMPOSED: dict[tuple[str, ...], Any] = {}  # compose's configs by their overrides, run_dir unset
_RUN_DIR_UNSET = "/act-test-run-dir-unset"


def compose(overrides: list[str] | None = None, run_dir: str = "/tmp/act-test-run"):
    """The training config as `python -m act_lightning.train <overrides>` would see it.

    A test process composes each set of overrides once (a suite asks for about 130 of its 430 configs a
    second time; a compose costs 0.15 s, a copy 0.006 s): every caller gets a copy of its own, with
    run_dir set afterwards. No value is computed from run_dir when composing (it is only interpolated:
    `${run_dir}/...`), so the copy is the config that composing with this run_dir gives: over a whole
    suite, each copy's YAML (resolved and not) and flags equalled a fresh compose's (2026-12-07)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    key = tuple(overrides or [])
    if key not in _COMPOSED:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            _COMPOSED[key] = hydra_compose("train", overrides=[f"run_dir={_RUN_DIR_UNSET}", *key])
    cfg = copy.deepcopy(_COMPOSED[key])
    if cfg.run_dir == _RUN_DIR_UNSET:  # not when an override set run_dir itself
        cfg.run_dir = run_dir
    return cfg


# -- the commands, run in this process ---------------------------------------------------------------


def run_module(
    module: str | Path,
    args: list[str],
    *,
    cwd: str | Path = ROOT,
    env: dict[str, str | None] | None = None,
    timeout: float | None = None,
    own_process: bool = False,
) -> subprocess.CompletedProcess:
    """`python -m act_lightning.<module> ARGS` (or `python SCRIPT ARGS` when `module` is a Path or a name
    ending in .py; a console script is such a file) run as a user would, with its exit status and its output:
    in this process (the test process has torch and Lightning imported already, a new interpreter takes
    seconds to import them), or with `own_process=True` in a process of its own (what needs one: DDP's
    several processes, a test that the command starts as `python -m`): a child forked from an interpreter
    that has imported the third-party libraries and nothing of this repository (tests.helpers_warm; ~5 s
    less per command). ACT_TESTS_SUBPROCESS=1 runs every call in a new interpreter instead.

    In this process: sys.argv is the command's, `env` is put over os.environ (None removes a variable), the
    working directory is `cwd`, and what the command writes to file descriptors 1 and 2 (print, logging,
    progress bars, C code) is its stdout and stderr. The exit status is what the interpreter would exit
    with (an uncaught exception: its traceback on stderr, status 1). Afterwards the process is as before:
    environment, directory, threads, TF32 and determinism flags, random states, signal handlers, logging,
    warnings filters, Hydra's global state, no W&B run left open. `timeout` applies to a subprocess only."""
    args = [str(a) for a in args]
    script, cmd = _command(module, args)
    if own_process or os.environ.get("ACT_TESTS_SUBPROCESS") == "1":
        full = dict(os.environ)
        for key, value in (env or {}).items():
            if value is None:
                full.pop(key, None)
            else:
                full[key] = value
        proc = start_module(module, args, cwd=cwd, env=full)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # as subprocess.run kills its child and waits for it
            proc.wait(60)
            raise
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if script:

        def call():  # as the interpreter runs a script: its folder first on sys.path (put back afterwards)
            sys.path.insert(0, str(Path(script).parent))
            runpy.run_path(script, run_name="__main__")

        program = script
    else:
        call = entry_point(module)
        program = importlib.util.find_spec(f"act_lightning.{module}").origin  # as `python -m` sets argv[0]
    # what the command starts as `python` (sys.executable: Lightning's DDP processes, the benchmarks' runs)
    # is a child of the warm interpreter too
    launcher = WarmInterpreter.executable()
    with _ProcessState([program, *args], env or {}, cwd, launcher) as state, _Captured() as out:
        try:
            with warnings.catch_warnings():
                _python_warnings(os.environ.get("PYTHONWARNINGS", ""))
                returncode = _exit_status(call)
        finally:
            state.close_run()  # while the output is captured: what it flushes is the command's
    return subprocess.CompletedProcess(cmd, returncode, out.stdout, out.stderr)


def _command(module: str | Path, args: list[str]) -> tuple[str | None, list[str]]:
    """The script (None for a module of act_lightning) and the command line, as run_module takes them."""
    script = str(module) if isinstance(module, Path) or module.endswith(".py") else None
    if script:
        return script, [sys.executable, script, *args]
    return None, [sys.executable, "-m", f"act_lightning.{module}", *args]


def start_module(module: str | Path, args: list[str], *, cwd: str | Path = ROOT, env: dict[str, str]):
    """`python -m act_lightning.<module> ARGS` (or `python SCRIPT ARGS`, as run_module) started in a process
    of its own and returned running, as `subprocess.Popen(..., stdout=PIPE, stderr=PIPE, text=True)` is (to
    be signalled, killed, waited for): a child of the warm interpreter (tests.helpers_warm), or a new
    interpreter when ACT_TESTS_SUBPROCESS=1. `env` is the whole environment."""
    args = [str(a) for a in args]
    script, cmd = _command(module, args)
    if os.environ.get("ACT_TESTS_SUBPROCESS") == "1":
        pipe = subprocess.PIPE
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=pipe, stderr=pipe, text=True)
    name = None if script else f"act_lightning.{module}"
    return WarmInterpreter.popen(cmd, module=name, script=script, args=args, cwd=cwd, env=env)


def entry_point(module: str):
    """What `python -m act_lightning.<module>` calls: the module's `main`, as its `if __name__ ==
    "__main__":` block calls it (read from the source, so logic added there is not skipped silently)."""
    name = f"act_lightning.{module}"
    mod = importlib.import_module(name)
    tree = ast.parse(Path(mod.__file__).read_text())
    blocks = [
        node.body
        for node in tree.body
        if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'"
    ]
    assert len(blocks) == 1, f"{name} has {len(blocks)} `if __name__ == '__main__':` blocks"
    code = tuple(ast.unparse(statement) for statement in blocks[0])
    if code in (("main()",), (f"from {name} import main as _main", "_main()")):
        return lambda: mod.main()
    if code in (("raise SystemExit(main())",), ("sys.exit(main())",)):

        def exit_with_main():
            raise SystemExit(mod.main())

        return exit_with_main
    raise AssertionError(
        f"{name}'s `if __name__ == '__main__':` block is {code}: tests.conftest.entry_point does not know "
        "what it calls (teach it, or run this command in a subprocess)"
    )


def _exit_status(call) -> int:
    """The status the interpreter would exit with after `call()`."""
    try:
        call()
    except SystemExit as stop:
        code = stop.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code & 0xFF
        print(code, file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc(file=sys.stderr)
        return 1
    return 0


def _python_warnings(spec: str) -> None:
    """What $PYTHONWARNINGS (plain actions such as `ignore`) does at an interpreter's start; warnings are
    printed to stderr, as an interpreter does, not collected by pytest."""

    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = show
    for action in filter(None, spec.split(",")):
        assert ":" not in action, f"PYTHONWARNINGS={spec}: run_module knows plain actions only"
        warnings.simplefilter(action)


class _Captured:
    """File descriptors 1 and 2 (and sys.stdout, sys.stderr, and logging handlers that write to them) into
    temporary files; `stdout` and `stderr` as `subprocess.run(..., text=True)` would give them."""

    def __enter__(self):
        self.files = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
        self.streams = (sys.stdout, sys.stderr)
        for stream in self.streams:
            stream.flush()
        self.saved_fds = [os.dup(1), os.dup(2)]
        try:
            for fd, f in zip((1, 2), self.files):
                os.dup2(f.fileno(), fd)
            sys.stdout, sys.stderr = (
                open(fd, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)
                for fd in (1, 2)
            )
            # Handlers made before (pytest's capture streams are not descriptors 1 and 2) write here too
            self.handlers = [
                (handler, handler.stream)
                for handler in _all_handlers()
                if isinstance(handler, logging.StreamHandler) and handler.stream in self.streams
            ]
            for handler, stream in self.handlers:
                handler.setStream(sys.stdout if stream is self.streams[0] else sys.stderr)
        except BaseException:
            self._restore()
            raise
        return self

    def _restore(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        for handler, stream in getattr(self, "handlers", ()):
            handler.setStream(stream)
        sys.stdout, sys.stderr = self.streams
        for fd, saved in zip((1, 2), self.saved_fds):
            os.dup2(saved, fd)
            os.close(saved)

    def __exit__(self, *exc) -> None:
        self._restore()
        self.stdout, self.stderr = (self._read(f) for f in self.files)

    @staticmethod
    def _read(f) -> str:
        with f:
            f.seek(0)
            text = f.read().decode("utf-8", errors="replace")
        return text.replace("\r\n", "\n").replace("\r", "\n")  # text=True's universal newlines


def _all_handlers() -> list[logging.Handler]:
    loggers = [logging.root, *logging.root.manager.loggerDict.values()]
    return [h for lg in loggers if isinstance(lg, logging.Logger) for h in lg.handlers]


SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT]
# W&B's token of its service process, which lives as long as this process (or until wandb.teardown) and
# which W&B sets and clears itself: what a command left there is W&B's, not the command's
W_AND_B_OWN = {"WANDB_SERVICE"}


class TorchSettings:
    """torch's process-wide settings that a run changes (act_lightning.process.apply_process_settings: TF32,
    threads; cuDNN's and the deterministic switches), as they are now; `restore` puts them back."""

    def __init__(self) -> None:
        import torch

        backends = torch.backends
        self.flags = [
            (obj, attr, getattr(obj, attr))
            for obj, attr in (
                (backends.cuda.matmul, "allow_tf32"),
                (backends.cudnn, "allow_tf32"),
                (backends.cudnn, "benchmark"),
                (backends.cudnn, "deterministic"),
                *(  # torch >= 2.9: TF32 as fp32_precision, set when allow_tf32 is (older: absent)
                    (obj, "fp32_precision")
                    for obj in (
                        backends,
                        backends.cuda.matmul,
                        backends.cudnn,
                        getattr(backends.cudnn, "conv", None),
                        getattr(backends.cudnn, "rnn", None),
                        backends.mkldnn,
                        getattr(backends.mkldnn, "matmul", None),
                        getattr(backends.mkldnn, "conv", None),
                        getattr(backends.mkldnn, "rnn", None),
                    )
                    if hasattr(obj, "fp32_precision")
                ),
            )
        ]
        self.precision = torch.get_float32_matmul_precision()
        self.deterministic = (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        )
        self.threads = torch.get_num_threads()

    def restore(self) -> None:
        import torch

        for obj, attr, value in self.flags:
            if getattr(obj, attr) != value:
                setattr(obj, attr, value)
        if torch.get_float32_matmul_precision() != self.precision:
            torch.set_float32_matmul_precision(self.precision)
        if (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        ) != self.deterministic:
            torch.use_deterministic_algorithms(self.deterministic[0], warn_only=self.deterministic[1])
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)


_PRISTINE: list[TorchSettings] = []  # the settings the test process had before its first test


@pytest.fixture(autouse=True)
def _torch_settings_kept():
    """Every test starts with the settings the test process started with, and leaves them so: a run
    trained in the test's own process (`train(compose(...))`, also in a session's fixture) sets TF32 on,
    which Dynamo's guards see, so a compile test after one recompiled (CI's test order decides which
    test runs after which)."""
    if not _PRISTINE:  # (taken as collection finished; here if a plugin skipped that hook)
        _PRISTINE.append(TorchSettings())
    _PRISTINE[0].restore()
    yield
    _PRISTINE[0].restore()


class _ProcessState:
    """What a command changes in its process, put back afterwards (see run_module)."""

    def __init__(self, argv: list[str], env: dict[str, str | None], cwd: str | Path, executable: str) -> None:
        self.command_argv, self.env, self.cwd, self.command_executable = argv, env, cwd, executable

    def __enter__(self):
        import numpy as np
        import torch

        self.torch_settings = TorchSettings()
        self.rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())  # noqa: NPY002
        self.signals = {signum: signal.getsignal(signum) for signum in SIGNALS}
        self.loggers = {
            lg: (lg.level, list(lg.handlers), lg.propagate, lg.disabled)
            for lg in [logging.root, *logging.root.manager.loggerDict.values()]
            if isinstance(lg, logging.Logger)
        }
        self.environ = dict(os.environ)
        self.argv, self.path, self.dir = list(sys.argv), list(sys.path), os.getcwd()
        self.executable = sys.executable
        self.umask = os.umask(0o022)
        os.umask(self.umask)
        self.hydra_config = _hydra_config().cfg
        self.wandb_env = any(
            key.startswith("WANDB_") and os.environ.get(key) != value for key, value in self.env.items()
        )
        try:
            if self.wandb_env:
                _wandb_teardown()  # W&B reads its variables once per process
            # a new interpreter: no launch name from an earlier command here (act_lightning.resolvers)
            os.environ.pop("ACT_LAUNCH", None)
            for key, value in self.env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            sys.argv = list(self.command_argv)
            sys.executable = self.command_executable
            os.chdir(self.cwd)
        except BaseException:
            self.__exit__()
            raise
        return self

    def close_run(self) -> None:
        """Ends what the command left open (a W&B run, its log files), while its output is captured."""
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None:
            wandb.finish()
        # A joblib launcher's multirun leaves loky's reusable executor and its workers in the process, where
        # a command's own process would end with them. A later command (the same n_jobs) would reuse them:
        # its workers, children of the warm interpreter, report a pid that is not the one loky started, so
        # after their idle timeout (300 s) they wait 30 s for a release that never comes and exit 0, which
        # failed a later joblib multirun once with TerminatedWorkerError "exit codes {EXIT(0)}".
        loky = sys.modules.get("joblib.externals.loky.reusable_executor")
        if loky is not None and loky._executor is not None:
            loky._executor.shutdown(wait=True, kill_workers=True)
            loky._executor = loky._executor_kwargs = None
        for lg, (level, handlers, propagate, disabled) in self.loggers.items():
            for handler in lg.handlers:
                if handler not in handlers:
                    handler.close()
            if lg.level != level:  # setLevel empties every logger's cache: ~0.2 s for all ~470 of them
                lg.setLevel(level)
            lg.handlers[:] = handlers
            lg.propagate, lg.disabled = propagate, disabled

    def __exit__(self, *exc) -> None:
        import numpy as np
        import torch

        try:
            from hydra.core.global_hydra import GlobalHydra

            if GlobalHydra.instance().is_initialized():
                GlobalHydra.instance().clear()
            _hydra_config().cfg = self.hydra_config
        finally:
            os.chdir(self.dir)
            sys.argv[:], sys.path[:] = self.argv, self.path
            sys.executable = self.executable
            for key in [k for k in os.environ if k not in self.environ and k not in W_AND_B_OWN]:
                del os.environ[key]
            for key, value in self.environ.items():
                if os.environ.get(key) != value and key not in W_AND_B_OWN:
                    os.environ[key] = value
            if self.wandb_env:
                _wandb_teardown()
            os.umask(self.umask)
            for signum, handler in self.signals.items():
                if handler is not None and signal.getsignal(signum) is not handler:
                    signal.signal(signum, handler)
            self.torch_settings.restore()
            torch.set_rng_state(self.rng[0])
            np.random.set_state(self.rng[1])  # noqa: NPY002
            random.setstate(self.rng[2])


def _hydra_config():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.instance()


def _wandb_teardown() -> None:
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        wandb.teardown()


def run_cli(args: list[str], run_dir: Path, timeout: int = 600, *, own_process: bool = False):
    """`python -m act_lightning.train ARGS hydra.run.dir=RUN_DIR`, as a user runs it (run_module)."""
    args = [*args, f"hydra.run.dir={run_dir}"]
    return run_module("train", args, env=COMMAND_ENV, timeout=timeout, own_process=own_process)


def run_make(target: str, variables: dict[str, str], env: dict[str, str | None] | None = None):
    """`make TARGET VAR=VALUE ...` as the Makefile runs it: the recipe's commands are read with `make -n`
    (what make would run, with the variables substituted), and each `PY -m act_lightning.<command> ...`
    line runs through run_module, in order, stopping at the first failure as make does. A line of any other
    form fails the test (run the target itself then). Returns the results, one per command."""
    cmd = ["make", "-s", "-n", target, f"PY={sys.executable}", "STAMP="]
    cmd += [f"{key}={value}" for key, value in variables.items()]
    listed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    results = []
    for line in filter(None, listed.stdout.splitlines()):
        argv = shlex.split(line)
        assert argv[:2] == [sys.executable, "-m"] and argv[2].startswith("act_lightning."), (
            f"make {target}: {line!r} is not a `$(PY) -m act_lightning.<command>` line"
        )
        results.append(run_module(argv[2].removeprefix("act_lightning."), argv[3:], env=env))
        if results[-1].returncode != 0:
            break
    return results


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
def as_if_on_gpu(monkeypatch):
    """model.speed.flex_attention on the CPU as on a GPU: compiled graphs take the flex_attention path, and
    flex_attention allows a backward there (its dense reference implementation; test_attention.py)."""
    import torch
    import torch.nn.attention.flex_attention as flex

    import act_lightning.nn.attention as attention_module

    monkeypatch.setattr(attention_module, "FLEX_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(flex, "_validate_device", lambda *tensors: None)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


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
