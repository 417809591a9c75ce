"""A portal of the bench's own: a scratch PostgreSQL database, media and data folders, and
Django set up against them; all of it removed afterwards."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

POSTGRES = os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432")


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
