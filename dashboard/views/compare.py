"""Grouping and comparing runs: a job's experiment and tags (the form on the job page), and the
compare page of a project's jobs, whose whole view (jobs, metric, x axis, per-site series) is
in its URL so that a reload or a shared link shows the same."""

from __future__ import annotations

from uuid import UUID

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST, require_safe

from common.exceptions import DomainError
from dashboard.compare import AXES, MAX_COMPARED, compare_jobs, compare_selection
from dashboard.forms import JobLabelsForm
from dashboard.http import SignedInRequest
from dashboard.views._common import job_for, project_for, require, source_address
from jobs import selectors
from jobs.services.labels import job_label
from sites import selectors as site_selectors

ONLY_LABELLERS = "Only a project admin, or the lead who submitted this job, may label it."


@login_required
@require_POST
def job_labels_view(request: SignedInRequest, uid: UUID) -> HttpResponse:
    """Set the job's experiment and tags; the same rule as the API's ``PATCH jobs/<uid>/``."""
    job = job_for(request, uid)
    require(selectors.can_manage_job(request.user, job), ONLY_LABELLERS)
    form = JobLabelsForm(request.POST)
    if not form.is_valid():
        for name, errors in form.errors.items():
            text = " ".join(str(error) for error in errors)
            messages.error(request, f"The labels were not saved: {name}: {text}")
        return redirect("dashboard:job", uid=job.uid)
    try:
        job_label(
            job=job,
            experiment=form.cleaned_data["experiment"],
            tags=form.tag_list(),
            actor=request.user,
            source_address=source_address(request),
        )
    except DomainError as exc:
        messages.error(request, f"The labels were not saved: {exc.message}")
    else:
        messages.success(request, f"The labels of job {job.name} were saved.")
    return redirect("dashboard:job", uid=job.uid)


@login_required
@require_safe
def compare_view(request: SignedInRequest, slug: str) -> HttpResponse:
    """``?job=<uid>&job=<uid>…&metric=<key>&x=round|step&sites=1``."""
    project = project_for(request, slug)
    selection = compare_selection(
        user=request.user, project=project, uids=request.GET.getlist("job")
    )
    comparison = compare_jobs(
        selection,
        metric=request.GET.get("metric") or None,
        axis=request.GET.get("x"),
        per_site=request.GET.get("sites") == "1",
    )
    context = {
        "project": project,
        # What the project's menu needs, without project_context's per-organisation checks:
        # this page's queries are bounded by the number of jobs compared.
        "can_submit": selectors.can_submit_job(request.user, project),
        "is_project_admin": site_selectors.is_project_admin(request.user, project),
        "comparison": comparison,
        "axes": AXES,
        "compare_max": MAX_COMPARED,
    }
    return render(request, "dashboard/compare.html", context)
