"""The site agent's socket against the real portal: Daphne in a subprocess on the test
database (the browser tests' server), its 1 MiB message cap included. What the agent sends
arrives, and nothing it sends makes it reconnect for ever."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from django.conf import settings

from client_agent import agent as agent_module
from client_agent.agent import Agent, JobRunner
from client_agent.portal import RoundClosed
from client_agent.protocol import MAX_MESSAGE_BYTES, Report
from jobs.envs.poc.env import _redis_answers
from jobs.models import LogLine, SiteTask, TaskState
from tests import daphne_portal
from tests.portal import jobs_api_world as jw
from tests.site_folders import site_folder

# The portal the browser tests use: Daphne serving the test database, one for this module.
REDIS_URL = daphne_portal.REDIS_URL
media_root = daphne_portal.media_root
portal_url = daphne_portal.portal_url

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not _redis_answers(REDIS_URL), reason=f"needs Redis at {REDIS_URL}"),
]


class Sent(list[int]):
    """A wire recorder: the size of every WebSocket message the agent sends."""

    def __call__(self, channel: str, method: str, path: str, body: bytes) -> None:
        if method == "SEND":
            self.append(len(body))


@pytest.fixture
def sent() -> Sent:
    return Sent()


def lines(count: int, width: int, start: int = 0) -> list[dict[str, Any]]:
    return [
        {"id": f"o{i}", "stream": "script", "text": f"{i:05d} " + "z" * width, "round": 0}
        for i in range(start, start + count)
    ]


async def deliver(agent: Agent, timeout: float = 60) -> None:
    """Run the agent's connection until its outbox is empty (everything answered)."""
    connection = asyncio.create_task(agent._connection_loop())
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while agent.outbox.pending:
            assert not connection.done(), connection
            assert asyncio.get_running_loop().time() < deadline, "the outbox never emptied"
            await asyncio.sleep(0.1)
    finally:
        connection.cancel()
        await asyncio.gather(connection, return_exceptions=True)


def job_uid(world: jw.World) -> str:
    assert world.job is not None
    return str(world.job.uid)


def stored(world: jw.World) -> list[str]:
    site = world.sites[0].site
    return list(
        LogLine.objects.filter(job=world.job, site=site)
        .order_by("id")
        .values_list("client_id", flat=True)
    )


def test_a_report_over_daphnes_cap_is_split_after_the_drop_and_delivered(
    jobs_world: jw.World, portal_url: str, tmp_path: Path, sent: Sent
) -> None:
    said: list[str] = []
    folder = site_folder(tmp_path / "site", jobs_world.sites[0], portal_url)
    agent = Agent(folder, say=said.append, wire=sent)
    # As an agent without a byte bound: 1000 lines of 1.5 KB in one 1.5 MB message.
    agent.outbox.message_budget = 4 * 1024 * 1024
    batch = lines(1000, 1500)
    first = agent.enqueue(Report(job=job_uid(jobs_world), lines=batch))
    assert len(agent.outbox.encoded(first)) > 1024 * 1024

    asyncio.run(deliver(agent))

    assert stored(jobs_world) == [line["id"] for line in batch]  # all, in order
    connects = [s for s in said if "connected to" in s]
    assert len(connects) == 3  # dropped twice with the large message, then split
    assert agent.outbox.message_budget <= MAX_MESSAGE_BYTES
    assert max(sent[-3:]) <= MAX_MESSAGE_BYTES
    assert agent.outbox.dropped_lines == 0 and agent.outbox.refused_messages == 0


def test_a_report_the_portal_refuses_for_size_is_dropped_counted_and_never_resent(
    jobs_world: jw.World, portal_url: str, tmp_path: Path, sent: Sent
) -> None:
    said: list[str] = []
    folder = site_folder(tmp_path / "site", jobs_world.sites[0], portal_url)
    agent = Agent(folder, say=said.append, wire=sent)
    agent.outbox.message_budget = 900 * 1024  # over the protocol's bound, under Daphne's
    job = job_uid(jobs_world)
    too_big = agent.enqueue(Report(job=job, lines=lines(400, 1500)))
    later = agent.enqueue(Report(job=job, lines=lines(2, 10, start=400)))

    asyncio.run(deliver(agent))

    assert too_big not in agent.outbox.pending and later not in agent.outbox.pending
    assert stored(jobs_world) == ["o400", "o401"]  # the later report arrived
    assert agent.outbox.refused_messages == 1 and agent.outbox.dropped_lines == 400
    assert any("too_large" in s and "is dropped" in s for s in said), said
    assert len([s for s in said if "connected to" in s]) == 1
    assert len([size for size in sent if size > MAX_MESSAGE_BYTES]) == 1  # sent once


def test_an_agent_bounds_every_message_it_makes(
    jobs_world: jw.World, portal_url: str, tmp_path: Path, sent: Sent
) -> None:
    said: list[str] = []
    folder = site_folder(tmp_path / "site", jobs_world.sites[0], portal_url)
    agent = Agent(folder, say=said.append, wire=sent)
    batch = lines(3000, 1500)  # 4.5 MB of output at once

    agent.enqueue_report(job_uid(jobs_world), "lines", batch, agent_module.LOG_LINES_PER_MESSAGE)
    asyncio.run(deliver(agent))

    assert stored(jobs_world) == [line["id"] for line in batch]
    assert sent and max(sent) <= MAX_MESSAGE_BYTES
    assert len([s for s in said if "connected to" in s]) == 1


class Wire(list[tuple[str, str]]):
    """A wire recorder: (channel, method) of everything the agent sends."""

    def __call__(self, channel: str, method: str, path: str, body: bytes) -> None:
        self.append((channel, method))


def site_1_runner(agent: Agent, world: jw.World) -> JobRunner:
    assert world.job is not None
    job = {"uid": str(world.job.uid), "name": world.job.name, "num_rounds": 2}
    return JobRunner(agent, {**job, "spec_url": "", "bundle_url": ""})


def update_file(world: jw.World, tmp_path: Path, values: int = 2) -> Path:
    """Site 1's update for round 0, as its agent sends it; ``values``: the tensor's size."""
    path = tmp_path / f"update-{values}.safetensors"
    path.write_bytes(jw.update_bytes({"w": torch.ones(values), "n": torch.tensor(1)}, tmp_path))
    return path


def upload_connected(agent: Agent, runner: JobRunner, update: Path) -> None:
    """Connect the agent's socket, then send round 0's update as a round does."""

    async def run() -> None:
        connection = asyncio.create_task(agent._connection_loop())
        try:
            deadline = asyncio.get_running_loop().time() + 30
            while agent.ws is None:
                assert not connection.done(), connection
                assert asyncio.get_running_loop().time() < deadline, "never connected"
                await asyncio.sleep(0.05)
            await runner._upload(
                f"{agent_module.JOBS_PATH}{runner.uid}/rounds/0/update/", update, 0
            )
        finally:
            connection.cancel()
            await asyncio.gather(connection, return_exceptions=True)

    asyncio.run(run())


def site_1_task(world: jw.World) -> SiteTask:
    return SiteTask.objects.get(round__job=world.job, round__number=0, site=world.sites[0].site)


def test_a_small_update_goes_on_the_socket_not_as_a_signed_upload(
    jobs_world: jw.World, portal_url: str, tmp_path: Path
) -> None:
    wire = Wire()
    agent = Agent(site_folder(tmp_path / "site", jobs_world.sites[0], portal_url), wire=wire)
    update = update_file(jobs_world, tmp_path)

    upload_connected(agent, site_1_runner(agent, jobs_world), update)

    task = site_1_task(jobs_world)
    assert task.state == TaskState.UPLOADED
    assert task.update_sha256 == hashlib.sha256(update.read_bytes()).hexdigest()
    assert ("ws", "UPDATE") in wire and ("http", "PUT") not in wire
    # A second try of the same round (an agent restarted) hears what a second upload hears:
    # the task took one.
    again = Agent(site_folder(tmp_path / "site", jobs_world.sites[0], portal_url), wire=wire)
    with pytest.raises(RoundClosed) as caught:
        upload_connected(again, site_1_runner(again, jobs_world), update)
    assert (caught.value.status, caught.value.code) == (409, "conflict")


def test_an_update_larger_than_the_welcome_takes_is_uploaded_over_http(
    jobs_world: jw.World, portal_url: str, tmp_path: Path
) -> None:
    wire = Wire()
    agent = Agent(site_folder(tmp_path / "site", jobs_world.sites[0], portal_url), wire=wire)
    update = update_file(jobs_world, tmp_path, values=20_000)  # 80 kB, over the default 64 KiB
    assert update.stat().st_size > settings.FEDPORTAL_SOCKET_UPDATE_MAX_BYTES

    upload_connected(agent, site_1_runner(agent, jobs_world), update)

    assert agent.update_max_bytes == 0  # disconnected now; it was the welcome's while connected
    task = site_1_task(jobs_world)
    assert task.state == TaskState.UPLOADED and task.update_size == update.stat().st_size
    assert ("http", "PUT") in wire and ("ws", "UPDATE") not in wire


def test_an_update_whose_socket_closes_before_the_answer_is_uploaded_over_http_at_once(
    jobs_world: jw.World, portal_url: str, tmp_path: Path
) -> None:
    wire = Wire()
    said: list[str] = []
    agent = Agent(
        site_folder(tmp_path / "site", jobs_world.sites[0], portal_url), wire=wire, say=said.append
    )
    update = update_file(jobs_world, tmp_path)
    original = agent.send_update

    async def lost_on_the_way(job: str, number: int, path: Path) -> Any:
        # The update never reaches the portal (a heartbeat, which has no answer, goes in its
        # place), and the socket then closes cleanly: closed here from the agent's side, as a
        # portal that shuts down closes it from its own.
        ws = agent.ws
        real_send = ws.send

        async def swapped(message: str) -> None:
            await real_send('{"type":"heartbeat"}')
            asyncio.get_running_loop().call_later(0.3, lambda: asyncio.ensure_future(ws.close()))

        ws.send = swapped
        return await original(job, number, path)

    agent.send_update = lost_on_the_way  # type: ignore[method-assign]
    started = time.monotonic()

    upload_connected(agent, site_1_runner(agent, jobs_world), update)

    # Over HTTP as soon as the socket closed: neither the wait for an answer (30 s) nor the
    # next heartbeat (which had found the closed socket up to 18 s later).
    assert time.monotonic() - started < 5
    assert site_1_task(jobs_world).state == TaskState.UPLOADED
    assert wire.count(("ws", "UPDATE")) == 1 and wire.count(("http", "PUT")) == 1
    assert "the portal closed the connection; reconnecting" in " ".join(said)
