"""An agent that lost its portal reconnects after a delay drawn over the whole window, so the
agents of a restarted portal come back spread out rather than all at once; and what it does
every so often (heartbeats, the safety listing) is jittered, so agents that connected
together do not do it together ever after."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from types import SimpleNamespace

import pytest

from client_agent import agent as agent_module
from client_agent.agent import jittered, reconnect_delay


def test_the_window_doubles_from_one_second_up_to_the_cap() -> None:
    rng = random.Random(7)
    for attempt, window in [(0, 1.0), (1, 2.0), (2, 4.0), (4, 16.0), (5, 30.0), (60, 30.0)]:
        draws = [reconnect_delay(attempt, cap=30.0, rng=rng) for _ in range(2000)]
        assert min(draws) >= 0.0 and max(draws) <= window
        # The whole window is used: some draws near each end.
        assert min(draws) < 0.05 * window and max(draws) > 0.95 * window


def test_three_hundred_agents_losing_their_portal_together_come_back_spread_out() -> None:
    rng = random.Random(11)
    delays = [reconnect_delay(0, rng=rng) for _ in range(300)]
    per_tenth = Counter(int(delay * 10) for delay in delays)
    # Even over the first second: about 30 in each tenth of it. With the old delay (0.5 s
    # times 0.8 to 1.2) every agent came back between 0.4 and 0.6 s.
    assert len(per_tenth) == 10
    assert max(per_tenth.values()) < 50, per_tenth


def test_jitter_spreads_agents_that_connected_together() -> None:
    rng = random.Random(5)
    draws = [jittered(30.0, rng=rng) for _ in range(2000)]
    assert 24.0 <= min(draws) < 24.5 and 35.5 < max(draws) <= 36.0
    # 150 agents that connected in the same second list their jobs every 30 s: by their third
    # listing they are spread over more than 20 s, no more than 25 of them in any one second
    # (without the jitter all 150 listed in the same second, every time).
    third = [sum(jittered(30.0, rng=rng) for _ in range(3)) for _ in range(150)]
    per_second = Counter(int(at) for at in third)
    assert max(third) - min(third) > 20.0
    assert max(per_second.values()) <= 25, per_second


class _Stop(Exception):
    """Ends a loop under test."""


def test_an_agent_jitters_its_heartbeats_and_its_safety_listing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits: list[float] = []

    def no_wait(seconds: float) -> float:
        waits.append(seconds)
        return 0.0

    monkeypatch.setattr(agent_module, "jittered", no_wait)
    agent = agent_module.Agent.__new__(agent_module.Agent)
    agent.client = SimpleNamespace(record=lambda *args: None)  # type: ignore[assignment]
    sent: list[str] = []

    class Socket:
        async def send(self, data: str) -> None:
            sent.append(data)
            if len(sent) == 3:
                raise _Stop

    with pytest.raises(_Stop):
        asyncio.run(agent._heartbeat(Socket(), 15.0))
    assert waits == [15.0, 15.0, 15.0]

    waits.clear()
    listings: list[int] = []

    async def sync() -> None:
        listings.append(1)
        if len(listings) == 2:
            raise _Stop

    async def work() -> None:
        agent.wake = asyncio.Event()
        await agent._work_loop()

    agent.poll_seconds, agent.ws = 10.0, object()  # connected: the listing every 3 polls
    agent.sync = sync  # type: ignore[method-assign]
    with pytest.raises(_Stop):
        asyncio.run(work())
    assert waits == [30.0, 30.0]
