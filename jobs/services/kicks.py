"""Tasks enqueued once a transaction commits: the round controller's kicks."""

from __future__ import annotations

import logging
from collections.abc import Callable

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
