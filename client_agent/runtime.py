"""The local runtime: runs one site's client script as a child process and talks to it.

``SimEnv`` starts one :class:`ScriptProcess` per site; the site agent starts one per job. The
script finds its runtime through environment variables (:data:`ENV_ADDR` and friends), opens
the Unix socket named there, proves it is the child we started with a one-time token, and
then receives tasks and sends results as JSON frames (:mod:`client_agent.wire`). Weights never
cross the socket: the runtime names a safetensors file to read and one to write.

Message types, runtime → script: ``welcome``, ``task``, ``end``; script → runtime: ``hello``,
``result``, ``log``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from client_agent import forkserver
from client_agent import frames as wire
from client_agent.analytics import LogRecordError, received_frame

log = logging.getLogger(__name__)

ENV_ADDR = "FEDPORTAL_RUNTIME_ADDR"
ENV_TOKEN = "FEDPORTAL_RUNTIME_TOKEN"
ENV_SITE = "FEDPORTAL_SITE_NAME"
ENV_JOB = "FEDPORTAL_JOB_ID"

TASK_TRAIN = "train"
TASK_VALIDATE = "validate"
TASK_SUBMIT_MODEL = "submit_model"

_PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ScriptFailed(RuntimeError):
    """The client script exited, or broke the protocol, before finishing its task."""

    def __init__(self, site: str, reason: str, log_tail: str = "") -> None:
        self.site = site
        self.reason = reason
        self.log_tail = log_tail
        message = f"client script of {site} {reason}"
        if log_tail:
            message += f"\n--- last lines of {site}'s output ---\n{log_tail}"
        super().__init__(message)


@dataclass(frozen=True)
class Task:
    """One unit of work for a site. ``model_path`` is read-only for the script."""

    task_id: str
    task_name: str
    model_path: str | None
    result_path: str
    current_round: int
    total_rounds: int
    start_round: int = 0
    meta: Mapping[str, Any] = field(default_factory=dict)

    def to_frame(self) -> dict[str, Any]:
        return {
            "type": "task",
            "task_id": self.task_id,
            "task_name": self.task_name,
            "model_path": self.model_path,
            "result_path": self.result_path,
            "current_round": self.current_round,
            "total_rounds": self.total_rounds,
            "start_round": self.start_round,
            "meta": dict(self.meta),
        }


LogHandler = Callable[[dict[str, Any]], None]


def tail(path: Path, max_lines: int = 25, max_bytes: int = 16384) -> str:
    """The last lines of a text file, for error messages."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-max_lines:])


class ScriptProcess:
    """One client script in its own process, with its stdout and stderr in ``log_path``.

    Not thread-safe: one thread drives a given site. The child is started by :meth:`start`
    and connects when it calls ``flare.init()``; :meth:`run_task` waits for that connection.
    """

    def __init__(
        self,
        *,
        script: Path,
        args: Sequence[str],
        site_name: str,
        job_id: str,
        workdir: Path,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        python: str = sys.executable,
        connect_timeout: float = 300.0,
        client_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.script = Path(script).resolve()
        self.args = list(args)
        self.site_name = site_name
        self.job_id = job_id
        self.workdir = Path(workdir).resolve()
        self.log_path = Path(log_path).resolve()
        self.extra_env = dict(env or {})
        self.python = python
        self.connect_timeout = connect_timeout
        # The job's add_client_config() values: the script reads them with flare.get_config().
        self.client_config = dict(client_config or {})
        self._proc: subprocess.Popen[bytes] | forkserver.ForkedProcess | None = None
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._sockdir: str | None = None
        self._token = secrets.token_hex(16)
        self._log_file: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        # Unix socket paths are limited to ~108 bytes, so the socket lives in a short private
        # temporary folder (mode 0700), not in the possibly deep workspace.
        self._sockdir = tempfile.mkdtemp(prefix="fedportal-")
        address = os.path.join(self._sockdir, "rt.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(address)
        self._listener.listen(1)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(self.extra_env)
        env.update(
            {
                ENV_ADDR: address,
                ENV_TOKEN: self._token,
                ENV_SITE: self.site_name,
                ENV_JOB: self.job_id,
                "PYTHONUNBUFFERED": "1",
                # The script imports client_agent even when the project is not installed.
                "PYTHONPATH": os.pathsep.join(
                    p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
                ),
            }
        )
        if self.python == sys.executable:
            # Fork from the warm fork server (torch already imported): see client_agent.forkserver.
            server = forkserver.get_server()
            server.preload(forkserver.third_party_imports(self.script))
            self._proc = server.spawn(
                script=self.script, args=self.args, workdir=self.workdir, log=self.log_path, env=env
            )
        else:
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the child
            self._proc = subprocess.Popen(
                [self.python, str(self.script), *self.args],
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        log.debug("started %s for %s (pid %s)", self.script.name, self.site_name, self._proc.pid)

    # -- connection -----------------------------------------------------------------------

    def _failed(self, reason: str) -> ScriptFailed:
        return ScriptFailed(self.site_name, reason, tail(self.log_path))

    def _exit_reason(self) -> str | None:
        assert self._proc is not None
        code = self._proc.poll()
        if code is None:
            return None
        return f"exited with code {code}"

    def _ensure_connected(self) -> socket.socket:
        if self._conn is not None:
            return self._conn
        if self._proc is None or self._listener is None:
            raise RuntimeError("ScriptProcess.start() was not called")
        deadline = time.monotonic() + self.connect_timeout
        while True:
            ready, _, _ = select.select([self._listener], [], [], 0.05)
            if ready:
                break
            reason = self._exit_reason()
            if reason:
                raise self._failed(f"{reason} before calling flare.init()")
            if time.monotonic() > deadline:
                raise self._failed(f"did not call flare.init() within {self.connect_timeout:.0f} s")
        conn, _ = self._listener.accept()
        conn.settimeout(30)
        try:
            hello = wire.recv_frame(conn)
        except (OSError, wire.WireFormatError) as exc:
            conn.close()
            raise self._failed(f"sent a bad hello: {exc}") from None
        if hello.get("type") != "hello" or not secrets.compare_digest(
            str(hello.get("token", "")), self._token
        ):
            conn.close()
            raise self._failed("connected without the runtime token")
        conn.settimeout(None)
        wire.send_frame(
            conn,
            {
                "type": "welcome",
                "site_name": self.site_name,
                "job_id": self.job_id,
                "client_config": self.client_config,
            },
        )
        self._conn = conn
        return conn

    # -- tasks ----------------------------------------------------------------------------

    def run_task(
        self, task: Task, *, on_log: LogHandler | None = None, timeout: float | None = None
    ) -> Path:
        """Send ``task`` and block until the script sends its result; returns the result file.

        ``log`` frames that arrive meanwhile are checked and go to ``on_log``, with their
        numeric points as ``(key, value)`` pairs in ``message["points"]``
        (:func:`client_agent.analytics.received_frame`). Raises :class:`ScriptFailed`
        when the script exits, breaks the protocol or exceeds ``timeout`` seconds.
        """
        conn = self._ensure_connected()
        try:
            wire.send_frame(conn, task.to_frame())
        except OSError:
            raise self._failed(self._wait_exit_reason()) from None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._failed(f"did not finish task {task.task_name} within {timeout} s")
                conn.settimeout(remaining)
            try:
                message = wire.recv_frame(conn)
            except TimeoutError:
                continue
            except (ConnectionError, OSError):
                raise self._failed(self._wait_exit_reason()) from None
            except wire.WireFormatError as exc:
                raise self._failed(f"broke the protocol: {exc}") from None
            kind = message["type"]
            if kind == "log":
                try:
                    message = received_frame(message)
                except LogRecordError as exc:
                    raise self._failed(f"sent a bad log record: {exc}") from None
                if on_log is not None:
                    on_log(message)
            elif kind == "result" and message.get("task_id") == task.task_id:
                return Path(task.result_path)
            else:
                raise self._failed(f"sent an unexpected {kind!r} message")

    def _wait_exit_reason(self) -> str:
        assert self._proc is not None
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "closed its connection to the runtime"
        return f"exited with code {self._proc.returncode} during its task"

    def stop(self, *, grace: float = 10.0) -> int | None:
        """Tell the script the job is over, wait ``grace`` seconds, then terminate it."""
        if self._conn is not None:
            with contextlib.suppress(OSError):  # the script may be gone already
                wire.send_frame(self._conn, {"type": "end"})
        code: int | None = None
        if self._proc is not None:
            try:
                code = self._proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._proc.terminate()
                try:
                    code = self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    code = self._proc.wait()
        for closable in (self._conn, self._listener, self._log_file):
            if closable is not None:
                closable.close()
        self._conn = self._listener = self._log_file = None
        if self._sockdir:
            shutil.rmtree(self._sockdir, ignore_errors=True)
            self._sockdir = None
        return code
