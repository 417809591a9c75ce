"""A site admin's job approvals: the jobs waiting for a decision at the sites they administer,
each with its submitter, parameters and the files of its app to read before deciding."""

from __future__ import annotations

from uuid import UUID

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST, require_safe

from common.exceptions import DomainError, NotFound
from dashboard.appfiles import AppArchiveUnreadable, app_file_text, app_files
from dashboard.forms import DecisionReasonForm
from dashboard.http import SignedInRequest
from dashboard.presenters import decision_rows
from dashboard.privacy import (
    link_expectation,
    link_expectations,
    project_budget,
    protection_of_job,
)
from dashboard.views._common import job_for, project_for, require, source_address
from dashboard.views.projects import decisions_before_start, project_context
from jobs import selectors
from jobs.models import JobSite
from jobs.services.participation import site_job_decide

DECISIONS_PAGE = 50
ONLY_SITE_ADMINS = "Only the site's org admins (or a project admin) decide which jobs it runs."


@login_required
@require_safe
def approval_list(request: SignedInRequest, slug: str) -> HttpResponse:
    """What waits for this person's decision, and what they declined and may still accept
    (until the job starts), each with where the job's quorum stands."""
    project = project_for(request, slug)
    context = project_context(request, project)
    # Oldest first, a page of each at a time: a busy project can have hundreds waiting.
    pending = Paginator(
        decisions_before_start(request, project, JobSite.Decision.PENDING), DECISIONS_PAGE
    ).get_page(request.GET.get("page"))
    declined = Paginator(
        decisions_before_start(request, project, JobSite.Decision.DECLINED), DECISIONS_PAGE
    ).get_page(request.GET.get("declined_page"))
    shown = [*pending, *declined]
    counts = selectors.decision_counts(sorted({link.job_id for link in shown}))
    privacy = link_expectations(shown)
    context.update(
        pending=decision_rows(list(pending), counts, privacy),
        pending_page=pending,
        declined=decision_rows(list(declined), counts, privacy),
        declined_page=declined,
        reason_form=DecisionReasonForm(),
    )
    return render(request, "dashboard/approvals.html", context)


@login_required
@require_POST
def approval_bulk(request: SignedInRequest, slug: str) -> HttpResponse:
    """Accept or decline the ticked job-site rows, with one optional reason. Each row is
    decided on its own through the same service and permission check as one decision: a row
    that fails (the job started meanwhile, no longer this person's site) is reported and the
    others stand."""
    project = project_for(request, slug)
    decision = request.POST.get("decision")
    form = DecisionReasonForm(request.POST)
    if decision not in ("accept", "decline"):
        messages.error(request, "Choose Accept selected or Decline selected.")
        return redirect("dashboard:approvals", slug=project.slug)
    if not form.is_valid():
        messages.error(request, f"Nothing was decided: {form.errors['reason'][0]}")
        return redirect("dashboard:approvals", slug=project.slug)
    chosen = {pk for pk in request.POST.getlist("link") if pk.isdigit()}
    if not chosen:
        messages.error(request, "Tick at least one job to decide for.")
        return redirect("dashboard:approvals", slug=project.slug)
    links = JobSite.objects.filter(
        pk__in=chosen, job__in=selectors.jobs_visible_to(request.user, project=project)
    ).select_related("job", "site")
    done, failed = [], []
    for link in links.order_by("job__created_at", "site__name"):
        label = f"{link.job.name} at {link.site.name}"
        if not selectors.can_decide_for_site(request.user, link.site):
            failed.append(f"{label}: {ONLY_SITE_ADMINS}")
            continue
        try:
            site_job_decide(
                job=link.job,
                site=link.site,
                accept=decision == "accept",
                decided_by=request.user,
                reason=form.cleaned_data["reason"],
                source_address=source_address(request),
            )
        except DomainError as exc:
            failed.append(f"{label}: {exc.message}")
        else:
            done.append(label)
    missing = len(chosen) - len(done) - len(failed)
    if missing:
        failed.append(f"{missing} ticked row(s) are not jobs of this project you can see")
    verb = "Accepted" if decision == "accept" else "Declined"
    if done:
        messages.success(request, f"{verb}: {', '.join(done)}.")
    for problem in failed:
        messages.error(request, f"Not decided: {problem}")
    return redirect("dashboard:approvals", slug=project.slug)


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
        privacy=link_expectation(link),
        protection=protection_of_job(job),
        project_budget=project_budget(link.site),
        reason_form=DecisionReasonForm(),
    )
    return render(request, "dashboard/approval_review.html", context)


@login_required
@require_POST
def approval_decide(request: SignedInRequest, uid: UUID, site_name: str) -> HttpResponse:
    link = _link(request, uid, site_name)
    decision = request.POST.get("decision")
    form = DecisionReasonForm(request.POST)
    if decision not in ("accept", "decline"):
        messages.error(request, "Choose Accept or Decline.")
        return redirect("dashboard:approval", uid=link.job.uid, site_name=site_name)
    if not form.is_valid():
        messages.error(request, f"Nothing was decided: {form.errors['reason'][0]}")
        return redirect("dashboard:approval", uid=link.job.uid, site_name=site_name)
    try:
        site_job_decide(
            job=link.job,
            site=link.site,
            accept=decision == "accept",
            decided_by=request.user,
            reason=form.cleaned_data["reason"],
            source_address=source_address(request),
        )
    except DomainError as exc:
        messages.error(request, exc.message)
        return redirect("dashboard:approval", uid=link.job.uid, site_name=site_name)
    verb = "accepted" if decision == "accept" else "declined"
    messages.success(request, f"Site {site_name} {verb} job {link.job.name}.")
    return redirect("dashboard:approvals", slug=link.job.project.slug)
