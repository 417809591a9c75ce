"""The agent's outbox (``client_agent.outbox.Outbox``), driven directly: what waits for the
portal's acknowledgement, its bounds, and what happens when the portal refuses a report, asks
it to slow down, or drops the socket. Also what fills it: output lines and packed reports."""

from __future__ import annotations

from pathlib import Path

from client_agent.outbox import Outbox
from client_agent.protocol import (
    CLOSE_MESSAGE_TOO_BIG,
    MAX_LINE_BYTES,
    MAX_LINE_CHARS,
    MAX_MESSAGE_BYTES,
    Ack,
    ErrorBody,
    Report,
    encode,
)
from client_agent.reports import OutputTail, pack


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def outbox(said: list[str] | None = None, clock: Clock | None = None, **kw: int) -> Outbox:
    return Outbox(
        session="s1",
        say=(said if said is not None else []).append,
        clock=clock or Clock(),
        **kw,
    )


def report(lines: int = 0, points: int = 0) -> Report:
    return Report(
        job="j",
        lines=[{"text": "x"}] * lines if lines else None,
        points=[{"key": "k", "value": 1.0}] * points if points else None,
    )


def test_a_report_gets_an_id_and_waits_in_order_until_acknowledged() -> None:
    box = outbox()

    first, second = box.enqueue(report(lines=2)), box.enqueue(report(points=1))

    assert (first, second) == ("report:s1:1", "report:s1:2")
    assert box.next_to_send() == first
    sent = box.send(first)
    assert sent is not None
    assert sent == encode({"type": "report", "job": "j", "lines": [{"text": "x"}] * 2, "id": first})
    assert box.in_flight == {first} and box.pending_lines == 2

    box.acknowledged(Ack(id=first, stored=2))

    assert list(box.pending) == [second] and box.in_flight == set() and box.pending_lines == 0
    assert box.delivered([first]) and not box.delivered([first, second])


def test_metrics_are_kept_and_old_output_lines_dropped_past_the_bound() -> None:
    box = outbox(max_lines=100)

    metrics_id = box.enqueue(report(points=3, lines=10))
    for _ in range(20):
        box.enqueue(report(lines=10))

    assert metrics_id in box.pending  # a report with points is never dropped
    assert box.pending_lines <= 100
    assert box.dropped_lines >= 100
    kept = [r for r in box.pending.values() if r.lines]
    assert sum(len(r.lines or ()) for r in kept) == box.pending_lines
    # The newest lines are the ones kept.
    assert list(box.pending)[-1] == list(box.unsent)[-1]


def test_a_report_the_portal_refuses_is_dropped_and_counted_not_resent() -> None:
    said: list[str] = []
    box = outbox(said)
    refused = box.enqueue(report(lines=7))

    requeued = box.acknowledged(Ack(id=refused, error=ErrorBody("too_large", "600000 bytes")))

    assert not requeued and refused not in box.pending
    assert (box.refused_messages, box.dropped_lines, box.pending_lines) == (1, 7, 0)
    assert said == [
        "a report for job j is dropped: the portal refused it (too_large: 600000 bytes) "
        "(1 dropped so far)"
    ]


def test_told_to_slow_down_line_reports_wait_in_order_while_points_go() -> None:
    clock = Clock()
    box = outbox(clock=clock)
    first, second = box.enqueue(report(lines=1)), box.enqueue(report(lines=1))
    sent = [box.next_to_send(), box.next_to_send()]  # both on the wire
    assert sent == [first, second]
    assert box.send(first) and box.send(second)
    points = box.enqueue(report(points=1))

    slow_down = ErrorBody("slow_down", "too fast", retry_after=30)
    assert box.acknowledged(Ack(id=first, error=slow_down))
    assert box.acknowledged(Ack(id=second, error=slow_down))

    assert box.lines_held_for() == 30
    assert [box.next_to_send(), box.next_to_send()] == [points, None]  # lines wait, points go
    clock.now += 30  # the wait is over
    assert [box.next_to_send(), box.next_to_send()] == [first, second]  # in their order
    assert box.refused_messages == 0 and box.dropped_lines == 0


def test_a_slow_down_without_a_wait_holds_lines_a_second_and_never_past_a_minute() -> None:
    clock = Clock()
    box = outbox(clock=clock)
    first = box.enqueue(report(lines=1))

    box.acknowledged(Ack(id=first, error=ErrorBody("slow_down", "too fast")))
    assert box.lines_held_for() == 1.0
    box.acknowledged(Ack(id=first, error=ErrorBody("slow_down", "x", retry_after=3600)))
    assert box.lines_held_for() == 60.0


def test_a_dropped_socket_with_a_large_message_in_flight_splits_what_waits() -> None:
    box = outbox()
    box.message_budget = 4 << 20
    lines = [{"id": f"o{i}", "text": "z" * 1500} for i in range(1000)]
    big = box.enqueue(Report(job="j", lines=lines))

    box.in_flight.add(big)
    box.connection_lost(None)  # no close frame: Daphne drops the connection
    assert list(box.pending) == [big]  # once may be the network
    box.in_flight.add(big)
    box.connection_lost(None)

    assert box.message_budget <= MAX_MESSAGE_BYTES
    reports = list(box.pending.values())
    assert len(reports) > 1 and all(len(encode(r.to_json())) <= box.message_budget for r in reports)
    assert [line for r in reports for line in r.lines or ()] == lines
    assert box.pending_lines == 1000 and box.dropped_lines == 0


def test_a_close_for_a_message_too_big_splits_at_once_and_resends_all() -> None:
    box = outbox()
    box.message_budget = 4 << 20
    points = [
        {"id": f"p{i}", "key": "k", "value": float(i), "text": "z" * 1000} for i in range(600)
    ]
    big = box.enqueue(Report(job="j", points=points))
    assert box.next_to_send() == big and box.send(big)

    box.connection_lost(CLOSE_MESSAGE_TOO_BIG)
    box.resend_all()

    assert big not in box.pending and box.in_flight == set()
    assert list(box.unsent) == list(box.pending) and len(box.pending) > 1
    assert [p for r in box.pending.values() for p in r.points or ()] == points


def test_a_message_over_the_budget_is_dropped_not_sent() -> None:
    said: list[str] = []
    box = outbox(said)
    too_big = box.enqueue(Report(job="j", lines=[{"text": "x" * 1000}]))
    box.message_budget = 100

    assert box.send(too_big) is None
    assert too_big not in box.pending and box.dropped_lines == 1 and box.refused_messages == 1
    assert "over 100" in said[0]


def test_items_are_packed_into_reports_within_the_budget() -> None:
    box = outbox()
    box.message_budget = 65536
    huge = {"id": "huge", "text": "h" * 70_000}
    items = [{"id": f"o{i}", "text": "z" * 1500} for i in range(100)]

    ids = box.enqueue_items("j", "lines", [huge, *items], most=30)

    assert len(ids) == 4 and box.dropped_lines == 1  # the huge one fits no message
    assert [line for i in ids for line in box.pending[i].lines or ()] == items
    assert all(len(box.encoded(i)) <= 65536 for i in ids)


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
    assert batches
    for batch in batches:
        assert len(batch) <= 500
        assert len(encode({**envelope, "id": "report:0123abcd:999999", "lines": batch})) <= 65536
