"""A site's work on its round tasks: fetching the round's model, reporting progress, and
uploading its update."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import logging
from collections.abc import Iterable
from typing import IO, TYPE_CHECKING, Any

from django.conf import settings
from django.core.files.base import ContentFile
from django.db import transaction
from django.db.models import Exists, OuterRef, QuerySet, Subquery
from django.utils import timezone

from client_agent.protocol import SOCKET_UPDATE_MOST_BYTES, UpdateMessage
from common.exceptions import Conflict, NotFound, ValidationFailed
from fedportal.prepared import PreparedUpdate
from jobs import events, storage
from jobs.exceptions import StorageFull, is_storage_full
from jobs.models import Checkpoint, ModelVersion, Round, RoundState, SiteTask, TaskState
from jobs.selectors import start_model_of, task_of_site, task_takes_update
from jobs.services.kicks import GatheredKicks, kick_after_commit
from jobs.services.privacy import round_declined_record
from jobs.services.rounds import job_kick_after_commit
from jobs.workflows import ModelRef
from sites.services.privacy import privacy_report_checked

if TYPE_CHECKING:
    from sites.models import Site

log = logging.getLogger(__name__)

_MOVES_TO_UPLOADED = SiteTask.states_that_move_to(TaskState.UPLOADED)
# A task whose round is open, as a condition on the task's own row: never ``round__state``
# in a conditional update, which Django turns into ``id IN (a join)`` with the task's state
# tested inside it. PostgreSQL then tests a task row that a closing round changed meanwhile
# (the update waited on its lock) against the state it had before, and overwrites ``late``.
_IN_OPEN_ROUND = Exists(Round.objects.filter(pk=OuterRef("round_id"), state=RoundState.OPEN))


def round_model_fetch(
    *, task: SiteTask, then: str = TaskState.DOWNLOADED
) -> ModelVersion | Checkpoint:
    """The model the site's ``task`` sends (its round and job attached): the global model the
    round starts from, or the named checkpoint the round's plan gave the site (another site's
    submitted model, to evaluate). Both have the ``file`` and ``sha256`` a download serves.

    Marks the task ``downloaded`` (when it was only ``assigned`` and the round is open), so
    the job's per-site status shows who has started; ``then="training"`` for an agent that
    starts the script as soon as the model is in (one report fewer a round).
    """
    job, round_number = task.round.job, task.round.number
    model = ModelRef.parse(task.model_ref)
    # Only what a download serves: the model's other fields (metrics) may be large.
    fields = ("id", "file", "sha256")
    if model.is_global:
        # Read with the task when the caller asked for it (jobs.selectors.start_model_of).
        found: ModelVersion | Checkpoint | None = (
            start_model_of(task)
            or ModelVersion.objects.filter(job=job, round_number=round_number).only(*fields).first()
        )
    else:
        found = Checkpoint.objects.filter(job=job, name=model.checkpoint).only(*fields).first()
    if found is None:  # a round opens after its start model and checkpoints were stored
        raise NotFound(f"no {model} model for round number {round_number}")
    task_mark(task=task, state=then)
    return found


_MOVES_TO_TRAINING = SiteTask.states_that_move_to(TaskState.TRAINING)


def tasks_model_delivered(deliveries: Iterable[tuple[dict[str, Any], int, str]]) -> int:
    """Round events (each ``(event, site id, site name)``, the event as published) that
    brought sites' agents the model their tasks start from (``jobs.services.rounds.event_model``),
    as a download with ``?then=training`` would have: those tasks are ``training`` now, and the
    job's page hears of each. How many moved: a task that had moved on already (uploaded, say)
    or whose round closed stays as it is.

    A portal process gathers the events its sockets sent in a moment (``jobs.consumers``), so a
    round that opens for a hundred sites costs one transaction per round and process: the
    tasks locked in one query, updated in another, whatever the number of sites, and the job's
    page told in one message (``events.publish_all``). The round's id comes from a subquery
    and its state is tested on the task's own row (see ``_IN_OPEN_ROUND``)."""
    by_round: dict[tuple[int, int, int], dict[int, str]] = {}
    for event, site_id, site_name in deliveries:
        key = (int(event["job_id"]), int(event["project_id"]), int(event["round"]))
        by_round.setdefault(key, {})[site_id] = site_name
    moved = 0
    for (job_id, project_id, number), sites in by_round.items():
        round_id = Round.objects.filter(job_id=job_id, number=number).values("pk")[:1]
        with transaction.atomic():
            moving = list(
                SiteTask.objects.filter(
                    round_id=Subquery(round_id), site_id__in=sites, state__in=_MOVES_TO_TRAINING
                )
                .filter(_IN_OPEN_ROUND)
                .select_for_update()
                .values_list("pk", "site_id")
            )
            if not moving:
                continue
            SiteTask.objects.filter(pk__in=[pk for pk, _ in moving]).update(
                state=TaskState.TRAINING, reason=""
            )
            events.publish_all(
                events.TaskStateChanged(
                    job_id=job_id,
                    project_id=project_id,
                    round=number,
                    site=sites[site_id],
                    state=TaskState.TRAINING,
                    reason="",
                )
                for _, site_id in moving
            )
        moved += len(moving)
    return moved


def task_mark(*, task: SiteTask, state: str, reason: str = "", privacy: Any = None) -> SiteTask:
    """A site reports progress (downloaded, training) or failure on an open task.

    ``failed`` (with the agent's ``reason``: the script crashed, the update could not be made)
    answers the task, so the round need not wait for its deadline to close on the others.
    Other moves, and reports on a closed round, change nothing.

    ``privacy``: with ``failed``, the site's privacy ledger report, sent when its privacy
    policy declined the round (the budget, or the job as a whole): checked (400 naming the
    field), kept, and the decline audited (``privacy.round_declined``).
    """
    reportable = (TaskState.DOWNLOADED, TaskState.TRAINING, TaskState.FAILED)
    if state not in reportable:
        raise ValidationFailed(f"a site may report only {', '.join(reportable)}", field="state")
    reason = reason.strip()[:2000] if state == TaskState.FAILED else ""
    if state == TaskState.FAILED and not reason:
        raise ValidationFailed("say why the task failed", field="reason")
    report = None
    if privacy is not None:
        if state != TaskState.FAILED:
            raise ValidationFailed(
                "a privacy report comes with a failed task only (a round the site's privacy "
                "policy declined)",
                field="privacy",
            )
        report = privacy_report_checked(privacy)
    # Progress is one conditional update, atomic on its own; a failure writes more with it.
    with transaction.atomic() if state == TaskState.FAILED else contextlib.nullcontext():
        changed = (
            SiteTask.objects.filter(pk=task.pk, state__in=SiteTask.states_that_move_to(state))
            .filter(_IN_OPEN_ROUND)
            .update(state=state, reason=reason)
        )
        if changed:
            task.state, task.reason = state, reason
            events.task_state(task)
            if report is not None:
                round_declined_record(task=task, reason=reason, report=report)
            if state == TaskState.FAILED:
                job_kick_after_commit(task.round.job)
    return task


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
    # On the file system the stored file itself; with an object store a local file, uploaded
    # in parts once the body is whole and checked (jobs.storage): never held in memory.
    path = storage.path_to_write(str(storage_file.name))
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
        storage.publish(str(storage_file.name), keep_local=False)
        stored = {
            "update": storage_file.name,
            "update_sha256": sha256.lower(),
            "update_size": size,
            "updated_at": timezone.now(),
        }
        if _uploaded_to_open_round(task, stored):
            return task
        with transaction.atomic():
            # The task's row alone is locked, not the round's (which every upload and update
            # check of the round would queue on). A round that closes marks its unanswered
            # tasks late under this same row lock, so either it did so first, and the round's
            # state read below (a statement after the lock: it sees that commit) says closed,
            # or it waits for this upload, and then makes the uploaded task late itself.
            locked = (
                SiteTask.objects.select_for_update(of=("self",))
                .select_related("round__job", "site")
                .get(pk=task.pk)
            )
            if not task_takes_update(locked):
                raise Conflict(f"this task is already {locked.state}")
            round_state = Round.objects.filter(pk=locked.round_id).values_list("state", flat=True)
            late = round_state.get() != RoundState.OPEN
            reason = "arrived after the round closed" if late else ""
            if locked.state == TaskState.LATE:  # made late when the round closed: kept as is
                locked.reason = reason
            else:
                locked.move_to(TaskState.LATE if late else TaskState.UPLOADED, reason)
            for field, value in stored.items():
                setattr(locked, field, value)
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
                _update_check_after_commit(locked)
        return locked
    except BaseException as exc:
        if storage_file.name:
            storage_file.storage.delete(storage_file.name)
            storage.forget([storage_file.name])
        if is_storage_full(exc):
            raise _update_not_kept(task) from exc
        raise


def socket_update_max_bytes() -> int:
    """The largest update an agent may send in an ``update`` message on its socket, as its
    welcome says: ``FEDPORTAL_SOCKET_UPDATE_MAX_BYTES``, within what one message carries and
    the largest model the portal keeps; 0: every update comes over HTTP."""
    return max(
        0,
        min(
            settings.FEDPORTAL_SOCKET_UPDATE_MAX_BYTES,
            SOCKET_UPDATE_MOST_BYTES,
            settings.FEDPORTAL_MAX_MODEL_BYTES,
        ),
    )


def update_from_socket(*, site: Site, update: UpdateMessage) -> SiteTask:
    """A site's update that came in an ``update`` message on its agent's socket: stored as an
    upload is (:func:`update_upload`: the digest checked, late if the round closed, refused
    if the task took one already), for the site's task in the message's job and round (not
    found: a job or round the site has no task in). An update over
    :func:`socket_update_max_bytes` is refused as ``too_large`` (413): the agent uploads it
    over HTTP instead."""
    most = socket_update_max_bytes()
    if len(update.data) > most:
        raise ValidationFailed(
            f"an update of {len(update.data)} bytes; this portal takes at most {most} on the "
            "socket: upload it over HTTP",
            field="data",
            code="too_large",
            status=413,
        )
    task = task_of_site(job_uid=update.job, site=site, round_number=update.round)
    return update_upload(
        task=task, stream=io.BytesIO(update.data), sha256=update.sha256, length=len(update.data)
    )


def _upload_to_open_round(task_id: int, **stored: Any) -> tuple[QuerySet[SiteTask], dict[str, Any]]:
    tasks = SiteTask.objects.filter(pk=task_id, state__in=_MOVES_TO_UPLOADED)
    return tasks.filter(_IN_OPEN_ROUND), {"state": TaskState.UPLOADED, "reason": "", **stored}


# Every upload runs it: compiled once (building and compiling it was a tenth of a busy
# portal's CPU at 100 agents).
_UPLOAD_TO_OPEN_ROUND = PreparedUpdate(
    _upload_to_open_round,
    task_id=2_000_000_003,
    update="jobs/prepared/example.safetensors",
    update_sha256="e" * 64,
    update_size=3_000_000_017,
    updated_at=dt.datetime(2001, 2, 3, 4, 5, 6, 789, tzinfo=dt.UTC),
)


def _uploaded_to_open_round(task: SiteTask, stored: dict[str, Any]) -> bool:
    """The usual upload, in one statement: an open task of a round that is still open becomes
    ``uploaded`` with its file (``stored``); whether it did. Anything else (a round closed
    or closing, a task answered meanwhile) is for the locked path, which says what happened.

    One conditional update is as safe as the lock: a round that closes marks its unanswered
    tasks late and leaves ``open`` in one transaction, so this statement either sees the
    round open and the task unanswered, or (waiting on the task's row, then reading it again)
    a task that is no longer open, and changes nothing.
    """
    uploaded = _UPLOAD_TO_OPEN_ROUND.update(task_id=task.pk, **stored)
    if not uploaded:
        return False
    task.state, task.reason = TaskState.UPLOADED, ""
    for field, value in stored.items():
        setattr(task, field, value)
    events.task_state(task)
    _update_check_after_commit(task)
    return True


def _round_updates_check_enqueue(round_id: int) -> None:
    from jobs.tasks import round_updates_check_task

    round_updates_check_task.delay(round_id)


# The uploads of a moment enqueue one check of their round: the worker's check takes every
# update of the round that waits anyway, and Celery's publish of a check for each upload was
# the largest single cost of a busy portal (6% of its CPU at 150 agents, profiled).
UPDATE_CHECKS = GatheredKicks(
    _round_updates_check_enqueue,
    lambda: settings.FEDPORTAL_UPDATE_CHECK_GATHER_SECONDS,
    quiet=lambda: settings.FEDPORTAL_UPDATE_CHECK_QUIET_SECONDS,
)


def _update_check_after_commit(task: SiteTask) -> None:
    round_id = task.round_id
    kick_after_commit(lambda: UPDATE_CHECKS.add(round_id))


def _update_not_kept(task: SiteTask) -> StorageFull:
    log.error("storage full: the update of %s was not kept", task.site.name)
    return StorageFull("the portal's storage is full; the update was not kept: send it again later")
