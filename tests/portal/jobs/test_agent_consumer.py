"""The agents' WebSocket (``jobs.consumers.AgentConsumer``) through the real routes with a
signed handshake: every message gets an answer, and nothing an agent sends closes the socket
(a close would have the agent reconnect and send the same again)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import uuid
from typing import Any

import pytest
import torch
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.db import connection
from django.test.utils import CaptureQueriesContext

from client_agent.protocol import MAX_MESSAGE_BYTES, UpdateMessage
from fedportal.events import BATCH_MESSAGE_TYPE, agents_group
from fedportal.routing import websocket_urlpatterns
from jobs import events
from jobs.consumers import MARK_GATHER_SECONDS
from jobs.models import LogLine, MetricPoint, ModelVersion, Round, SiteTask, TaskState
from jobs.services import telemetry
from jobs.services.rounds import event_model
from jobs.services.tasks import tasks_model_delivered
from tests.portal import jobs_api_world as jw

pytestmark = pytest.mark.django_db(transaction=True)

APP = URLRouter(websocket_urlpatterns)
PATH = "/ws/agent/"


async def site_1_socket(world: jw.World) -> WebsocketCommunicator:
    """The site-1 agent's socket, connected with a signed handshake, its welcome read."""
    headers = world.sites[0].headers("GET", PATH)
    communicator = WebsocketCommunicator(
        APP, PATH, headers=[(k.lower().encode(), v.encode()) for k, v in headers.items()]
    )
    connected, _ = await communicator.connect()
    assert connected
    welcome = await communicator.receive_json_from(timeout=5)
    assert welcome["type"] == "welcome"
    return communicator


def talk(world: jw.World, frames: list[Any]) -> tuple[list[dict[str, Any]], bool]:
    """Open the site-1 agent's socket, send ``frames`` (str: as text; bytes: binary; else as
    JSON), and return every answer and whether the socket is still open at the end."""

    async def run() -> tuple[list[dict[str, Any]], bool]:
        communicator = await site_1_socket(world)
        answers = []
        for frame in frames:
            if isinstance(frame, bytes):
                await communicator.send_to(bytes_data=frame)
            elif isinstance(frame, str):
                await communicator.send_to(text_data=frame)
            else:
                await communicator.send_json_to(frame)
            answers.append(await communicator.receive_json_from(timeout=5))
        # Still open: a heartbeat is taken (no answer), then a report is acknowledged.
        await communicator.send_json_to({"type": "heartbeat"})
        await communicator.send_json_to(report(world, "alive", [{"id": "alive", "text": "ok"}]))
        alive = await communicator.receive_json_from(timeout=5)
        await communicator.disconnect()
        return answers, alive == {"type": "ack", "id": "alive", "stored": 1}

    return async_to_sync(run)()


def report(world: jw.World, message_id: str, lines: Any = None, points: Any = None) -> dict:
    assert world.job is not None
    message: dict[str, Any] = {"type": "report", "id": message_id, "job": str(world.job.uid)}
    if lines is not None:
        message["lines"] = lines
    if points is not None:
        message["points"] = points
    return message


def test_a_report_is_stored_and_acknowledged(jobs_world: jw.World) -> None:
    answers, alive = talk(
        jobs_world,
        [report(jobs_world, "r1", lines=[{"id": "o0", "text": "epoch 1"}])],
    )
    assert answers == [{"type": "ack", "id": "r1", "stored": 1}] and alive
    assert list(LogLine.objects.values_list("text", flat=True)) == ["epoch 1", "ok"]


def test_a_message_over_the_bound_is_refused_with_an_ack_and_the_socket_stays(
    jobs_world: jw.World,
) -> None:
    big = "x" * 1900
    lines = [{"id": f"o{i}", "text": big} for i in range(MAX_MESSAGE_BYTES // 1900 + 10)]
    message = report(jobs_world, "big", lines=lines[:1000])
    assert len(json.dumps(message)) > MAX_MESSAGE_BYTES

    answers, alive = talk(jobs_world, [message])

    (ack,) = answers
    assert ack["type"] == "ack" and ack["id"] == "big"
    assert ack["error"]["code"] == "too_large"
    assert alive
    assert LogLine.objects.filter(client_id="o0").count() == 0


BAD = {
    "a binary frame": (b"\x00\x01", "error", "bad_message"),
    "not JSON": ("{'type': 'report'", "error", "bad_message"),
    "JSON nested too deep": ("[" * 100_000 + "]" * 100_000, "error", "bad_message"),
    "not an object": ("[1, 2]", "error", "bad_message"),
    "an unknown type": ({"type": "upload", "id": "m"}, "ack", "unknown_message"),
    "lines that are no list": ({"type": "report", "id": "m", "lines": "x"}, "ack", "invalid"),
    "points that are no list": ({"type": "report", "id": "m", "points": 7}, "ack", "invalid"),
    "a job id that is no id": (
        {"type": "report", "id": "m", "job": {"a": 1}, "lines": [{"text": "x"}]},
        "ack",
        "not_found",
    ),
    "a line that is no object": (None, "ack", "invalid"),
}


def update(world: jw.World, message_id: str, body: bytes, **change: Any) -> dict[str, Any]:
    """Site 1's ``update`` message for round 0 of the world's job (``change``: fields as sent)."""
    assert world.job is not None
    message = UpdateMessage(
        job=str(world.job.uid), round=0, sha256=hashlib.sha256(body).hexdigest(), data=body
    ).to_json()
    return {**message, "id": message_id, **change}


def an_update(world: jw.World, value: float = 1.0) -> bytes:
    return jw.update_bytes({"w": torch.tensor([value, value]), "n": torch.tensor(1)}, world.tmp)


def site_1_task(world: jw.World) -> SiteTask:
    return SiteTask.objects.get(round__job=world.job, round__number=0, site=world.sites[0].site)


def test_the_welcome_says_the_largest_update_the_socket_takes(
    jobs_world: jw.World, settings
) -> None:
    async def welcome() -> dict[str, Any]:
        headers = jobs_world.sites[0].headers("GET", PATH)
        communicator = WebsocketCommunicator(
            APP, PATH, headers=[(k.lower().encode(), v.encode()) for k, v in headers.items()]
        )
        await communicator.connect()
        try:
            said: dict[str, Any] = await communicator.receive_json_from(timeout=5)
            return said
        finally:
            await communicator.disconnect()

    assert async_to_sync(welcome)()["update_max_bytes"] == 64 * 1024  # the default
    settings.FEDPORTAL_SOCKET_UPDATE_MAX_BYTES = 0
    assert async_to_sync(welcome)()["update_max_bytes"] == 0  # every update over HTTP
    settings.FEDPORTAL_SOCKET_UPDATE_MAX_BYTES = 10**9
    settings.FEDPORTAL_MAX_MODEL_BYTES = 1000
    assert async_to_sync(welcome)()["update_max_bytes"] == 1000  # never over what is kept


def test_an_update_on_the_socket_is_stored_as_an_upload_and_acknowledged_with_the_tasks_state(
    jobs_world: jw.World,
) -> None:
    data = an_update(jobs_world)

    answers, alive = talk(jobs_world, [update(jobs_world, "u1", data)])

    assert answers == [{"type": "ack", "id": "u1", "state": TaskState.UPLOADED}] and alive
    task = site_1_task(jobs_world)
    # Checked and accepted by the round's update check (Celery runs inline here).
    assert task.state == TaskState.ACCEPTED, task.reason
    assert (task.update_sha256, task.update_size) == (hashlib.sha256(data).hexdigest(), len(data))
    with task.update.open("rb") as stored:
        assert stored.read() == data


def test_every_bad_update_on_the_socket_is_refused_as_its_upload_would_be_and_stores_nothing(
    jobs_world: jw.World, settings
) -> None:
    good, other = an_update(jobs_world, 1.0), an_update(jobs_world, 2.0)
    settings.FEDPORTAL_SOCKET_UPDATE_MAX_BYTES = len(good)
    refused = {
        # The bytes are not what the digest says: altered on the way.
        "tampered": update(jobs_world, "tampered", other, sha256=hashlib.sha256(good).hexdigest()),
        "no digest": update(jobs_world, "no digest", good, sha256=""),
        "a round without its task": update(jobs_world, "a round without its task", good, round=3),
        "another job": update(jobs_world, "another job", good, job=str(uuid.uuid4())),
        "over the socket's bound": update(jobs_world, "over the socket's bound", good + b"\0"),
        "not base64": update(jobs_world, "not base64", good, data="%%%"),
    }

    answers, alive = talk(jobs_world, list(refused.values()))

    errors = {answer["id"]: answer["error"] for answer in answers}
    assert {name: (e["code"], e.get("field"), e["status"]) for name, e in errors.items()} == {
        "tampered": ("checksum_mismatch", "sha256", 400),
        "no digest": ("invalid", "sha256", 400),
        "a round without its task": ("not_found", None, 404),
        "another job": ("not_found", None, 404),
        "over the socket's bound": ("too_large", "data", 413),
        "not base64": ("invalid", "data", 400),
    }
    assert alive
    task = site_1_task(jobs_world)
    assert task.state == TaskState.ASSIGNED and not task.update
    assert all("/updates/" not in name for name in jw.stored_files())

    # One update per task, as over HTTP: the second is refused (409) and the first is kept.
    answers, _ = talk(
        jobs_world, [update(jobs_world, "first", good), update(jobs_world, "second", other)]
    )
    assert answers[0] == {"type": "ack", "id": "first", "state": TaskState.UPLOADED}
    assert (answers[1]["error"]["code"], answers[1]["error"]["status"]) == ("conflict", 409)
    assert site_1_task(jobs_world).update_sha256 == hashlib.sha256(good).hexdigest()


@pytest.mark.parametrize("case", list(BAD))
def test_a_malformed_message_gets_an_error_and_the_socket_stays(
    jobs_world: jw.World, case: str
) -> None:
    frame, kind, code = BAD[case]
    if frame is None:
        frame = report(jobs_world, "m", lines=["just a string"])

    answers, alive = talk(jobs_world, [frame])

    (answer,) = answers
    assert answer["type"] == kind, answer
    if kind == "ack":
        assert answer["id"] == "m" and answer["error"]["code"] == code, answer
    else:
        assert answer["code"] == code, answer
    assert alive


def test_lines_faster_than_the_rate_are_told_to_wait_while_points_go_on(
    jobs_world: jw.World, settings, monkeypatch
) -> None:
    settings.FEDPORTAL_LOG_BYTES_PER_SECOND = 10
    settings.FEDPORTAL_LOG_BURST_BYTES = 100
    monkeypatch.setattr(telemetry, "MAX_MESSAGE_BYTES", 100)

    answers, _ = talk(
        jobs_world,
        [
            report(jobs_world, "r1", lines=[{"id": "o0", "text": "a" * 90}]),
            report(jobs_world, "r2", lines=[{"id": "o91", "text": "b" * 90}]),
            report(jobs_world, "r3", lines=[{"id": "o182", "text": "c" * 5}]),
            report(jobs_world, "p1", points=[{"id": "p1", "key": "loss", "value": 0.5}]),
        ],
    )

    first, second, third, points = answers
    assert first == {"type": "ack", "id": "r1", "stored": 1}
    assert second["error"]["code"] == "slow_down" and second["error"]["retry_after"] > 0
    # Told to wait, the socket answers the next line report so until then.
    assert third["error"]["code"] == "slow_down"
    assert points == {"type": "ack", "id": "p1", "stored": 1}
    assert list(LogLine.objects.values_list("text", flat=True)) == ["a" * 90]
    assert MetricPoint.objects.filter(key="loss").count() == 1


def test_a_line_report_sent_before_the_agent_heard_to_wait_is_not_stored_before_the_refused_one(
    jobs_world: jw.World, settings, monkeypatch
) -> None:
    # The agent sends several reports before it hears an answer: r2 is told to slow down, and
    # r3, sent meanwhile, arrives once the wait is over with room for its few bytes. Stored,
    # it would come before r2 in the site's output: it is told to wait too, and both are
    # stored in their order when the agent sends them again.
    settings.FEDPORTAL_LOG_BYTES_PER_SECOND = 1000
    settings.FEDPORTAL_LOG_BURST_BYTES = 100
    monkeypatch.setattr(telemetry, "MAX_MESSAGE_BYTES", 100)
    r1 = report(jobs_world, "r1", lines=[{"id": "o0", "text": "a" * 90}])
    r2 = report(jobs_world, "r2", lines=[{"id": "o91", "text": "b" * 90}])
    r3 = report(jobs_world, "r3", lines=[{"id": "o182", "text": "c" * 5}])

    async def run() -> list[dict[str, Any]]:
        communicator = await site_1_socket(jobs_world)
        answers = []
        for frame, pause in ((r1, 0), (r2, 0.15), (r3, 0.15), (r2, 0), (r3, 0)):
            await communicator.send_json_to(frame)
            answers.append(await communicator.receive_json_from(timeout=5))
            await asyncio.sleep(pause)  # the wait told, and the quota's refill, are over
        await communicator.disconnect()
        return answers

    first, slowed, overtaking, again, last = async_to_sync(run)()

    assert first == {"type": "ack", "id": "r1", "stored": 1}
    assert slowed["error"]["code"] == "slow_down"
    assert overtaking["id"] == "r3" and overtaking["error"]["code"] == "slow_down"
    assert overtaking["error"]["retry_after"] > 0
    assert again == {"type": "ack", "id": "r2", "stored": 1}
    assert last == {"type": "ack", "id": "r3", "stored": 1}
    assert list(LogLine.objects.order_by("pk").values_list("text", flat=True)) == [
        "a" * 90,
        "b" * 90,
        "c" * 5,
    ]


def test_a_round_event_that_brings_the_model_marks_the_task_training_as_it_goes_out(
    jobs_world: jw.World,
) -> None:
    # As the model's download with ?then=training would have: the job's page shows the site
    # at work, and the agent starts without a request.
    assert jobs_world.job is not None
    job = jobs_world.job
    rnd = Round.objects.get(job=job, number=0)
    start = ModelVersion.objects.get(job=job, round_number=0)
    model = event_model(start)
    assert model is not None

    def publish_round() -> None:
        events.round_state(rnd, task={"task_name": "train"}, model=model)

    def training() -> list[str]:
        return list(SiteTask.objects.filter(state="training").values_list("site__name", flat=True))

    async def run() -> tuple[dict[str, Any], list[str], list[dict[str, Any]]]:
        layer = get_channel_layer()
        job_channel = await layer.new_channel()
        await layer.group_add(f"job.{job.pk}", job_channel)
        communicator = await site_1_socket(jobs_world)
        await database_sync_to_async(publish_round)()
        heard = await communicator.receive_json_from(timeout=5)
        # Marked a moment after the event went out, with the other sockets' of that moment.
        marked: list[str] = []
        for _ in range(100):
            marked = await database_sync_to_async(training)()
            if marked:
                break
            await asyncio.sleep(MARK_GATHER_SECONDS)
        await communicator.disconnect()
        page = []
        with contextlib.suppress(TimeoutError):
            while True:
                page.append((await asyncio.wait_for(layer.receive(job_channel), 0.5))["event"])
        return heard, marked, page

    heard, marked, page = async_to_sync(run)()

    assert heard["type"] == "event" and heard["event"]["model"] == model
    assert "site_ids" not in heard["event"]  # the other sites' ids are none of its business
    assert marked == ["site-1"]
    states = dict(SiteTask.objects.filter(round=rnd).values_list("site__name", "state"))
    assert states == {"site-1": "training", "site-2": "assigned", "site-3": "assigned"}
    # The job's page hears of the task, and never gets the model's bytes.
    told = [(e["site"], e["state"], e["round"]) for e in page if e["kind"] == "task.state"]
    assert told == [("site-1", "training", 0)]
    assert all("model" not in event for event in page)


def test_the_tasks_of_many_sites_are_marked_in_statements_that_do_not_grow_with_them(
    jobs_world: jw.World,
) -> None:
    assert jobs_world.job is not None
    job = jobs_world.job
    event = {"job_id": job.pk, "project_id": job.project_id, "round": 0}
    site_1, site_2, site_3 = (s.site for s in jobs_world.sites)
    Round.objects.filter(job=job, number=0).update(state="closed")

    assert tasks_model_delivered([(event, site_1.pk, site_1.name)]) == 0  # the round closed
    assert set(SiteTask.objects.values_list("state", flat=True)) == {"assigned"}
    Round.objects.filter(job=job, number=0).update(state="open")
    SiteTask.objects.filter(site=site_3).update(state="uploaded")  # moved on: stays
    with CaptureQueriesContext(connection) as one:
        assert tasks_model_delivered([(event, site_1.pk, site_1.name)]) == 1
    SiteTask.objects.filter(site=site_1).update(state="assigned")
    layer = get_channel_layer()
    job_page = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(f"job.{job.pk}", job_page)
    with CaptureQueriesContext(connection) as three:
        moved = tasks_model_delivered([(event, s.pk, s.name) for s in (site_1, site_2, site_3)])

    assert moved == 2
    assert len(three) == len(one)
    # The job's page is told of both in one message (events.publish_all), not one each.
    told = async_to_sync(layer.receive)(job_page)
    assert told["type"] == BATCH_MESSAGE_TYPE
    assert sorted(e["site"] for e in told["events"]) == ["site-1", "site-2"]
    states = dict(SiteTask.objects.values_list("site__name", "state"))
    assert states == {"site-1": "training", "site-2": "training", "site-3": "uploaded"}
    assert tasks_model_delivered([(event, site_1.pk, site_1.name)]) == 0  # once


def test_a_round_event_for_the_projects_agents_reaches_only_the_sites_it_names(
    jobs_world: jw.World,
) -> None:
    site_1, site_2 = jobs_world.sites[0].site, jobs_world.sites[1].site
    opened: dict[str, Any] = {"kind": "round.state", "state": "open"}

    async def run() -> list[dict[str, Any]]:
        layer = get_channel_layer()
        communicator = await site_1_socket(jobs_world)
        group = agents_group(site_1.project_id)
        for named in ([site_2.pk], [site_2.pk, site_1.pk]):
            event = {**opened, "round": len(named), "site_ids": named}
            await layer.group_send(group, {"type": events.MESSAGE_TYPE, "event": event})
        heard = [await communicator.receive_json_from(timeout=5)]
        assert await communicator.receive_nothing(timeout=0.3)
        await communicator.disconnect()
        return heard

    assert async_to_sync(run)() == [
        {"type": "event", "event": {"kind": "round.state", "state": "open", "round": 2}}
    ]


def test_the_events_of_a_batch_reach_the_agent_one_by_one_in_order_and_only_its_own(
    jobs_world: jw.World,
) -> None:
    # fedportal.events.send_all_after_commit: one message for several events.
    site_1, site_2 = jobs_world.sites[0].site, jobs_world.sites[1].site
    batch = [
        {"kind": "round.state", "state": "open", "round": 1, "site_ids": [site_1.pk]},
        {"kind": "round.state", "state": "open", "round": 2, "site_ids": [site_2.pk]},
        {"kind": "job.state", "state": "running"},
    ]

    async def run() -> list[dict[str, Any]]:
        layer = get_channel_layer()
        communicator = await site_1_socket(jobs_world)
        await layer.group_send(
            agents_group(site_1.project_id), {"type": BATCH_MESSAGE_TYPE, "events": batch}
        )
        heard = [await communicator.receive_json_from(timeout=5) for _ in range(2)]
        assert await communicator.receive_nothing(timeout=0.3)
        await communicator.disconnect()
        return heard

    assert async_to_sync(run)() == [
        {"type": "event", "event": {"kind": "round.state", "state": "open", "round": 1}},
        {"type": "event", "event": {"kind": "job.state", "state": "running"}},
    ]
