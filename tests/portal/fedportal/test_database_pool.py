"""PostgreSQL through a pool of connections per process (``DATABASE_POOL_*``): many requests
at once share a bounded number of connections and none fails for want of one; bad sizes are
refused at start, naming the variable."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import psycopg
import pytest
from django.conf import settings
from django.db import connection, connections

from sites.models import Site
from tests.portal.settings_probe import portal_settings

POSTGRES = "postgres://postgres@127.0.0.1:5432/fedportal_pool_settings"


def database_settings(**env: str) -> subprocess.CompletedProcess[str]:
    """The ``default`` database's settings, as a portal process started with ``env`` sees them."""
    return portal_settings(
        "{'options': s.DATABASES['default'].get('OPTIONS', {}), "
        "'age': s.DATABASES['default'].get('CONN_MAX_AGE')}",
        DATABASE_URL=POSTGRES,
        **env,
    )


def test_a_postgresql_portal_pools_its_connections_sized_from_the_environment() -> None:
    default = database_settings()
    assert default.returncode == 0, default.stderr
    pool = json.loads(default.stdout)["options"]["pool"]
    assert (pool["min_size"], pool["max_size"], pool["timeout"]) == (1, 10, 30)
    assert json.loads(default.stdout)["age"] == 0  # Django's pool needs it

    sized = database_settings(
        DATABASE_POOL_MIN_SIZE="2", DATABASE_POOL_MAX_SIZE="4", DATABASE_POOL_TIMEOUT="5"
    )
    pool = json.loads(sized.stdout)["options"]["pool"]
    assert (pool["min_size"], pool["max_size"], pool["timeout"]) == (2, 4, 5)

    off = database_settings(DATABASE_POOL_MAX_SIZE="0")
    assert "pool" not in json.loads(off.stdout)["options"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DATABASE_POOL_MAX_SIZE": "ten"}, "DATABASE_POOL_MAX_SIZE must be a whole number"),
        ({"DATABASE_POOL_MAX_SIZE": "-1"}, "must be 0 or more"),
        ({"DATABASE_POOL_TIMEOUT": "0"}, "DATABASE_POOL_TIMEOUT more than 0"),
        ({"DATABASE_CONN_MAX_AGE": "60"}, "set DATABASE_POOL_MAX_SIZE=0 to use it"),
    ],
)
def test_bad_pool_settings_stop_the_portal_naming_the_variable(
    env: dict[str, str], message: str
) -> None:
    started = database_settings(**env)
    assert started.returncode != 0
    assert message in started.stderr


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(connection.vendor != "postgresql", reason="the pool is PostgreSQL's")
def test_many_requests_at_once_share_the_pool_and_none_fails() -> None:
    # Each thread is a request as Daphne runs it: its own thread, a query that takes a moment,
    # its connection given back when it ends. Three times the pool's size at once: all are
    # answered, and PostgreSQL never sees more connections from this process than the pool
    # holds (without the pool, each thread opened its own).
    most = settings.DATABASE_POOL_MAX_SIZE
    params = connection.get_connection_params()
    monitor = psycopg.connect(
        **{k: v for k, v in params.items() if k in ("host", "port", "user", "dbname")},
        autocommit=True,
    )
    seen: list[int] = []
    answered: list[bool] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            row = monitor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> "
                "pg_backend_pid()",
                [params["dbname"]],
            ).fetchone()
            seen.append(int(row[0]) if row else 0)
            time.sleep(0.002)

    def request() -> None:
        try:
            for _ in range(3):
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_sleep(0.05)")
                answered.append(not Site.objects.filter(name="nobody").exists())
                connection.close()  # the request ends: its connection goes back to the pool
        except BaseException as exc:  # reported below, with the others
            errors.append(exc)
        finally:
            connections.close_all()

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=request) for _ in range(3 * most)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        done.set()
        watcher.join()
        monitor.close()
    assert errors == []
    assert answered == [True] * (3 * 3 * most)
    assert 1 < max(seen) <= most, max(seen)
