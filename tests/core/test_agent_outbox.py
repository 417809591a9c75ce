"""The agent's outbox: what waits for the portal's acknowledgement, its bounds, and what the
agent does when the portal refuses a report, asks it to slow down, or drops the socket."""

from __future__ import annotations

import asyncio
from pathlib import Path

from client_agent import agent as agent_module
from client_agent.agent import Agent, JobRunner
from client_agent.portal import PortalError, PortalUnreachable
from client_agent.protocol import MAX_LINE_BYTES, MAX_LINE_CHARS, MAX_MESSAGE_BYTES, encode
from client_agent.reports import OutputTail, pack
from tests.site_folders import enrolled_folder


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


def test_output_lines_are_read_whole_and_an_overlong_one_is_cut_with_a_marker(
    tmp_path: Path,
) -> None:
    log = tmp_path / "log.txt"
    long = "y" * 1500
    with open(log, "w") as fh:
        fh.write("first\n" + "x" * 3_000_000 + "\n")
        fh.writelines(f"{i} {long}\n" for i in range(10_000))
        fh.write("no newline yet")
    tail = OutputTail(log)
    got: list[tuple[int, str]] = []
    while tail.offset < log.stat().st_size:
        got.extend(tail.read())
        assert len(tail.head) <= MAX_LINE_BYTES  # never more of a line in memory

    assert len(got) == 10_002
    assert got[0] == (0, "first")
    start, cut = got[1]
    assert start == 6 and len(cut) == MAX_LINE_CHARS
    assert cut.startswith("xxx") and cut.endswith(" … [line cut: 3000000 bytes in all]")
    assert got[2] == (6 + 3_000_001, f"0 {long}")
    assert got[-1][1] == f"9999 {long}"
    assert tail.read() == []  # a line is not complete before its newline ...
    last = log.stat().st_size - len("no newline yet")
    assert tail.read(final=True) == [(last, "no newline yet")]  # ... or the script's end
    assert tail.read(final=True) == []


def test_reports_are_packed_in_order_under_the_byte_budget() -> None:
    items = [{"id": f"o{i}", "text": "z" * (100 + i % 1900)} for i in range(3000)]
    huge = {"id": "huge", "text": "h" * 70_000}
    envelope = {"type": "report", "job": "0" * 36}

    batches, too_large = pack(
        [*items[:10], huge, *items[10:]], envelope=envelope, key="lines", most=500, budget=65536
    )

    assert too_large == [huge]
    assert [item for batch in batches for item in batch] == items
    for batch in batches:
        assert len(batch) <= 500
        assert len(encode({**envelope, "id": "report:0123abcd:999999", "lines": batch})) <= 65536


def test_a_report_the_portal_refuses_is_dropped_and_counted_not_resent(tmp_path: Path) -> None:
    said: list[str] = []
    agent = Agent(enrolled_folder(tmp_path / "site"), python="/nonexistent/python", say=said.append)

    async def refuse() -> None:
        refused = agent.enqueue(report(lines=7))
        agent._acknowledged(refused, {"code": "too_large", "message": "600000 bytes"})
        assert refused not in agent.pending

    asyncio.run(refuse())

    assert (agent.refused_messages, agent.dropped_lines, agent.pending_lines) == (1, 7, 0)
    assert "too_large" in said[-1] and "is dropped" in said[-1]


def test_told_to_slow_down_line_reports_wait_in_order_while_points_go(tmp_path: Path) -> None:
    agent = Agent(enrolled_folder(tmp_path / "site"), python="/nonexistent/python")

    async def slowed() -> list[str | None]:
        first, second = agent.enqueue(report(lines=1)), agent.enqueue(report(lines=1))
        sent = [agent._next_to_send(), agent._next_to_send()]  # both on the wire
        assert sent == [first, second]
        agent.in_flight.update(sent)
        points = agent.enqueue(report(points=1))
        agent._acknowledged(first, {"code": "slow_down", "retry_after": 30})
        agent._acknowledged(second, {"code": "slow_down", "retry_after": 30})
        held = [agent._next_to_send(), agent._next_to_send()]
        assert held == [points, None]  # the lines wait; the points do not
        agent.hold_lines_until = agent.loop.time()  # the wait is over
        return [agent._next_to_send(), agent._next_to_send()]

    assert asyncio.run(slowed()) == list(agent.pending)[:2]
    assert agent.refused_messages == 0 and agent.dropped_lines == 0


def test_a_dropped_socket_with_a_large_message_in_flight_splits_what_waits(
    tmp_path: Path,
) -> None:
    agent = Agent(enrolled_folder(tmp_path / "site"), python="/nonexistent/python")
    agent.message_budget = 4 << 20
    lines = [{"id": f"o{i}", "text": "z" * 1500} for i in range(1000)]

    async def lose_twice() -> None:
        big = agent.enqueue({"type": "report", "job": "j", "lines": lines})
        for _ in range(2):
            agent.in_flight.add(big)
            agent._connection_lost(None)  # no close frame: Daphne drops the connection

    asyncio.run(lose_twice())

    assert agent.message_budget <= MAX_MESSAGE_BYTES
    messages = list(agent.pending.values())
    assert len(messages) > 1 and all(len(encode(m)) <= agent.message_budget for m in messages)
    assert [line for m in messages for line in m["lines"]] == lines
    assert agent.pending_lines == 1000 and agent.dropped_lines == 0


def runner_for(tmp_path: Path) -> JobRunner:
    agent = Agent(
        enrolled_folder(tmp_path / "site"), python="/nonexistent/python", say=lambda _: None
    )
    job = {
        "uid": "u-1",
        "name": "job",
        "num_rounds": 1,
        "spec_url": "/spec/",
        "bundle_url": "/bundle/",
    }
    return JobRunner(agent, job)


def test_an_update_the_portal_cannot_take_now_is_sent_again_not_redone(
    tmp_path: Path, monkeypatch
) -> None:
    # A full disk (507), a restarting portal (unreachable, 503) or a throttle (429): the same
    # file goes again after a pause, and the script's work is not redone.
    runner = runner_for(tmp_path)
    answers: list[Exception | None] = [
        PortalError(507, "storage_full", "the portal's storage is full"),
        PortalUnreachable("connection refused"),
        PortalError(503, "unavailable", "restarting"),
        PortalError(429, "throttled", "later"),
        None,
    ]
    sent: list[str] = []

    def upload(url: str, path: Path) -> None:
        sent.append(url)
        answer = answers.pop(0)
        if answer is not None:
            raise answer

    pauses: list[float] = []

    async def no_wait(seconds: float) -> None:
        pauses.append(seconds)

    monkeypatch.setattr(runner.agent.client, "upload", upload)
    monkeypatch.setattr(agent_module.asyncio, "sleep", no_wait)

    asyncio.run(runner._upload("/update/", tmp_path / "u.safetensors", 0))

    assert sent == ["/update/"] * 5 and answers == []
    assert len(pauses) == 4 and pauses[1] > pauses[0]  # backing off


def test_an_update_refused_for_good_is_not_sent_again(tmp_path: Path, monkeypatch) -> None:
    runner = runner_for(tmp_path)
    sent: list[str] = []

    def upload(url: str, path: Path) -> None:
        sent.append(url)
        raise PortalError(409, "conflict", "this task is already accepted")

    monkeypatch.setattr(runner.agent.client, "upload", upload)

    try:
        asyncio.run(runner._upload("/update/", tmp_path / "u.safetensors", 0))
    except PortalError as exc:
        assert exc.status == 409
    else:
        raise AssertionError("a 409 must reach the round, which stops there")
    assert sent == ["/update/"]
