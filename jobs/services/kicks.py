"""Tasks enqueued once a transaction commits: the round controller's kicks, and the update
checks' (one queued per round at a time)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.core.cache import cache
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


# A round's update check that is queued and has not started yet. One check decides every update
# of the round waiting when it starts (jobs.services.rounds.update_check), so an upload that
# finds one queued enqueues none: a round of a hundred uploads enqueues a few checks, not a
# hundred (each a broker message, and a task for a worker that would find its update decided).
_CHECK_QUEUED = "jobs:update-check-queued:{}"
# Only a backstop: the check clears the mark when it starts. A check that never starts (a broker
# that lost it) leaves the round's later uploads to the beat's resume until then.
CHECK_QUEUED_SECONDS = 60


def update_check_queue(round_id: int, enqueue: Callable[[], object]) -> bool:
    """Enqueue a check of the round (``enqueue``) unless one is queued and not started;
    whether this call enqueued it.

    Exact with :func:`update_check_started`: an upload marks the round after its update
    committed, and a check clears the mark before it reads which updates wait. So an upload
    that finds the mark set committed before that check reads, and the check decides it."""
    key = _CHECK_QUEUED.format(round_id)
    if not cache.add(key, 1, timeout=CHECK_QUEUED_SECONDS):
        return False
    try:
        enqueue()
    except BaseException:
        cache.delete(key)  # not queued after all: the next upload tries again
        raise
    return True


def update_check_started(round_id: int) -> None:
    """A check of the round starts: uploads committed from now on enqueue one again."""
    cache.delete(_CHECK_QUEUED.format(round_id))
