"""The table of body limits per route, and the ASGI middleware that applies it under any
server (the portal's own server applies it before reading: test_server_limits.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from asgiref.sync import async_to_sync

from fedportal import bodylimits
from fedportal.bodylimits import BodyLimitMiddleware, Sender, rule_for

UID = "7d0d6f9b-2a36-4a43-8f0c-0c1f3e1d2a11"


@pytest.mark.parametrize(
    ("method", "path", "limit", "sender"),
    [
        ("PUT", f"/api/v1/agent/jobs/{UID}/rounds/3/update/", "model", Sender.SITE),
        ("put", f"/api/v1/agent/jobs/{UID}/rounds/3/update/", "model", Sender.SITE),
        ("POST", "/api/v1/projects/oncology/jobs/", "submission", Sender.PERSON),
        ("POST", "/projects/oncology/jobs/new/", "submission", Sender.PERSON),
        ("GET", "/projects/oncology/jobs/new/", "default", Sender.ANYONE),
        ("POST", f"/api/v1/agent/jobs/{UID}/rounds/3/update/", "default", Sender.ANYONE),
        ("POST", "/login/", 16 * 1024, Sender.ANYONE),
        ("POST", "/admin/login/", 16 * 1024, Sender.ANYONE),
        ("POST", "/api/v1/enrol/", 64 * 1024, Sender.ANYONE),
        ("POST", "/api/v1/enrol/check/", 64 * 1024, Sender.ANYONE),
        ("POST", "/api/v1/projects/", "default", Sender.ANYONE),
        ("POST", "/anything/at/all", "default", Sender.ANYONE),
    ],
)
def test_each_route_has_its_limit_and_sender(
    settings: Any, method: str, path: str, limit: Any, sender: Sender
) -> None:
    settings.FEDPORTAL_MAX_MODEL_BYTES = 1000
    settings.FEDPORTAL_MAX_APP_ARCHIVE_BYTES = 100
    settings.FEDPORTAL_MAX_REQUEST_BYTES = 10
    expected = {
        "model": 1000,
        "submission": 1100 + bodylimits.SUBMISSION_OVERHEAD_BYTES,
        "default": 10,
    }.get(limit, limit)
    rule = rule_for(method, path)
    assert (rule.limit(), rule.sender) == (expected, sender)


def test_the_submission_overhead_holds_the_largest_job_json() -> None:
    from jobs.api.serializers import SPEC_MAX_BYTES

    assert bodylimits.SUBMISSION_OVERHEAD_BYTES > SPEC_MAX_BYTES


class Recorder:
    """An ASGI HTTP app that reads the whole body, then answers 200."""

    def __init__(self) -> None:
        self.called = False
        self.disconnected = False
        self.body = b""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.called = True
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                return
            self.body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def run(app: Any, chunks: list[bytes], headers: list[tuple[bytes, bytes]]) -> list[Any]:
    scope = {"type": "http", "method": "POST", "path": "/api/v1/enrol/", "headers": headers}
    messages = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
        for i, chunk in enumerate(chunks)
    ]
    sent: list[Any] = []

    async def receive() -> Any:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    async_to_sync(BodyLimitMiddleware(app))(scope, receive, send)
    return sent


def test_the_middleware_refuses_an_announced_length_over_the_limit_without_the_app() -> None:
    app = Recorder()
    sent = run(app, [b""], [(b"content-length", b"300000000")])
    assert not app.called
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["code"] == "too_large"


def test_the_middleware_refuses_a_streamed_body_that_grows_past_the_limit() -> None:
    app = Recorder()
    sent = run(app, [b"x" * 40_000, b"x" * 40_000, b"x" * 40_000], [])
    assert app.disconnected
    assert [m.get("status") for m in sent if m["type"] == "http.response.start"] == [413]


def test_the_middleware_passes_a_body_within_the_limit() -> None:
    app = Recorder()
    sent = run(app, [b'{"token": ', b'"x"}'], [(b"content-length", b"15")])
    assert app.body == b'{"token": "x"}'
    assert sent[0]["status"] == 200
