"""The audit events of jobs: who submitted, aborted or decided for a site, and how jobs ended.

Written through ``sites.services.audit.audit_event_record`` (the one way an audit event is
written), inside the transaction that makes the change, with the job as the target, so that a
job's whole history is one ``target_type=job&target_id=<id>`` filter away.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.db import models

from jobs.models import Job
from sites.services.audit import audit_event_record

if TYPE_CHECKING:
    from django.contrib.auth.models import User

    from sites.models import Site


class JobAuditAction(models.TextChoices):
    """The actions the jobs app records (``AuditEvent.action`` is a plain string)."""

    SUBMITTED = "job.submitted"
    ABORTED = "job.aborted"
    # Privacy-relevant: whether a site's data is used for a job.
    SITE_DECIDED = "job.site_decided"
    COMPLETED = "job.completed"
    LABELLED = "job.labelled"  # its experiment or tags changed
    FAILED = "job.failed"
    # A site's agent enforcing its privacy policy: a round declined for the budget or the
    # policy, tensors the site keeps home.
    PRIVACY_ROUND_DECLINED = "privacy.round_declined"
    PRIVACY_TENSORS_EXCLUDED = "privacy.tensors_excluded"


def job_audit_record(
    *,
    action: JobAuditAction,
    job: Job,
    actor: User | None,
    actor_site: Site | None = None,
    source_address: str | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    """Append one audit event about ``job``; ``actor`` None (and no ``actor_site``) is the
    system: the round controller, or a site's policy applied by the portal. Call it inside
    the transaction that makes the change."""
    audit_event_record(
        action=action.value,
        target=job,
        project=job.project,
        actor=actor,
        actor_site=actor_site,
        source_address=source_address,
        details=details,
    )
