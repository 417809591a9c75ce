"""Whether a job runs: a site's decision to take part, and a person's abort. Both are audited."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.db import transaction
from django.utils import timezone

from common.exceptions import Conflict, ValidationFailed
from common.validators import has_control_characters
from jobs import events
from jobs.exceptions import DecisionNotDelegated, PrivacyPolicyRefuses
from jobs.models import Job, JobSite, JobState, RoundState
from jobs.selectors import job_privacy_assessment
from jobs.services.audit import JobAuditAction, job_audit_record
from jobs.services.rounds import job_kick_after_commit

if TYPE_CHECKING:
    from django.contrib.auth.models import User

    from sites.models import Site

MAX_DECISION_REASON = 1000


def _decision_reason(reason: object) -> str:
    """A decision's reason: optional, at most 1,000 characters, lines but no other control
    characters (it is shown on pages and in the audit log)."""
    if not isinstance(reason, str):
        raise ValidationFailed("reason must be a string", field="reason")
    reason = reason.strip()
    if len(reason) > MAX_DECISION_REASON:
        raise ValidationFailed(
            f"reason is {len(reason)} characters long; at most {MAX_DECISION_REASON}",
            field="reason",
        )
    if has_control_characters(reason, allowed="\n\r\t"):
        raise ValidationFailed("reason must not hold control characters", field="reason")
    return reason


def site_job_decide(
    *,
    job: Job,
    site: Site,
    accept: bool,
    decided_by: User | None = None,
    by_agent: bool = False,
    reason: str = "",
    source_address: str | None = None,
) -> JobSite:
    """The site accepts or declines the job; only while the job waits to start, and as often
    as the site changes its mind until then (a declined job can be accepted after all).

    ``decided_by``: the person who decided (their permission is checked by the caller);
    ``by_agent``: the site's agent decides, which its policy allows only when the site accepts
    jobs automatically (``DecisionNotDelegated`` otherwise). A job the site's privacy policy
    refuses (as its agent reported the policy) cannot be accepted (``PrivacyPolicyRefuses``,
    409 with the policy's reason); it can be declined. The audit event names the site
    and the decision, and as actor the person or the site's agent. ``reason`` (optional) is
    kept with the decision and in the audit event.
    """
    reason = _decision_reason(reason)
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
        if accept:
            assessment = job_privacy_assessment(job=link.job, site=link.site)
            if assessment is not None and assessment.refused:
                raise PrivacyPolicyRefuses(
                    f"site {link.site.name} cannot accept this job: {assessment.refused}"
                )
        link.decision = JobSite.Decision.ACCEPTED if accept else JobSite.Decision.DECLINED
        link.decided_at = timezone.now()
        link.decided_by = decided_by
        link.decision_reason = reason
        link.save(update_fields=["decision", "decided_at", "decided_by", "decision_reason"])
        job_audit_record(
            action=JobAuditAction.SITE_DECIDED,
            job=link.job,
            actor=decided_by,
            actor_site=link.site if by_agent else None,
            source_address=source_address,
            details={
                "site": link.site.name,
                "decision": link.decision,
                **({"reason": reason} if reason else {}),
            },
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
