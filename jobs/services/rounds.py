"""The job state machine, driven by one idempotent step: :func:`job_advance`.

Every event that may move a job on (a site's update checked, a site accepting the job, a
heartbeat, a round's deadline, a worker starting) enqueues ``job_advance(job_id)``. It locks
the job row, looks at what the database says, and does the next step that is due:

    submitted → waiting                       always
    waiting   → running, round 1 opens        when min_clients participants accepted and are online
    running, round open, all answered         → aggregate
    running, round open, past its deadline    → aggregate if min_clients accepted, else fail
    running, round aggregating                → aggregate (a worker died in the middle)
    running, round closed                     → open the next round, or complete the job

Every workflow is driven the same way, through the protocol of ``jobs.workflows.base``: the
sites and the round count are frozen when the job starts (``Job.round_sites``,
``Job.total_rounds``); a round opens with ``workflow.plan`` over those sites and the server
state the last round stored, and stores the plan (``Round.plan``) and each site's task; answers
are checked as their task asks (``result_from_file``); the round closes by
``round_close_decision`` over the stored plan and ``workflow.close``, whose outcome (the next
global model or the same file again, the next server state, checkpoints, evaluations, metric
points, the best model) is stored with the round. Nothing here names a workflow.

Running it twice, or after a crash at any point, does the same as running it once: every
write is conditional on the state it read, and aggregation is deterministic (sites folded in
name order from files in storage), so a re-run writes the same bits.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, transaction
from django.db.models import F, Q
from django.utils import timezone

from client_agent.runtime import TASK_SUBMIT_MODEL, TASK_TRAIN
from client_agent.secagg.session import ProtocolError
from client_agent.wire import WireFormatError, load_state_dict
from common.rounds import round_for_people
from fedportal.bulk import rows_update
from fedportal.prepared import PreparedQuery
from jobs import events, storage
from jobs.exceptions import StorageFull, is_storage_full
from jobs.models import (
    TASK_ANSWERED,
    Checkpoint,
    Evaluation,
    Job,
    JobSite,
    JobState,
    MetricPoint,
    ModelVersion,
    Round,
    RoundState,
    SiteTask,
    TaskState,
)
from jobs.selectors import ROUND_HEAVY, job_privacy_assessment
from jobs.services import claims, secure
from jobs.services.audit import JobAuditAction, job_audit_record
from jobs.services.kicks import kick_after_commit
from jobs.services.plans import (
    checkpoint_name,
    global_model_name,
    plan_from_json,
    plan_to_json,
    server_state_name,
    task_spec_from_payload,
    task_spec_payload,
)
from jobs.services.privacy import task_privacy_record, upload_privacy_report
from jobs.services.telemetry import MAX_CLIENT_ID_LENGTH
from jobs.workflows import (
    ModelRef,
    PlannedTask,
    RoundPlan,
    ServerState,
    TaskSpec,
    Workflow,
    best_score_after,
    round_close_decision,
    workflow_from_spec,
)
from jobs.workflows.base import next_global_model, write_global_model
from jobs.workflows.secure import protection_of
from jobs.workflows.training_options import stop_reason
from sites.models import Site
from sites.selectors import site_is_online

log = logging.getLogger(__name__)


class Step(StrEnum):
    """What one :func:`job_advance` did."""

    NOTHING = "nothing"  # the state it found needs no step (or another worker took it)
    WAITING_TO_START = "waiting to start"  # submitted → waiting: starting may be due at once
    WAITING_FOR_SITES = "waiting for sites"  # fewer than min_clients accepted and online
    STARTED = "started"  # running, its first round open
    WAITING_FOR_UPDATES = "waiting for updates"
    OPENED = "opened"  # the next round
    CLOSED = "closed"  # the round aggregated; opening the next (or completing) is due at once
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True)
class Advance:
    """The outcome of :func:`job_advance`: what it did (``step``) and, for logs, in words."""

    step: Step
    text: str

    @property
    def due_again(self) -> bool:
        """Whether the step made another one due at once (no event will come for it)."""
        return self.step in (Step.WAITING_TO_START, Step.CLOSED)

    def __str__(self) -> str:
        return self.text


def workflow_of(job: Job) -> Workflow:
    return workflow_from_spec(job.workflow, job.params)


def total_rounds_of(job: Job) -> int:
    """The rounds the job runs: frozen when it started (``num_rounds`` for a job started
    before the count was stored)."""
    return job.total_rounds if job.total_rounds is not None else job.num_rounds


def round_plan_of(rnd: Round, workflow: Workflow) -> RoundPlan:
    """The plan stored when the round opened. A round opened before plans were stored (FedAvg
    was the only workflow then) gets FedAvg's plan over the sites with a task in it."""
    if rnd.plan:
        return plan_from_json(rnd.plan)
    sites = sorted(rnd.tasks.values_list("site__name", flat=True))
    return workflow.plan(rnd.number, sites, ServerState())


def planned_task_of(task: SiteTask) -> PlannedTask:
    """The plan's task of one site, from its row (round and job loaded)."""
    if task.spec:
        spec = task_spec_from_payload(task.spec)
    else:  # a task made before tasks stored their spec: FedAvg's train task
        rnd = task.round
        spec = TaskSpec(task.task_name, rnd.number, total_rounds_of(rnd.job))
    return PlannedTask(task.site.name, spec, ModelRef.parse(task.model_ref))


def server_state_before(job: Job, workflow: Workflow, number: int) -> ServerState:
    """The server state round ``number`` starts from: stored when the round before closed, or
    the workflow's initial state for the first round."""
    if number == 0:
        return workflow.initial_state(list(job.round_sites))
    previous = Round.objects.get(job=job, number=number - 1)
    if not previous.server_state:  # closed before server states were stored (FedAvg: none)
        return ServerState()
    return ServerState.load(storage.local_path(previous.server_state))


def metric_point_id(source: str, round_number: int, key: str) -> str:
    """The id that stores a round's result or aggregate point once: ``<source>:<round>:<key>``,
    or, when that is longer than the column, the key's digest in place of the key. Cut to
    the column instead, two long keys with a common prefix got one id and the second point
    was lost (keys go up to ``MAX_METRIC_KEY_LENGTH`` characters)."""
    readable = f"{source}:{round_number}:{key}"
    if len(readable) <= MAX_CLIENT_ID_LENGTH:
        return readable
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    # 40 hex digits: the longest source and round number still leave the id within 64.
    return f"{source}:{round_number}:#{digest[:40]}"


def job_kick_after_commit(job: Job) -> None:
    """Enqueue :func:`job_advance` for ``job`` once the current transaction commits."""
    from jobs.tasks import job_advance_task  # tasks import services

    job_id = job.pk
    kick_after_commit(lambda: job_advance_task.delay(job_id))


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


def job_advance(*, job_id: int) -> Advance:
    """Do the next step that is due for the job; returns what it did."""
    with transaction.atomic():
        job = Job.objects.select_for_update().get(pk=job_id)
        if job.state == JobState.SUBMITTED:
            job.move_to(JobState.WAITING)
            job.save(update_fields=["state"])
            events.job_state(job)
            job_kick_after_commit(job)
            return Advance(Step.WAITING_TO_START, "waiting")
        if job.state == JobState.WAITING:
            return _start_if_ready(job)
        if job.state != JobState.RUNNING:
            return Advance(Step.NOTHING, f"nothing: job is {job.state}")
        current = job.rounds.order_by("-number").first()
        sum_due = False
        if current is None:
            _round_open(job, 0)
            return Advance(Step.OPENED, f"opened round {round_for_people(0)}")
        if current.state == RoundState.CLOSED:
            if job.completed_rounds >= total_rounds_of(job):
                job.move_to(JobState.COMPLETED)
                job.save(update_fields=["state", "finished_at", "failure_reason"])
                _audit_job_end(job)
                events.job_state(job)
                return Advance(Step.COMPLETED, "completed")
            _round_open(job, current.number + 1)
            return Advance(Step.OPENED, f"opened round {round_for_people(current.number + 1)}")
        if current.state == RoundState.OPEN:
            tasks = list(current.tasks.select_related("site"))
            # A protected round has phases before and after its uploads (jobs.services.secure).
            step = secure.secure_round_step(current) if current.protection else None
            if step is not None and step.failure:
                return _round_open_fail(job, current, step.failure)
            if step is not None and step.waiting:
                return Advance(Step.WAITING_FOR_UPDATES, step.waiting)
            sum_due = step is not None and step.sum_due
            if step is None or not (step.sum_due or step.aggregate):
                answered = [t for t in tasks if t.state in TASK_ANSWERED]
                if len(answered) < len(tasks) and timezone.now() < current.deadline:
                    waiting = len(tasks) - len(answered)
                    return Advance(Step.WAITING_FOR_UPDATES, f"waiting for {waiting} site(s)")
                plan = round_plan_of(current, workflow_of(job))
                decision = round_close_decision(
                    plan,
                    {
                        t.site.name: None
                        if t.state == TaskState.ACCEPTED
                        else (t.reason or f"no update ({t.state})")
                        for t in tasks
                    },
                )
                if not decision.closes:
                    return _round_open_fail(job, current, decision.failure or "", "quorum")
                # Sites that have not answered are now late.
                current.tasks.filter(state__in=SiteTask.states_that_move_to(TaskState.LATE)).update(
                    state=TaskState.LATE, reason="no update before the round closed"
                )
                if current.protection:
                    try:
                        sum_due = secure.uploads_closed(current, list(decision.accepted))
                    except ProtocolError as exc:
                        why = f"{current.label}: secure aggregation: {exc.reason}"
                        return _round_open_fail(job, current, why)
                    if not sum_due:
                        return Advance(Step.WAITING_FOR_UPDATES, "finish: the survivors asked")
            if not sum_due:
                # Due for aggregation, which this worker claims next (outside the job lock).
                # Should it die first, the watchdog kicks the round once a lease passed.
                current.move_to(RoundState.AGGREGATING)
                for field, value in claims.unclaimed_until_kick().items():
                    setattr(current, field, value)
                current.save(update_fields=["state", "claim_holder", "claim_expires_at"])
        round_id = current.pk
    if sum_due:
        # Summing the protected uploads reads them all: outside the job lock, like aggregation.
        return _round_sum(round_id)
    # Aggregation reads every update from storage: long, so outside the job lock. A worker
    # killed here leaves the round AGGREGATING, and the next job_advance does it again.
    return _round_aggregate(round_id)


def _round_open_fail(
    job: Job, rnd: Round, failure: str, why: str = "secure aggregation"
) -> Advance:
    """The open round cannot go on (lock held): it fails, and the job with it."""
    rnd.move_to(RoundState.FAILED)
    rnd.save(update_fields=["state", "closed_at"])
    job.move_to(JobState.FAILED, failure[:4000])
    job.save(update_fields=["state", "finished_at", "failure_reason"])
    _audit_job_end(job)
    events.round_state(rnd)
    events.job_state(job)
    return Advance(Step.FAILED, f"failed: {why}")


def _round_sum(round_id: int) -> Advance:
    with claims.round_claim(round_id) as claimed:
        if not claimed:
            return Advance(Step.NOTHING, "nothing: another worker is summing the round")
        try:
            return Advance(Step.WAITING_FOR_UPDATES, secure.round_sum(round_id))
        except TRANSIENT_ERRORS:
            raise
        except ProtocolError as exc:
            return _round_fail_open(round_id, f"secure aggregation: {exc.reason}")


def _round_fail_open(round_id: int, why: str) -> Advance:
    with transaction.atomic():
        rnd = Round.objects.select_related("job").get(pk=round_id)
        job = Job.objects.select_for_update().get(pk=rnd.job_id)
        rnd = Round.objects.select_for_update().get(pk=round_id)
        if rnd.state != RoundState.OPEN or job.state != JobState.RUNNING:
            return Advance(Step.NOTHING, f"nothing: round already {rnd.state}")
        return _round_open_fail(job, rnd, f"{rnd.label}: {why}")


def _audit_job_end(job: Job) -> None:
    """The round controller ended the job (lock held): ``job.completed`` or ``job.failed``,
    with no actor (the system) and, for a failure, its reason."""
    completed = job.state == JobState.COMPLETED
    job_audit_record(
        action=JobAuditAction.COMPLETED if completed else JobAuditAction.FAILED,
        job=job,
        actor=None,
        details={"rounds": job.completed_rounds}
        if completed
        else {"rounds": job.completed_rounds, "reason": job.failure_reason},
    )


def job_advance_while_due(*, job_id: int, max_steps: int = 4) -> str:
    """:func:`job_advance` again while its last step made another one due; the outcomes joined.

    Saves a trip through the broker between closing a round and opening the next (about a
    tenth of a second a round on one machine). Each step is still its own transaction, so a
    worker killed between them leaves the job where a lone ``job_advance`` would have.
    """
    outcomes = []
    for _ in range(max_steps):
        outcome = job_advance(job_id=job_id)
        outcomes.append(outcome.text)
        if not outcome.due_again:
            break
    return "; ".join(outcomes)


def _start_if_ready(job: Job) -> Advance:
    now = timezone.now()
    links = list(job.participants.select_related("site"))
    for link in links:
        if link.decision == JobSite.Decision.PENDING and link.site.auto_accept_jobs:
            # A job the site's privacy policy refuses (its project or submitter, or not one
            # round fits the budget) is declined now, not after its first round.
            assessment = job_privacy_assessment(job=job, site=link.site)
            refused = assessment.refused if assessment is not None else None
            link.decision = JobSite.Decision.DECLINED if refused else JobSite.Decision.ACCEPTED
            link.decided_at = now
            link.decision_reason = refused or ""
            link.save(update_fields=["decision", "decided_at", "decision_reason"])
            # The site's own policy decided, applied by the portal: no person, no agent.
            job_audit_record(
                action=JobAuditAction.SITE_DECIDED,
                job=job,
                actor=None,
                details={
                    "site": link.site.name,
                    "decision": link.decision,
                    "automatic": True,
                    **({"reason": refused} if refused else {}),
                },
            )
            events.decision(link)
    ready = [
        link
        for link in links
        if link.decision == JobSite.Decision.ACCEPTED and site_is_online(link.site, now)
    ]
    if len(ready) < job.min_clients:
        return Advance(
            Step.WAITING_FOR_SITES,
            f"waiting: {len(ready)} of {job.min_clients} sites accepted and online",
        )
    job.move_to(JobState.RUNNING)
    # The sites and the round count are frozen now (see Job.round_sites): every site that
    # accepted the job, online or not (one that is away misses its tasks, as before).
    workflow = workflow_of(job)
    job.round_sites = sorted(
        link.site.name for link in links if link.decision == JobSite.Decision.ACCEPTED
    )
    job.total_rounds = workflow.total_rounds(job.round_sites)
    job.save(update_fields=["state", "started_at", "round_sites", "total_rounds"])
    _initial_model_meta_write(job, workflow)
    events.job_state(job)
    _round_open(job, 0)
    return Advance(Step.STARTED, "running")


def _initial_model_meta_write(job: Job, workflow: Workflow) -> None:
    """Rewrite the initial model with the meta the workflow sends with the global model in its
    initial state (SCAFFOLD's control variate), as every later global model carries its
    round's; nothing for a workflow that sends none (the file stays as submitted). Idempotent:
    the same bits each time, written by atomic rename."""
    state = workflow.initial_state(list(job.round_sites))
    if not workflow.global_model_meta(state, {}):
        return
    version = ModelVersion.objects.get(job=job, round_number=0)
    name = str(version.file.name)
    params = load_state_dict(storage.local_path(name))
    path = storage.path_to_write(name)
    write_global_model(path, workflow, state, params)
    storage.publish(name)
    version.sha256, version.size = _file_digest(path)
    version.save(update_fields=["sha256", "size"])


# An event's model travels base64-encoded in one WebSocket message, which an agent reads up
# to 4 MiB (client_agent.agent): whatever the setting, no larger model goes in an event.
EVENT_MODEL_MOST_BYTES = 1024**2


def event_model(start: ModelVersion | None) -> dict[str, Any] | None:
    """The model a round starts from, to send with the round's event to its sites' agents
    (``{"sha256", "size", "data"}``, the bytes in base64), when it is no larger than
    ``FEDPORTAL_EVENT_MODEL_MAX_BYTES``: an agent then starts the round at once, without a
    download (a request, and three statements, per site and round). None for a larger model
    (downloaded as before), or when it cannot be read here; the agent checks the digest, and
    downloads the model when it does not match."""
    most = min(settings.FEDPORTAL_EVENT_MODEL_MAX_BYTES, EVENT_MODEL_MOST_BYTES)
    if start is None or not start.file or not 0 < start.size <= most:
        return None
    try:
        data = storage.local_path(start.file.name).read_bytes()
    except OSError as exc:  # FileNotFoundError too: the download will say what is wrong
        log.warning("round model %s not sent with the event: %s", start.file.name, exc)
        return None
    return {
        "sha256": start.sha256,
        "size": len(data),
        "data": base64.b64encode(data).decode("ascii"),
    }


def _all_global(plan: RoundPlan) -> bool:
    """Whether every task of ``plan`` starts from the global model (not from a checkpoint)."""
    return all(planned.model.is_global for planned in plan.tasks)


def _round_open(job: Job, number: int) -> Round:
    """Open round ``number`` as the workflow plans it (lock held): the plan over the job's
    sites from the server state the last round left, stored with the round, and one task for
    each planned site. A plan with no tasks closes at once."""
    existing = Round.objects.filter(job=job, number=number).first()
    if existing is not None:
        return existing
    workflow = workflow_of(job)
    plan = workflow.plan(number, list(job.round_sites), server_state_before(job, workflow, number))
    site_ids = dict(
        job.participants.filter(site__name__in=plan.sites).values_list("site__name", "site_id")
    )
    start = ModelVersion.objects.filter(job=job, round_number=number).first()
    rnd = Round.objects.create(
        job=job,
        number=number,
        deadline=timezone.now() + timedelta(seconds=job.round_timeout_seconds),
        plan=plan_to_json(plan),
        protection=secure.protection_start(
            job=job, workflow=workflow, global_model_path=storage.local_path(start.file.name)
        )
        if start is not None and protection_of(workflow)
        else {},
    )
    SiteTask.objects.bulk_create(
        SiteTask(
            round=rnd,
            site_id=site_ids[planned.site],
            task_name=planned.task_name,
            model_ref=str(planned.model),
            spec=task_spec_payload(planned.spec),
        )
        for planned in plan.tasks
    )
    # The event carries the task when every site got the same one (an agent starts it at
    # once); else each agent reads its own from the job listing.
    payloads = {json.dumps(task_spec_payload(t.spec), sort_keys=True) for t in plan.tasks}
    shared_task = json.loads(payloads.pop()) if len(payloads) == 1 else None
    events.round_state(
        rnd,
        task=shared_task,
        model=event_model(start) if shared_task is not None and _all_global(plan) else None,
    )
    from jobs.tasks import job_advance_task

    job_id = job.pk
    if not plan.tasks:
        job_kick_after_commit(job)  # nothing to wait for: the round closes now
        return rnd
    # The deadline check: job_advance closes or fails the round if it is still open.
    kick_after_commit(
        lambda: job_advance_task.apply_async((job_id,), countdown=job.round_timeout_seconds + 1)
    )
    if rnd.protection:
        secure.kick_at_phase_deadline(rnd)
    return rnd


# Errors that say the database or its connection went away for a moment (a restart, a
# failover): the task is retried later (``jobs.tasks``). Any other error while closing a round
# would happen again on every retry, so the round fails with it instead.
# A full disk is waited out too: an operator frees space, and nothing is lost meanwhile.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (OperationalError, InterfaceError, StorageFull)


def _round_aggregate(round_id: int) -> Advance:
    with claims.round_claim(round_id) as claimed:
        if not claimed:
            return Advance(Step.NOTHING, "nothing: another worker is aggregating the round")
        attempts = _aggregation_attempt(round_id)
        if attempts is None:
            return Advance(Step.NOTHING, "nothing: round no longer aggregating")
        limit = settings.FEDPORTAL_ROUND_MAX_AGGREGATION_ATTEMPTS
        if attempts > limit:
            return _round_fail(
                round_id,
                f"aggregation was started {limit} times and never finished (each worker "
                "stopped in the middle: out of memory, or killed)",
            )
        try:
            return _round_aggregate_claimed(round_id)
        except TRANSIENT_ERRORS:
            _aggregation_not_counted(round_id)
            raise
        except ProtocolError as exc:
            # A protected round whose sum cannot be opened (too few shares came back): an
            # outcome of the protocol with its reason, not a fault to log with a traceback.
            log.info("round %s: secure aggregation failed: %s", round_id, exc.reason)
            return _round_fail(round_id, f"secure aggregation: {exc.reason}")
        except Exception as exc:
            if is_storage_full(exc):
                log.error("round %s: storage full; the new global model waits for room", round_id)
                _aggregation_not_counted(round_id)
                raise StorageFull(
                    "the portal's storage is full: the round closes once there is room"
                ) from exc
            log.exception("round %s: aggregation failed", round_id)
            return _round_fail(round_id, f"the new global model could not be made: {exc}")


def _aggregation_not_counted(round_id: int) -> None:
    """A start that ended in a transient error was no death: it does not count against the
    round (when the database takes the correction; if it is still away, the start stays
    counted)."""
    with contextlib.suppress(DatabaseError):
        Round.objects.filter(pk=round_id, aggregation_attempts__gt=0).update(
            aggregation_attempts=F("aggregation_attempts") - 1
        )


def _aggregation_attempt(round_id: int) -> int | None:
    """Count a start of the round's aggregation (committed at once, so a worker that dies
    next still counted); the count, or None when the round is not aggregating any more."""
    with transaction.atomic():
        changed = Round.objects.filter(pk=round_id, state=RoundState.AGGREGATING).update(
            aggregation_attempts=F("aggregation_attempts") + 1
        )
        if not changed:
            return None
        return int(
            Round.objects.filter(pk=round_id).values_list("aggregation_attempts", flat=True)[0]
        )


def _round_fail(round_id: int, why: str) -> Advance:
    """The round cannot close: it fails, and the job with it, naming the round and ``why``."""
    with transaction.atomic():
        rnd = Round.objects.select_related("job").get(pk=round_id)
        job = Job.objects.select_for_update().get(pk=rnd.job_id)
        rnd = Round.objects.select_for_update().get(pk=round_id)
        if rnd.state != RoundState.AGGREGATING or job.state != JobState.RUNNING:
            return Advance(Step.NOTHING, f"nothing: round already {rnd.state}")
        rnd.move_to(RoundState.FAILED)
        rnd.save(update_fields=["state", "closed_at"])
        job.move_to(JobState.FAILED, f"round {round_for_people(rnd.number)}: {why}"[:4000])
        job.save(update_fields=["state", "finished_at", "failure_reason"])
        _audit_job_end(job)
        events.round_state(rnd)
        events.job_state(job)
    return Advance(Step.FAILED, f"failed: round {round_for_people(rnd.number)} cannot close")


def _round_aggregate_claimed(round_id: int) -> Advance:
    """Close the round through the workflow and store what it made (claim held).

    Everything the close reads was stored before: the round's plan, the server state the last
    round left, the global model it started from, the accepted tasks' files and checked
    numbers. The files it makes (the next global model, the next server state, checkpoints)
    are written by atomic rename before the closing transaction, so a worker killed at any
    point leaves either nothing or whole files that a re-run overwrites with the same bits.
    """
    rnd = Round.objects.select_related("job").get(pk=round_id)
    job = rnd.job
    workflow = workflow_of(job)
    plan = round_plan_of(rnd, workflow)
    state = server_state_before(job, workflow, rnd.number)
    # Each task's round and job are ``rnd`` and ``job``: read once above, not once a task
    # (their plan and site list grow with the sites: decoding them a task at a time made a
    # round's close cost the square of its sites, 11% of a worker's CPU at 100 sites).
    tasks = list(
        rnd.tasks.filter(state=TaskState.ACCEPTED).select_related("site").order_by("site__name")
    )
    for task in tasks:
        task.round = rnd
    start_version = ModelVersion.objects.get(job=job, round_number=rnd.number)
    completed = rnd.number + 1  # a count of rounds, not an index: see common.rounds
    # Quorum was checked under the job lock when the round was claimed; accepted tasks cannot
    # change once the round is AGGREGATING (uploads to it are late).
    if rnd.protection:
        started = time.perf_counter()
        outcome, checkpoints = _round_close_protected(
            workflow, plan, state, rnd, tasks, start_version
        )
        protection = {
            **rnd.protection,
            "phase": "done",
            "cost": {
                **secure.protection_cost(rnd),
                "unmask_seconds": round(time.perf_counter() - started, 4),
            },
        }
    else:
        outcome, checkpoints = _round_close_files(
            job, workflow, plan, state, rnd, tasks, start_version
        )
    start_path = storage.local_path(start_version.file.name)
    params = next_global_model(workflow, outcome, lambda: load_state_dict(start_path))
    if params is None:
        model_name = str(start_version.file.name)  # unchanged: the same file, no copy
        model_path = start_path
    else:
        model_name = global_model_name(job, completed)
        model_path = storage.path_to_write(model_name)
        write_global_model(model_path, workflow, outcome.state, params)
        storage.publish(model_name)
    sha, size = _file_digest(model_path)
    state_name = server_state_name(job, completed)
    outcome.state.save(storage.path_to_write(state_name))  # atomic rename
    storage.publish(state_name)
    with transaction.atomic():
        job = Job.objects.select_for_update().get(pk=job.pk)
        rnd = Round.objects.select_for_update().get(pk=round_id)
        if rnd.state != RoundState.AGGREGATING or job.state != JobState.RUNNING:
            return Advance(Step.NOTHING, f"nothing: round already {rnd.state}")
        ModelVersion.objects.update_or_create(
            job=job,
            round_number=completed,
            defaults={"file": model_name, "sha256": sha, "size": size},
        )
        for name, (file_name, file_sha, file_size) in checkpoints.items():
            Checkpoint.objects.update_or_create(
                job=job,
                name=name,
                defaults={
                    "file": file_name,
                    "sha256": file_sha,
                    "size": file_size,
                    "round_number": rnd.number,
                },
            )
        for cell in outcome.evaluations:
            Evaluation.objects.update_or_create(
                job=job,
                round_number=rnd.number,
                model=cell.model,
                site_name=cell.site,
                defaults={"metrics": dict(cell.metrics)},
            )
        best = best_score_after(workflow, outcome, job.best_score)
        if outcome.scores_start_model:
            # A train round's metrics score the model it started from (NVFlare's convention).
            start_version.metrics = outcome.metrics
        if best is not None:
            job.best_score, job.best_round = best, rnd.number
            ModelVersion.objects.filter(job=job).update(is_best=False)
            start_version.is_best = True
        start_version.save(update_fields=["metrics", "is_best"])
        for key, value in outcome.metrics.items():
            MetricPoint.objects.get_or_create(
                job=job,
                site=None,
                client_id=metric_point_id("aggregate", rnd.number, key),
                defaults={
                    "round_number": rnd.number,
                    "key": key,
                    "value": value,
                    "source": MetricPoint.Source.AGGREGATE,
                },
            )
        rnd.move_to(RoundState.CLOSED)
        rnd.metrics = outcome.metrics
        rnd.server_state = state_name
        if rnd.protection:
            rnd.protection = protection
        stopped = stop_reason(state.data, outcome.state.data)
        if stopped:
            # The workflow ends sooner (stop_cond, patience): the job has fewer rounds.
            rnd.plan = {**(rnd.plan or {}), "label": f"{rnd.label}; {stopped}"}
            job.total_rounds = workflow.total_rounds_given(list(job.round_sites), outcome.state)
        rnd.save(
            update_fields=["state", "closed_at", "metrics", "server_state", "plan", "protection"]
        )
        job.completed_rounds = completed
        job.save(update_fields=["completed_rounds", "best_score", "best_round", "total_rounds"])
        events.round_state(rnd)
        job_kick_after_commit(job)
    # This host's copies of the updates (an object store's) are read never again.
    storage.forget(task.update.name for task in tasks)
    return Advance(Step.CLOSED, f"closed {plan.label}")


def _round_close_files(
    job: Job,
    workflow: Workflow,
    plan: RoundPlan,
    state: ServerState,
    rnd: Round,
    tasks: list[SiteTask],
    start_version: ModelVersion,
) -> tuple[Any, dict[str, tuple[str, str, int]]]:
    """``workflow.close`` over the accepted tasks' results (site-name order), and the
    checkpoints it keeps written to storage while their sources are open: the outcome, and
    each checkpoint's (storage name, sha256, size) by its name."""
    from jobs.aggregation import FileTensorSource, SiteUpdate  # torch
    from jobs.workflows import (
        EvalResult,
        SubmittedModel,
        TaskResult,
        TrainResult,
        close_result,
        fill_withheld,
    )

    results: list[TaskResult] = []
    global_source = FileTensorSource(storage.local_path(start_version.file.name))
    try:
        for task in tasks:
            planned = planned_task_of(task)
            if planned.task_name not in (TASK_TRAIN, TASK_SUBMIT_MODEL):
                # An evaluation's numbers were checked and stored with the task.
                results.append(EvalResult(task.site.name, planned.model, dict(task.metrics)))
                continue
            update = SiteUpdate.from_file(task.site.name, storage.local_path(task.update.name))
            # The values the update check accepted and stored: checked numbers, not the file's.
            update.weight, update.metrics = float(task.weight or 0.0), dict(task.metrics or {})
            kind = TrainResult if planned.task_name == TASK_TRAIN else SubmittedModel
            results.append(kind(task.site.name, update))
        fill_withheld(results, global_source)
        outcome = workflow.close(rnd.number, plan, global_source, results, state)
        checkpoints = {
            name: _checkpoint_write(checkpoint_name(job, name), source)
            for name, source in outcome.checkpoints.items()
        }
    finally:
        for result in results:
            close_result(result)
        global_source.close()
    return outcome, checkpoints


def _round_close_protected(
    workflow: Workflow,
    plan: RoundPlan,
    state: ServerState,
    rnd: Round,
    tasks: list[SiteTask],
    start_version: ModelVersion,
) -> tuple[Any, dict[str, tuple[str, str, int]]]:
    """``workflow.close`` from the survivors' sum alone (``jobs.workflows.secure``): the
    masks removed (or the sum decrypted by a site) with the finish answers; each survivor's
    weight, params type and metrics are its upload's, checked when it arrived."""
    from client_agent.fl_model import ParamsType
    from client_agent.secagg.upload import read_protected
    from jobs.aggregation import FileTensorSource, SiteUpdate
    from jobs.aggregation.sources import MemoryTensorSource
    from jobs.workflows.secure import close_from_sum, layout_of

    total = secure.protected_sum(rnd)
    survivors = [
        SiteUpdate(
            site=task.site.name,
            source=MemoryTensorSource({}),
            weight=float(task.weight or 0.0),
            params_type=ParamsType(
                read_protected(storage.local_path(task.update.name)).fields["params_type"]
                or ParamsType.FULL
            ),
            metrics=dict(task.metrics or {}),
        )
        for task in tasks
    ]
    global_source = FileTensorSource(storage.local_path(start_version.file.name))
    try:
        layout = layout_of(workflow, global_source.specs())
        outcome = close_from_sum(
            workflow, rnd.number, plan, global_source, layout, total, survivors, state
        )
    finally:
        global_source.close()
    return outcome, {}


def _checkpoint_write(name: str, source: Any) -> tuple[str, str, int]:
    """A model the workflow keeps by name, as a file in storage (atomic rename): its storage
    name, sha256 and size."""
    from jobs.aggregation.sources import write_source  # torch: the worker's side

    path = storage.path_to_write(name)
    write_source(source, path)
    storage.publish(name)
    sha, size = _file_digest(path)
    return name, sha, size


def _file_digest(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest(), os.path.getsize(path)


# --------------------------------------------------------------------------------------------
# Updates from sites
# --------------------------------------------------------------------------------------------


# What an update's check never reads of its round and job, and that grows with the sites: the
# round's plan lists every site's task, the job its sites. Read with each of a round's checks,
# a round of 100 sites decoded them 100 times (profiled: 7% of a worker's CPU). A protected
# round's state is read: it says how to check.
_CHECK_NEVER_READS = tuple(name for name in ROUND_HEAVY if name != "round__protection")


# A check of one task (what portals enqueued before the round's check) mostly finds its task
# decided by an earlier check that took the whole round: the lookup is compiled once
# (fedportal.prepared).
_TASK_TO_CHECK = PreparedQuery(
    lambda task_id: (
        SiteTask.objects.select_related("round__job", "site")
        .defer(*_CHECK_NEVER_READS)
        .filter(pk=task_id)
        .order_by()
    ),
    task_id=2_000_000_029,
)


def update_check(*, task_id: int) -> str:
    """Check an uploaded update against the round's global model: accepted or rejected.

    Every other update of the round waiting for its check is checked with it
    (:func:`round_updates_check`). Returns this task's outcome.
    """
    task = _TASK_TO_CHECK.first(task_id=task_id)
    if task is None:
        raise SiteTask.DoesNotExist(f"no site task {task_id}")
    if task.state != TaskState.UPLOADED:
        return "nothing: task is " + task.state
    # This task among the round's waiting updates, unless another worker decided it since it
    # was read above.
    decided = round_updates_check(round_id=task.round_id)
    return decided.get(task.pk, "nothing: checked meanwhile")


def round_updates_check(*, round_id: int) -> dict[int, str]:
    """Check every update of round ``round_id`` that waits for its check against the round's
    global model, accepted or rejected; the state recorded for each, by task id (empty when
    none waited: a check enqueued before took them, and this one cost one statement).

    The updates are checked with the global model opened once, and recorded in one
    transaction whose statements do not grow with their number: when fifty sites upload at
    once, one check does the work. Only the tasks still ``uploaded`` under the lock are
    recorded, so two workers never decide one task twice.
    """
    waiting = list(
        SiteTask.objects.select_related("round__job", "site")
        .defer(*_CHECK_NEVER_READS)
        .filter(round_id=round_id, state=TaskState.UPLOADED)
        .order_by("pk")
    )
    if not waiting:
        return {}
    from jobs.aggregation import FileTensorSource  # torch: the worker's side

    rnd = waiting[0].round
    start = ModelVersion.objects.only("id", "file").get(job=rnd.job, round_number=rnd.number)
    global_source = FileTensorSource(storage.local_path(start.file.name))
    try:
        specs = global_source.specs()
        # The files are read before the transaction: the round's row stays locked for the
        # writes alone, not for as long as fifty files take to read.
        checked = [_update_check_one(waiting_task, rnd, specs) for waiting_task in waiting]
    finally:
        global_source.close()
    return _update_checks_record(rnd, checked)


@dataclass
class _CheckedUpdate:
    """What the check made of one site's file, before it is recorded."""

    task: SiteTask
    state: str  # TaskState.ACCEPTED or TaskState.REJECTED
    reason: str
    weight: float | None
    # Only an accepted result's metrics were checked: a rejected one's may hold values no
    # database column takes (NaN, Infinity), so they are left out ({}).
    metrics: dict[str, Any]
    # The site's ledger from the file's header; None when there is none or it is malformed.
    privacy: dict[str, Any] | None


def _update_check_one(task: SiteTask, rnd: Round, specs: Any) -> _CheckedUpdate:
    """Check one site's answer as its task asks (``result_from_file``): a train result FULL or
    DIFF params fitting the global model, a validate result metrics only, a submitted model
    FULL params; accepted, or rejected with the reason. Reads the file, writes nothing.

    The privacy report the file carries (the site's ledger, read from the header) is kept
    once the task is answered, either way: what the site released is spent whatever the
    portal made of it. A malformed report is logged and not kept; it does not decide the
    check."""
    from jobs.aggregation import UpdateRejected
    from jobs.workflows import TaskResult, close_result, result_from_file

    result: TaskResult | None = None
    task.round = rnd
    privacy: dict[str, Any] | None = None
    try:
        path = storage.local_path(task.update.name)
        privacy = upload_privacy_report(path)
        if rnd.protection:
            result = secure.protected_upload_check(task, path)
        else:
            result = result_from_file(planned_task_of(task), path, specs)
    except (UpdateRejected, WireFormatError, ProtocolError) as exc:
        state, reason = TaskState.REJECTED, getattr(exc, "reason", str(exc))
    except Exception as exc:
        # Whatever else a site's file makes the check trip over, the task is answered: left
        # ``uploaded``, it would hold the round until its deadline on every retry.
        log.exception("round %s: the update of %s could not be checked", rnd.pk, task.site.name)
        state, reason = TaskState.REJECTED, f"the update could not be checked: {exc}"
    else:
        state, reason = TaskState.ACCEPTED, ""
    finally:
        if result is not None:
            close_result(result)
    accepted = result if state == TaskState.ACCEPTED else None
    weight = getattr(getattr(accepted, "update", None), "weight", None)
    return _CheckedUpdate(
        task=task,
        state=state,
        reason=reason[:2000],
        weight=float(weight) if weight is not None else None,
        metrics=dict(accepted.metrics) if accepted is not None else {},
        privacy=privacy,
    )


def _update_checks_record(rnd: Round, checked: list[_CheckedUpdate]) -> dict[int, str]:
    """Record the checks of ``rnd``'s updates in one transaction, a constant number of
    statements for the batch (and a few more for each task that carries a privacy report):
    each task's state, reason, weight and metrics, the accepted results' metric points, the
    privacy reports, an event per task, and the job advanced when no task is left unanswered.

    Returns the state recorded for each task, by id. A task missing from it was decided
    meanwhile by another worker and is left as that worker recorded it."""
    if not checked:
        return {}
    by_id = {check.task.pk: check for check in checked}
    with transaction.atomic():
        # The round's row lock orders concurrent checks, so the count of unanswered tasks
        # below sees every check that finished before this one. (Uploads lock their task's
        # row only: they never wait on it.) The round's ordering joins its job, whose row is
        # locked too: ``job_advance`` reads the tasks under the job's lock alone.
        Round.objects.select_for_update().filter(pk=rnd.pk).values_list("pk").first()
        decided = [by_id[pk] for pk in _still_to_decide(checked)]
        for check in decided:
            task = check.task
            task.state, task.reason = check.state, check.reason
            task.weight, task.metrics = check.weight, check.metrics
        rows_update([check.task for check in decided], ["state", "reason", "weight", "metrics"])
        # The checks left only finite numbers in accepted metrics. One insert: the lock in
        # ``_still_to_decide`` lets one check alone get here for a task, in the same
        # transaction, so none of these points can be stored already.
        MetricPoint.objects.bulk_create(
            MetricPoint(
                job=rnd.job,
                site=check.task.site,
                client_id=metric_point_id("result", rnd.number, key),
                round_number=rnd.number,
                key=key,
                value=float(value),
                source=MetricPoint.Source.RESULT,
            )
            for check in decided
            if check.state == TaskState.ACCEPTED
            for key, value in check.metrics.items()
        )
        for check in decided:
            if check.privacy is not None:
                task_privacy_record(task=check.task, report=check.privacy)
        events.publish_all(events.task_state_changed(check.task) for check in decided)
        # The round closes when every site answered (or at its deadline, which has its own
        # countdown): only the last answer needs the job advanced, not all fifty.
        if decided and not rnd.tasks.exclude(state__in=TASK_ANSWERED).exists():
            job_kick_after_commit(rnd.job)
    return {check.task.pk: check.state for check in decided}


def _still_to_decide(checked: list[_CheckedUpdate]) -> list[int]:
    """The ids of the ``checked`` tasks whose state may still move to their check's outcome
    (``SiteTask.states_that_move_to``), locked until the transaction ends, in ``checked``'s
    order: one query, whatever their number. Call it inside the transaction that records them.

    The lock is what keeps two workers from deciding one task twice: a task another worker
    decided meanwhile is no longer in a state that moves, and one it is deciding now is
    returned only once that worker's transaction ended, and then no longer matches."""
    movable = Q(pk__in=[])  # matches nothing: each outcome's tasks are added to it
    for state in {check.state for check in checked}:
        movable |= Q(
            pk__in=[check.task.pk for check in checked if check.state == state],
            state__in=SiteTask.states_that_move_to(state),
        )
    # Ordered by id, not by the model's ordering: that joins the round, the job and the site,
    # and the lock would take the sites' rows too (heartbeats write those).
    rows = SiteTask.objects.select_for_update().filter(movable).order_by("pk")
    locked = set(rows.values_list("pk", flat=True))
    return [check.task.pk for check in checked if check.task.pk in locked]


def jobs_resume() -> int:
    """Enqueue :func:`job_advance` for every active job (after a worker or portal restart)."""
    from jobs.models import JOB_ACTIVE
    from jobs.tasks import job_advance_task, round_updates_check_task

    ids = list(Job.objects.filter(state__in=JOB_ACTIVE).values_list("pk", flat=True))
    for job_id in ids:
        job_advance_task.delay(job_id)
    # Uploads stored but not yet checked (the check was lost with a worker, or with a portal
    # process that was gathering its kick): one check for each round that has any.
    waiting = SiteTask.objects.filter(state=TaskState.UPLOADED, round__job__state=JobState.RUNNING)
    for round_id in waiting.values_list("round_id", flat=True).order_by().distinct():
        round_updates_check_task.delay(round_id)
    return len(ids)


def on_site_heartbeat(*, site: Site, was_online: bool, **_: Any) -> None:
    """A site that comes online may complete the quorum of jobs waiting to start."""
    if was_online:
        return  # nothing changed for waiting jobs
    from jobs.tasks import job_advance_task

    waiting = Job.objects.filter(state=JobState.WAITING, participants__site=site)
    for job_id in waiting.values_list("pk", flat=True):
        job_advance_task.delay(job_id)
