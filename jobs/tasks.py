"""Celery tasks: thin, idempotent wrappers around ``jobs.services``.

They take ids, never tensors or model instances; the service re-reads the database and
re-checks state on entry, so a task that runs twice (a redelivery after a worker died, or a
duplicate enqueue) does no harm. ``acks_late``: a task is acknowledged only after it ran, so a
worker killed with SIGKILL in the middle leaves it to be delivered again.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any, ParamSpec, Protocol, TypeVar

from celery import shared_task
from celery.signals import worker_init, worker_process_init, worker_ready
from django.conf import settings

from jobs.services import claims, rounds

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R", covariant=True)


class Task(Protocol[P, R]):
    """What callers use of a Celery task, typed with the function's own signature."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R: ...

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> Any: ...

    def apply_async(
        self,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Any: ...


def task(**options: Any) -> Callable[[Callable[P, R]], Task[P, R]]:
    """Celery's ``shared_task(**options)``, typed: Celery ships no type hints, so its decorator
    would make every task untyped."""
    decorator: Callable[[Callable[P, R]], Task[P, R]] = shared_task(**options)
    return decorator


# A database that went away for a moment (restart, failover) is waited out: retried with
# backoff from 1 s up to 30 s between tries, about ten minutes in all. Every other error is
# handled inside the services (a round that cannot close fails with its reason), so it is not
# retried here: it would only fail again.
RETRY_ON_TRANSIENT: dict[str, Any] = {
    "autoretry_for": rounds.TRANSIENT_ERRORS,
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "retry_jitter": True,
    "max_retries": 25,
}


@task(acks_late=True, reject_on_worker_lost=True, **RETRY_ON_TRANSIENT)
def job_advance_task(job_id: int) -> str:
    """Do the job's next due step (see ``jobs.services.rounds.job_advance``)."""
    outcome = rounds.job_advance_while_due(job_id=job_id)
    log.info("job %s: %s", job_id, outcome)
    return outcome


@task(acks_late=True, reject_on_worker_lost=True, **RETRY_ON_TRANSIENT)
def update_check_task(task_id: int) -> str:
    """Check one uploaded update, and the round's others waiting; the service enqueues
    job_advance when the round's last was answered. (Portals enqueue
    ``round_updates_check_task`` now; this one stays for the checks an earlier portal left in
    the broker.)"""
    return rounds.update_check(task_id=task_id)


@task(acks_late=True, reject_on_worker_lost=True, **RETRY_ON_TRANSIENT)
def round_updates_check_task(round_id: int) -> dict[int, str]:
    """Check every update of the round waiting for its check: what the portal enqueues for
    the uploads of a moment (see ``jobs.services.rounds.round_updates_check``)."""
    return rounds.round_updates_check(round_id=round_id)


@task()
def jobs_resume_task() -> int:
    """Enqueue job_advance for every active job: what a restarted worker does first."""
    return rounds.jobs_resume()


def _limit_torch_threads(**_: Any) -> None:
    # Aggregation and update checks are memory-bound loops of small chunk operations. With
    # torch's default of one thread per core, every chunk is a parallel section whose idle
    # thread spins whenever another process (the portal, PostgreSQL, an upload) holds a core:
    # measured 1.6 s per 8 × 25M round on 2 busy cores, 0.3 s with one thread.
    threads = settings.FEDPORTAL_WORKER_TORCH_THREADS
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    else:
        # torch is imported by the first update check, not at start (~1 s a worker need not
        # spend before there is work); it takes its thread count from here when it is.
        os.environ["OMP_NUM_THREADS"] = str(threads)


def _resume_on_worker_start(sender: Any = None, **_: Any) -> None:
    # A worker that died mid-aggregation left its round AGGREGATING; jobs waiting for a
    # deadline countdown that was lost with Redis still need a nudge. Resume them all.
    jobs_resume_task.delay()


def _watch_claims(**_: Any) -> None:
    # Every process that runs tasks (each prefork child; a solo worker itself) runs the claim
    # watchdog, in its own thread with its own database connection: a round whose worker died
    # is handed on whichever workers survive (jobs.services.claims). Started in the process
    # that runs it, never inherited through a fork with a connection open.
    claims.Watchdog().start()


# Connected by calls, not as decorators: Celery's signals are untyped, and a decorator would
# make the handlers untyped too.
worker_init.connect(_limit_torch_threads)
worker_process_init.connect(_limit_torch_threads)
worker_process_init.connect(_watch_claims)
worker_ready.connect(_resume_on_worker_start)
