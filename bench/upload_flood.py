"""Anonymous and badly signed 1 GB uploads against a real portal: what they cost the server.

Starts the portal's server (``python -m fedportal.serve``) on a fresh SQLite database with its
own TMPDIR, then sends, each on its own connection:

1. an anonymous ``POST /api/v1/projects/`` announcing and streaming 1 GB;
2. ``PUT /api/v1/agent/jobs/<uid>/rounds/0/update/`` streaming 1 GB, signed with a certificate
   the portal does not know (well-formed headers, wrong signer);
3. for comparison, what a known sender may do: a person with a valid API token submitting a
   1 GB multipart job bundle (to a project they cannot see: the view answers 404 once Django
   has read the body);

and samples the server's RSS and what it holds in its TMPDIR (files there, and files it keeps
open there: Twisted's temporary files are unlinked at once) while each runs. The client stops
sending once an answer arrives (as curl does). With ``--compare-daphne`` it does the same
against plain Daphne serving the same application (the server before this guard: it stores a
body before the application sees it).

Then it opens ``--slow`` connections (600) that each send a request line and one more header
byte every second, never the end of the headers, and counts how many the server still holds
open after ``--slow-seconds`` (20; the header timeout is 10 s).

    .venv/bin/python bench/upload_flood.py [--size-mib 1024] [--compare-daphne]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import select
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import benchlib
from benchlib.portal import migrated_database, served_portal, served_portal_env

CHUNK = 1 << 20


def tmpdir_bytes(pid: int, tmpdir: Path) -> int:
    """Bytes the server holds under ``tmpdir``: files there, and its open files there."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for path in tmpdir.rglob("*"):
        try:
            st = path.stat()
        except OSError:
            continue
        seen.add((st.st_dev, st.st_ino))
        total += st.st_size
    for fd in Path(f"/proc/{pid}/fd").glob("*"):
        try:
            if not os.readlink(fd).startswith(str(tmpdir)):
                continue
            st = os.stat(fd)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


class Sampler:
    """Peak RSS and TMPDIR bytes of the server, sampled every 20 ms in a thread."""

    def __init__(self, pid: int, tmpdir: Path) -> None:
        self.pid, self.tmpdir = pid, tmpdir
        self.peak_rss = 0
        self.peak_tmp = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_rss = max(self.peak_rss, benchlib.proc_status_kib("VmRSS", self.pid))
                self.peak_tmp = max(self.peak_tmp, tmpdir_bytes(self.pid, self.tmpdir))
            except (OSError, KeyError):
                return
            self._stop.wait(0.02)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Outcome:
    answer: str
    sent_mib: float
    seconds: float
    rss_before: float
    rss_peak: float
    rss_after: float
    tmp_peak: float
    tmp_after: float


def flood(
    port: int, head: bytes, size: int, tail: bytes = b"", *, chunked: bool = False
) -> tuple[str, int, float]:
    """Send ``head``, ``size`` zero bytes and ``tail``, stopping at the first answer or close;
    returns the status line (or what ended it), the bytes sent and the seconds taken.
    ``chunked``: the body in chunked transfer coding, 1 MiB a chunk, then the last chunk."""
    started = time.monotonic()
    sent = 0
    block = b"\0" * CHUNK
    with socket.create_connection(("127.0.0.1", port), timeout=600) as sock:
        sock.sendall(head)
        answer = b""
        try:
            while sent < size:
                readable, writable, _ = select.select([sock], [sock], [], 60)
                if readable:
                    break
                if not writable:
                    continue
                length = min(CHUNK, size - sent)
                if chunked:
                    sock.sendall(b"%x\r\n" % length + block[:length] + b"\r\n")
                    sent += length
                else:
                    sent += sock.send(block[:length])
            if sent == size:
                sock.sendall(b"0\r\n\r\n" + tail if chunked else tail)
            sock.settimeout(600)  # everything sent (or answered): wait for the answer
            answer = sock.recv(65536)
        except (BrokenPipeError, ConnectionResetError) as exc:
            return f"connection closed ({type(exc).__name__})", sent, time.monotonic() - started
    status = answer.split(b"\r\n", 1)[0].decode("latin-1") or "closed without an answer"
    return status, sent, time.monotonic() - started


def slow_headers(port: int, count: int, seconds: float) -> int:
    """Open ``count`` connections that never finish their headers; how many are still open
    after ``seconds``."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        socks.append(sock)
    open_socks = set(range(count))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for index in list(open_socks):
            try:
                socks[index].sendall(b"X")
            except OSError:
                open_socks.discard(index)
        time.sleep(1)
    for index in list(open_socks):
        socks[index].setblocking(False)
        try:
            if socks[index].recv(1) == b"":
                open_socks.discard(index)
        except BlockingIOError:
            pass  # nothing to read: still open
        except OSError:
            open_socks.discard(index)
    for sock in socks:
        sock.close()
    return len(open_socks)


def run_server(
    label: str,
    command: tuple[str, ...],
    env: dict[str, str],
    size: int,
    key: str,
    slow: tuple[int, float],
) -> tuple[list[tuple[str, ...]], int]:
    tmpdir = Path(env["TMPDIR"])
    log_path = Path(env["FEDPORTAL_DATA_DIR"]) / f"{label}.log"
    with (
        open(log_path, "wb") as log,
        served_portal(env, label, command, log) as (proc, port),
    ):
        rows: list[tuple[str, ...]] = []
        for name, head, tail in requests(size, key):
            time.sleep(1)
            before = benchlib.proc_status_kib("VmRSS", proc.pid)
            with Sampler(proc.pid, tmpdir) as sampler:
                answer, sent, seconds = flood(port, head, size, tail)
                time.sleep(2)  # the server finishes with the request (or its linger ends)
            outcome = Outcome(
                answer=answer,
                sent_mib=sent / 2**20,
                seconds=seconds,
                rss_before=before / 1024,
                rss_peak=sampler.peak_rss / 1024,
                rss_after=benchlib.proc_status_kib("VmRSS", proc.pid) / 1024,
                tmp_peak=sampler.peak_tmp / 2**20,
                tmp_after=tmpdir_bytes(proc.pid, tmpdir) / 2**20,
            )
            rows.append(
                (
                    label,
                    name,
                    outcome.answer,
                    f"{outcome.sent_mib:.0f}",
                    f"{outcome.seconds:.2f}",
                    f"{outcome.rss_before:.0f} / {outcome.rss_peak:.0f} / {outcome.rss_after:.0f}",
                    f"{outcome.tmp_peak:.0f} / {outcome.tmp_after:.0f}",
                )
            )
        return rows, slow_headers(port, *slow)


def requests(size: int, key: str) -> list[tuple[str, bytes, bytes]]:
    anonymous = (
        b"POST /api/v1/projects/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % size
    )
    path = f"/api/v1/agent/jobs/{uuid.uuid4()}/rounds/0/update/"
    badly_signed = (
        f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {size}\r\n"
        "Content-Type: application/octet-stream\r\n"
        f"X-Content-SHA256: {hashlib.sha256(b'x').hexdigest()}\r\n"
        f"X-FedPortal-Cert-Fingerprint: {hashlib.sha256(b'nobody').hexdigest()}\r\n"
        f"X-FedPortal-Timestamp: {int(time.time())}\r\n"
        f"X-FedPortal-Nonce: {uuid.uuid4().hex}\r\n"
        "X-FedPortal-Signature: c2lnbmVk\r\n\r\n"
    ).encode()
    part = (
        b'--x\r\nContent-Disposition: form-data; name="initial_model"; filename="m"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n"
    )
    tail = b"\r\n--x--\r\n"
    submission = (
        b"POST /api/v1/projects/elsewhere/jobs/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer %s\r\nContent-Type: multipart/form-data; boundary=x\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (key.encode(), len(part) + size + len(tail), part)
    )
    return [
        ("anonymous POST /api/v1/projects/", anonymous, b""),
        ("PUT …/update/, unknown signer", badly_signed, b""),
        ("job submission, valid API token", submission, tail),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--compare-daphne", action="store_true")
    parser.add_argument("--slow", type=int, default=600)
    parser.add_argument("--slow-seconds", type=float, default=20)
    args = parser.parse_args()
    size = args.size_mib * 2**20

    benchlib.print_header(
        "Upload flood",
        f"{args.size_mib} MiB request bodies nobody may send, against a real portal; the "
        "server's RSS and TMPDIR while each runs.",
    )
    workspace = Path(tempfile.mkdtemp(prefix="fedportal-flood-"))
    try:
        (workspace / "tmp").mkdir()
        env = served_portal_env(workspace, TMPDIR=str(workspace / "tmp"))
        key = migrated_database(workspace, env)
        servers: list[tuple[str, tuple[str, ...]]] = [
            ("fedportal.serve", (sys.executable, "-m", "fedportal.serve"))
        ]
        if args.compare_daphne:
            servers.append(
                ("plain Daphne", (sys.executable, "-m", "daphne", "fedportal.asgi:application"))
            )
        rows = []
        still_open = []
        for label, command in servers:
            measured, held = run_server(
                label, command, env, size, key, (args.slow, args.slow_seconds)
            )
            rows += measured
            still_open.append((label, f"{held} of {args.slow}"))
        print(
            benchlib.md_table(
                [
                    "server",
                    "request",
                    "answer",
                    "MiB sent",
                    "s",
                    "RSS MiB before / peak / after",
                    "TMPDIR MiB peak / after",
                ],
                rows,
            )
        )
        print(f"\nTMPDIR on {benchlib.filesystem(workspace)}\n")
        print(
            benchlib.md_table(
                ["server", f"half-sent requests still open after {args.slow_seconds:g} s"],
                still_open,
            )
        )
    finally:
        shutil.rmtree(workspace, ignore_errors=True)


if __name__ == "__main__":
    main()
