"""Typed events for the dashboard and agents, published after the transaction commits.

Every state change of a job, round or site task, every site's decision to run the job or not,
every batch of metric points and of log lines goes to the Channels group ``job.<id>``, and job
and round changes also to ``project.<id>``, through :func:`publish` (which uses
:func:`fedportal.events.send_after_commit`, the one sender). Job state changes also go to the
groups of the sites they concern (``site.<id>``), and round openings to the project's agents
(``project.<id>.agents``, naming the round's sites), where a connected agent learns that there
is work; a task's own changes echo what its agent did, so they are not sent back to it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from fedportal.events import (
    MESSAGE_TYPE,
    agents_group,
    job_group,
    project_group,
    send_after_commit,
    send_all_after_commit,
    site_group,
)

if TYPE_CHECKING:
    from jobs.models import Job, JobSite, LogLine, MetricPoint, Round, SiteTask
    from sites.models import Site


log = logging.getLogger(__name__)

__all__ = ["MESSAGE_TYPE", "Event", "publish", "publish_all"]


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
    """``task`` (when the round opens): what the workflow asks of every site's script, as the
    agent API's ``current_task.task``; with ``job_uid`` an agent can start at once."""

    job_uid: str
    round: int
    state: str
    metrics: dict[str, float]
    task: dict[str, Any] | None = None
    kind: str = field(init=False, default="round.state")


@dataclass(frozen=True)
class TaskStateChanged(Event):
    round: int
    site: str
    state: str
    reason: str
    kind: str = field(init=False, default="task.state")


@dataclass(frozen=True)
class DecisionChanged(Event):
    """A site accepted or declined the job (its admin, its agent, or automatically)."""

    site: str
    decision: str
    decided_by: str | None
    kind: str = field(init=False, default="job.decision")


@dataclass(frozen=True)
class LogRecorded(Event):
    """Lines a site's client script printed (``stream="script"``), or its agent wrote about the
    job (``"agent"``); ``lines`` holds ``{"id", "stream", "text", "round", "time"}`` dicts
    (``id``: the line's, so that a page skips a line its snapshot holds already)."""

    site: str
    lines: list[dict[str, Any]]
    kind: str = field(init=False, default="log")


@dataclass(frozen=True)
class MetricsRecorded(Event):
    """Points a site logged (``flare.log``), stored together; ``points`` holds
    ``{"id", "key", "value", "step", "round", "source"}`` dicts in the order they were sent
    (``id``: the point's; see ``dashboard.metrics.metric_snapshot``)."""

    site: str
    points: list[dict[str, Any]]
    kind: str = field(init=False, default="metrics")


# What a project's page follows: which jobs run and how far they are. Metric points, log
# lines and task states go to the job's page only (fifty sites send hundreds a round).
PROJECT_KINDS = frozenset({"job.state", "round.state"})


def groups(event: Event) -> tuple[str, ...]:
    if event.kind in PROJECT_KINDS:
        return job_group(event.job_id), project_group(event.project_id)
    return (job_group(event.job_id),)


def publish(event: Event, *, site_ids: Iterable[int] = ()) -> None:
    """Send ``event`` to its job's and project's groups, and to ``site_ids``' agents, once the
    transaction commits."""
    send_after_commit([*groups(event), *map(site_group, site_ids)], event.payload())


def publish_all(news: Iterable[Event]) -> None:
    """Send several events once the transaction commits: those bound for the same groups go
    as one message per group, in their order (``fedportal.events.send_all_after_commit``).
    For what one transaction says of many sites at once."""
    by_groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for event in news:
        by_groups.setdefault(groups(event), []).append(event.payload())
    for targets, payloads in by_groups.items():
        send_all_after_commit(targets, payloads)


def job_state(job: Job) -> None:
    publish(
        JobStateChanged(
            job_id=job.pk,
            project_id=job.project_id,
            state=job.state,
            completed_rounds=job.completed_rounds,
            failure_reason=job.failure_reason,
        ),
        site_ids=job.participants.values_list("site_id", flat=True),
    )


def round_state(
    rnd: Round, *, task: dict[str, Any] | None = None, model: dict[str, Any] | None = None
) -> None:
    """A round that opens also goes to its sites' agents (:func:`fedportal.events.agents_group`),
    with ``model`` when given (and ``task``): the model every site's task starts from,
    ``{"sha256", "size", "data"}`` with the bytes in base64, which the job's and project's
    pages do not get. An agent then starts without downloading it
    (``jobs.services.rounds.event_model``)."""
    from jobs.models import RoundState  # at call time, as this module imports no models

    event = RoundStateChanged(
        job_id=rnd.job_id,
        project_id=rnd.job.project_id,
        job_uid=str(rnd.job.uid),
        round=rnd.number,
        state=rnd.state,
        metrics=dict(rnd.metrics or {}),
        task=task,
    )
    publish(event)
    if rnd.state != RoundState.OPEN:
        # Only a round that opens is news to an agent (it acts on that, and on the job's
        # state): a hundred agents on one portal get one round event each, not three.
        return
    # To the agents of the sites with a task in it: through their project's group, one
    # message per portal process (which passes it on to those sockets alone), not one per
    # site, which a portal process received one after the other, a hundred taking a second.
    to_agents = {**event.payload(), "site_ids": list(rnd.tasks.values_list("site_id", flat=True))}
    if model is not None and task is not None:
        to_agents["model"] = model
    send_after_commit([agents_group(rnd.job.project_id)], to_agents)


def task_state(task: SiteTask) -> None:
    publish(task_state_changed(task))


def task_state_changed(task: SiteTask) -> TaskStateChanged:
    """The event of ``task``'s state as it is now (for :func:`publish_all`)."""
    return TaskStateChanged(
        job_id=task.round.job_id,
        project_id=task.round.job.project_id,
        round=task.round.number,
        site=task.site.name,
        state=task.state,
        reason=task.reason,
    )


def decision(link: JobSite) -> None:
    publish(
        DecisionChanged(
            job_id=link.job_id,
            project_id=link.job.project_id,
            site=link.site.name,
            decision=link.decision,
            decided_by=link.decided_by.get_username() if link.decided_by is not None else None,
        )
    )


def metrics(job: Job, site: Site, points: Iterable[MetricPoint]) -> None:
    """One event for a batch of a site's points (one per point would be a channel-layer
    message each: thousands a second from a busy site)."""
    publish(
        MetricsRecorded(
            job_id=job.pk,
            project_id=job.project_id,
            site=site.name,
            points=[
                {
                    "id": point.pk,
                    "key": point.key,
                    "value": point.value,
                    "step": point.step,
                    "round": point.round_number,
                    "source": point.source,
                }
                for point in points
            ],
        )
    )


def log_lines(job: Job, site: Site, rows: Iterable[LogLine]) -> None:
    publish(
        LogRecorded(
            job_id=job.pk,
            project_id=job.project_id,
            site=site.name,
            lines=[
                {
                    "id": row.pk,
                    "stream": row.stream,
                    "text": row.text,
                    "round": row.round_number,
                    "time": row.created_at.isoformat(),
                }
                for row in rows
            ],
        )
    )
