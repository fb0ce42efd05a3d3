"""A warm interpreter for the commands the tests start as processes of their own.

A new interpreter spends ~5 s importing torch, torchvision, Lightning, Hydra and W&B before the command
runs. The server below (this file run as a script, one per test process) imports those third-party
libraries once and then forks a child per command. The child sets up what a new interpreter would have
(argv, environment, working directory, sys.path[0], stdin from /dev/null, stdout and stderr to files,
PYTHONWARNINGS, OMP_NUM_THREADS) and runs the command as `python -m` does
(`runpy._run_module_as_main`) or as `python SCRIPT` does (`runpy.run_path`). It imports act_lightning
itself, and everything of this repository, for the first time: only the third-party libraries were
imported before. The child exits as an interpreter exits (atexit handlers, an uncaught exception's
traceback and status 1, SystemExit's status), and is a real process: DDP starts the command again
from it (`python -m act_lightning.train ...`, new interpreters for the other ranks).

What needs an interpreter nobody prepared stays on `subprocess`: a test of what a command imports
(test_export), the console scripts, signals, the memory probe.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# What the commands import from outside this repository, in import order (the heavy ones first).
PRELOAD = (
    "numpy",
    "torch",
    "torchvision",
    "scipy.linalg",
    "omegaconf",
    "hydra",
    "hydra.main",
    "hydra.utils",
    "torchmetrics",
    "lightning",
    "lightning.pytorch",
    "einops",
    "diffusers",
)  # not wandb: its import makes a media folder that the first child to exit would remove for all


# -- the server (this file run as a script) ---------------------------------------------------------------


def serve() -> None:
    """Reads one JSON request per line on stdin, forks, answers {"pid": ...} at once and
    {"returncode": ...} when the child has exited. One command at a time."""
    import warnings

    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # what the libraries print goes to stderr, not into the answers
    defaults = list(warnings.filters)  # the interpreter's (started without PYTHONWARNINGS)
    own = {os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    site = [p for p in sys.path[1:] if os.path.abspath(p) not in own]  # the interpreter's own path
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass
    # the filters the libraries added at import: in front of the defaults (filterwarnings) and after
    # them (append=True), where they are in any interpreter, whatever PYTHONWARNINGS put before them
    now, n = list(warnings.filters), len(defaults)
    start = next(i for i in range(len(now) - n + 1) if now[i : i + n] == defaults)
    added = (now[:start], now[start + n :])
    print(json.dumps({"ready": os.getpid()}), file=answers)
    for line in sys.stdin.buffer:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            answers.close()
            _become(
                request, added, defaults, site
            )  # ends in SystemExit or an exception: the interpreter exits
        print(json.dumps({"pid": pid}), file=answers)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), file=answers)


def _become(request: dict, added: tuple, defaults: list, site: list) -> None:
    """In the child: become `python -m MODULE ARGS` (or `python SCRIPT ARGS`) as a new interpreter is."""
    import runpy
    import warnings

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(out, fd)
        os.close(out)
    # PYTHONWARNINGS as the interpreter reads it at start-up: in front of its defaults, each option in
    # front of the ones before it; the libraries' own filters come later, at import, in front of all
    sys.warnoptions[:] = [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w]
    warnings.filters[:] = defaults
    for option in sys.warnoptions:
        warnings._setoption(option)  # noqa: SLF001
    warnings.filters[:0] = added[0]
    warnings.filters.extend(added[1])
    warnings._filters_mutated()  # noqa: SLF001
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        import torch

        torch.set_num_threads(int(threads))
    module, script = request.get("module"), request.get("script")
    # as `python -m` puts the working directory first and `python SCRIPT` the script's folder, then
    # $PYTHONPATH, then the interpreter's own folders
    first = os.getcwd() if module else str(Path(script).resolve().parent)
    extra = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [first, *extra, *site]
    if module:
        sys.argv = ["-m", *request["args"]]
        runpy._run_module_as_main(module, alter_argv=True)  # noqa: SLF001 (what `python -m` calls)
    else:
        sys.argv = [script, *request["args"]]
        runpy.run_path(script, run_name="__main__")
    raise SystemExit(0)


# -- the client (in the test process) ----------------------------------------------------------------------


class WarmProcess:
    """A command running as a child of the warm interpreter, used as `subprocess.Popen(cmd, stdout=PIPE,
    stderr=PIPE, text=True)` is: pid, poll, wait, send_signal, kill, communicate, returncode."""

    def __init__(self, server: subprocess.Popen, args: list[str], tmp: tempfile.TemporaryDirectory) -> None:
        self.server, self.args, self._tmp = server, args, tmp
        self.pid: int = WarmInterpreter.answer(server, 60)["pid"]
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self.server.stdout], [], [], 0)[0]:
            self.wait()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = WarmInterpreter.answer(self.server, timeout, self.args)["returncode"]
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def output(self) -> tuple[str, str]:
        folder = Path(self._tmp.name)
        return (folder / "stdout").read_text(), (folder / "stderr").read_text()

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired as e:
            e.output, e.stderr = self.output()
            raise
        out = self.output()
        self._tmp.cleanup()
        return out


class WarmInterpreter:
    """The test process's server, started at its first use and stopped at exit."""

    _server: subprocess.Popen | None = None

    @classmethod
    def popen(
        cls,
        cmd: list[str],
        *,
        module: str | None,
        script: str | None,
        args: list[str],
        cwd,
        env: dict[str, str],
    ) -> WarmProcess:
        """`cmd` (as the record has it) started as `python -m MODULE ARGS` or `python SCRIPT ARGS`."""
        server = cls._start()
        tmp = tempfile.TemporaryDirectory(prefix="warm-")
        request = {"module": module, "script": script, "args": args, "cwd": str(cwd), "env": env}
        request |= {"stdout": f"{tmp.name}/stdout", "stderr": f"{tmp.name}/stderr"}
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        return WarmProcess(server, cmd, tmp)

    @classmethod
    def run(cls, cmd: list[str], *, timeout: float | None, **how) -> subprocess.CompletedProcess:
        """`cmd` run as `subprocess.run(cmd, capture_output=True, text=True, timeout=...)` would."""
        proc = cls.popen(cmd, **how)
        try:
            out, err = proc.communicate(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # as subprocess.run kills its child
            proc.communicate(60)
            raise
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    @classmethod
    def _start(cls) -> subprocess.Popen:
        if cls._server is not None and cls._server.poll() is None:
            return cls._server
        env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # the defaults (above)
        server = subprocess.Popen(
            [sys.executable, __file__],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        cls._server = server
        atexit.register(cls.stop)
        cls.answer(server, 300)  # {"ready": pid}: the libraries are imported
        return server

    @staticmethod
    def answer(server: subprocess.Popen, timeout: float | None, cmd=None) -> dict:
        ready, _, _ = select.select([server.stdout], [], [], timeout)
        if not ready:
            raise subprocess.TimeoutExpired(cmd or server.args, timeout)
        line = server.stdout.readline()
        if not line:
            raise RuntimeError(f"the warm interpreter (pid {server.pid}) exited: {server.poll()}")
        return json.loads(line)

    @classmethod
    def stop(cls) -> None:
        if cls._server is not None and cls._server.poll() is None:
            cls._server.stdin.close()
            cls._server.wait(30)
        cls._server = None


if __name__ == "__main__":
    serve()
