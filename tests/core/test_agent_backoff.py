"""An agent that lost its portal reconnects after a delay drawn over the whole window, so the
agents of a restarted portal come back spread out rather than all at once."""

from __future__ import annotations

import random
from collections import Counter

from client_agent.agent import reconnect_delay


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
