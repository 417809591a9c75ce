"""A fork server for client scripts: import torch once, start each site in milliseconds.

A fresh Python process spends about 1.5 s of CPU importing torch before a client script's
first line runs, and N sites on a 2-core laptop pay that N times over. The fork server is a
clean child process (``python -m client_agent.forkserver``) that imports torch, numpy and the
Client API, plus the third-party modules a script imports at its top, and then forks one
child per site. It never runs a torch operation, so it has no threads to lose in a fork, and
the sites share the imported pages copy-on-write.

Requests and replies are JSON lines on the server's stdin and stdout; nothing is pickled.
With ``--listen PATH`` the server instead takes connections on a Unix socket (mode 0600) and
serves each the same way: PocEnv runs one for all its agents, so one machine imports torch
once rather than once per site (agents find it through ``FEDPORTAL_FORKSERVER_SOCKET``).

    → {"op": "preload", "modules": [...]}
    → {"op": "spawn", "id": 7, "script": …, "args": […], "workdir": …, "log": …, "env": {…}}
    ← {"op": "spawned", "id": 7, "pid": 1234}
    ← {"op": "exited", "pid": 1234, "code": 0}        (negative: killed by that signal)

The server exits when its stdin closes (its parent went away); its children then notice
that their runtime socket closed and end as they do at the end of a job.
"""

from __future__ import annotations

import ast
import contextlib
import gc
import importlib
import io
import json
import os
import runpy
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

# torch._dynamo: the first optimizer a process makes imports it (about 1 s of CPU).
BASE_PRELOAD = ("torch", "numpy", "torch.optim", "torch._dynamo", "client_agent.api")


# --------------------------------------------------------------------------------------------
# The server process
# --------------------------------------------------------------------------------------------


def _run_script(request: dict[str, Any]) -> None:
    """In the forked child: become ``python script.py args`` with output in the log file."""
    os.setsid()  # its own session, like start_new_session: a terminal's Ctrl-C goes to the env
    log_fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.close(null_fd)
    # sys.stdout and sys.stderr wrap fds 1 and 2, which now point at the log file.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=True)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    env: dict[str, str] = request["env"]
    with contextlib.suppress(OSError):  # show the site in `top` and `ps -o comm`
        Path("/proc/self/comm").write_text(env.get("FEDPORTAL_SITE_NAME", "fedportal-site")[:15])
    os.environ.clear()
    os.environ.update(env)
    os.chdir(request["workdir"])
    threads = env.get("OMP_NUM_THREADS", "")
    torch_module = sys.modules.get("torch")
    if torch_module is not None and threads.isdigit():
        # OpenMP read its environment when the server imported torch; apply the site's value.
        torch_module.set_num_threads(int(threads))
    script = request["script"]
    sys.argv = [script, *request["args"]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


def _child_main(request: dict[str, Any]) -> None:
    code = 0
    try:
        _run_script(request)
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
    os._exit(code)


class _Channel:
    """One parent's requests and replies: the server's stdin/stdout, or a Unix-socket
    connection when the server is shared (``--listen``)."""

    def __init__(self, read_fd: int, write: Any) -> None:
        self.read_fd = read_fd
        self._write = write
        self.buffered = b""
        self.open = True

    def reply(self, message: dict[str, Any]) -> None:
        if not self.open:
            return
        try:
            self._write((json.dumps(message) + "\n").encode())
        except OSError:
            self.open = False  # that parent went away; its children end on their own


def _stdout_write(data: bytes) -> None:
    out = sys.__stdout__.buffer  # type: ignore[union-attr]
    out.write(data)
    out.flush()


def _freeze_loaded() -> None:
    """Set aside what the server has loaded (torch, NumPy, the Client API: a few hundred
    thousand objects) from the garbage collector's passes, in the server and so in every
    script it forks.

    A script's full collection walked all of them. A PocEnv's scripts do the same work, so
    they reached it at the same round: a hundred at once kept a two-core machine busy for a
    second, and that round took half as long again as the others (``bench/scale_out.py``,
    round 6 of 12, in every run). Untouched, the inherited pages also stay shared with the
    server instead of being copied into each script by the collector's writes."""
    gc.collect()
    gc.freeze()


def serve(listen: str | None = None) -> None:
    """Serve spawn requests from the parent on stdin, or, with ``listen`` (a Unix socket
    path), from every process that connects: one server, and one torch import, for all the
    agents PocEnv runs on one machine. The stdin server exits when its stdin closes; a
    shared one when it is terminated."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select() through the wakeup fd
    channels: dict[int, _Channel] = {}
    owners: dict[int, _Channel] = {}  # child pid → the parent to tell when it exits
    listener: socket.socket | None = None
    if listen:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(listen)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(listen)
        os.chmod(listen, 0o600)
        listener.listen(64)
    else:
        stdin_fd = sys.stdin.buffer.fileno()
        channels[stdin_fd] = _Channel(stdin_fd, _stdout_write)
    connections: dict[int, socket.socket] = {}
    # After binding: agents may connect while torch imports; their requests wait in the socket.
    for module in BASE_PRELOAD:
        importlib.import_module(module)
    _freeze_loaded()

    def reap() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            owner = owners.pop(pid, None)
            if owner is not None:
                owner.reply({"op": "exited", "pid": pid, "code": os.waitstatus_to_exitcode(status)})

    while True:
        watched: list[int] = [wake_r, *channels, *([listener.fileno()] if listener else [])]
        ready, _, _ = select.select(watched, [], [], 1.0)
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)
        reap()
        if listener is not None and listener.fileno() in ready:
            conn, _ = listener.accept()
            connections[conn.fileno()] = conn
            channels[conn.fileno()] = _Channel(conn.fileno(), conn.sendall)
        for fd in [fd for fd in ready if fd in channels]:
            channel = channels[fd]
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                channel.open = False
                del channels[fd]
                if listener is None:
                    return  # the parent went away
                connections.pop(fd).close()
                continue
            channel.buffered += chunk
            while b"\n" in channel.buffered:
                line, channel.buffered = channel.buffered.split(b"\n", 1)
                request = json.loads(line)
                if request["op"] == "preload":
                    for module in request["modules"]:
                        # A module that fails here fails again, with its real error, in the site.
                        with contextlib.suppress(Exception):
                            importlib.import_module(module)
                    _freeze_loaded()
                elif request["op"] == "spawn":
                    pid = os.fork()
                    if pid == 0:
                        os.close(wake_r)
                        os.close(wake_w)
                        signal.set_wakeup_fd(-1)
                        for inherited in (listener, *connections.values()):
                            if inherited is not None:
                                inherited.close()
                        _child_main(request)
                    owners[pid] = channel
                    channel.reply({"op": "spawned", "id": request["id"], "pid": pid})


# --------------------------------------------------------------------------------------------
# The client side, used by ScriptProcess
# --------------------------------------------------------------------------------------------


def _top_level_imports(path: Path) -> list[str]:
    """The modules ``path`` imports at its top: what to preload, a speed-up only, so a file
    that cannot be read or parsed preloads nothing (the script then imports it itself)."""
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return []
    except SystemError:
        # CPython 3.11 before 3.11.8 keeps the AST validator's recursion depth per
        # interpreter, not per thread (python/cpython#106905): a compile in another thread at
        # the same moment makes ast.parse fail spuriously (seen once in a full test run).
        return []
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def third_party_imports(script: Path) -> list[str]:
    """Modules a script imports at its top, directly or through its own folder's modules,
    that are not files of that folder (``data.py`` importing ``sklearn.datasets`` counts)."""
    folder = script.parent
    local = {p.stem for p in folder.iterdir() if p.suffix == ".py" or p.is_dir()}
    found: dict[str, None] = {}
    seen: set[Path] = set()
    pending = [script]
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _top_level_imports(path):
            top = name.split(".")[0]
            if top not in local:
                found.setdefault(name)
            elif (folder / f"{top}.py").is_file():
                pending.append(folder / f"{top}.py")
    return list(found)


class ForkedProcess:
    """A site forked by the server, with the part of ``subprocess.Popen``'s interface we use."""

    def __init__(self, server: ForkServer, pid: int) -> None:
        self._server = server
        self.pid = pid

    @property
    def returncode(self) -> int | None:
        return self._server.exit_code(self.pid)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self._server.wait_exit(self.pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0)
        return code

    def _signal(self, signum: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)


class ForkServer:
    """The parent's handle on a fork server; thread-safe.

    Its own child process by default; with ``address``, a connection to a shared server
    that another process started (``python -m client_agent.forkserver --listen PATH``).
    """

    def __init__(self, address: str | None = None) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._exits: dict[int, int] = {}
        self._spawned: dict[int, int] = {}
        self._next_id = 0
        self._preloaded: set[str] = set()
        self._proc: subprocess.Popen[bytes] | None = None
        replies: IO[bytes]
        if address:
            self._socket: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._socket.connect(address)
            self._stdin: IO[bytes] = self._socket.makefile("wb")
            replies = self._socket.makefile("rb")
        else:
            self._socket = None
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "client_agent.forkserver"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": _pythonpath()},
                start_new_session=True,
            )
            assert self._proc.stdin is not None and self._proc.stdout is not None
            self._stdin = self._proc.stdin
            replies = self._proc.stdout
        self._reader = threading.Thread(target=self._read_replies, args=(replies,), daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self._reader.is_alive()

    def _read_replies(self, stdout: IO[bytes]) -> None:
        for line in stdout:
            message = json.loads(line)
            with self._cond:
                if message["op"] == "spawned":
                    self._spawned[message["id"]] = message["pid"]
                elif message["op"] == "exited":
                    self._exits[message["pid"]] = message["code"]
                self._cond.notify_all()
        with self._cond:  # the server is gone: no more replies will come
            self._cond.notify_all()

    def _send(self, message: dict[str, Any]) -> None:
        self._stdin.write(json.dumps(message).encode() + b"\n")
        self._stdin.flush()

    def preload(self, modules: Sequence[str]) -> None:
        with self._lock:
            fresh = [m for m in modules if m not in self._preloaded]
            self._preloaded.update(fresh)
            if fresh:
                self._send({"op": "preload", "modules": fresh})

    def spawn(
        self, *, script: Path, args: Sequence[str], workdir: Path, log: Path, env: dict[str, str]
    ) -> ForkedProcess:
        with self._cond:
            self._next_id += 1
            request_id = self._next_id
            self._send(
                {
                    "op": "spawn",
                    "id": request_id,
                    "script": str(script),
                    "args": list(args),
                    "workdir": str(workdir),
                    "log": str(log),
                    "env": env,
                }
            )
            while request_id not in self._spawned:
                if not self.alive:
                    raise RuntimeError("the client-script fork server exited")
                self._cond.wait(timeout=1.0)
            return ForkedProcess(self, self._spawned.pop(request_id))

    def exit_code(self, pid: int) -> int | None:
        with self._lock:
            return self._exits.get(pid)

    def wait_exit(self, pid: int, timeout: float | None) -> int | None:
        with self._cond:
            self._cond.wait_for(lambda: pid in self._exits or not self.alive, timeout)
            return self._exits.get(pid)


def _pythonpath() -> str:
    root = str(Path(__file__).resolve().parent.parent)
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)


_server: ForkServer | None = None
_server_lock = threading.Lock()


ENV_SHARED_SERVER = "FEDPORTAL_FORKSERVER_SOCKET"


def get_server() -> ForkServer:
    """This process's fork server, started on first use (and again if it died); or, when
    ``FEDPORTAL_FORKSERVER_SOCKET`` names one, a connection to a shared server."""
    global _server
    with _server_lock:
        if _server is None or not _server.alive:
            _server = ForkServer(os.environ.get(ENV_SHARED_SERVER) or None)
        return _server


if __name__ == "__main__":
    serve(sys.argv[2] if len(sys.argv) > 2 and sys.argv[1] == "--listen" else None)
