"""Whether a job runs: a site's decision to take part, and a person's abort. Both are audited."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.db import transaction
from django.utils import timezone

from common.exceptions import Conflict
from jobs import events
from jobs.exceptions import DecisionNotDelegated
from jobs.models import Job, JobSite, JobState, RoundState
from jobs.services.audit import JobAuditAction, job_audit_record
from jobs.services.rounds import job_kick_after_commit

if TYPE_CHECKING:
    from django.contrib.auth.models import User

    from sites.models import Site


def site_job_decide(
    *,
    job: Job,
    site: Site,
    accept: bool,
    decided_by: User | None = None,
    by_agent: bool = False,
    source_address: str | None = None,
) -> JobSite:
    """The site accepts or declines the job; only while the job waits to start.

    ``decided_by``: the person who decided (their permission is checked by the caller);
    ``by_agent``: the site's agent decides, which its policy allows only when the site accepts
    jobs automatically (``DecisionNotDelegated`` otherwise). The audit event names the site
    and the decision, and as actor the person or the site's agent.
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
        job_audit_record(
            action=JobAuditAction.SITE_DECIDED,
            job=link.job,
            actor=decided_by,
            actor_site=link.site if by_agent else None,
            source_address=source_address,
            details={"site": link.site.name, "decision": link.decision},
        )
        events.decision(link)
        job_kick_after_commit(link.job)
    return link


def job_abort(
    *, job: Job, actor: User | None, reason: str = "", source_address: str | None = None
) -> Job:
    """Stop an active job: its open round fails. ``reason`` is what the actor gave; without
    one, the job's failure reason names who aborted it. The caller checks ``actor`` may."""
    who = actor.get_username() if actor is not None else ""
    reason = reason or (f"aborted by {who}" if who else "aborted")
    with transaction.atomic():
        locked = Job.objects.select_for_update().get(pk=job.pk)
        locked.move_to(JobState.ABORTED, reason)
        locked.save(update_fields=["state", "finished_at", "failure_reason"])
        locked.rounds.filter(state=RoundState.OPEN).update(
            state=RoundState.FAILED, closed_at=timezone.now()
        )
        job_audit_record(
            action=JobAuditAction.ABORTED,
            job=locked,
            actor=actor,
            source_address=source_address,
            details={"reason": reason},
        )
        events.job_state(locked)
    return locked
