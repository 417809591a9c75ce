"""The agent's outbox: what waits for the portal's acknowledgement, and its bound."""

from __future__ import annotations

import asyncio
from pathlib import Path

from client_agent import agent as agent_module
from client_agent import signing
from client_agent.agent import Agent
from client_agent.site_dir import SiteDir, SiteIdentity


def enrolled_folder(path: Path) -> SiteDir:
    """A site folder as `enrol` leaves it (no portal needed: nothing here is sent)."""
    folder = SiteDir(path)
    identity = SiteIdentity(
        portal="http://127.0.0.1:9",
        site="site-1",
        project="p",
        project_name="P",
        organization="O",
        serial="1",
        fingerprint="ab" * 32,
        not_after="2030-01-01T00:00:00Z",
    )
    folder.save(identity, key=signing.generate_key(), cert_pem="unused", ca_pem="unused")
    return folder


def report(lines: int = 0, points: int = 0) -> dict:
    return {
        "type": "report",
        "job": "j",
        **({"lines": [{"text": "x"}] * lines} if lines else {}),
        **({"points": [{"key": "k", "value": 1.0}] * points} if points else {}),
    }


def test_metrics_are_kept_and_old_output_lines_dropped_past_the_bound(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(agent_module, "MAX_PENDING_LINES", 100)
    agent = Agent(enrolled_folder(tmp_path / "site"), python="/nonexistent/python")

    async def fill() -> None:
        agent.outbox_ready = asyncio.Event()
        metrics_id = agent.enqueue(report(points=3, lines=10))
        for _ in range(20):
            agent.enqueue(report(lines=10))
        assert metrics_id in agent.pending  # a report with points is never dropped

    asyncio.run(fill())

    assert agent.pending_lines <= 100
    assert agent.dropped_lines >= 100
    kept = [m for m in agent.pending.values() if "lines" in m]
    assert sum(len(m["lines"]) for m in kept) == agent.pending_lines
    # The newest lines are the ones kept.
    assert list(agent.pending)[-1] == list(agent.unsent)[-1]
