"""The portal served by Daphne in a subprocess (HTTP and WebSocket) on the test database, for
tests that reach it over the network: the browser tests, and the site agent's socket tests.

Needs PostgreSQL (the portal process shares the test database) and Redis (the channel layer
between the two processes, database 13 unless BROWSER_TEST_REDIS_URL names another). A module
takes the fixtures by naming them at its top (``portal_url = daphne_portal.portal_url``): one
server per module.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("BROWSER_TEST_REDIS_URL") or "redis://127.0.0.1:6379/13"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def shared_test_database_url() -> str:
    """The test database, for a server process to share (PostgreSQL only)."""
    from django.db import connection

    db = connection.settings_dict
    assert db["NAME"].startswith("test_"), "the server must use the test database"
    return f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


@contextlib.contextmanager
def served(
    env: dict[str, str], log: Path, args: Sequence[str] = ()
) -> Iterator[tuple[str, int, int]]:
    """``python -m fedportal.serve`` on a free port with ``env`` over this process's
    environment and ``args`` (more of its options), until the block ends: ``(url, port,
    pid)`` once ``/healthz`` answers. Its output goes to ``log``, whose end is raised with the
    error when it does not start."""
    port = _free_port()
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    full_env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedportal.serve", "-b", "127.0.0.1", "-p", str(port), *args],
            cwd=ROOT,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield url, port, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("browser-media")


@pytest.fixture(scope="module")
def portal_url(django_db_setup: None, media_root: Path) -> Iterator[str]:
    """The portal's server (``python -m fedportal.serve``, Daphne) on a free port, on the test
    database; its log is printed when it fails to start."""
    with served(portal_env(media_root), media_root.parent / "daphne.log") as (url, _, _):
        yield url


def portal_env(media_root: Path) -> dict[str, str]:
    """The environment of the test portal's process (Redis's test database flushed first)."""
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    return {
        "DJANGO_SETTINGS_MODULE": "tests.browser.daphne_settings",
        "DATABASE_URL": shared_test_database_url(),
        "DJANGO_MEDIA_ROOT": str(media_root),
        # Development mode: plain HTTP on 127.0.0.1 (cookies not Secure), and the portal
        # serves its own static files; DEBUG stays off, as in a deployment.
        "FEDPORTAL_DEV": "1",
        "DJANGO_DEBUG": "false",
        "BROWSER_TEST_REDIS_URL": REDIS_URL,
    }
