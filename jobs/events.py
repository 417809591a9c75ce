"""Typed events for the dashboard and agents, published after the transaction commits.

Every state change of a job, round or site task, and every metric point, goes to the Channels
groups ``job.<id>`` and ``project.<id>`` through :func:`publish`, the one sender helper. A
consumer forwards the ``event`` dict of a ``fedportal.event`` message to its WebSocket as is.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

log = logging.getLogger(__name__)

MESSAGE_TYPE = "fedportal.event"


@dataclass(frozen=True)
class Event:
    job_id: int
    project_id: int
    kind: str = field(init=False)

    def payload(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class JobStateChanged(Event):
    state: str
    completed_rounds: int
    failure_reason: str
    kind: str = field(init=False, default="job.state")


@dataclass(frozen=True)
class RoundStateChanged(Event):
    round: int
    state: str
    metrics: dict[str, float]
    kind: str = field(init=False, default="round.state")


@dataclass(frozen=True)
class TaskStateChanged(Event):
    round: int
    site: str
    state: str
    reason: str
    kind: str = field(init=False, default="task.state")


@dataclass(frozen=True)
class MetricRecorded(Event):
    site: str | None
    round: int | None
    key: str
    value: float
    step: int | None
    source: str
    kind: str = field(init=False, default="metric")


def groups(event: Event) -> tuple[str, str]:
    return f"job.{event.job_id}", f"project.{event.project_id}"


def publish(event: Event) -> None:
    """Send ``event`` to its job's and project's groups once the transaction commits.

    A channel layer that is down must not undo a state change that is already in the
    database, so a failed send is logged, not raised.
    """

    def send() -> None:
        layer = get_channel_layer()
        if layer is None:
            return
        message = {"type": MESSAGE_TYPE, "event": event.payload()}
        try:
            for group in groups(event):
                async_to_sync(layer.group_send)(group, message)
        except Exception:
            log.exception("job %s: could not publish %s", event.job_id, event.kind)

    transaction.on_commit(send)


def job_state(job: Any) -> None:
    publish(
        JobStateChanged(
            job_id=job.pk,
            project_id=job.project_id,
            state=job.state,
            completed_rounds=job.completed_rounds,
            failure_reason=job.failure_reason,
        )
    )


def round_state(rnd: Any) -> None:
    publish(
        RoundStateChanged(
            job_id=rnd.job_id,
            project_id=rnd.job.project_id,
            round=rnd.number,
            state=rnd.state,
            metrics=dict(rnd.metrics or {}),
        )
    )


def task_state(task: Any) -> None:
    publish(
        TaskStateChanged(
            job_id=task.round.job_id,
            project_id=task.round.job.project_id,
            round=task.round.number,
            site=task.site.name,
            state=task.state,
            reason=task.reason,
        )
    )


def metric(point: Any) -> None:
    publish(
        MetricRecorded(
            job_id=point.job_id,
            project_id=point.job.project_id,
            site=point.site.name if point.site_id else None,
            round=point.round_number,
            key=point.key,
            value=point.value,
            step=point.step,
            source=point.source,
        )
    )
