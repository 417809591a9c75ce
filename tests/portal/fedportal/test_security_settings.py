"""The portal fails closed: no secrets, no start (outside development mode); DEBUG off and
Secure cookies by default; every security header from the environment; a clean
``check --deploy`` for a production-like environment; pages with no inline script or style
(the Content-Security-Policy allows none); the enrol command says https behind a TLS proxy."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from rest_framework.test import APIClient

from tests.portal import api_world as sw

ROOT = Path(__file__).resolve().parents[3]
SECRET = "s" * 60
# What docker/README.md tells a deployment behind a TLS proxy to set.
PRODUCTION = {
    "DJANGO_SECRET_KEY": "x9V#q" * 12,
    "FEDPORTAL_CA_KEY_ENCRYPTION_KEY": "another-long-random-secret-for-the-ca-keys",
    "DJANGO_ALLOWED_HOSTS": "fl.example.org",
    "DJANGO_CSRF_TRUSTED_ORIGINS": "https://fl.example.org",
    "DJANGO_SECURE_PROXY_SSL_HEADER": "X-Forwarded-Proto",
    "DJANGO_SECURE_SSL_REDIRECT": "true",
    "DJANGO_SECURE_HSTS_SECONDS": "31536000",
    "DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS": "true",
    "DJANGO_SECURE_HSTS_PRELOAD": "true",
    "FEDPORTAL_PUBLIC_URL": "https://fl.example.org",
}
SHOWN = [
    "DEBUG",
    "SESSION_COOKIE_SECURE",
    "CSRF_COOKIE_SECURE",
    "SECURE_SSL_REDIRECT",
    "SECURE_HSTS_SECONDS",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS",
    "SECURE_HSTS_PRELOAD",
    "SECURE_PROXY_SSL_HEADER",
    "SECURE_REFERRER_POLICY",
    "FEDPORTAL_CONTENT_SECURITY_POLICY",
    "FEDPORTAL_SERVE_STATIC",
    "FEDPORTAL_CA_KEY_ENCRYPTION_KEY",
]


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The tests' environment without any of the portal's settings, plus ``extra``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DJANGO_", "FEDPORTAL_"))
    }
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "fedportal.settings.base",
            "FEDPORTAL_DATA_DIR": str(tmp_path / "data"),
            "PYTHONPATH": str(ROOT),
        }
    )
    env.update(extra)
    return env


def settings_in(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = (
        "import json, django; django.setup(); from django.conf import settings as s; "
        f"print(json.dumps({{name: getattr(s, name, None) for name in {SHOWN!r}}}))"
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
    )


@pytest.mark.parametrize("missing", ["DJANGO_SECRET_KEY", "FEDPORTAL_CA_KEY_ENCRYPTION_KEY"])
def test_without_its_secrets_the_portal_refuses_to_start(tmp_path: Path, missing: str) -> None:
    secrets = {
        "DJANGO_SECRET_KEY": SECRET,
        "FEDPORTAL_CA_KEY_ENCRYPTION_KEY": SECRET,
    }
    del secrets[missing]
    started = settings_in(clean_env(tmp_path, **secrets))
    assert started.returncode != 0
    assert f"ImproperlyConfigured: {missing} is not set" in started.stderr
    # manage.py (migrate, the worker's settings too) refuses the same way.
    manage = subprocess.run(
        [sys.executable, "manage.py", "check"],
        env=clean_env(tmp_path, **secrets),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert manage.returncode != 0
    assert f"{missing} is not set" in manage.stderr


def test_with_only_its_secrets_it_runs_closed(tmp_path: Path) -> None:
    started = settings_in(
        clean_env(tmp_path, DJANGO_SECRET_KEY=SECRET, FEDPORTAL_CA_KEY_ENCRYPTION_KEY="the-ca-key")
    )
    assert started.returncode == 0, started.stderr
    got = json.loads(started.stdout)
    assert got["DEBUG"] is False
    assert got["SESSION_COOKIE_SECURE"] is True and got["CSRF_COOKIE_SECURE"] is True
    assert got["SECURE_PROXY_SSL_HEADER"] is None  # X-Forwarded-Proto is trusted only if told
    assert got["SECURE_REFERRER_POLICY"] == "same-origin"
    assert got["FEDPORTAL_CONTENT_SECURITY_POLICY"].startswith("default-src 'self'")
    assert got["FEDPORTAL_SERVE_STATIC"] is False


def test_development_mode_is_explicit_and_needs_no_secrets(tmp_path: Path) -> None:
    started = settings_in(clean_env(tmp_path, FEDPORTAL_DEV="1"))
    assert started.returncode == 0, started.stderr
    got = json.loads(started.stdout)
    assert got["DEBUG"] is True
    assert got["SESSION_COOKIE_SECURE"] is False
    assert got["FEDPORTAL_SERVE_STATIC"] is True
    assert got["FEDPORTAL_CA_KEY_ENCRYPTION_KEY"] == ""  # sites.conf derives a development key
    # DEBUG alone is not development mode: it still needs the secrets.
    debug_only = settings_in(clean_env(tmp_path, DJANGO_DEBUG="true"))
    assert debug_only.returncode != 0


def test_every_https_setting_comes_from_the_environment(tmp_path: Path) -> None:
    started = settings_in(clean_env(tmp_path, **PRODUCTION))
    assert started.returncode == 0, started.stderr
    got = json.loads(started.stdout)
    assert got["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    assert got["SECURE_SSL_REDIRECT"] is True
    assert got["SECURE_HSTS_SECONDS"] == 31536000
    assert got["SECURE_HSTS_INCLUDE_SUBDOMAINS"] is True
    assert got["SECURE_HSTS_PRELOAD"] is True


def deploy_check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def test_check_deploy_is_clean_for_a_production_like_environment(tmp_path: Path) -> None:
    clean = deploy_check(clean_env(tmp_path, **PRODUCTION))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "no issues" in clean.stdout
    # The same check does find what a bare deployment lacks (no redirect, no HSTS).
    bare = deploy_check(
        clean_env(
            tmp_path,
            DJANGO_SECRET_KEY=PRODUCTION["DJANGO_SECRET_KEY"],
            **{"FEDPORTAL_CA_KEY_ENCRYPTION_KEY": "k" * 40},
        )
    )
    assert bare.returncode != 0
    assert "security.W004" in bare.stderr + bare.stdout  # HSTS
    assert "security.W008" in bare.stderr + bare.stdout  # SSL redirect


# --- headers on every response ----------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/", "/login/", "/api/docs/", "/healthz", "/api/v1/projects/"])
def test_every_response_carries_the_security_headers(path: str) -> None:
    response = Client().get(path)
    assert response["Content-Security-Policy"].startswith("default-src 'self'")
    assert "unsafe-inline" not in response["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in response["Content-Security-Policy"]
    assert response["Referrer-Policy"] == "same-origin"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["X-Frame-Options"] == "DENY"


def test_the_pages_hold_no_inline_script_or_style() -> None:
    """The policy allows scripts and styles from the portal's files only."""
    found = []
    for template in (ROOT / "templates").rglob("*.html"):
        html = template.read_text()
        for tag in re.findall(r"<script\b[^>]*>", html):
            if "src=" not in tag:
                found.append(f"{template.name}: {tag}")
        if re.search(r"<style\b", html):
            found.append(f"{template.name}: <style>")
        for attribute in re.findall(r"\s(style|on[a-z]+)\s*=", html):
            found.append(f"{template.name}: {attribute}=")
    assert found == []


# --- the enrol command's address ---------------------------------------------------------------


def approve(world: sw.World, **headers: str) -> str:
    path = f"/api/v1/projects/{world.project.slug}/sites/{world.site_requested.pk}/approve/"
    response = world.call(sw.ADMIN, "POST", path, **headers)
    assert response.status_code == 200, response.content
    command: str = response.json()["enrolment"]["command"]
    return command


def dashboard_approve(world: sw.World, **extra: Any) -> str:
    client = Client()
    client.force_login(world.users[sw.ADMIN])
    url = f"/projects/{world.project.slug}/sites/{world.site_requested.pk}/token/"
    response = client.post(url, **extra)
    assert response.status_code == 200
    command: str = response.context["command"]
    return command


@pytest.mark.django_db
def test_behind_a_trusted_tls_proxy_the_enrol_command_says_https(
    sites_world: sw.World, settings: Any
) -> None:
    # As a proxy forwards it: the Host the client asked for, and the scheme it used.
    forwarded = {"X-Forwarded-Proto": "https", "Host": "testserver"}
    # Not told to trust the proxy's header: the request came over plain HTTP.
    assert "--portal http://testserver " in approve(sites_world, **forwarded)

    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    sites_world.site_requested.refresh_from_db()
    sites_world.site_requested.state = "requested"
    sites_world.site_requested.save()
    assert "--portal https://testserver " in approve(sites_world, **forwarded)
    assert "--portal https://testserver " in dashboard_approve(
        sites_world, HTTP_X_FORWARDED_PROTO="https", HTTP_HOST="testserver"
    )

    settings.FEDPORTAL_PUBLIC_URL = "https://fl.example.org"
    assert "--portal https://fl.example.org " in dashboard_approve(sites_world)


@pytest.mark.django_db
def test_the_api_renders_json_only() -> None:
    response = APIClient().get("/api/v1/projects/", HTTP_ACCEPT="text/html")
    assert response["Content-Type"].startswith("application/json")
