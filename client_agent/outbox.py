"""The agent's outbox: what it must deliver to the portal, held until the portal acknowledges it.

Three things, and nothing of sockets or event loops, so a test drives them directly:

- **enqueue**: a report gets an id (``report:<session>:<n>``) and waits in order; items too
  large for any message are dropped and counted, never sent.
- **drop policy**: past ``max_lines`` queued output lines the oldest reports holding only lines
  go (points never do); a socket dropped with a large message in flight halves the message
  budget and splits what waits to fit.
- **acknowledgement**: an answer without an error takes the report out; ``slow_down`` puts it
  back in its place, and line reports wait ``retry_after`` seconds while points go on; any other
  error drops it for good, counted and said.

The agent's connection sends what :meth:`Outbox.next_to_send` picks and hands every answer to
:meth:`Outbox.acknowledged`; everything not acknowledged goes again after a reconnect
(:meth:`Outbox.resend_all`), and the portal stores a resent item once (ids).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from client_agent.protocol import (
    CLOSE_MESSAGE_TOO_BIG,
    ERROR_SLOW_DOWN,
    MAX_MESSAGE_BYTES,
    REPORT,
    Ack,
    Report,
    encode,
)
from client_agent.reports import pack

log = logging.getLogger("client_agent")

MAX_PENDING_LINES = 20_000
# A server or proxy that closes on messages smaller than the agent's budget halves it, down to
# this (a cut line encodes to at most ~24 KB); a single item larger than the budget is dropped.
MIN_MESSAGE_BYTES = 64 * 1024
MAX_SLOW_DOWN_SECONDS = 60.0
DEFAULT_SLOW_DOWN_SECONDS = 1.0  # when the portal says slow down without saying how long


class Outbox:
    """Reports waiting for the portal's acknowledgement, in the order they were made.

    ``say`` tells the site admin what was lost; ``clock`` (seconds, monotonic) times the waits
    the portal asks for. Not thread-safe: the agent calls it from its loop only.
    """

    def __init__(
        self,
        *,
        session: str,
        say: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        max_lines: int = MAX_PENDING_LINES,
    ) -> None:
        self.session = session
        self.say = say
        self.clock = clock
        self.max_lines = max_lines
        self._seq = 0
        # Every report with an id stays in ``pending`` until acknowledged or dropped.
        self.pending: dict[str, Report] = {}
        self.unsent: deque[str] = deque()
        self.pending_lines = 0  # output lines queued in ``pending``
        # What never reached the portal: dropped past the bound, refused by the portal, or too
        # large for any message.
        self.dropped_lines = 0
        self.dropped_points = 0
        self.refused_messages = 0  # refused by the portal, or too large to send
        self.message_budget = MAX_MESSAGE_BYTES
        self.in_flight: set[str] = set()  # sent on this socket, not yet acknowledged
        self.hold_lines_until = 0.0  # clock time; the portal asked for line reports to wait
        self.large_losses = 0  # sockets lost with a large message in flight, since a shrink

    # -- enqueue ----------------------------------------------------------------------------

    def next_id(self, prefix: str) -> str:
        self._seq += 1
        return f"{prefix}:{self.session}:{self._seq}"

    def enqueue(self, report: Report) -> str:
        """Queue a report for the portal; returns its id (its own, or a new one).

        While the portal is away the outbox grows; past ``max_lines`` output lines the oldest
        reports that hold only lines are dropped (metrics never are) and the agent's log says
        how many went, so a chatty script cannot fill the site's memory.
        """
        report_id = str(report.id) if report.id is not None else self.next_id(REPORT)
        self.pending[report_id] = report.with_id(report_id)
        self.unsent.append(report_id)
        self.pending_lines += len(report.lines or ())
        if self.pending_lines > self.max_lines:
            self._drop_oldest_lines()
        return report_id

    def enqueue_items(self, job: str, key: str, items: list[Any], most: int) -> list[str]:
        """Queue ``items`` (``points`` or ``lines``) of ``job`` as reports, each message within
        the budget; returns their ids. An item too large for any message is dropped, counted
        and logged."""
        envelope = Report(job=job).to_json()
        batches, too_large = pack(
            items, envelope=envelope, key=key, most=most, budget=self.message_budget
        )
        if too_large:
            self._count_dropped(key, len(too_large))
            log.warning(
                "job %s: %s %s too large for a message of %s bytes; dropped",
                job,
                len(too_large),
                key,
                self.message_budget,
            )
        return [self.enqueue(_report(job, key, batch)) for batch in batches]

    # -- drop policy ------------------------------------------------------------------------

    def _drop_oldest_lines(self) -> None:
        dropped = 0
        for old_id in list(self.pending):
            if self.pending_lines <= self.max_lines // 2:
                break
            old = self.pending[old_id]
            if not old.points and old.lines:
                self._forget(old_id)
                dropped += len(old.lines)
        if dropped:
            self.dropped_lines += dropped
            log.warning("the portal is away or slow: dropped %s queued output lines", dropped)

    def drop(self, report_id: str, why: str) -> None:
        """Drop a report for good: counted, and said, since what it held never arrives."""
        sent = self._forget(report_id)
        if sent is None:
            return
        self.refused_messages += 1
        self._count_dropped("points", len(sent.points or ()))
        self._count_dropped("lines", len(sent.lines or ()))
        self.say(
            f"a {REPORT} for job {sent.job} is dropped: {why} "
            f"({self.refused_messages} dropped so far)"
        )

    def _count_dropped(self, key: str, n: int) -> None:
        if key == "points":
            self.dropped_points += n
        else:
            self.dropped_lines += n

    def _forget(self, report_id: str) -> Report | None:
        """Take a report out of the outbox (acknowledged, or dropped)."""
        self.in_flight.discard(report_id)
        sent = self.pending.pop(report_id, None)
        if sent is not None:
            self.pending_lines -= len(sent.lines or ())
        return sent

    def connection_lost(self, code: int | None) -> None:
        """The socket closed with messages sent and not answered. A server closes on a message
        over its size cap, with code 1009 or (Daphne: autobahn's ``failByDrop``) by dropping
        the connection with no close frame at all; sending the same message after every
        reconnect would loop for ever. So: on 1009, or on the second drop with a message over
        ``MIN_MESSAGE_BYTES`` in flight, the budget goes below the largest such message and
        what waits is split to fit."""
        sizes = [len(self.encoded(i)) for i in self.in_flight if i in self.pending]
        largest = max(sizes, default=0)
        if code == CLOSE_MESSAGE_TOO_BIG or (code is None and largest > MIN_MESSAGE_BYTES):
            self.large_losses += 1
            if code == CLOSE_MESSAGE_TOO_BIG or self.large_losses >= 2:
                self.large_losses = 0
                self._shrink(below=largest or self.message_budget)

    def _shrink(self, below: int) -> None:
        """Halve the budget (and keep it under ``below`` bytes, the message that failed), then
        split every waiting report to fit. An item too large even then is dropped and counted.

        A split report gets new ids; whoever waits for the old one's acknowledgement stops
        waiting, as for a dropped one."""
        self.message_budget = max(
            MIN_MESSAGE_BYTES, min(self.message_budget // 2, below // 2, MAX_MESSAGE_BYTES)
        )
        log.warning(
            "the portal dropped the socket on a large message; messages now at most %s bytes",
            self.message_budget,
        )
        pending: dict[str, Report] = {}
        for report_id, report in self.pending.items():
            key = "lines" if report.lines else "points"
            items = (report.lines if report.lines else report.points) or []
            if not items or len(self.encoded(report_id)) <= self.message_budget:
                pending[report_id] = report
                continue
            envelope = Report(job=report.job).to_json()
            batches, too_large = pack(
                items, envelope=envelope, key=key, most=len(items), budget=self.message_budget
            )
            self._count_dropped(key, len(too_large))
            if key == "lines":
                self.pending_lines -= len(too_large)
            for batch in batches:
                new_id = self.next_id(REPORT)
                pending[new_id] = _report(report.job, key, batch).with_id(new_id)
        self.pending = pending

    # -- sending ----------------------------------------------------------------------------

    def resend_all(self) -> None:
        """A new socket: everything not acknowledged goes again, in order."""
        self.unsent = deque(self.pending)
        self.in_flight.clear()

    def encoded(self, report_id: str) -> str:
        """The pending report ``report_id`` as sent."""
        return encode(self.pending[report_id].to_json())

    def next_to_send(self) -> str | None:
        """Take the next report to send off the queue: the oldest, or while the portal asked
        line reports to wait, the oldest other one (None if there is none)."""
        if self.clock() >= self.hold_lines_until:
            return self.unsent.popleft()
        for index, report_id in enumerate(self.unsent):
            report = self.pending.get(report_id)
            if report is None or not report.lines:
                del self.unsent[index]
                return report_id
        return None

    def lines_held_for(self) -> float:
        """Seconds line reports still wait (0 or less: they may go)."""
        return self.hold_lines_until - self.clock()

    def send(self, report_id: str) -> str | None:
        """Report ``report_id`` as sent now, marked in flight; None when it is gone (answered
        or dropped meanwhile) or over the budget (then dropped: never made so, a last guard)."""
        if report_id not in self.pending:
            return None
        data = self.encoded(report_id)
        if len(data) > self.message_budget:
            self.drop(report_id, f"{len(data)} bytes, over {self.message_budget}")
            return None
        self.in_flight.add(report_id)
        return data

    # -- acknowledgement --------------------------------------------------------------------

    def acknowledged(self, ack: Ack) -> bool:
        """The portal answered a report: stored (no error), to be sent again later
        (``slow_down``), or refused for good: then it is dropped, counted and logged, and never
        sent again. True when the report is back in the queue, to be sent."""
        report_id = str(ack.id)
        error = ack.error
        if error is None:
            self._forget(report_id)
            return False
        if error.code == ERROR_SLOW_DOWN and report_id in self.pending:
            wait = min(error.retry_after or DEFAULT_SLOW_DOWN_SECONDS, MAX_SLOW_DOWN_SECONDS)
            self.hold_lines_until = max(self.hold_lines_until, self.clock() + wait)
            log.info("the portal asks output lines to wait %.1f s (sent too fast)", wait)
            self.in_flight.discard(report_id)
            # Back in the queue, in its place: the outbox's order is the order lines were read.
            queued = set(self.unsent) | {report_id}
            self.unsent = deque(i for i in self.pending if i in queued)
            return True
        self.drop(report_id, f"the portal refused it ({error.code}: {error.message})")
        return False

    def delivered(self, ids: list[str]) -> bool:
        """Whether none of ``ids`` waits any more (acknowledged, or dropped)."""
        return not any(i in self.pending for i in ids)


def _report(job: object, key: str, batch: list[Any]) -> Report:
    return Report(job=job, points=batch) if key == "points" else Report(job=job, lines=batch)
