"""What a site reports while it works: ``flare.log`` metric points and its script's output lines.

Both kinds of report go through the same two steps:

- **one check** (:func:`_report_entries`): every entry is an object whose optional ``round`` is
  a round number (``jobs.numbers``) and whose optional ``id`` fits the ``client_id`` column;
  then each kind checks its own fields (a point's key, value and step; a line's text and
  stream), every error naming the entry's field (``points[3].value``);
- **one de-duplication** (:func:`_unseen`): under the lock of the job-site row, entries whose
  sender ``id`` is stored already, or came earlier in the same report, are dropped (an agent
  sends a report again when its acknowledgement was lost), and the rest are inserted with one
  ``bulk_create``. The lock makes the count of new entries exact.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from django.conf import settings
from django.db import transaction
from django.db.models import Value
from django.utils import timezone

from client_agent.protocol import MAX_LINES_PER_REPORT, MAX_MESSAGE_BYTES, cut_line
from common.exceptions import Conflict, NotFound, ValidationFailed
from jobs import events
from jobs.exceptions import SlowDown
from jobs.models import JOB_ACTIVE, Job, JobSite, LogLine, MetricPoint
from jobs.numbers import (
    MAX_METRIC_KEY_LENGTH,
    NumberRejected,
    check_finite_number,
    check_optional_round,
    check_optional_step,
    metric_name_problem,
)
from sites.models import Site

# The sender's id of a point or line: what the models' ``client_id`` columns hold.
MAX_CLIENT_ID_LENGTH = 64

_Row = TypeVar("_Row", MetricPoint, LogLine)
_Value = TypeVar("_Value")


# --- the one check and the one de-duplication ----------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One entry of a site's report, with what every kind of entry carries checked."""

    field: str  # where it was in the report, for errors: ``points[3]``
    data: Mapping[str, Any]
    round_number: int | None
    client_id: str


def _report_entries(entries: Iterable[Any], *, name: str) -> list[_Entry]:
    """The entries of a report's ``name`` list (``points``, ``lines``), each checked to be an
    object with an optional ``round`` (a round number) and an optional sender ``id``."""
    checked = []
    for index, data in enumerate(entries):
        field = f"{name}[{index}]"
        if not isinstance(data, Mapping):
            raise ValidationFailed("must be an object", field=field)
        round_number = _checked_number(check_optional_round, f"{field}.round", data.get("round"))
        client_id = data.get("id") or ""
        if not isinstance(client_id, str) or len(client_id) > MAX_CLIENT_ID_LENGTH:
            raise ValidationFailed(
                f"id must be a string of at most {MAX_CLIENT_ID_LENGTH} characters",
                field=f"{field}.id",
            )
        checked.append(_Entry(field, data, round_number, client_id))
    return checked


def _checked_number(check: Callable[[str, Any], _Value], field: str, value: Any) -> _Value:
    try:
        return check(field, value)
    except NumberRejected as exc:
        raise ValidationFailed(exc.reason, field=exc.field) from None


def _locked_link(job: Job, site: Site) -> JobSite:
    """The job-site row, locked until the transaction ends: one report of a site is stored
    at a time, so :func:`_unseen` sees every entry stored before it."""
    link = JobSite.objects.select_for_update().filter(job=job, site=site).first()
    if link is None:
        raise NotFound("no such job for this site")
    link.job, link.site = job, site
    return link


def _locked_link_of(job_uid: object, site: Site) -> JobSite:
    """:func:`_locked_link` by the job's uid (as an agent's message names it), with the job
    read in the same statement; only the job-site row is locked, not the job's."""
    try:
        uid = uuid.UUID(str(job_uid)) if not isinstance(job_uid, uuid.UUID) else job_uid
    except ValueError:
        raise NotFound("no such job for this site") from None
    link = (
        JobSite.objects.select_for_update(of=("self",))
        .select_related("job")
        .filter(job__uid=uid, site=site)
        .first()
    )
    if link is None:
        raise NotFound("no such job for this site")
    return link


def _unseen(
    model: type[_Row], link: JobSite, rows: list[_Row], stored: set[str] | None = None
) -> list[_Row]:
    """``rows`` less those whose sender id is stored already for the job and site, or came
    earlier in ``rows``: an entry sent again is stored once. Exact under ``link``'s lock.
    ``stored``: those of the ids that are stored, when the caller read them already."""
    seen = set(stored) if stored is not None else _stored_ids(link, {model: rows})[model]
    fresh = []
    for row in rows:
        if row.client_id:
            if row.client_id in seen:
                continue
            seen.add(row.client_id)
        fresh.append(row)
    return fresh


def _stored_ids(
    link: JobSite, rows: Mapping[type[MetricPoint] | type[LogLine], list[Any]]
) -> dict[type[MetricPoint] | type[LogLine], set[str]]:
    """For each model of ``rows``, the sender ids of its rows that are stored already for the
    job and site: one statement for all of them (a report's points and lines together)."""
    queries = []
    for tag, (model, entries) in enumerate(rows.items()):
        ids = {row.client_id for row in entries if row.client_id}
        if ids:
            queries.append(
                model.objects.filter(job_id=link.job_id, site_id=link.site_id, client_id__in=ids)
                .order_by()
                .annotate(model_tag=Value(tag))
                .values_list("model_tag", "client_id")
            )
    stored: dict[type[MetricPoint] | type[LogLine], set[str]] = {model: set() for model in rows}
    if not queries:
        return stored
    models = list(rows)
    union = queries[0].union(*queries[1:], all=True) if len(queries) > 1 else queries[0]
    for tag, client_id in union:
        stored[models[tag]].add(client_id)
    return stored


# --- metric points -------------------------------------------------------------------------


def metrics_record(*, job: Job, site: Site, points: Iterable[Mapping[str, Any]]) -> int:
    """Store ``flare.log`` points from a site; returns how many were new.

    Each point: ``key`` (str), ``value`` (finite number), optional ``step`` (int), ``round``
    (int) and ``id`` (the sender's id: a point sent twice is stored once). The new points are
    inserted together and published as one event.
    """
    rows = _metric_rows(job, site, points)
    with transaction.atomic():
        return _metrics_store(_locked_link(job, site), rows)


def _metric_rows(job: Job, site: Site, points: Iterable[Mapping[str, Any]]) -> list[MetricPoint]:
    if job.state not in JOB_ACTIVE:
        raise Conflict(f"the job is {job.state}")
    return [_metric_row(job, site, entry) for entry in _report_entries(points, name="points")]


def _metrics_store(link: JobSite, rows: list[MetricPoint], stored: set[str] | None = None) -> int:
    """Insert the new of ``rows`` (``link`` locked; ``stored`` as :func:`_unseen`); how
    many."""
    fresh = _unseen(MetricPoint, link, rows, stored)
    if fresh:
        MetricPoint.objects.bulk_create(fresh)
        events.metrics(link.job, link.site, fresh)
    return len(fresh)


def report_record(
    *,
    job_uid: object,
    site: Site,
    points: Iterable[Mapping[str, Any]] | None = None,
    lines: Iterable[Mapping[str, Any]] | None = None,
) -> int:
    """One report of a site's agent: its ``flare.log`` points and output lines for the job
    with ``job_uid``, stored together in one transaction under one lock of the job-site row,
    as :func:`metrics_record` and :func:`log_lines_record` store each (their checks, errors
    and bounds); how many entries were new. Nothing is stored when either part is refused."""
    now = timezone.now()
    with transaction.atomic():
        link = _locked_link_of(job_uid, site)
        link.site = site
        point_rows = _metric_rows(link.job, site, points) if points else []
        line_rows = _line_rows(link.job, site, lines, now) if lines else []
        # Which of both were sent before, in one statement.
        seen = _stored_ids(link, {MetricPoint: point_rows, LogLine: line_rows})
        stored = 0
        if point_rows:
            stored += _metrics_store(link, point_rows, seen[MetricPoint])
        if line_rows:
            stored += _lines_store(link, line_rows, now, seen[LogLine])
    return stored


def _metric_row(job: Job, site: Site, entry: _Entry) -> MetricPoint:
    key = entry.data.get("key")
    if not isinstance(key, str) or not key or len(key) > MAX_METRIC_KEY_LENGTH:
        raise ValidationFailed(
            f"key must be a string of 1 to {MAX_METRIC_KEY_LENGTH} characters",
            field=f"{entry.field}.key",
        )
    if problem := metric_name_problem(key):
        raise ValidationFailed(problem, field=f"{entry.field}.key")
    return MetricPoint(
        job=job,
        site=site,
        key=key,
        value=_checked_number(check_finite_number, f"{entry.field}.value", entry.data.get("value")),
        step=_checked_number(check_optional_step, f"{entry.field}.step", entry.data.get("step")),
        round_number=entry.round_number,
        client_id=entry.client_id,
        source=MetricPoint.Source.LOG,
    )


# --- output lines --------------------------------------------------------------------------


def log_lines_record(
    *,
    job: Job,
    site: Site,
    lines: Iterable[Mapping[str, Any]],
    now: dt.datetime | None = None,
) -> int:
    """Store lines a site's script printed (or its agent wrote); returns how many were new.

    Each line: ``text`` (str, cut to ``LogLine.MAX_LENGTH`` characters with a marker), optional
    ``stream`` (``script`` or ``agent``), ``round`` (int) and ``id`` (the sender's id: a line
    sent twice is stored once). At most ``MAX_LINES_PER_REPORT`` lines at a time.

    Bounds, per job and site (``FEDPORTAL_LOG_*`` settings):

    - **quota**: the newest ``MAX_LINES_PER_SITE`` lines and ``MAX_BYTES_PER_SITE`` bytes are
      kept; older ones are deleted, oldest first (as the agent's outbox drops them), and
      counted in ``JobSite.log_lines_dropped``, which the API and the job page show.
    - **rate**: a token bucket of ``BURST_BYTES`` refilled at ``BYTES_PER_SECOND``. A batch
      that does not fit raises :class:`SlowDown` with the seconds until it would, and nothing
      is stored; the agent sends it again then. The quota alone bounds storage, but not the
      work: a site sending 8 MB/s would make the portal insert and delete 8 MB/s for ever.
    - **time**: lines of a finished job are taken for ``GRACE_SECONDS`` after it ended (a
      script's last words arrive after its last update), then refused with a Conflict.

    Holds the job-site row's lock (``select_for_update``) while it counts, so a site's reports
    are stored one at a time and the counters are exact.
    """
    now = now or timezone.now()
    rows = _line_rows(job, site, lines, now)
    with transaction.atomic():
        return _lines_store(_locked_link(job, site), rows, now)


def _line_rows(
    job: Job, site: Site, lines: Iterable[Mapping[str, Any]], now: dt.datetime
) -> list[LogLine]:
    lines = list(lines)
    if len(lines) > MAX_LINES_PER_REPORT:
        raise ValidationFailed(
            f"at most {MAX_LINES_PER_REPORT} lines at a time, got {len(lines)}", field="lines"
        )
    _check_job_takes_lines(job, now)
    return [_log_row(job, site, entry) for entry in _report_entries(lines, name="lines")]


def _lines_store(
    link: JobSite, rows: list[LogLine], now: dt.datetime, stored: set[str] | None = None
) -> int:
    """Insert the new of ``rows`` within the bounds (``link`` locked; ``stored`` as
    :func:`_unseen`); how many."""
    fresh = _unseen(LogLine, link, rows, stored)
    if not fresh:
        return 0
    _take_log_allowance(link, sum(row.size for row in fresh), now)
    fresh, dropped = _newest_within_quota(fresh)
    LogLine.objects.bulk_create(fresh)
    link.log_lines += len(fresh)
    link.log_bytes += sum(row.size for row in fresh)
    dropped += _drop_oldest_lines(link)
    link.log_lines_dropped += dropped
    link.save(
        update_fields=[
            "log_lines",
            "log_bytes",
            "log_lines_dropped",
            "log_allowance",
            "log_allowance_at",
        ]
    )
    events.log_lines(link.job, link.site, fresh)
    return len(fresh)


def _check_job_takes_lines(job: Job, now: dt.datetime) -> None:
    if job.state in JOB_ACTIVE:
        return
    grace = settings.FEDPORTAL_LOG_GRACE_SECONDS
    if job.finished_at is not None and (now - job.finished_at).total_seconds() <= grace:
        return
    raise Conflict(
        f"the job is {job.state}; its output lines are taken until {grace} s after it ended"
    )


def _log_row(job: Job, site: Site, entry: _Entry) -> LogLine:
    streams = set(LogLine.Stream.values)
    text, stream = entry.data.get("text"), entry.data.get("stream", LogLine.Stream.SCRIPT)
    if not isinstance(text, str):
        raise ValidationFailed("text must be a string", field=f"{entry.field}.text")
    if stream not in streams:
        raise ValidationFailed(
            f"stream must be one of {', '.join(sorted(streams))}", field=f"{entry.field}.stream"
        )
    # What a database text column holds: no NUL, no lone surrogate (JSON allows both).
    text = cut_line(text).replace("\x00", "\ufffd")
    data = text.encode("utf-8", "replace")
    return LogLine(
        job=job,
        site=site,
        round_number=entry.round_number,
        stream=stream,
        text=data.decode("utf-8"),
        size=len(data),
        client_id=entry.client_id,
    )


def _take_log_allowance(link: JobSite, cost: int, now: dt.datetime) -> None:
    """Spend ``cost`` bytes of the job-site's token bucket, or raise SlowDown (locked row)."""
    rate = settings.FEDPORTAL_LOG_BYTES_PER_SECOND
    # A bucket smaller than one message could never take a full one.
    burst = max(settings.FEDPORTAL_LOG_BURST_BYTES, MAX_MESSAGE_BYTES)
    allowance = float(burst)
    if link.log_allowance is not None and link.log_allowance_at is not None:
        elapsed = max(0.0, (now - link.log_allowance_at).total_seconds())
        allowance = min(allowance, link.log_allowance + rate * elapsed)
    # A batch larger than the bucket (never one message of an agent) waits for a full one.
    cost = min(cost, burst)
    if cost > allowance:
        wait = (cost - allowance) / rate if rate > 0 else 60.0
        raise SlowDown(
            f"this site sends output lines faster than {rate} bytes a second; send these "
            f"again in {wait:.1f} s",
            retry_after=wait,
        )
    link.log_allowance = allowance - cost
    link.log_allowance_at = now


def _newest_within_quota(rows: list[LogLine]) -> tuple[list[LogLine], int]:
    """The newest of ``rows`` that the quota could hold on their own, and how many did not fit."""
    max_lines = settings.FEDPORTAL_LOG_MAX_LINES_PER_SITE
    max_bytes = settings.FEDPORTAL_LOG_MAX_BYTES_PER_SITE
    kept, size = 0, 0
    for row in reversed(rows):
        if kept + 1 > max_lines or size + row.size > max_bytes:
            break
        kept += 1
        size += row.size
    return rows[len(rows) - kept :], len(rows) - kept


def _drop_oldest_lines(link: JobSite) -> int:
    """Delete the job-site's oldest lines until its counts are within the quota; how many."""
    excess_lines = link.log_lines - settings.FEDPORTAL_LOG_MAX_LINES_PER_SITE
    excess_bytes = link.log_bytes - settings.FEDPORTAL_LOG_MAX_BYTES_PER_SITE
    if excess_lines <= 0 and excess_bytes <= 0:
        return 0
    oldest = (
        LogLine.objects.filter(job_id=link.job_id, site_id=link.site_id)
        .order_by("id")
        .values_list("id", "size")
    )
    ids: list[int] = []
    freed = 0
    for pk, size in oldest.iterator(chunk_size=1000):
        if len(ids) >= excess_lines and freed >= excess_bytes:
            break
        ids.append(pk)
        freed += size
    LogLine.objects.filter(pk__in=ids).delete()
    link.log_lines -= len(ids)
    link.log_bytes -= freed
    return len(ids)
