"""The site agent's socket against the real portal: Daphne in a subprocess on the test
database (the browser tests' server), its 1 MiB message cap included. What the agent sends
arrives, and nothing it sends makes it reconnect for ever."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from client_agent import agent as agent_module
from client_agent.agent import Agent
from client_agent.protocol import MAX_MESSAGE_BYTES, Report
from jobs.envs.poc.env import _redis_answers
from jobs.models import LogLine
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
