"""``job_label``: change a job's experiment and tags, the labels that group runs to compare.

The rules are the bundle's (``jobs.bundle.check_experiment`` / ``check_tags``), so a label set
afterwards obeys what ``job.json`` may hold at submission. Whoever may manage the job
(``jobs.selectors.can_manage_job``) may label it; the caller checks that, as for abort.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from django.db import transaction

from common.exceptions import ValidationFailed
from jobs.bundle import BundleError, check_experiment, check_tags
from jobs.models import Job
from jobs.services.audit import JobAuditAction, job_audit_record

if TYPE_CHECKING:
    from django.contrib.auth.models import User


def job_label(
    *,
    job: Job,
    experiment: str | None,
    tags: Sequence[str] | None,
    actor: User,
    source_address: str | None = None,
) -> Job:
    """Set the job's ``experiment`` and ``tags``; None leaves that one as it is.

    Both are checked before anything is written (:class:`ValidationFailed` naming
    ``experiment`` or ``tags``). A change is audited (``job.labelled``, with the values before
    and after); setting the labels the job already has writes nothing.
    """
    try:
        new_experiment = None if experiment is None else check_experiment(experiment)
        new_tags = None if tags is None else list(check_tags(tags))
    except BundleError as exc:
        raise ValidationFailed(f"{exc.field}: {exc.reason}", field=exc.field) from None
    with transaction.atomic():
        locked = Job.objects.select_for_update().get(pk=job.pk)
        changes: dict[str, Any] = {}
        if new_experiment is not None and new_experiment != locked.experiment:
            changes["experiment"] = {"from": locked.experiment, "to": new_experiment}
            locked.experiment = new_experiment
        if new_tags is not None and new_tags != list(locked.tags or []):
            changes["tags"] = {"from": list(locked.tags or []), "to": new_tags}
            locked.tags = new_tags
        if changes:
            locked.save(update_fields=list(changes))
            job_audit_record(
                action=JobAuditAction.LABELLED,
                job=locked,
                actor=actor,
                source_address=source_address,
                details=changes,
            )
    job.experiment, job.tags = locked.experiment, locked.tags
    return job
