"""Shaping a job's records for people: the site × round metric table, the log search form,
who is holding the open round and which sites are lagging, the whole record as JSON."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from django import forms
from django.core.serializers.json import DjangoJSONEncoder
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from common.rounds import round_for_people
from common.spreadsheet import spreadsheet_safe
from dashboard.metrics import AGGREGATE
from jobs import selectors
from jobs.models import TASK_OPEN, Job, MetricPoint, Round, RoundState, SiteTask, TaskState
from sites import selectors as site_selectors
from sites.models import Project, Site
from sites.selectors import UserLike

MAX_QUERY = 200
MAX_MATCHES = 500
MAX_TABLE_ROUNDS = 1000


class LogSearchForm(forms.Form):
    """``?q=…&site=…``: text to find in the job's logs, optionally at one site."""

    q = forms.CharField(
        label="Text",
        max_length=MAX_QUERY,
        strip=False,  # spaces at either end are part of what a person looks for
        help_text="Any case; matched as written, not as a pattern.",
    )
    site = forms.ChoiceField(label="Site", required=False)

    def __init__(self, *args: Any, job: Job, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sites: dict[str, Site] = {
            link.site.name: link.site
            for link in job.participants.select_related("site").order_by("site__name")
        }
        site_field = self.fields["site"]
        assert isinstance(site_field, forms.ChoiceField)
        site_field.choices = [("", "Every site"), *((name, name) for name in self.sites)]

    def chosen_site(self) -> Site | None:
        name: str = self.cleaned_data.get("site") or ""
        return self.sites.get(name)


@dataclass(frozen=True)
class MetricTableRow:
    """A site (or the aggregate) and its value of the metric in each round, as text (the
    shortest that reads back as the stored float), "" where it has none."""

    name: str
    cells: list[str]


@dataclass(frozen=True)
class MetricTable:
    """One metric key, rounds 1..n as columns, the job's sites by name then the aggregate."""

    key: str
    keys: list[str]
    rounds: list[int]  # as people count them
    rows: list[MetricTableRow]


def metric_table_of(job: Job, key: str | None) -> MetricTable:
    """The table of ``key`` (the first key when it is not one of the job's); rounds up to the
    job's planned number or the last with a value, whichever is later. Two queries and one
    cell per site and round: 100 × 100 is 10,000 cells."""
    keys = selectors.round_metric_keys_of(job)
    if key not in keys:
        key = keys[0] if keys else ""
    values = selectors.round_metric_values_of(job, key) if key else {}
    planned = job.total_rounds or job.num_rounds
    # A script may report any round number: the columns stop at a bound a page can show.
    count = min(max([planned, *(number + 1 for _, number in values)]), MAX_TABLE_ROUNDS)
    sites = [
        (link.site_id, link.site.name)
        for link in job.participants.select_related("site").order_by("site__name")
    ]
    rows = [
        MetricTableRow(
            name=name,
            cells=[_cell(values.get((site_id, number))) for number in range(count)],
        )
        for site_id, name in [*sites, (None, AGGREGATE)]
    ]
    return MetricTable(
        key=key,
        keys=keys,
        rounds=[round_for_people(number) for number in range(count)],
        rows=rows,
    )


def _cell(value: float | None) -> str:
    return "" if value is None else repr(value)


def metric_table_csv(table: MetricTable) -> str:
    """The table as CSV, cell for cell as the page shows it."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["site", *(f"round {number}" for number in table.rounds)])
    writer.writerows([spreadsheet_safe(row.name), *row.cells] for row in table.rows)
    return out.getvalue()


# --- who is holding a round -----------------------------------------------------------------

STATE_WORDS: dict[str, str] = {
    TaskState.ASSIGNED: "waiting to download",
    TaskState.DOWNLOADED: "downloaded",
    TaskState.TRAINING: "training",
    TaskState.UPLOADED: "uploaded",
    TaskState.ACCEPTED: "answered: accepted",
    TaskState.REJECTED: "answered: rejected",
    TaskState.FAILED: "answered: failed",
    TaskState.LATE: "late",
}


def duration_text(seconds: float) -> str:
    """``"1 h 02 min 05 s"``, ``"3 min 09 s"``, ``"42 s"``: as job.js writes it live."""
    total = max(0, int(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min {secs:02d} s"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


@dataclass(frozen=True)
class HolderRow:
    """A site's part in an open round, for people: ``running`` when its time still counts
    (the page's clock ticks it on from ``since``)."""

    site: str
    job_name: str
    job_uid: str
    round_label: str
    state: str
    state_words: str
    since: dt.datetime
    taken: str
    running: bool
    last_seen: dt.datetime | None
    online: bool
    lag: str


def holder_rows(holders: list[selectors.RoundHolder], now: dt.datetime) -> list[HolderRow]:
    rows = []
    for holder in holders:
        task, rnd = holder.task, holder.task.round
        running = task.state in TASK_OPEN
        end = now if running else max(task.updated_at, rnd.opened_at)
        rows.append(
            HolderRow(
                site=task.site.name,
                job_name=rnd.job.name,
                job_uid=str(rnd.job.uid),
                round_label=rnd.label,
                state=task.state,
                state_words=STATE_WORDS.get(task.state, task.state),
                since=rnd.opened_at,
                taken=duration_text((end - rnd.opened_at).total_seconds()),
                running=running,
                last_seen=task.site.last_heartbeat,
                online=holder.online,
                lag=holder.lag,
            )
        )
    return rows


@dataclass(frozen=True)
class RoundHolders:
    """The job's open round (None when none is open) and each of its sites."""

    round: Round | None
    rows: list[HolderRow]


def round_holders_for_page(job: Job, now: dt.datetime | None = None) -> RoundHolders:
    now = now or timezone.now()
    current = job.rounds.filter(state=RoundState.OPEN).order_by("-number").first()
    if current is None:
        return RoundHolders(round=None, rows=[])
    return RoundHolders(
        round=current, rows=holder_rows(selectors.round_holders_of([current], now), now)
    )


def lagging_rows_for(jobs: QuerySet[Job], now: dt.datetime | None = None) -> list[HolderRow]:
    """The lagging sites of the running ``jobs`` (``jobs.selectors.lag_of``)."""
    now = now or timezone.now()
    return holder_rows(selectors.lagging_in(jobs, now), now)


def lagging_of_project(request: HttpRequest, project: Project) -> list[HolderRow]:
    """The lagging sites of the project's jobs the viewer may see (as the jobs list)."""
    return lagging_rows_for(selectors.jobs_visible_to(request.user, project=project))


# --- the whole record as JSON ---------------------------------------------------------------
# Streamed. Everything but the metric points is bounded by the job's rounds × sites (and its
# audit events), so it is built in memory first; the metric points, which a script may log
# by the hundred thousand, come last, POINT_BATCH at a time, so memory stays flat. The
# document says how it counts rounds in its "note" key.

RECORD_FORMAT = "fedportal.job-record/1"
RECORD_NOTE = (
    "Rounds count from 0 in this file (round_number, number), as in the REST API; the pages "
    "count them from 1 (round 0 here is 'round 1' there). Times are ISO 8601 in UTC; sizes "
    "are bytes. audit_events are those the downloader may see (a project admin: all of the "
    "job's; anyone else: their own). metric_points are every point, in the order stored; "
    f"site {AGGREGATE!r} is the round's aggregate."
)
POINT_BATCH = 5000


def _when(value: Any) -> str | None:
    return None if value is None else value.isoformat()


def _head(job: Job, user: UserLike | None) -> dict[str, Any]:
    """Every part of the record but the metric points."""
    participants = job.participants.select_related("site", "decided_by").order_by("site__name")
    tasks: dict[int, list[dict[str, Any]]] = {}
    for task in (
        SiteTask.objects.filter(round__job=job).select_related("site").order_by("site__name")
    ):
        tasks.setdefault(task.round_id, []).append(
            {
                "site": task.site.name,
                "state": task.state,
                "reason": task.reason,
                "task_name": task.task_name,
                "model_ref": task.model_ref,
                "weight": task.weight,
                "metrics": task.metrics,
                "update_sha256": task.update_sha256 or None,
                "update_size": task.update_size,
                "updated_at": _when(task.updated_at),
            }
        )
    audit = site_selectors.audit_events_visible_to(
        user, project=job.project, target_type="job", target_id=job.pk
    ).order_by("created_at", "id")
    return {
        "format": RECORD_FORMAT,
        "note": RECORD_NOTE,
        "job": {
            "uid": str(job.uid),
            "name": job.name,
            "project": job.project.slug,
            "experiment": job.experiment,
            "tags": job.tags,
            "submitted_by": job.submitted_by.username if job.submitted_by else None,
            "workflow": job.workflow,
            "params": job.params,
            "spec": job.spec,
            "min_clients": job.min_clients,
            "num_rounds": job.num_rounds,
            "total_rounds": job.total_rounds,
            "round_timeout_seconds": job.round_timeout_seconds,
            "round_sites": job.round_sites,
            "app_sha256": job.app_sha256,
            "state": job.state,
            "failure_reason": job.failure_reason,
            "completed_rounds": job.completed_rounds,
            "best_round": job.best_round,
            "best_score": job.best_score,
            "created_at": _when(job.created_at),
            "started_at": _when(job.started_at),
            "finished_at": _when(job.finished_at),
        },
        "participants": [
            {
                "site": link.site.name,
                "decision": link.decision,
                "decided_at": _when(link.decided_at),
                "decided_by": link.decided_by.username if link.decided_by else None,
                "decision_reason": link.decision_reason,
                "log_lines_dropped": link.log_lines_dropped,
            }
            for link in participants
        ],
        "rounds": [
            {
                "number": rnd.number,
                "label": rnd.label,
                "state": rnd.state,
                "opened_at": _when(rnd.opened_at),
                "deadline": _when(rnd.deadline),
                "closed_at": _when(rnd.closed_at),
                "metrics": rnd.metrics,
                "tasks": tasks.get(rnd.pk, []),
            }
            for rnd in job.rounds.order_by("number")
        ],
        "model_versions": [
            {
                "round_number": version.round_number,
                "sha256": version.sha256,
                "size": version.size,
                "metrics": version.metrics,
                "is_best": version.is_best,
                "created_at": _when(version.created_at),
            }
            for version in selectors.model_versions_of(job)
        ],
        "evaluations": [
            {
                "round_number": cell.round_number,
                "model": cell.model,
                "site": cell.site_name,
                "metrics": cell.metrics,
            }
            for cell in job.evaluations.order_by("round_number", "model", "site_name")
        ],
        "cross_site": selectors.cross_site_matrix_of(job),
        "audit_events": [
            {
                "at": _when(event.created_at),
                "action": event.action,
                "actor": event.actor_repr or None,
                "actor_site": event.actor_site.name if event.actor_site else None,
                "details": event.details,
                "source_address": event.source_address,
            }
            for event in audit
        ],
    }


def _points(job_id: int, names: dict[int, str], after: int) -> tuple[str, int | None]:
    """The next batch of points as JSON array items (each after a comma but the very first),
    and the last id (None when there are no more)."""
    rows = list(
        MetricPoint.objects.filter(job_id=job_id, id__gt=after)
        .order_by("id")
        .values_list(
            "id", "site_id", "round_number", "step", "key", "value", "source", "created_at"
        )[:POINT_BATCH]
    )
    if not rows:
        return "", None
    items = ",\n".join(
        json.dumps(
            {
                "site": AGGREGATE if site_id is None else names.get(site_id, ""),
                "round_number": round_number,
                "step": step,
                "key": key,
                "value": value,
                "source": source,
                "recorded_at": created_at.isoformat(),
            }
        )
        for _, site_id, round_number, step, key, value, source, created_at in rows
    )
    return ("" if after == 0 else ",\n") + items, rows[-1][0]


def _participant_names(job: Job) -> dict[int, str]:
    return {link.site_id: link.site.name for link in job.participants.select_related("site")}


def job_record_json(job: Job, user: UserLike | None) -> Iterator[str]:
    """The record, as pieces of one JSON object (``metric_points`` last)."""
    head = json.dumps(_head(job, user), indent=1, cls=DjangoJSONEncoder)
    yield head[:-2] + ',\n "metric_points": [\n'
    names, last = _participant_names(job), 0
    while True:
        text, after = _points(job.pk, names, last)
        if after is None:
            break
        yield text
        last = after
    yield "\n ]\n}\n"


async def job_record_json_async(job: Job, user: UserLike | None) -> AsyncIterator[str]:
    """:func:`job_record_json` for an ASGI server (each piece read in a worker thread)."""
    pieces = job_record_json(job, user)
    step = sync_to_async(lambda: next(pieces, None))
    while (piece := await step()) is not None:
        yield piece
