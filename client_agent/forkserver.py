"""A fork server for client scripts: import torch once, start each site in milliseconds.

A fresh Python process spends about 1.5 s of CPU importing torch before a client script's
first line runs, and N sites on a 2-core laptop pay that N times over. The fork server is a
clean child process (``python -m client_agent.forkserver``) that imports torch, numpy and the
Client API, plus the third-party modules a script imports at its top, and then forks one
child per site. It never runs a torch operation, so it has no threads to lose in a fork, and
the sites share the imported pages copy-on-write.

Requests and replies are JSON lines on the server's stdin and stdout; nothing is pickled.

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
import importlib
import io
import json
import os
import runpy
import select
import signal
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


def _reply(message: dict[str, Any]) -> None:
    sys.__stdout__.write(json.dumps(message) + "\n")  # type: ignore[union-attr]
    sys.__stdout__.flush()  # type: ignore[union-attr]


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _reply({"op": "exited", "pid": pid, "code": os.waitstatus_to_exitcode(status)})


def serve() -> None:
    for module in BASE_PRELOAD:
        importlib.import_module(module)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select() through the wakeup fd
    stdin = sys.stdin.buffer
    buffered = b""
    while True:
        ready, _, _ = select.select([stdin, wake_r], [], [], 1.0)
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)
        _reap()
        if stdin not in ready:
            continue
        chunk = os.read(stdin.fileno(), 65536)
        if not chunk:
            return  # the parent went away
        buffered += chunk
        while b"\n" in buffered:
            line, buffered = buffered.split(b"\n", 1)
            request = json.loads(line)
            if request["op"] == "preload":
                for module in request["modules"]:
                    # A module that fails here fails again, with its real error, in the site.
                    with contextlib.suppress(Exception):
                        importlib.import_module(module)
            elif request["op"] == "spawn":
                pid = os.fork()
                if pid == 0:
                    os.close(wake_r)
                    os.close(wake_w)
                    signal.set_wakeup_fd(-1)
                    _child_main(request)
                _reply({"op": "spawned", "id": request["id"], "pid": pid})


# --------------------------------------------------------------------------------------------
# The client side, used by ScriptProcess
# --------------------------------------------------------------------------------------------


def _top_level_imports(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (OSError, SyntaxError, ValueError):
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
    """The parent's handle on one fork server process; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._exits: dict[int, int] = {}
        self._spawned: dict[int, int] = {}
        self._next_id = 0
        self._preloaded: set[str] = set()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "client_agent.forkserver"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": _pythonpath()},
            start_new_session=True,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._stdin: IO[bytes] = self._proc.stdin
        self._reader = threading.Thread(
            target=self._read_replies, args=(self._proc.stdout,), daemon=True
        )
        self._reader.start()

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

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


def get_server() -> ForkServer:
    """This process's fork server, started on first use (and again if it died)."""
    global _server
    with _server_lock:
        if _server is None or not _server.alive:
            _server = ForkServer()
        return _server


if __name__ == "__main__":
    serve()
