"""What sites do in a job: accept it, fetch its files, upload updates, post metrics."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import uuid
from collections.abc import Iterable, Mapping
from typing import IO, Any

from django.conf import settings
from django.core.files.base import ContentFile
from django.db import IntegrityError, transaction
from django.utils import timezone

from client_agent.protocol import MAX_LINES_PER_REPORT, MAX_MESSAGE_BYTES, cut_line
from common.exceptions import Conflict, NotFound, ValidationFailed
from jobs import events
from jobs.exceptions import DecisionNotDelegated, SlowDown, StorageFull, is_storage_full
from jobs.models import (
    JOB_ACTIVE,
    Job,
    JobSite,
    JobState,
    LogLine,
    MetricPoint,
    ModelVersion,
    RoundState,
    SiteTask,
    TaskState,
)
from jobs.numbers import (
    MAX_METRIC_KEY_LENGTH,
    NumberRejected,
    check_finite_number,
    check_optional_round,
    check_optional_step,
)
from jobs.services.rounds import job_kick_after_commit

log = logging.getLogger(__name__)


def job_for_site(*, job_uid: Any, site: Any) -> Job:
    """The job, if ``site`` takes part in it; otherwise NotFound (existence must not leak),
    also for a ``job_uid`` that is no job id at all."""
    try:
        uid = uuid.UUID(str(job_uid)) if not isinstance(job_uid, uuid.UUID) else job_uid
    except ValueError:
        raise NotFound("no such job for this site") from None
    # At most one row: no ordering (the model's would sort, and this runs on every agent call).
    job = Job.objects.filter(uid=uid, participants__site=site).order_by().first()
    if job is None:
        raise NotFound("no such job for this site")
    return job


def site_job_decide(
    *, job: Job, site: Any, accept: bool, decided_by: Any = None, by_agent: bool = False
) -> JobSite:
    """The site accepts or declines the job; only while the job waits to start.

    ``by_agent``: the site's agent decides, which its policy allows only when the site accepts
    jobs automatically (``DecisionNotDelegated`` otherwise); people's permission to decide is
    checked by the caller.
    """
    with transaction.atomic():
        link = (
            JobSite.objects.select_for_update()
            .select_related("job", "site")
            .get(job=job, site=site)
        )
        if by_agent and not link.site.auto_accept_jobs:
            raise DecisionNotDelegated()
        if link.job.state not in (JobState.SUBMITTED, JobState.WAITING):
            raise Conflict(f"the job is {link.job.state}; sites decide before it starts")
        link.decision = JobSite.Decision.ACCEPTED if accept else JobSite.Decision.DECLINED
        link.decided_at = timezone.now()
        link.decided_by = decided_by
        link.save(update_fields=["decision", "decided_at", "decided_by"])
        events.decision(link)
        job_kick_after_commit(link.job)
    return link


def task_for_site(*, job: Job, site: Any, round_number: int) -> SiteTask:
    task = (
        SiteTask.objects.select_related("round__job", "site")
        .filter(round__job=job, round__number=round_number, site=site)
        .order_by()  # one row; the model's ordering would join the sites to sort it
        .first()
    )
    if task is None:
        raise NotFound(f"this site has no task in round number {round_number} (counted from 0)")
    return task


def round_model_fetch(
    *, job: Job, site: Any, round_number: int, then: str = TaskState.DOWNLOADED
) -> ModelVersion:
    """The global model that round ``round_number`` starts from, for a site with a task in it.

    Marks the task ``downloaded`` (when it was only ``assigned`` and the round is open), so
    the job's per-site status shows who has started; ``then="training"`` for an agent that
    starts the script as soon as the model is in (one report fewer a round).
    """
    task = task_for_site(job=job, site=site, round_number=round_number)
    task_mark(task=task, state=then)
    version = ModelVersion.objects.filter(job=job, round_number=round_number).first()
    if version is None:  # a round always opens after its start model was stored
        raise NotFound(f"no global model for round number {round_number}")
    return version


def task_mark(*, task: SiteTask, state: str, reason: str = "") -> SiteTask:
    """A site reports progress (downloaded, training) or failure on an open task.

    ``failed`` (with the agent's ``reason``: the script crashed, the update could not be made)
    answers the task, so the round need not wait for its deadline to close on the others.
    Other moves, and reports on a closed round, change nothing.
    """
    open_states = {TaskState.ASSIGNED, TaskState.DOWNLOADED, TaskState.TRAINING}
    allowed = {
        TaskState.DOWNLOADED: {TaskState.ASSIGNED},
        TaskState.TRAINING: {TaskState.ASSIGNED, TaskState.DOWNLOADED},
        TaskState.FAILED: open_states,
    }
    if state not in allowed:
        raise ValidationFailed(f"a site may report only {', '.join(allowed)}", field="state")
    reason = reason.strip()[:2000] if state == TaskState.FAILED else ""
    if state == TaskState.FAILED and not reason:
        raise ValidationFailed("say why the task failed", field="reason")
    with transaction.atomic():
        changed = SiteTask.objects.filter(
            pk=task.pk, state__in=allowed[state], round__state=RoundState.OPEN
        ).update(state=state, reason=reason)
        if changed:
            task.state, task.reason = state, reason
            events.task_state(task)
            if state == TaskState.FAILED:
                job_kick_after_commit(task.round.job)
    return task


_OPEN_TASK_STATES = (TaskState.ASSIGNED, TaskState.DOWNLOADED, TaskState.TRAINING)


def task_takes_update(task: SiteTask) -> bool:
    """One update per task: while it is open, or once, late, after its round closed."""
    return task.state in _OPEN_TASK_STATES or (task.state == TaskState.LATE and not task.update)


def update_upload(
    *, task: SiteTask, stream: IO[bytes], sha256: str, length: int | None
) -> SiteTask:
    """Store a site's update from ``stream`` in chunks, never whole in memory.

    The body must be at most FEDPORTAL_MAX_MODEL_BYTES and hash to ``sha256``; otherwise
    ValidationFailed and nothing is kept. An update for a round that is no longer open is kept
    as ``late`` and not aggregated. A second upload for the same task is refused.
    """
    if not isinstance(sha256, str) or len(sha256) != 64:
        raise ValidationFailed(
            "the X-Content-SHA256 header must be a sha256 hex digest", field="sha256"
        )
    limit = settings.FEDPORTAL_MAX_MODEL_BYTES
    if length is not None and length > limit:
        raise ValidationFailed(
            f"larger than the limit of {limit} bytes", field="body", code="too_large"
        )
    if not task_takes_update(task):
        raise Conflict(f"this task is already {task.state}")
    digest = hashlib.sha256()
    size = 0
    name = f"{task.site.name}.safetensors"
    # Write to storage as it arrives; the file is deleted again on any refusal below.
    storage_file = task.update
    try:
        storage_file.save(name, ContentFile(b""), save=False)
    except OSError as exc:
        if is_storage_full(exc):
            raise _update_not_kept(task) from exc
        raise
    path = storage_file.path
    try:
        with open(path, "wb") as out:
            while chunk := stream.read(1 << 20):
                size += len(chunk)
                if size > limit:
                    raise ValidationFailed(
                        f"larger than the limit of {limit} bytes", field="body", code="too_large"
                    )
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256.lower():
            raise ValidationFailed(
                "the body does not match X-Content-SHA256", field="sha256", code="checksum_mismatch"
            )
        with transaction.atomic():
            locked = SiteTask.objects.select_for_update().select_related("round").get(pk=task.pk)
            if not task_takes_update(locked):
                raise Conflict(f"this task is already {locked.state}")
            late = locked.round.state != RoundState.OPEN
            locked.state = TaskState.LATE if late else TaskState.UPLOADED
            locked.reason = "arrived after the round closed" if late else ""
            locked.update = storage_file.name
            locked.update_sha256 = sha256.lower()
            locked.update_size = size
            locked.save(
                update_fields=[
                    "state",
                    "reason",
                    "update",
                    "update_sha256",
                    "update_size",
                    "updated_at",
                ]
            )
            events.task_state(locked)
            if not late:
                from jobs.tasks import update_check_task  # noqa: PLC0415

                task_id = locked.pk
                transaction.on_commit(lambda: update_check_task.delay(task_id))
        return locked
    except BaseException as exc:
        storage_file.storage.delete(storage_file.name)
        if is_storage_full(exc):
            raise _update_not_kept(task) from exc
        raise


def _update_not_kept(task: SiteTask) -> StorageFull:
    log.error("storage full: the update of %s was not kept", task.site.name)
    return StorageFull("the portal's storage is full; the update was not kept: send it again later")


def metrics_record(*, job: Job, site: Any, points: Iterable[Mapping[str, Any]]) -> int:
    """Store ``flare.log`` points from a site; returns how many were new.

    Each point: ``key`` (str), ``value`` (finite number), optional ``step`` (int), ``round``
    (int) and ``id`` (the sender's id: a point sent twice is stored once).
    """
    if job.state not in JOB_ACTIVE:
        raise Conflict(f"the job is {job.state}")
    rows = []
    for index, point in enumerate(points):
        field = f"points[{index}]"
        if not isinstance(point, Mapping):
            raise ValidationFailed("must be an object", field=field)
        key = point.get("key")
        if not isinstance(key, str) or not key or len(key) > MAX_METRIC_KEY_LENGTH:
            raise ValidationFailed(
                f"key must be a string of 1 to {MAX_METRIC_KEY_LENGTH} characters",
                field=f"{field}.key",
            )
        try:
            value = check_finite_number(f"{field}.value", point.get("value"))
            step = check_optional_step(f"{field}.step", point.get("step"))
            round_number = check_optional_round(f"{field}.round", point.get("round"))
        except NumberRejected as exc:
            raise ValidationFailed(exc.reason, field=exc.field) from None
        client_id = point.get("id") or ""
        if not isinstance(client_id, str) or len(client_id) > 64:
            raise ValidationFailed(
                "id must be a string of at most 64 characters", field=f"{field}.id"
            )
        rows.append(
            MetricPoint(
                job=job,
                site=site,
                key=key,
                value=value,
                step=step,
                round_number=round_number,
                client_id=client_id,
                source=MetricPoint.Source.LOG,
            )
        )
    created = 0
    with transaction.atomic():
        for row in rows:
            try:
                with transaction.atomic():
                    row.save()
            except IntegrityError:
                continue  # the same client id again: stored once
            created += 1
            events.metric(row)
    return created


def log_lines_record(
    *,
    job: Job,
    site: Any,
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
    lines = list(lines)
    if len(lines) > MAX_LINES_PER_REPORT:
        raise ValidationFailed(
            f"at most {MAX_LINES_PER_REPORT} lines at a time, got {len(lines)}", field="lines"
        )
    _check_job_takes_lines(job, now)
    rows = _log_rows(job, site, lines)
    with transaction.atomic():
        link = JobSite.objects.select_for_update().filter(job=job, site=site).first()
        if link is None:
            raise NotFound("no such job for this site")
        fresh = rows
        ids = [row.client_id for row in rows if row.client_id]
        if ids:
            seen = set(
                LogLine.objects.filter(job=job, site=site, client_id__in=ids).values_list(
                    "client_id", flat=True
                )
            )
            fresh = [row for row in rows if not row.client_id or row.client_id not in seen]
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
        events.log_lines(job, site, fresh)
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


def _log_rows(job: Job, site: Any, lines: list[Any]) -> list[LogLine]:
    streams = set(LogLine.Stream.values)
    rows = []
    for index, line in enumerate(lines):
        field = f"lines[{index}]"
        if not isinstance(line, Mapping):
            raise ValidationFailed("must be an object", field=field)
        text, stream = line.get("text"), line.get("stream", LogLine.Stream.SCRIPT)
        if not isinstance(text, str):
            raise ValidationFailed("text must be a string", field=f"{field}.text")
        if stream not in streams:
            raise ValidationFailed(
                f"stream must be one of {', '.join(sorted(streams))}", field=f"{field}.stream"
            )
        rnd = line.get("round")
        if rnd is not None and (isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0):
            raise ValidationFailed("round must be a non-negative integer", field=f"{field}.round")
        client_id = line.get("id") or ""
        if not isinstance(client_id, str) or len(client_id) > 64:
            raise ValidationFailed(
                "id must be a string of at most 64 characters", field=f"{field}.id"
            )
        # What a database text column holds: no NUL, no lone surrogate (JSON allows both).
        text = cut_line(text).replace("\x00", "\ufffd")
        data = text.encode("utf-8", "replace")
        rows.append(
            LogLine(
                job=job,
                site=site,
                round_number=rnd,
                stream=stream,
                text=data.decode("utf-8"),
                size=len(data),
                client_id=client_id,
            )
        )
    return rows


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


def job_abort(*, job: Job, reason: str = "aborted") -> Job:
    with transaction.atomic():
        locked = Job.objects.select_for_update().get(pk=job.pk)
        locked.move_to(JobState.ABORTED, reason)
        locked.save(update_fields=["state", "finished_at", "failure_reason"])
        locked.rounds.filter(state=RoundState.OPEN).update(
            state=RoundState.FAILED, closed_at=timezone.now()
        )
        events.job_state(locked)
    return locked
