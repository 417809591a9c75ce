"""What a site's agent reports of its privacy enforcement in a job, stored and audited.

A report is its ledger's (``PrivacyLedger.report``): it travels in an uploaded result's
``FLModel.meta["fedportal.privacy"]`` (with the tensor names the site kept home, ``excluded``)
and with a round the site declines (``POST …/status/`` with ``privacy``). The portal checks
it (``sites.services.privacy.privacy_report_checked``, which recomputes ε with the
accountant), then keeps it on the task, as the job's latest at the site, and the project's
spending at the site. It never acts on the site's behalf: enforcement is the agent's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from client_agent.config import PRIVACY_META_KEY
from client_agent.wire import WireFormatError, model_fields, read_header
from common.exceptions import ValidationFailed
from jobs.models import JobSite, SiteTask
from jobs.services.audit import JobAuditAction, job_audit_record
from sites.models import AuditEvent, Site
from sites.services.privacy import (
    AUDITED_EXCLUDED_NAMES,
    privacy_report_checked,
    site_privacy_spend_record,
)

log = logging.getLogger(__name__)


def upload_privacy_report(path: str | Path) -> dict[str, Any] | None:
    """The checked privacy report an uploaded result carries, read from its header alone
    (no tensor is loaded); None when it carries none, or one that is malformed (logged: the
    update is still judged on its tensors, and a bad report must not stop that)."""
    try:
        _, metadata = read_header(path)
        meta = model_fields(metadata, Path(path).name)["meta"]
    except (WireFormatError, OSError) as exc:
        log.info("%s: no privacy report read (%s)", Path(path).name, exc)
        return None
    raw = meta.get(PRIVACY_META_KEY)
    if raw is None:
        return None
    try:
        return privacy_report_checked(raw)
    except ValidationFailed as exc:
        log.warning("%s: the privacy report is not kept: %s", Path(path).name, exc.message)
    except Exception:
        # Whatever else the report trips the accountant over, the update is still judged.
        log.exception("%s: the privacy report could not be read", Path(path).name)
    return None


def task_privacy_record(*, task: SiteTask, report: dict[str, Any]) -> None:
    """Keep a checked ``report`` on ``task``, as its job's latest at the site, and as the
    project's spending there; audit the first report of the job at the site that names
    tensors kept home. Call it inside the transaction that answers the task."""
    job, site = task.round.job, task.site
    SiteTask.objects.filter(pk=task.pk).update(privacy=report)
    task.privacy = report
    link = JobSite.objects.select_for_update().get(job=job, site=site)
    previous = link.privacy or {}
    # Reports can arrive out of order (a retried status after an upload): the ledger only
    # grows, so the one with the most releases is the latest.
    if int(previous.get("releases") or 0) <= report["releases"]:
        kept = dict(report)
        if not kept["excluded"] and previous.get("excluded"):
            kept["excluded"] = previous["excluded"]  # a refusal's report names none
        link.privacy = kept
        link.save(update_fields=["privacy"])
    stored = (
        Site.objects.select_for_update()
        .values_list("privacy_project_history", flat=True)
        .get(pk=site.pk)
    )
    spent = sum(int(n) for _, _, n in stored or [])
    if sum(int(n) for _, _, n in report["project_history"]) >= spent:
        site_privacy_spend_record(site=site, report=report)
    if report["excluded"] and not _excluded_audited(job_id=job.pk, site=site):
        job_audit_record(
            action=JobAuditAction.PRIVACY_TENSORS_EXCLUDED,
            job=job,
            actor=None,
            actor_site=site,
            details={
                "site": site.name,
                "job": str(job.uid),
                "round": task.round.number,
                "names": report["excluded"][:AUDITED_EXCLUDED_NAMES],
                "count": len(report["excluded"]),
            },
        )


def _excluded_audited(*, job_id: int, site: Site) -> bool:
    return AuditEvent.objects.filter(
        action=JobAuditAction.PRIVACY_TENSORS_EXCLUDED,
        target_type="job",
        target_id=str(job_id),
        actor_site=site,
    ).exists()


def round_declined_record(*, task: SiteTask, reason: str, report: dict[str, Any] | None) -> None:
    """A site declined its task of a round for its privacy policy (its budget, or the job as
    a whole): audited with the reason, and the ledger's report kept. Call it inside the
    transaction that fails the task."""
    if report is not None:
        task_privacy_record(task=task, report=report)
    job = task.round.job
    job_audit_record(
        action=JobAuditAction.PRIVACY_ROUND_DECLINED,
        job=job,
        actor=None,
        actor_site=task.site,
        details={
            "site": task.site.name,
            "job": str(job.uid),
            "round": task.round.number,
            "reason": reason,
        },
    )
