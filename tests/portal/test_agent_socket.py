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
from client_agent.portal import record_outgoing
from client_agent.protocol import MAX_MESSAGE_BYTES, encode
from jobs.envs.poc import _redis_answers
from jobs.models import LogLine
from tests.browser import conftest as browser
from tests.portal import jobs_api_world as jw
from tests.portal.test_agent_live import site_folder

# The browser tests' portal: Daphne serving the test database.
REDIS_URL = browser.REDIS_URL
media_root = browser.media_root
portal_url = browser.portal_url

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not _redis_answers(REDIS_URL), reason=f"needs Redis at {REDIS_URL}"),
]


@pytest.fixture
def sent() -> Any:
    """The size of every WebSocket message the agent sends."""
    sizes: list[int] = []
    record_outgoing(
        lambda channel, method, path, body: sizes.append(len(body)) if method == "SEND" else None
    )
    yield sizes
    record_outgoing(None)


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
        while agent.pending:
            assert not connection.done(), connection
            assert asyncio.get_running_loop().time() < deadline, "the outbox never emptied"
            await asyncio.sleep(0.1)
    finally:
        connection.cancel()
        await asyncio.gather(connection, return_exceptions=True)


def stored(world: jw.World) -> list[str]:
    site = world.sites[0].site
    return list(
        LogLine.objects.filter(job=world.job, site=site)
        .order_by("id")
        .values_list("client_id", flat=True)
    )


def test_a_report_over_daphnes_cap_is_split_after_the_drop_and_delivered(
    world: jw.World, portal_url: str, tmp_path: Path, sent: list[int]
) -> None:
    said: list[str] = []
    agent = Agent(site_folder(tmp_path / "site", world.sites[0], portal_url), say=said.append)
    # As an agent without a byte bound: 1000 lines of 1.5 KB in one 1.5 MB message.
    agent.message_budget = 4 * 1024 * 1024
    batch = lines(1000, 1500)
    agent.enqueue({"type": "report", "job": str(world.job.uid), "lines": batch})
    assert len(encode(agent.pending[next(iter(agent.pending))])) > 1024 * 1024

    asyncio.run(deliver(agent))

    assert stored(world) == [line["id"] for line in batch]  # all, in order
    connects = [s for s in said if "connected to" in s]
    assert len(connects) == 3  # dropped twice with the large message, then split
    assert agent.message_budget <= MAX_MESSAGE_BYTES and max(sent[-3:]) <= MAX_MESSAGE_BYTES
    assert agent.dropped_lines == 0 and agent.refused_messages == 0


def test_a_report_the_portal_refuses_for_size_is_dropped_counted_and_never_resent(
    world: jw.World, portal_url: str, tmp_path: Path, sent: list[int]
) -> None:
    said: list[str] = []
    agent = Agent(site_folder(tmp_path / "site", world.sites[0], portal_url), say=said.append)
    agent.message_budget = 900 * 1024  # over the protocol's bound, under Daphne's
    job = str(world.job.uid)
    too_big = agent.enqueue({"type": "report", "job": job, "lines": lines(400, 1500)})
    later = agent.enqueue({"type": "report", "job": job, "lines": lines(2, 10, start=400)})

    asyncio.run(deliver(agent))

    assert too_big not in agent.pending and later not in agent.pending
    assert stored(world) == ["o400", "o401"]  # the later report arrived
    assert agent.refused_messages == 1 and agent.dropped_lines == 400
    assert any("too_large" in s and "is dropped" in s for s in said), said
    assert len([s for s in said if "connected to" in s]) == 1
    assert len([size for size in sent if size > MAX_MESSAGE_BYTES]) == 1  # sent once


def test_an_agent_bounds_every_message_it_makes(
    world: jw.World, portal_url: str, tmp_path: Path, sent: list[int]
) -> None:
    said: list[str] = []
    agent = Agent(site_folder(tmp_path / "site", world.sites[0], portal_url), say=said.append)
    batch = lines(3000, 1500)  # 4.5 MB of output at once

    agent.enqueue_report(str(world.job.uid), "lines", batch, agent_module.LOG_LINES_PER_MESSAGE)
    asyncio.run(deliver(agent))

    assert stored(world) == [line["id"] for line in batch]
    assert sent and max(sent) <= MAX_MESSAGE_BYTES
    assert len([s for s in said if "connected to" in s]) == 1
