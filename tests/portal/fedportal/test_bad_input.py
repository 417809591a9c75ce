"""Input the portal used to answer with a 500: deeply nested JSON, integers past the
database's range, unknown WebSocket paths, and any exception under /api/. Each is now a 4xx
JSON error naming the field (or, for a real failure, a JSON 500), and changes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.test import Client
from rest_framework.test import APIClient

from client_agent import jsonlimits
from fedportal.asgi import application
from jobs.models import Job, MetricPoint
from tests.portal.jobs_api_world import (
    ADMIN,
    LEAD,
    SITE_IN,
    World,
    build_world,
    make_bundle,
    stored_files,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("media")]

DEEP = b"[" * 100_000 + b"]" * 100_000


def assert_error(response: Any, status: int, field: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert set(body) >= {"code", "message"}
    if field is not None:
        assert body["field"] == field, body
    return body


# --- JSON nested too deeply --------------------------------------------------------------------


def test_deep_json_on_the_anonymous_enrol_endpoints_is_a_400_naming_the_body() -> None:
    client = APIClient()
    for path in ("/api/v1/enrol/", "/api/v1/enrol/check/"):
        # drf-stubs type generic()'s data as str; DRF hands bytes to Django unchanged.
        response = client.generic("POST", path, DEEP, content_type="application/json")  # type: ignore[arg-type]
        body = assert_error(response, 400, "body")
        assert "nested deeper than" in body["message"]


def test_deep_json_from_a_person_and_from_an_agent_is_a_400(jobs_world: World) -> None:
    deep: dict[str, object] = {"accept": True, "x": 0}
    for _ in range(200):
        deep = {"x": deep}
    as_person = jobs_world.call(ADMIN, "POST", f"{jobs_world.j}/abort/", deep)
    assert_error(as_person, 400, "body")
    as_agent = jobs_world.agent(SITE_IN, "POST", f"{jobs_world.a}/metrics/", {"points": [deep]})
    assert_error(as_agent, 400, "body")
    assert Job.objects.get().state != "aborted"
    assert MetricPoint.objects.count() == 0


def test_the_bound_is_on_nesting_not_on_brackets_inside_strings() -> None:
    text = '{"a": "' + "[" * 1000 + '", "b": [[1, 2], {"c": "]]]{{"}]}'
    assert jsonlimits.loads(text)["b"][1]["c"] == "]]]{{"
    with pytest.raises(jsonlimits.JSONLimitError):
        jsonlimits.loads("[" * 33 + "]" * 33)
    assert jsonlimits.loads("[" * 32 + "]" * 32) is not None
    with pytest.raises(ValueError, match="Expecting"):
        jsonlimits.loads("[" * 40)  # not JSON at all: the parser's message, not "too deep"
    with pytest.raises(ValueError, match="NaN"):
        jsonlimits.loads('{"v": NaN}')
    with pytest.raises(jsonlimits.JSONLimitError, match="at most 10"):
        jsonlimits.loads("[" + "1," * 10 + "1]", max_bytes=10)


def test_strings_with_escapes_are_skipped_whole_when_nesting_is_counted() -> None:
    # An escaped quote does not end a string, an escaped backslash before a quote does: the
    # brackets inside count for nothing, those after for their nesting.
    inside = '{"a": "x\\"' + "[" * 40 + '", "b": "\\\\", "c": ' + "[" * 31 + "]" * 31 + "}"
    assert len(jsonlimits.loads(inside)["a"]) == 42
    after = '{"a": "\\\\", "c": ' + "[" * 32 + "]" * 32 + "}"  # 33 levels with the object
    with pytest.raises(jsonlimits.JSONLimitError):
        jsonlimits.loads(after)
    # A long string is one run (an update's base64 on an agent's socket); one that never ends is
    # the parser's error.
    assert len(jsonlimits.loads('{"data": "' + "QUJD" * 100_000 + '"}')["data"]) == 400_000
    with pytest.raises(ValueError, match="Unterminated string"):
        jsonlimits.loads('{"data": "' + "\\\\a" * 50_000)


def test_deep_json_on_the_websockets_is_answered_not_crashed() -> None:
    from dashboard.consumers import DashboardConsumer
    from jobs.consumers import AgentConsumer

    for consumer in (AgentConsumer, DashboardConsumer):
        decode = async_to_sync(consumer.decode_json)
        assert decode("[" * 5000 + "]" * 5000) is None
        assert decode("{not json") is None
        assert decode('{"type": "heartbeat"}') == {"type": "heartbeat"}


# --- integers past the database's range --------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"num_rounds": 10**20}, "spec.num_rounds"),
        ({"min_clients": 10**20}, "spec.min_clients"),
        ({"num_rounds": 2**31}, "spec.num_rounds"),
    ],
)
def test_a_submission_with_a_number_past_its_range_is_a_400_naming_it(
    tmp_path: Path, spec: dict[str, int], field: str
) -> None:
    world = build_world(tmp_path, submit=False)
    Job.objects.all().delete()
    bundle = make_bundle(tmp_path)
    bundle.spec["params"].update(spec)
    response = world.call(LEAD, "POST", f"{world.p}/jobs/", multipart=bundle.form())
    assert_error(response, 400, field)
    assert Job.objects.count() == 0
    assert stored_files() == []


def test_a_round_timeout_past_its_range_is_a_400(tmp_path: Path) -> None:
    world = build_world(tmp_path, submit=False)
    bundle = make_bundle(tmp_path)
    form = bundle.form(round_timeout_seconds=str(10**20))
    response = world.call(LEAD, "POST", f"{world.p}/jobs/", multipart=form)
    assert_error(response, 400, "round_timeout_seconds")
    assert Job.objects.count() == 0


def test_the_dashboard_form_refuses_numbers_past_their_range(tmp_path: Path) -> None:
    world = build_world(tmp_path, submit=False)
    bundle = make_bundle(tmp_path)
    client = Client()
    client.force_login(world.users[LEAD])
    from django.core.files.uploadedfile import SimpleUploadedFile

    response = client.post(
        f"/projects/{world.project.slug}/jobs/new/",
        {
            "name": "big",
            "workflow": "fedavg",
            "fedavg__min_clients": "1",
            "fedavg__num_rounds": str(10**20),
            "train_script": "client.py",
            "round_timeout_seconds": str(10**20),
            "app": SimpleUploadedFile("app.zip", bundle.app),
            "initial_model": SimpleUploadedFile("m.safetensors", bundle.model),
        },
    )
    assert response.status_code == 200  # the form again, with the errors beside their fields
    form = response.context["form"]
    assert "fedavg__num_rounds" in form.errors
    assert "round_timeout_seconds" in form.errors
    assert Job.objects.count() == 0


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("round=100000000000000000000", "round"),
        ("offset=100000000000000000000", "offset"),
        ("limit=100000000000000000000", "limit"),
        ("offset=-1", "offset"),
        ("limit=abc", "limit"),
    ],
)
def test_query_parameters_past_their_range_are_a_400_naming_them(
    jobs_world: World, query: str, field: str
) -> None:
    response = jobs_world.call(ADMIN, "GET", f"{jobs_world.j}/metrics/?{query}")
    assert_error(response, 400, field)


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/jobs/{uid}/models/100000000000000000000/download/",
        "/api/v1/projects/{slug}/sites/100000000000000000000/",
        "/api/v1/projects/{slug}/memberships/100000000000000000000/",
    ],
)
def test_ids_in_the_url_past_the_database_range_are_a_404(jobs_world: World, path: str) -> None:
    assert jobs_world.job is not None
    url = path.format(uid=jobs_world.job.uid, slug=jobs_world.project.slug)
    assert_error(jobs_world.call(ADMIN, "GET", url), 404, None)


def test_a_username_holding_a_nul_is_a_400_naming_it(jobs_world: World) -> None:
    # PostgreSQL refuses a NUL in any text, a lookup included: it must not reach the query.
    organization = jobs_world.project.organizations.first()
    assert organization is not None
    body = {"organization": organization.pk, "username": "lead\x00", "role": "member"}
    response = jobs_world.call(ADMIN, "POST", f"{jobs_world.p}/memberships/", body)
    assert_error(response, 400, "username")


@pytest.mark.parametrize("action", ["model", "status"])
def test_an_agent_round_past_the_database_range_is_a_404(jobs_world: World, action: str) -> None:
    method = "GET" if action == "model" else "POST"
    body = None if action == "model" else {"state": "training"}
    url = f"{jobs_world.a}/rounds/100000000000000000000/{action}/"
    assert_error(jobs_world.agent(SITE_IN, method, url, body), 404, None)


def test_an_agent_metric_point_past_the_database_range_is_refused(jobs_world: World) -> None:
    points = [{"key": "loss", "value": 1.0, "step": 10**20}]
    response = jobs_world.agent(SITE_IN, "POST", f"{jobs_world.a}/metrics/", {"points": points})
    assert_error(response, 400, "points[0].step")
    points = [{"key": "loss", "value": 1.0, "round": 2**31}]
    response = jobs_world.agent(SITE_IN, "POST", f"{jobs_world.a}/metrics/", {"points": points})
    assert_error(response, 400, "points[0].round")
    assert MetricPoint.objects.count() == 0


# --- whatever else fails under /api/ is JSON ---------------------------------------------------


def test_an_unhandled_exception_under_the_api_is_a_json_500(jobs_world: World, monkeypatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr("jobs.selectors.rounds_of", broken)
    client = APIClient(raise_request_exception=False)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {jobs_world.keys[ADMIN]}")
    response = client.get(f"{jobs_world.j}/rounds/")
    body = assert_error(response, 500, None)
    assert body["code"] == "server_error"
    assert "a bug" not in body["message"]


def test_an_unknown_api_url_is_a_json_404_and_a_page_stays_html(jobs_world: World) -> None:
    client = APIClient()
    body = assert_error(client.get("/api/v1/no-such-thing/"), 404, None)
    assert body["code"] == "not_found"
    page = Client().get("/no-such-page/")
    assert page.status_code == 404
    assert page["Content-Type"].startswith("text/html")


# --- WebSocket paths ---------------------------------------------------------------------------


def test_an_unknown_websocket_path_is_refused_with_4404() -> None:
    async def connect() -> tuple[bool, Any]:
        communicator = WebsocketCommunicator(application, "/ws/no-such-socket/")
        connected, code = await communicator.connect()
        await communicator.disconnect()
        return connected, code

    assert async_to_sync(connect)() == (False, 4404)
