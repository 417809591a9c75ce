"""A portal of the bench's own: a scratch PostgreSQL database, media and data folders, and
Django set up against them, all of it removed afterwards; and for benches that start the
portal's server (``python -m fedportal.serve``): a free port, a migrated database with a
person's API token, and the wait until it serves."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from benchlib import REPO_ROOT

POSTGRES = os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432")


def served_portal_env(workspace: Path, **extra: str) -> dict[str, str]:
    """The environment of a portal server a bench starts: fail-closed settings (no DEBUG, no
    development mode), a SQLite database and data folder in ``workspace``, and ``extra``."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "fedportal.settings.base",
        "DJANGO_SECRET_KEY": "bench-only-secret-key-" + secrets.token_urlsafe(32),
        "FEDPORTAL_CA_KEY_ENCRYPTION_KEY": "bench-only-ca-key-encryption-key",
        "DJANGO_DEBUG": "false",
        "FEDPORTAL_DATA_DIR": str(workspace),
        "DATABASE_URL": f"sqlite:///{workspace / 'db.sqlite3'}",
        "PYTHONPATH": str(REPO_ROOT),
        **extra,
    }
    env.pop("FEDPORTAL_DEV", None)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def migrated_database(workspace: Path, env: dict[str, str]) -> str:
    """Migrate the database of ``env``, and make a person with an API token; returns the
    token."""
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=REPO_ROOT,
        env=env,
        check=True,
    )
    code = (
        "import django; django.setup(); from django.contrib.auth import get_user_model; "
        "from sites.services import api_token_create; "
        "user = get_user_model().objects.create_user('bench', password=None); "
        "print(api_token_create(user=user, name='bench')[1])"
    )
    made = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return made.stdout.strip().splitlines()[-1]


def wait_until_serving(port: int, proc: subprocess.Popen[bytes], label: str) -> None:
    """Return once the server ``proc`` answers ``/healthz`` on ``port``; RuntimeError if it
    exits first or takes more than a minute."""
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{label} did not start") from None
            time.sleep(0.1)


@contextmanager
def served_portal(
    env: dict[str, str],
    label: str = "the portal",
    command: tuple[str, ...] = (sys.executable, "-m", "fedportal.serve"),
    output: int | IO[bytes] = subprocess.DEVNULL,
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """The portal's server (``command``, ``python -m fedportal.serve`` unless another is
    given) on a free port with ``env``, its output to ``output``: yields the process and the
    port once it serves ``/healthz``, and stops it at the end (killed if it lingers)."""
    port = free_port()
    proc = subprocess.Popen(
        [*command, "-b", "127.0.0.1", "-p", str(port)],
        cwd=REPO_ROOT,
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until_serving(port, proc, label)
        yield proc, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def bench_env(tmp: Path, db_name: str, name: str) -> dict[str, str]:
    """The portal's settings for a bench named ``name`` (fail-closed settings, no DEBUG)."""
    return {
        "DJANGO_SETTINGS_MODULE": "fedportal.settings.base",
        "DATABASE_URL": f"{POSTGRES}/{db_name}",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(32),
        "DJANGO_DEBUG": "false",
        "DJANGO_ALLOWED_HOSTS": "testserver",
        "DJANGO_MEDIA_ROOT": str(tmp / "media"),
        "FEDPORTAL_DATA_DIR": str(tmp / "data"),
        "FEDPORTAL_CA_KEY_ENCRYPTION_KEY": "bench-only-ca-key-encryption-key",
        # Nothing listens: events of the set-up go to groups of the bench's own, and nowhere.
        "FEDPORTAL_CHANNELS_PREFIX": f"bench-{name}-{os.getpid()}",
    }


@contextmanager
def scratch_portal(name: str) -> Iterator[Path]:
    """Django set up against a new database (not yet migrated) and a temporary folder, which
    it yields; the database is dropped and the folder removed on the way out."""
    import psycopg

    tmp = Path(tempfile.mkdtemp(prefix=f"fedportal-bench-{name}-"))
    db_name = f"fedportal_bench_{name.replace('-', '_')}_{os.getpid()}"
    os.environ.update(bench_env(tmp, db_name, name))  # before django.setup(): settings read them
    server = psycopg.connect(f"{POSTGRES}/postgres", autocommit=True)
    try:
        server.execute(f'CREATE DATABASE "{db_name}"')
        import django

        django.setup()
        logging.getLogger().setLevel(logging.WARNING)
        yield tmp
    finally:
        if "django" in sys.modules:
            from django.db import connections

            connections.close_all()
        server.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        server.close()
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one run of a bench whose processes set themselves up
    (PocEnv's): its URL. Dropped afterwards."""
    import psycopg

    server = POSTGRES.rstrip("/")
    name = f"{prefix}_{os.getpid()}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{server}/{name}"
    finally:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def round_cycles(url: str, api_token: str, job_id: str) -> list[float]:
    """A finished job's round times, from the portal's own record: round n+1 opened minus
    round n opened, the last round's end being the job's (seconds, in round order)."""
    import datetime as dt

    from client_agent.portal import PortalClient

    client = PortalClient(url, api_token=api_token)
    opened = sorted(
        dt.datetime.fromisoformat(r["opened_at"]).timestamp()
        for r in client.get_all(f"/api/v1/jobs/{job_id}/rounds/")
    )
    job = client.get(f"/api/v1/jobs/{job_id}/")
    finished = dt.datetime.fromisoformat(job["finished_at"]).timestamp()
    return [b - a for a, b in zip(opened, [*opened[1:], finished], strict=True)]
