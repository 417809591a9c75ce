"""What the chaos tests break on purpose: a PostgreSQL, a Redis and a network of their own.

Each test run starts a private PostgreSQL cluster and a private Redis on free ports, so that
restarting them mid-round disturbs nothing else on the machine (other test runs, a developer's
portal). A :class:`TcpProxy` sits between agents and the portal where a test needs to cut,
slow down or watch the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], T], timeout: float, what: str, every: float = 0.1) -> T:
    """``predicate()``'s first true value, polled every ``every`` s; AssertionError naming
    ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def _postgres_bin() -> Path | None:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def postgres_available() -> bool:
    return _postgres_bin() is not None


class PrivatePostgres:
    """A throwaway PostgreSQL cluster (trust auth, fsync off, synchronous commits) on a free
    port.

    PostgreSQL refuses to run as root: as root, the cluster is made and run as the ``postgres``
    user in a folder of its own under /tmp.
    """

    def __init__(self) -> None:
        binaries = _postgres_bin()
        if binaries is None:
            raise RuntimeError("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
        self.bin = binaries
        self.root = Path(tempfile.mkdtemp(prefix="fedportal-chaos-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / tool), *args]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=check, timeout=120)

    def url(self, database: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        # fsync off is safe here: a crash of the server (an immediate stop) keeps what the
        # kernel already holds. Commits stay synchronous: an asynchronous commit acknowledged
        # to a client can be lost in such a crash, which no deployment would accept.
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast``: sessions are cut, as in a restart; ``immediate``: as in a crash."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self, mode: str = "immediate", down_seconds: float = 1.0) -> None:
        self.stop(mode)
        time.sleep(down_seconds)
        self.start()

    def create_database(self, name: str) -> str:
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return self.url(name)

    def sql(self, database: str, query: str) -> str:
        done = self._run(
            "psql",
            *("-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database),
            *("-At", "-c", query),
        )
        return done.stdout.strip()

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateRedis:
    """A Redis of its own that keeps nothing on disk, like the portal's: a restart loses
    every queued task and every channel-layer group."""

    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="fedportal-chaos-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.root)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, 10, "the private Redis to answer")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), 0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def flush(self) -> None:
        """Drop every key: queued and unacknowledged tasks, channel-layer groups, socket
        claims. The server lives for the module, and a task left by one test would otherwise
        reach the next test's worker, naming ids that exist again in the next database."""
        with socket.create_connection(("127.0.0.1", self.port), 5) as sock:
            sock.sendall(b"FLUSHALL\r\n")
            answer = sock.recv(16)
        if not answer.startswith(b"+OK"):
            raise RuntimeError(f"the private Redis refused FLUSHALL: {answer!r}")

    def restart(self, down_seconds: float = 1.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class TcpProxy:
    """A TCP relay in front of the portal, for agents whose network a test disturbs.

    - :meth:`cut`: every open connection is dropped and new ones hang without an answer, as
      when a cable is pulled; :meth:`restore` ends that.
    - :meth:`throttle`: bytes towards the portal flow at most at this rate (slow uploads).
    - :meth:`uploads_in_flight`: connections that sent more than ``min_bytes`` towards the
      portal in the last second: bodies being uploaded.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.cut_off = False
        self.rate: float | None = None
        self._connections: set[_Relay] = set()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="tcp-proxy")
        self._thread.start()
        self._ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self.server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
            self._ready.set()
            await self.server.serve_forever()

        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(main())

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        relay = _Relay(self, reader, writer)
        self._connections.add(relay)
        try:
            await relay.run()
        finally:
            self._connections.discard(relay)

    def _call(self, fn: Callable[[], object]) -> None:
        done = threading.Event()

        def wrapped() -> None:
            try:
                fn()
            finally:
                done.set()

        self.loop.call_soon_threadsafe(wrapped)
        done.wait(10)

    def cut(self) -> None:
        def drop_all() -> None:
            self.cut_off = True
            for relay in list(self._connections):
                relay.abort()

        self._call(drop_all)

    def restore(self) -> None:
        def reopen() -> None:
            self.cut_off = False
            for relay in list(self._connections):
                if relay.held:
                    relay.abort()  # a connection made during the cut never got through

        self._call(reopen)

    def throttle(self, bytes_per_second: float | None) -> None:
        self.rate = bytes_per_second

    def uploads_in_flight(self, min_bytes: int = 64 * 1024) -> int:
        now = time.monotonic()
        return sum(
            1
            for relay in list(self._connections)
            if relay.upstream_bytes >= min_bytes and now - relay.last_upstream < 1.0
        )

    def close(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            for relay in list(self._connections):
                relay.abort()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        with contextlib.suppress(RuntimeError, TimeoutError):
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self._thread.join(5)


class _Relay:
    def __init__(
        self, proxy: TcpProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.proxy = proxy
        self.reader, self.writer = reader, writer
        self.upstream: asyncio.StreamWriter | None = None
        self.upstream_bytes = 0
        self.last_upstream = 0.0
        self.held = False
        self.tasks: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        if self.proxy.cut_off:
            # Accepted (the SYN got an answer before the cut) but nothing ever comes back.
            self.held = True
            with contextlib.suppress(Exception):
                while await self.reader.read(65536):
                    pass
            return
        try:
            up_reader, self.upstream = await asyncio.open_connection(
                "127.0.0.1", self.proxy.target_port
            )
        except OSError:
            self.writer.close()
            return
        self.tasks = [
            asyncio.ensure_future(self._pipe(self.reader, self.upstream, towards_portal=True)),
            asyncio.ensure_future(self._pipe(up_reader, self.writer, towards_portal=False)),
        ]
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.abort()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, towards_portal: bool
    ) -> None:
        try:
            while data := await reader.read(16384):
                if towards_portal:
                    self.upstream_bytes += len(data)
                    self.last_upstream = time.monotonic()
                    if self.proxy.rate:
                        await asyncio.sleep(len(data) / self.proxy.rate)
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                writer.write_eof()

    def abort(self) -> None:
        for task in self.tasks:
            task.cancel()
        for writer in (self.writer, self.upstream):
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.transport.abort()


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    """A small filesystem at ``path`` (root only): a disk that can be filled in a moment."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
        check=True,
        capture_output=True,
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def can_mount_tmpfs() -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = Path(tempfile.mkdtemp(prefix="fedportal-chaos-mount-"))
    try:
        with mounted_tmpfs(probe, 1 << 20):
            return True
    except (OSError, subprocess.CalledProcessError):
        return False
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()
