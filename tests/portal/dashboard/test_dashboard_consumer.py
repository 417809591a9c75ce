"""The dashboard's WebSocket: who may listen to a job's or project's events, through the real
routes (session cookie, Origin check), and that the events published by the services arrive."""

from __future__ import annotations

from pathlib import Path

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client

from dashboard.consumers import CLOSE_NOT_FOUND
from fedportal.routing import websocket_urlpatterns
from jobs.models import MetricPoint
from jobs.services.participation import site_job_decide
from jobs.services.tasks import tasks_model_delivered
from jobs.services.telemetry import metrics_record
from tests.portal import jobs_api_world as jw

pytestmark = pytest.mark.django_db(transaction=True)

APP = URLRouter(websocket_urlpatterns)


# The Origin validator reads ALLOWED_HOSTS when the routes are built, before the test setup adds
# "testserver"; localhost is in the default ALLOWED_HOSTS.
def headers_for(user, origin: str = "http://localhost") -> list[tuple[bytes, bytes]]:
    headers = [(b"origin", origin.encode())]
    if user is not None:
        client = Client()
        client.force_login(user)
        cookie = client.cookies[settings.SESSION_COOKIE_NAME].value
        headers.append((b"cookie", f"{settings.SESSION_COOKIE_NAME}={cookie}".encode()))
    return headers


async def _open(path: str, headers) -> tuple[WebsocketCommunicator, bool, object]:
    communicator = WebsocketCommunicator(APP, path, headers=headers)
    connected, code = await communicator.connect()
    return communicator, connected, code


def try_connect(path: str, user, **kwargs) -> tuple[bool, object]:
    headers = headers_for(user, **kwargs)

    async def run() -> tuple[bool, object]:
        communicator, connected, code = await _open(path, headers)
        await communicator.disconnect()
        return connected, code

    return async_to_sync(run)()


def test_people_of_the_project_listen_to_its_jobs_and_others_are_refused(jobs_world) -> None:
    job_path = f"/ws/dashboard/jobs/{jobs_world.job.uid}/"
    project_path = f"/ws/dashboard/projects/{jobs_world.project.slug}/"
    for persona in (jw.ADMIN, jw.LEAD, jw.MEMBER, jw.ORG_ADMIN):
        assert try_connect(job_path, jobs_world.users[persona])[0], persona
        assert try_connect(project_path, jobs_world.users[persona])[0], persona
    # Another project's admin, and nobody signed in: refused, as the page would be 404.
    assert try_connect(job_path, jobs_world.users[jw.OUTSIDER]) == (False, CLOSE_NOT_FOUND)
    assert try_connect(project_path, jobs_world.users[jw.OUTSIDER]) == (False, CLOSE_NOT_FOUND)
    assert try_connect(job_path, None) == (False, CLOSE_NOT_FOUND)
    assert (
        try_connect("/ws/dashboard/projects/no-such-project/", jobs_world.users[jw.ADMIN])[0]
        is False
    )
    # A page of another site may not open a socket with the person's cookie.
    assert not try_connect(job_path, jobs_world.users[jw.LEAD], origin="http://evil.example")[0]


def test_a_metric_posted_by_a_site_reaches_the_jobs_socket(jobs_world) -> None:
    job = jobs_world.job
    site = jobs_world.sites[0].site
    headers = headers_for(jobs_world.users[jw.MEMBER])

    async def run():
        communicator, connected, _ = await _open(f"/ws/dashboard/jobs/{job.uid}/", headers)
        assert connected
        hello = await communicator.receive_json_from()
        assert hello == {"kind": "hello", "group": f"job.{job.pk}"}
        stored = await database_sync_to_async(metrics_record)(
            job=job, site=site, points=[{"key": "loss", "value": 0.25, "step": 7}]
        )
        assert stored == 1
        event = await communicator.receive_json_from(timeout=2)
        await communicator.disconnect()
        return event

    event = async_to_sync(run)()
    assert event["kind"] == "metrics" and event["job_id"] == job.pk
    assert event["site"] == "site-1"
    point = MetricPoint.objects.get(job=job, site=site)
    assert event["points"] == [
        {"id": point.pk, "key": "loss", "value": 0.25, "step": 7, "round": None, "source": "log"}
    ]


@pytest.mark.usefixtures("media")
def test_a_sites_decision_reaches_the_jobs_page(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path, start=False)  # waiting for sites 2 and 3 to decide
    job = world.job
    assert job is not None
    headers = headers_for(world.users[jw.MEMBER])

    async def run():
        communicator, connected, _ = await _open(f"/ws/dashboard/jobs/{job.uid}/", headers)
        assert connected
        assert (await communicator.receive_json_from())["kind"] == "hello"
        await database_sync_to_async(site_job_decide)(
            job=job, site=world.sites[1].site, accept=False, decided_by=world.users[jw.ORG_ADMIN]
        )
        event = await communicator.receive_json_from(timeout=2)
        await communicator.disconnect()
        return event

    event = async_to_sync(run)()
    assert event == {
        "kind": "job.decision",
        "job_id": job.pk,
        "project_id": job.project_id,
        "site": "site-2",
        "decision": "declined",
        "decided_by": jw.ORG_ADMIN,
    }


def test_tasks_marked_together_reach_the_jobs_socket_a_frame_each(jobs_world) -> None:
    # A round's event delivered the model to three sites at once: their tasks are marked
    # training in one transaction, and the job's page hears of them in one message.
    job = jobs_world.job
    sites = [world_site.site for world_site in jobs_world.sites]
    event = {"job_id": job.pk, "project_id": job.project_id, "round": 0}
    headers = headers_for(jobs_world.users[jw.MEMBER])

    async def run():
        communicator, connected, _ = await _open(f"/ws/dashboard/jobs/{job.uid}/", headers)
        assert connected
        await communicator.receive_json_from()  # hello
        moved = await database_sync_to_async(tasks_model_delivered)(
            [(event, site.pk, site.name) for site in sites]
        )
        frames = [await communicator.receive_json_from(timeout=2) for _ in range(moved)]
        assert await communicator.receive_nothing(timeout=0.3)
        await communicator.disconnect()
        return moved, frames

    moved, frames = async_to_sync(run)()

    assert moved == 3
    told = sorted((frame["kind"], frame["site"], frame["state"]) for frame in frames)
    assert told == [("task.state", site.name, "training") for site in sites]
