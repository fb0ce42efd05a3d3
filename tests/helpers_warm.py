"""A warm interpreter for the commands the tests run in processes of their own.

A new interpreter spends ~5 s importing torch, torchvision, Lightning, Hydra and W&B before the command
runs. The server below (this file run as a script, one per test session: `share`) imports those third-party
libraries once and then forks a child per command. The child sets up what a new interpreter would have
(argv, environment, working directory, sys.path[0], descriptors, stdout and stderr with their buffering,
PYTHONWARNINGS, OMP_NUM_THREADS) and runs the command as `python -m` does (`runpy._run_module_as_main`) or
as `python SCRIPT` does (`runpy.run_path`).
It imports act_lightning itself, and everything of this repository, for the first time: only the third-party
libraries were imported before. The child exits as an interpreter exits (atexit handlers, an uncaught
exception's traceback and status 1, SystemExit's status).

Each command is one connection to the server's Unix socket, carrying the request (JSON) and the command's
descriptors (SCM_RIGHTS), which the child puts at the same numbers. Two kinds of callers:
- the test process (`WarmInterpreter.popen`): stdin /dev/null, stdout and stderr to files;
- `python`, a launcher script the server's children (and the commands run in the test process, see
  tests.conftest.run_module) see as `sys.executable`: a command that starts `sys.executable -m MODULE ...`
  or `sys.executable SCRIPT ...` itself (Lightning's DDP processes, the benchmarks' runs) gets a child of
  the server too, with the launcher's descriptors (0, 1, 2 and any passed on, as joblib's workers have
  theirs), environment and working directory. The launcher is the
  process its starter knows (its pid, its exit status): it forwards signals to the child, a child killed
  by a signal kills it with the same one, and a launcher that is killed (SIGKILL) takes the child with it;
  the child's `os.getppid()` answers the launcher's parent, as the started process's own would, and
  Lightning's rank is read again from the child's environment; `-u` before either form (torchrun's
  workers) is kept. Anything else (`-c`, other interpreter options, a closed standard descriptor, no
  server) runs the real interpreter in the launcher's place (exec).

What needs an interpreter nobody prepared stays on `subprocess` with the real interpreter: a test of what
a command imports (test_export), one console script (the others' wrappers run in the test process),
signals, the probe below that compares the two.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
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

SOCKET, LAUNCHER = "socket", "python"
SHARED = "ACT_TESTS_WARM"  # the folder of a server shared by the test processes of a session (share)

# The launcher, written next to the socket by the test process (WarmInterpreter._start). `-IS`: no site,
# no environment: it starts in ~20 ms and needs only the standard library.
LAUNCHER_CODE = '''#!{real} -IS
"""`python` for the commands the tests start (tests/helpers_warm.py): a child of the warm interpreter
runs `-m MODULE ARGS` or `SCRIPT ARGS`, either after `-u`; anything else runs the real interpreter {real}."""
import json, os, signal, socket, sys

REAL, SERVER, LAUNCHER = {real!r}, {server!r}, {launcher!r}


def real():
    os.execv(REAL, [REAL, *sys.argv[1:]])


def open_descriptors():
    names = os.listdir("/proc/self/fd")  # the listing's own descriptor is closed again after it
    fds = set()
    for name in names:
        try:
            os.fstat(int(name))
            fds.add(int(name))
        except OSError:
            pass
    return fds


argv = sys.argv[1:]
unbuffered = argv[:1] == ["-u"]  # torchrun starts its workers as `python -u -m MODULE`
argv = argv[unbuffered:]
if argv[:1] == ["-m"] and len(argv) > 1:
    request = {{"module": argv[1], "script": None, "args": argv[2:]}}
elif argv and not argv[0].startswith("-"):
    request = {{"module": None, "script": argv[0], "args": argv[1:]}}
else:
    real()
fds = sorted(open_descriptors())  # 0, 1, 2 and what the starter passed on (pass_fds)
if fds[:3] != [0, 1, 2] or len(fds) > 250:
    real()  # a standard descriptor closed, or more than one message carries
request |= {{"cwd": os.getcwd(), "env": dict(os.environ), "ppid": os.getppid(), "executable": LAUNCHER}}
request["unbuffered"] = unbuffered
request["fds"] = fds
try:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(SERVER)
    socket.send_fds(conn, [json.dumps(request).encode() + b"\\n"], fds)
    answers = conn.makefile("rb")
    started = answers.readline()
except OSError:
    started = b""
if not started:
    real()  # no server (any more): nothing was started
pid = json.loads(started)["pid"]


def forward(signum, frame):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(signum, forward)
ended = answers.readline()
if not ended:
    sys.exit("the warm interpreter ended before the command it started (tests/helpers_warm.py)")
code = json.loads(ended)["returncode"]
if code < 0:
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
'''


# -- the server (this file run as a script) ---------------------------------------------------------------


def serve(folder: str) -> None:
    """Accepts one connection per command on FOLDER/socket: a JSON request and its descriptors in, then
    {"pid": ...} at once and {"returncode": ...} when the child has exited. Commands run side by side. A
    caller that closes its connection first takes its child with it (SIGKILL). Ends when stdin does."""
    import gc
    import warnings

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(folder, SOCKET))  # before the imports: callers queue until they are done
    listener.listen(64)
    os.dup2(2, 1)  # what the libraries print goes to stderr
    defaults = list(warnings.filters)  # the interpreter's (started without PYTHONWARNINGS)
    own = {os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    site = [p for p in sys.path[1:] if os.path.abspath(p) not in own]  # the interpreter's own path
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass
    # What the imports built lives as long as the server: out of the collector's sight (gc.freeze), so
    # that a child's collections, and the one an interpreter's exit runs, do not walk it again (1.5 s
    # of each child's exit), nor touch its pages, which the fork shares, as copy-on-write
    gc.freeze()
    # the filters the libraries added at import: in front of the defaults (filterwarnings) and after
    # them (append=True), where they are in any interpreter, whatever PYTHONWARNINGS put before them
    now, n = list(warnings.filters), len(defaults)
    start = next(i for i in range(len(now) - n + 1) if now[i : i + n] == defaults)
    added = (now[:start], now[start + n :])
    wake_r, wake_w = os.pipe()  # SIGCHLD wakes the loop
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    running: dict[int, socket.socket] = {}
    while True:
        ready, _, _ = select.select([sys.stdin, listener, wake_r, *running.values()], [], [])
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1024):
            break  # the test process has ended
        if wake_r in ready:
            os.read(wake_r, 4096)
        if listener in ready:
            conn = listener.accept()[0]
            pid = _start(conn, running, (listener, wake_r, wake_w), added, defaults, site)
            if pid is not None:
                running[pid] = conn
        for pid, conn in list(running.items()):
            if conn in ready and not _recv(conn):
                _kill(pid)  # its caller went away
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = running.pop(pid, None)
            if conn is not None:
                _answer(conn, {"returncode": os.waitstatus_to_exitcode(status)})
                conn.close()
    for pid in running:  # commands a finished test left behind
        _kill(pid)
    import shutil

    shutil.rmtree(folder, ignore_errors=True)  # also when the test process was killed


def _recv(conn: socket.socket) -> bytes:
    try:
        return conn.recv(1)
    except OSError:
        return b""


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _answer(conn: socket.socket, message: dict) -> None:
    try:
        conn.sendall(json.dumps(message).encode() + b"\n")
    except OSError:
        pass  # the caller has gone


def _start(conn, running, own, added, defaults, site) -> int | None:
    """Reads a request and forks its child; the child never returns from here."""
    message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 255)
    while message and not message.endswith(b"\n"):
        more = conn.recv(1 << 20)
        if not more:
            break
        message += more
    request = json.loads(message) if message.endswith(b"\n") else {}  # {}: the caller went away first
    if "fds" not in request or len(fds) != len(request["fds"]):
        for fd in fds:
            os.close(fd)
        conn.close()
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # the caller's descriptors at their numbers, and none of the server's: first out of the way of
        # both (above every number in use), then into place
        listener, wake_r, wake_w = own
        base = max([*request["fds"], *fds, listener.fileno(), wake_r, wake_w, conn.fileno()]) + 1
        moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, base) for fd in fds]
        for fd in fds:
            os.close(fd)
        for sock in (listener, conn, *running.values()):
            sock.close()
        os.close(wake_r)
        os.close(wake_w)
        for fd, target in zip(moved, request["fds"], strict=True):
            os.dup2(fd, target)  # inheritable, as the caller's were
            os.close(fd)
        _become(request, added, defaults, site)  # ends in SystemExit or an exception: the interpreter exits
    for fd in fds:
        os.close(fd)
    _answer(conn, {"pid": pid})
    return pid


def _become(request: dict, added: tuple, defaults: list, site: list) -> None:
    """In the child: become `python -m MODULE ARGS` (or `python SCRIPT ARGS`) as a new interpreter is."""
    import runpy
    import warnings

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.executable = request["executable"]  # what this command starts as `python` is warm too
    rank_zero = sys.modules.get("lightning.fabric.utilities.rank_zero")
    if rank_zero is not None:  # read from RANK, LOCAL_RANK, ... when Lightning is imported: this process's
        rank_zero.rank_zero_only.rank = rank_zero._get_rank() or 0  # noqa: SLF001 (DDP's other ranks)
    if request.get("ppid") is not None:
        ppid = request["ppid"]
        os.getppid = lambda: ppid  # the launcher's parent, which started "this" process
    # PYTHONWARNINGS as the interpreter reads it at start-up: in front of its defaults, each option in
    # front of the ones before it; the libraries' own filters come later, at import, in front of all
    sys.warnoptions[:] = [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w]
    warnings.filters[:] = defaults
    for option in sys.warnoptions:
        warnings._setoption(option)  # noqa: SLF001
    warnings.filters[:0] = added[0]
    warnings.filters.extend(added[1])
    warnings._filters_mutated()  # noqa: SLF001
    _standard_streams(bool(request.get("unbuffered") or os.environ.get("PYTHONUNBUFFERED")))
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


_SERVERS_STREAMS: list = []  # the server's sys.stdout and sys.stderr, kept: they would close 1 and 2


def _standard_streams(unbuffered: bool) -> None:
    """sys.stdout and sys.stderr as a new interpreter sets them up: written through with `-u` or
    PYTHONUNBUFFERED (the server's follow the server's start), otherwise buffered, stderr and a terminal
    line by line."""
    import io

    _SERVERS_STREAMS.extend([sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__])
    for name, fd in (("stdout", 1), ("stderr", 2)):
        old = getattr(sys, name)
        raw = io.FileIO(fd, "w", closefd=False)
        binary = raw if unbuffered else io.BufferedWriter(raw)
        lines = not unbuffered and (name == "stderr" or os.isatty(fd))
        stream = io.TextIOWrapper(
            binary, old.encoding, old.errors, line_buffering=lines, write_through=unbuffered
        )
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


# -- the client (in the test process) ----------------------------------------------------------------------


class WarmProcess:
    """A command running as a child of the warm interpreter, used as `subprocess.Popen(cmd, stdout=PIPE,
    stderr=PIPE, text=True)` is: pid, poll, wait, send_signal, kill, communicate, returncode."""

    def __init__(self, conn: socket.socket, args: list[str], tmp: tempfile.TemporaryDirectory) -> None:
        self.conn, self.args, self._tmp, self._buffer = conn, args, tmp, b""
        self.returncode: int | None = None
        self.pid: int = self._answer(300)["pid"]  # the server may still be importing

    def _answer(self, timeout: float | None) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.conn], [], [], left)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            more = self.conn.recv(65536)
            if not more:
                raise RuntimeError(f"the warm interpreter ended before answering for {self.args}")
            self._buffer += more
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self.conn], [], [], 0)[0]:
            self.wait()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._answer(timeout)["returncode"]
            self.conn.close()
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
    _folder: str | None = None
    _runs: dict[str, bool] = {}  # launcher: whether it runs here

    @classmethod
    def executable(cls) -> str:
        """The launcher (`python` for the commands the tests start), the server started if it is not; the
        real interpreter where the launcher cannot run (a folder mounted noexec)."""
        cls._start()
        launcher = os.path.join(cls._folder, LAUNCHER)
        if cls._runs.get(launcher) is None:
            try:
                ran = subprocess.run([launcher, "-c", "0"], timeout=60).returncode == 0  # execs the real one
            except OSError:
                ran = False
            cls._runs[launcher] = ran
        return launcher if cls._runs[launcher] else sys.executable

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
        launcher = cls.executable()
        tmp = tempfile.TemporaryDirectory(prefix="warm-")
        request = {"module": module, "script": script, "args": args, "cwd": str(cwd), "env": env}
        request |= {"executable": launcher, "fds": [0, 1, 2]}
        flags = os.O_WRONLY | os.O_CREAT
        fds = [os.open(os.devnull, os.O_RDONLY)]
        fds += [os.open(f"{tmp.name}/{name}", flags, 0o600) for name in ("stdout", "stderr")]
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(os.path.join(cls._folder, SOCKET))
            socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], fds)
        finally:
            for fd in fds:
                os.close(fd)
        return WarmProcess(conn, cmd, tmp)

    @classmethod
    def share(cls) -> None:
        """Starts the server now, for this process and the processes it starts (pytest-xdist's workers):
        they find it by SHARED in their environment. One set of imports for the whole session."""
        cls._start()
        os.environ[SHARED] = cls._folder

    @classmethod
    def _start(cls) -> None:
        if cls._server is not None and cls._server.poll() is None:
            return
        shared = os.environ.get(SHARED)
        if shared and cls._server is None and os.path.exists(os.path.join(shared, SOCKET)):
            cls._folder = shared  # the session's server (share), in the process that started it
            return
        # a socket's path has at most 107 bytes: a long $TMPDIR (macOS's) gives way to /tmp
        folder = tempfile.mkdtemp(prefix="act-warm-", dir="/tmp" if len(tempfile.gettempdir()) > 80 else None)
        launcher = os.path.join(folder, LAUNCHER)
        address = os.path.join(folder, SOCKET)
        Path(launcher).write_text(
            LAUNCHER_CODE.format(real=sys.executable, server=address, launcher=launcher)
        )
        os.chmod(launcher, 0o755)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # the defaults (serve)
        server = subprocess.Popen(
            [sys.executable, __file__, folder],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parents[1],
        )
        deadline = time.monotonic() + 60
        while not os.path.exists(address):  # bound before the imports: ~0.1 s
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the warm interpreter did not start: {server.poll()}")
            time.sleep(0.01)
        cls._server, cls._folder = server, folder
        atexit.register(cls.stop)

    @classmethod
    def stop(cls) -> None:
        """Stops the server this process started (not a shared one that another process started)."""
        if cls._server is not None:
            if cls._server.poll() is None:
                cls._server.stdin.close()  # it ends its loop, and any command a test left behind
                try:
                    cls._server.wait(2)
                except subprocess.TimeoutExpired:  # still importing (a session without commands)
                    cls._server.kill()
                    cls._server.wait(30)
            import shutil

            shutil.rmtree(cls._folder, ignore_errors=True)
            if os.environ.get(SHARED) == cls._folder:
                del os.environ[SHARED]
        cls._server = cls._folder = None


if __name__ == "__main__":
    serve(sys.argv[1])
