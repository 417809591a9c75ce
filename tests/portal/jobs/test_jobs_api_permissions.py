"""Who may call each jobs endpoint: every endpoint × every persona, by status code.

401 for the wrong kind of caller (people on agent endpoints and agents on people's, anonymous
everywhere), 404 for a job or project the caller cannot see (another project's; for a site, a
job it does not take part in), 403 for one it sees but may not act on, and the success code
otherwise. Each case starts from a fresh world; writes that succeed are checked elsewhere.

These run inside the test's transaction (faster than flushing the database per case): the
after-commit callbacks that enqueue Celery work are run by ``django_capture_on_commit_callbacks``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from jobs.models import JobState
from tests.portal.jobs_api_world import (
    AGENTS,
    ANONYMOUS,
    LEAD,
    MEMBER,
    ORG_ADMIN,
    OTHER_LEAD,
    OUTSIDER,
    PEOPLE,
    PERSONAS,
    SITE_ELSEWHERE,
    SITE_IN,
    SITE_OUT,
    World,
    build_world,
    make_bundle,
    update_bytes,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("eager_celery", "media")]


def people(ok: int, **others: int) -> dict[str, int]:
    """A people's endpoint: ``ok`` for every member of the project unless ``others`` say
    otherwise; the outsider 404; anonymous and site agents 401."""
    codes = {persona: ok for persona in PEOPLE}
    codes.update({OUTSIDER: 404, ANONYMOUS: 401, **{agent: 401 for agent in AGENTS}})
    codes.update(others)
    return codes


def agents(ok: int, elsewhere: int = 404) -> dict[str, int]:
    """An agent's endpoint: ``ok`` for the site in the job, 404 for the others (which do not
    take part in it), 401 for every person and for anonymous."""
    codes = {persona: 401 for persona in (*PEOPLE, ANONYMOUS)}
    codes.update({SITE_IN: ok, SITE_OUT: elsewhere, SITE_ELSEWHERE: elsewhere})
    return codes


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: Callable[[World], str]
    expected: dict[str, int]
    waiting: bool = False  # the job waits for its sites' decisions (decision endpoints)
    body: Callable[[World], dict[str, Any]] = lambda w: {}


def submission(world: World) -> dict[str, Any]:
    return {"multipart": make_bundle(world.tmp, name="another-job").form()}


def an_update(world: World) -> dict[str, Any]:
    params = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(5)}
    return {"raw": update_bytes(params, world.tmp)}


def json_body(value: Any) -> Callable[[World], dict[str, Any]]:
    return lambda world: {"body": value}


ENDPOINTS: dict[str, Endpoint] = {
    "list jobs": Endpoint("GET", lambda w: f"{w.p}/jobs/", people(200)),
    "submit": Endpoint(
        "POST",
        lambda w: f"{w.p}/jobs/",
        people(201, **{MEMBER: 403, ORG_ADMIN: 403}),
        body=submission,
    ),
    "job": Endpoint("GET", lambda w: f"{w.j}/", people(200)),
    "rounds": Endpoint("GET", lambda w: f"{w.j}/rounds/", people(200)),
    "sites": Endpoint("GET", lambda w: f"{w.j}/sites/", people(200)),
    "metrics": Endpoint("GET", lambda w: f"{w.j}/metrics/", people(200)),
    "cross-site": Endpoint("GET", lambda w: f"{w.j}/cross-site/", people(200)),
    "models": Endpoint("GET", lambda w: f"{w.j}/models/", people(200)),
    "model download": Endpoint("GET", lambda w: f"{w.j}/models/0/download/", people(200)),
    "abort": Endpoint(
        "POST",
        lambda w: f"{w.j}/abort/",
        people(200, **{OTHER_LEAD: 403, MEMBER: 403, ORG_ADMIN: 403}),
    ),
    "site decision": Endpoint(
        "POST",
        lambda w: f"{w.j}/sites/site-2/decision/",
        people(200, **{LEAD: 403, OTHER_LEAD: 403, MEMBER: 403}),
        waiting=True,
        body=json_body({"accept": True}),
    ),
    "agent: jobs": Endpoint("GET", lambda w: "/api/v1/agent/jobs/", agents(200, elsewhere=200)),
    "agent: decision": Endpoint(
        "POST",
        lambda w: f"{w.a}/decision/",
        agents(200),
        waiting=True,
        body=json_body({"accept": True}),
    ),
    "agent: spec": Endpoint("GET", lambda w: f"{w.a}/spec/", agents(200)),
    "agent: bundle": Endpoint("GET", lambda w: f"{w.a}/bundle/", agents(200)),
    "agent: model": Endpoint("GET", lambda w: f"{w.a}/rounds/0/model/", agents(200)),
    "agent: status": Endpoint(
        "POST",
        lambda w: f"{w.a}/rounds/0/status/",
        agents(200),
        body=json_body({"state": "training"}),
    ),
    "agent: update": Endpoint(
        "PUT", lambda w: f"{w.a}/rounds/0/update/", agents(202), body=an_update
    ),
    "agent: metrics": Endpoint(
        "POST",
        lambda w: f"{w.a}/metrics/",
        agents(200),
        body=json_body({"points": [{"key": "loss", "value": 1.0, "id": "x"}]}),
    ),
}

CASES = [(name, persona) for name in ENDPOINTS for persona in PERSONAS]


def test_every_endpoint_has_a_row_for_every_persona() -> None:
    for name, endpoint in ENDPOINTS.items():
        assert set(endpoint.expected) == set(PERSONAS), name


@pytest.mark.parametrize(("name", "persona"), CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_who_may_call_what(
    name: str, persona: str, tmp_path: Path, django_capture_on_commit_callbacks: Any
) -> None:
    endpoint = ENDPOINTS[name]
    with django_capture_on_commit_callbacks(execute=True):
        world = build_world(tmp_path, start=not endpoint.waiting)
    assert world.job is not None
    world.job.refresh_from_db()
    assert world.job.state == (JobState.WAITING if endpoint.waiting else JobState.RUNNING)

    with django_capture_on_commit_callbacks(execute=True):
        response = world.call(
            persona, endpoint.method, endpoint.path(world), **endpoint.body(world)
        )

    expected = endpoint.expected[persona]
    assert response.status_code == expected, getattr(response, "data", response)
    if expected >= 400:
        assert set(response.json()) >= {"code", "message"}
