"""A site admin's job approvals: the jobs waiting for a decision at the sites they administer,
each with its submitter, parameters and the files of its app to read before deciding."""

from __future__ import annotations

from uuid import UUID

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST, require_safe

from common.exceptions import DomainError, NotFound
from dashboard.appfiles import AppArchiveUnreadable, app_file_text, app_files
from dashboard.http import SignedInRequest
from dashboard.views._common import job_for, project_for, require
from dashboard.views.projects import pending_decisions, project_context
from jobs import selectors
from jobs.models import JobSite
from jobs.services.participation import site_job_decide

ONLY_SITE_ADMINS = "Only the site's org admins (or a project admin) decide which jobs it runs."


@login_required
@require_safe
def approval_list(request: SignedInRequest, slug: str) -> HttpResponse:
    project = project_for(request, slug)
    context = project_context(request, project)
    context["pending"] = pending_decisions(request, project)
    return render(request, "dashboard/approvals.html", context)


def _link(request: HttpRequest, uid: UUID, site_name: str) -> JobSite:
    job = job_for(request, uid)
    try:
        link = selectors.participant_of(job, site_name)
    except NotFound:
        raise Http404(f"Site {site_name} does not take part in this job.") from None
    require(selectors.can_decide_for_site(request.user, link.site), ONLY_SITE_ADMINS)
    return link


@login_required
@require_safe
def approval_review(request: SignedInRequest, uid: UUID, site_name: str) -> HttpResponse:
    link = _link(request, uid, site_name)
    job = link.job
    context = project_context(request, job.project)
    shown = request.GET.get("file")
    files, text, archive_error = [], None, ""
    try:
        files = app_files(job)
        text = app_file_text(job, shown) if shown else None
    except AppArchiveUnreadable as exc:
        archive_error = str(exc)
    context.update(
        link=link,
        job=job,
        files=files,
        archive_error=archive_error,
        shown=shown,
        shown_text=text,
        pending=link.decision == JobSite.Decision.PENDING,
    )
    return render(request, "dashboard/approval_review.html", context)


@login_required
@require_POST
def approval_decide(request: SignedInRequest, uid: UUID, site_name: str) -> HttpResponse:
    link = _link(request, uid, site_name)
    decision = request.POST.get("decision")
    if decision not in ("accept", "decline"):
        messages.error(request, "Choose Accept or Decline.")
        return redirect("dashboard:approval", uid=link.job.uid, site_name=site_name)
    try:
        site_job_decide(
            job=link.job, site=link.site, accept=decision == "accept", decided_by=request.user
        )
    except DomainError as exc:
        messages.error(request, exc.message)
        return redirect("dashboard:approval", uid=link.job.uid, site_name=site_name)
    verb = "accepted" if decision == "accept" else "declined"
    messages.success(request, f"Site {site_name} {verb} job {link.job.name}.")
    return redirect("dashboard:approvals", slug=link.job.project.slug)
