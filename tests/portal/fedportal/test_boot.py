"""The portal boots: its pages, schema, settings, database and Celery app are wired up."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.staticfiles import finders
from django.core.management import call_command
from django.db import connection
from django.test import Client

from fedportal import celery_app

ROOT = Path(__file__).resolve().parents[3]


def test_healthz_returns_ok_json(client: Client) -> None:
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"status": "ok"}


def test_healthz_refuses_post(client: Client) -> None:
    assert client.post("/healthz").status_code == 405


def test_api_schema_is_an_openapi_document(client: Client) -> None:
    response = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")

    assert response.status_code == 200
    schema = json.loads(response.content)
    assert schema["openapi"].startswith("3.")
    assert schema["info"]["title"] == "FedPortal"
    assert "paths" in schema


def test_api_docs_page_is_served_by_the_portal_and_points_at_the_schema(client: Client) -> None:
    response = client.get("/api/docs/")

    assert response.status_code == 200
    html = response.content.decode()
    scripts = re.findall(r"<script([^>]*)>", html)
    sources = [re.search(r'src="([^"]+)"', attrs) for attrs in scripts]
    # Every script and style from the portal itself (no CDN), none inline (the CSP allows none).
    assert sources and all(found is not None for found in sources)
    paths = [found.group(1) for found in sources if found is not None]
    assert all(path.startswith("/static/") or path.startswith("/api/docs/") for path in paths)
    assert "<style" not in html and "//cdn" not in html
    static = [path.removeprefix("/static/") for path in paths if path.startswith("/static/")]
    assert static, paths
    for name in static:
        assert finders.find(name), name
    setup = client.get("/api/docs/?script=")
    assert setup.status_code == 200
    assert setup["Content-Type"].startswith("application/javascript")
    assert b"/api/schema/" in setup.content


def test_home_page_renders_with_links(client: Client) -> None:
    response = client.get("/")

    assert response.status_code == 200
    assert [t.name for t in response.templates][:2] == ["home.html", "base.html"]
    html = response.content.decode()
    assert '<html lang="en">' in html
    assert '<main id="main" tabindex="-1">' in html
    assert "FedPortal" in html
    assert 'href="/api/docs/"' in html
    assert 'href="/admin/"' in html


def test_admin_login_page_renders(client: Client) -> None:
    response = client.get("/admin/", follow=True)

    assert response.status_code == 200
    assert response.redirect_chain[0][0].startswith("/admin/login/")


def test_celery_app_uses_settings() -> None:
    assert celery_app.main == "fedportal"
    assert celery_app.conf.broker_url == settings.CELERY_BROKER_URL
    assert celery_app.conf.result_backend == settings.CELERY_RESULT_BACKEND
    assert celery_app.conf.accept_content == ["json"]
    assert celery_app.conf.task_serializer == "json"


def test_system_check_passes() -> None:
    call_command("check", fail_level="WARNING")


@pytest.mark.parametrize("first", ["fedportal.api", "jobs.tasks"])
def test_the_api_module_imports_first_in_a_fresh_process(first: str) -> None:
    # DRF's settings name fedportal.api's parser and paginator, and rest_framework.views reads
    # those settings when it is imported: fedportal.api must not need rest_framework.views
    # while it loads. A Celery worker imports it first (through its tasks), and the cycle made
    # every worker exit at start.
    code = f"import django; django.setup(); import {first}; print('imported')"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "fedportal.settings.test"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )

    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "imported"


@pytest.mark.django_db
def test_database_from_database_url_is_used() -> None:
    url = os.environ.get("DATABASE_URL", "")
    expected = "postgresql" if url.startswith(("postgres://", "postgresql://")) else "sqlite"

    assert connection.vendor == expected
    user = get_user_model().objects.create_user("alice", password="pw")
    assert get_user_model().objects.get(pk=user.pk).username == "alice"


def test_settings_come_from_the_environment(tmp_path: Path) -> None:
    """Base settings, loaded fresh in a subprocess, follow the environment."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"}
    }
    env |= {
        "DJANGO_SETTINGS_MODULE": "fedportal.settings.base",
        "FEDPORTAL_DATA_DIR": str(tmp_path / "data"),
        "REDIS_URL": "redis://redis.example:6390/3",
        "DJANGO_DEBUG": "false",
        "DJANGO_ALLOWED_HOSTS": "portal.example, localhost",
    }
    code = (
        "import json, django; django.setup(); from django.conf import settings as s; "
        "from fedportal import celery_app as c; "
        "print(json.dumps({'db': s.DATABASES['default'], 'media': str(s.MEDIA_ROOT), "
        "'debug': s.DEBUG, 'hosts': s.ALLOWED_HOSTS, 'broker': c.conf.broker_url, "
        "'channels': s.CHANNEL_LAYERS['default']['CONFIG']['hosts']}, default=str))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    got = json.loads(out)

    assert got["db"]["ENGINE"] == "django.db.backends.sqlite3"
    assert got["db"]["NAME"] == str(tmp_path / "data" / "db.sqlite3")
    assert got["media"] == str(tmp_path / "data" / "media")
    assert (tmp_path / "data").is_dir()
    assert got["debug"] is False
    assert got["hosts"] == ["portal.example", "localhost"]
    assert got["broker"] == "redis://redis.example:6390/3"
    assert got["channels"] == [{"address": "redis://redis.example:6390/3", "socket_timeout": 30}]


def test_the_portal_serves_its_urls_without_importing_torch(tmp_path: Path) -> None:
    # torch costs ~1 s and ~300 MB at start; only the worker's aggregation needs it.
    code = (
        "import sys, django; django.setup(); "
        "from django.urls import get_resolver; import fedportal.asgi, fedportal.routing; "
        "get_resolver().url_patterns; import jobs.tasks; print('torch' in sys.modules)"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "fedportal.settings.base",
        "FEDPORTAL_DATA_DIR": str(tmp_path / "data"),
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"
