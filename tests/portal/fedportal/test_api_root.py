"""``GET /api/v1/`` lists the API's resources from its URL configuration, and ``/favicon.ico``
leads to the dashboard's icon."""

from __future__ import annotations

import re

import pytest
from django.test import Client
from django.urls import Resolver404, resolve

from fedportal.api_root import ApiRootView

pytestmark = pytest.mark.django_db


def _concrete(path: str) -> str:
    """A path template with a plausible value for each parameter, to resolve it."""
    values = {"uid": "2f1e5b57-1e0b-4d52-9a4a-3a1f0f1b8c11", "site_name": "site-a"}
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), "1"), path)


def test_the_api_root_lists_every_resource_to_anyone(client: Client) -> None:
    response = client.get("/api/v1/")

    assert response.status_code == 200
    body = response.json()
    assert body["schema"] == "/api/schema/"
    assert body["docs"] == "/api/docs/"
    paths = {entry["path"]: entry for entry in body["resources"]}
    # People's resources and the agents' both, with their methods.
    assert paths["/api/v1/projects/"]["methods"] == ["GET", "POST"]
    assert paths["/api/v1/jobs/{uid}/abort/"]["methods"] == ["POST"]
    assert "/api/v1/projects/{project}/jobs/" in paths
    assert "/api/v1/agent/whoami/" in paths
    # Agents' routes come last.
    kinds = [e["path"].startswith(("/api/v1/agent/", "/api/v1/enrol/")) for e in body["resources"]]
    assert kinds == sorted(kinds)
    assert len(body["resources"]) >= 40


def test_every_listed_path_is_served_by_the_view_it_names(client: Client) -> None:
    resources = client.get("/api/v1/").json()["resources"]
    assert resources
    for entry in resources:
        try:
            match = resolve(_concrete(entry["path"]))
        except Resolver404:
            pytest.fail(f"{entry['path']} is listed but not served")
        assert f"{match.namespace}:{match.url_name}" == entry["name"]
        assert match.func is not ApiRootView


def test_the_api_root_is_in_the_openapi_schema(client: Client) -> None:
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/json").json()

    assert "get" in schema["paths"]["/api/v1/"]


def test_the_favicon_is_served(client: Client) -> None:
    response = client.get("/favicon.ico")

    assert response.status_code == 302
    assert response["Location"].endswith("dashboard/favicon.svg")
    assert 'rel="icon"' in client.get("/login/").content.decode()
