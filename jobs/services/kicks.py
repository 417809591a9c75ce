"""Tasks enqueued once a transaction commits: the round controller's kicks."""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from django.db import transaction

log = logging.getLogger(__name__)


def kick_after_commit(kick: Callable[[], object]) -> None:
    """Enqueue a task (``kick``) once the current transaction commits. A broker that is down
    then must not fail what already committed (an upload deleted while its row says stored):
    the error is logged, and the beat's resume (``jobs.services.rounds.jobs_resume``, every
    ``FEDPORTAL_RESUME_SECONDS``) enqueues what was lost."""
    transaction.on_commit(kick, robust=True)


def kick_robustly(kick: Callable[[], object]) -> None:
    """Enqueue a task (``kick``) now, outside any transaction. A broker that is down is logged,
    not raised: whoever kicks (the claim watchdog, the beat's resume) kicks again later."""
    try:
        kick()
    except Exception:
        log.warning("a kick was not enqueued (the broker away?)", exc_info=True)


Key = TypeVar("Key", bound=Hashable)


class GatheredKicks(Generic[Key]):
    """Kicks of one task for a key (a round's id), gathered in this process: the first waits
    ``seconds()``, and every kick for the same key meanwhile goes with it, so a burst for one
    key enqueues one task, not one each. With ``seconds()`` at 0 each kick is enqueued at
    once, in the caller's thread. With ``quiet()`` above 0, a gathering ends sooner once no
    kick came for that long: a burst that is over (a few sites' uploads) goes at once, and a
    steady stream (a hundred sites') is gathered for ``seconds()``.

    The wait is in a timer thread, so the caller (a request, in its transaction's commit
    hook) never waits. The thread is not a daemon: a process that exits cleanly enqueues what
    it gathered. One killed meanwhile loses it; what enqueues the task must have a safety net
    that enqueues it again (the beat's resume, for update checks).
    """

    def __init__(
        self,
        kick: Callable[[Key], object],
        seconds: Callable[[], float],
        quiet: Callable[[], float] | None = None,
    ) -> None:
        self._kick = kick
        self._seconds = seconds
        self._quiet = quiet or (lambda: 0.0)
        self._lock = threading.Lock()
        self._keys: dict[Key, None] = {}  # in the order of their first kick
        self._timer: threading.Timer | None = None
        # When the gathering under way ends at the latest, and when its last kick came
        # (time.monotonic()).
        self._until = 0.0
        self._last = 0.0
        # A process forked with a timer pending (a Celery pool's child) has none running.
        os.register_at_fork(after_in_child=self._forget)

    def add(self, key: Key) -> None:
        """Enqueue the task for ``key``, with the other kicks of the moment."""
        seconds = self._seconds()
        if seconds <= 0:
            self._kick(key)
            return
        now = time.monotonic()
        with self._lock:
            self._keys[key] = None
            self._last = now
            if self._timer is None:
                self._until = now + seconds
                self._start_timer(self._due() - now)

    def _due(self) -> float:
        """When the gathering under way ends: ``quiet()`` after its last kick, and at the
        latest ``seconds()`` after its first. Call it holding the lock."""
        quiet = self._quiet()
        return min(self._until, self._last + quiet) if quiet > 0 else self._until

    def _start_timer(self, seconds: float) -> None:
        self._timer = threading.Timer(max(seconds, 0.0), self._tick)
        self._timer.name = "gathered-kicks"
        self._timer.start()

    def _tick(self) -> None:
        """The timer's call: enqueue what was gathered, unless a kick came meanwhile that moves
        the end of the gathering later (then wait for that)."""
        with self._lock:
            remaining = self._due() - time.monotonic()
            if remaining > 0.001:
                self._start_timer(remaining)
                return
        self.flush()

    def flush(self) -> None:
        """Enqueue what was gathered, now."""
        with self._lock:
            keys, self._keys, self._timer = list(self._keys), {}, None
        for key in keys:
            kick_robustly(functools.partial(self._kick, key))

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._keys, self._timer = {}, None
