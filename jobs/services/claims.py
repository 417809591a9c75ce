"""Which worker does a round's long step (aggregation, or a protected round's summing): a lease.

Two workers racing on one round (a redelivered task, a deadline kick during a long aggregation,
the watchdog's kick) would otherwise both read every update. The claim is two columns of the
round, ``claim_holder`` and ``claim_expires_at``, set by one conditional ``UPDATE``, so it means
the same on PostgreSQL and SQLite, with or without a connection pool, and whichever host the
worker runs on:

- ``claim_holder`` empty: nobody holds the round. ``claim_expires_at``, when set, is when the
  watchdog kicks the round if nobody has claimed it by then (a worker that died between moving
  the round to AGGREGATING and claiming it).
- ``claim_holder`` set: that worker holds the round until ``claim_expires_at``. While it works,
  a thread renews the lease every third of it. A worker that dies (SIGKILL, out of memory, its
  host gone) stops renewing: the claim lapses, and any worker may take the round.

Every worker runs the watchdog (:func:`lapsed_claims_kick`, each
``FEDPORTAL_CLAIM_CHECK_SECONDS``): it enqueues the next step of each round whose claim lapsed,
so a live worker takes over within about one lease, rather than at the hourly round deadline or
the broker's redelivery of the dead worker's task (minutes). A worker that lost its lease while
still alive (its database unreachable for a lease) is harmless: the files a round's close makes
are written by atomic rename with the same bits whoever makes them, and the closing transaction
re-checks the round's state under its row lock, so the second to finish changes nothing.

Why not a PostgreSQL advisory lock, as before: it is only freed when PostgreSQL notices the
connection died, which for a host that vanished is TCP keepalive's business (hours by default),
and a pooled connection outlives the task that took it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import partial

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.db.models import Q
from django.utils import timezone

from jobs.models import JobState, Round, RoundState
from jobs.services.kicks import kick_robustly

log = logging.getLogger(__name__)


def lease() -> timedelta:
    return timedelta(seconds=settings.FEDPORTAL_CLAIM_LEASE_SECONDS)


def holder_name() -> str:
    """This worker, as the claim names it: host and process (for people reading the round),
    and a random part, so a process id reused after a restart is not the same holder."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"[:200]


def claimable() -> Q:
    """Rounds nobody holds, or whose holder stopped renewing its lease."""
    return (
        Q(claim_holder="")
        | Q(claim_expires_at__isnull=True)
        | Q(claim_expires_at__lt=timezone.now())
    )


def unclaimed_until_kick() -> dict[str, object]:
    """The claim columns of a round that is due for its long step and held by nobody yet: the
    watchdog kicks it after one lease if nobody claims it meanwhile."""
    return {"claim_holder": "", "claim_expires_at": timezone.now() + lease()}


class _Renewer(threading.Thread):
    """Renews a held lease every third of it until stopped.

    Never waits on a lock: the row is taken with ``SKIP LOCKED`` (on PostgreSQL), so a renewal
    that meets the row locked by a transaction (the round's own close, a test's transaction)
    skips this turn and tries at the next. A renewal that fails (the database away) is logged
    and tried again; the lease lapses if the failures last longer than it.
    """

    def __init__(self, round_id: int, holder: str) -> None:
        super().__init__(name=f"claim-renewer-{round_id}", daemon=True)
        self.round_id = round_id
        self.holder = holder
        self.stopped = threading.Event()
        self.lost = False

    def run(self) -> None:
        every = settings.FEDPORTAL_CLAIM_LEASE_SECONDS / 3
        try:
            while not self.stopped.wait(every):
                try:
                    if not self._renew():
                        log.warning(
                            "round %s: the aggregation claim of %s was lost (it lapsed and "
                            "another worker took the round); this worker's result will only "
                            "count if it finishes first",
                            self.round_id,
                            self.holder,
                        )
                        self.lost = True
                        return
                except DatabaseError as exc:
                    log.warning("round %s: lease not renewed: %s", self.round_id, exc)
        finally:
            connection.close()  # this thread's own connection (back to the pool, if any)

    def _renew(self) -> bool:
        """True when the lease is still ours (renewed now, or skipped because the row was
        locked); False when another holder took it."""
        with transaction.atomic():
            rows = Round.objects.filter(pk=self.round_id).select_for_update(skip_locked=True)
            held = rows.values_list("claim_holder", flat=True).first()
            if held is None:
                # Locked by someone else this turn, or the round is gone: look again next turn
                # (a round that is gone is the end of the job; stop() comes soon).
                return True
            if held != self.holder:
                return False
            Round.objects.filter(pk=self.round_id).update(claim_expires_at=timezone.now() + lease())
            return True

    def stop(self) -> None:
        self.stopped.set()
        # Not joined for long: a renewal blocked in the database must not hold up the worker.
        self.join(timeout=1.0)


@contextmanager
def round_claim(round_id: int) -> Iterator[bool]:
    """Whether this worker may do the round's long step now: it took the claim (nobody held
    it, or the holder's lease lapsed). Held, it is renewed until the block ends, then given
    back."""
    holder = holder_name()
    taken = (
        Round.objects.filter(claimable(), pk=round_id)
        .exclude(state__in=[RoundState.CLOSED, RoundState.FAILED])
        .update(claim_holder=holder, claim_expires_at=timezone.now() + lease())
    )
    if not taken:
        yield False
        return
    renewer = _Renewer(round_id, holder)
    renewer.start()
    try:
        yield True
    finally:
        renewer.stop()
        _give_back(round_id, holder)


def _give_back(round_id: int, holder: str) -> None:
    """The claim ends. A round still due for its step (an error that a retry takes up) is
    kicked by the watchdog after one lease if nothing took it up by then."""
    try:
        rows = Round.objects.filter(pk=round_id, claim_holder=holder)
        rows.filter(state=RoundState.AGGREGATING).update(**unclaimed_until_kick())
        rows.update(claim_holder="", claim_expires_at=None)
    except DatabaseError as exc:
        # The lease lapses by itself: the round is only slower to be taken up.
        log.warning("round %s: claim not given back: %s", round_id, exc)


def lapsed_claims_kick() -> list[int]:
    """Enqueue the next step of every round of a running job whose claim lapsed: its holder
    died, or nobody claimed it. One kick per lapse, whichever worker's watchdog sees it first
    (a conditional update re-arms the claim's deadline). The ids of the jobs kicked."""
    from jobs.tasks import job_advance_task  # tasks import services

    now = timezone.now()
    lapsed = Round.objects.filter(
        Q(state=RoundState.AGGREGATING) | ~Q(claim_holder=""),
        claim_expires_at__lt=now,
        job__state=JobState.RUNNING,
    ).values_list("pk", "job_id", "claim_holder")
    kicked = []
    for round_id, job_id, holder in lapsed:
        rearmed = Round.objects.filter(
            pk=round_id, claim_holder=holder, claim_expires_at__lt=now
        ).update(**unclaimed_until_kick())
        if rearmed:
            if holder:
                log.warning(
                    "round %s: the claim of %s lapsed (the worker died?): handing it on",
                    round_id,
                    holder,
                )
            kick_robustly(partial(job_advance_task.delay, job_id))
            kicked.append(job_id)
    return kicked


class Watchdog(threading.Thread):
    """A worker's thread that runs :func:`lapsed_claims_kick` every
    ``FEDPORTAL_CLAIM_CHECK_SECONDS``. Every worker runs one: the takeover must not depend on
    one process (the beat) being the one that survived."""

    def __init__(self) -> None:
        super().__init__(name="claim-watchdog", daemon=True)
        self.stopped = threading.Event()

    def run(self) -> None:
        every = settings.FEDPORTAL_CLAIM_CHECK_SECONDS
        try:
            while not self.stopped.wait(every):
                try:
                    lapsed_claims_kick()
                except Exception:  # the database or broker away: the next turn tries again
                    log.warning("claim watchdog: this check failed", exc_info=True)
                    connection.close()
        finally:
            connection.close()

    def stop(self) -> None:
        self.stopped.set()
