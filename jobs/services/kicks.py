"""Tasks enqueued once a transaction commits: the round controller's kicks."""

from __future__ import annotations

import functools
import logging
import os
import threading
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
    once, in the caller's thread.

    The wait is in a timer thread, so the caller (a request, in its transaction's commit
    hook) never waits. The thread is not a daemon: a process that exits cleanly enqueues what
    it gathered. One killed meanwhile loses it; what enqueues the task must have a safety net
    that enqueues it again (the beat's resume, for update checks).
    """

    def __init__(self, kick: Callable[[Key], object], seconds: Callable[[], float]) -> None:
        self._kick = kick
        self._seconds = seconds
        self._lock = threading.Lock()
        self._keys: dict[Key, None] = {}  # in the order of their first kick
        self._timer: threading.Timer | None = None
        # A process forked with a timer pending (a Celery pool's child) has none running.
        os.register_at_fork(after_in_child=self._forget)

    def add(self, key: Key) -> None:
        """Enqueue the task for ``key``, with the other kicks of the moment."""
        seconds = self._seconds()
        if seconds <= 0:
            self._kick(key)
            return
        with self._lock:
            self._keys[key] = None
            if self._timer is None:
                self._timer = threading.Timer(seconds, self.flush)
                self._timer.name = "gathered-kicks"
                self._timer.start()

    def flush(self) -> None:
        """Enqueue what was gathered, now (the timer's call)."""
        with self._lock:
            keys, self._keys, self._timer = list(self._keys), {}, None
        for key in keys:
            kick_robustly(functools.partial(self._kick, key))

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._keys, self._timer = {}, None
