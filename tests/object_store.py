"""An S3-compatible server for tests: moto's standalone server (``moto_server``), started on a
free port in a subprocess, so that the code under test talks to it over HTTP with the real
boto3 client, as it would to AWS S3 or MinIO."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# moto accepts any credentials; boto3 needs some to sign with.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def s3_server(log: Path) -> Iterator[str]:
    """A running S3-compatible server; its endpoint URL. Stopped on leaving."""
    with moto_process(log) as (url, _):
        yield url


@contextmanager
def moto_process(log: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """:func:`s3_server`, with its process (for a bench that counts its CPU)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
            return True

    server = Path(sys.executable).with_name("moto_server")
    command = [str(server), "-H", "127.0.0.1", "-p", str(port)]
    with started(command, {**os.environ, **CREDENTIALS}, log, answers, "moto_server") as proc:
        yield url, proc


@contextmanager
def started(
    command: list[str], env: dict[str, str], log: Path, ready: Callable[[], object], what: str
) -> Iterator[subprocess.Popen[bytes]]:
    """``command`` running, its output in ``log``, once ``ready()`` returns without an
    OSError (30 s at most); terminated on leaving."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                ready()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{what} did not start: {log.read_text(errors='replace')[-2000:]}"
                    ) from None
                time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def s3_client(endpoint: str) -> object:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, **_credentials())


def _credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_DEFAULT_REGION"],
    }
