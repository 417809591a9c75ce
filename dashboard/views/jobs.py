"""A job's page (live), its fragments and chart data, abort, and submitting a job."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST, require_safe

from common.downloads import download_filename
from common.exceptions import DomainError
from dashboard.appfiles import app_listing
from dashboard.forms import AbortForm
from dashboard.http import SignedInRequest
from dashboard.job_records import metric_table_of, round_holders_for_page
from dashboard.metrics import (
    AGGREGATE,
    MAX_CHART_POINTS,
    metric_points_csv,
    metric_points_csv_async,
    metric_snapshot,
)
from dashboard.presenters import SiteLog, model_version_rows, task_grid_rows
from dashboard.privacy import protection_of_job, round_protection, server_privacy
from dashboard.submission import JobSubmitForm, clone_initial, site_choices
from dashboard.views._common import job_for, project_for, require, source_address
from dashboard.views.projects import project_context
from dashboard.workflow_views import cross_site_heat_map, relay_turns, workflow_parameter_rows
from jobs import selectors
from jobs.models import Job
from jobs.services.participation import job_abort
from jobs.services.submission import job_submit
from sites.models import Site

ONLY_MANAGERS = "Only a project admin, or the lead who submitted this job, may abort it."
ONLY_SUBMITTERS = "Only a project admin or a lead of this project may submit jobs."
LOG_LINES = 200


def rounds_context(job: Job) -> dict[str, Any]:
    """The round timeline and the site × round grid of task states, with each site's privacy
    spend on the job when any site reported one."""
    rounds, grid = selectors.task_grid_of(job)
    rows = task_grid_rows(grid)
    return {
        "job": job,
        "rounds": rounds,
        "grid": rows,
        "grid_privacy": any(row.privacy for row in rows),
        "relay": relay_turns(job, rounds),
        "heat_map": cross_site_heat_map(job),
        "round_protection": {rnd.pk: round_protection(rnd) for rnd in rounds},
    }


def models_context(job: Job) -> dict[str, Any]:
    return {"job": job, "versions": model_version_rows(job, selectors.model_versions_of(job))}


def logs_of(job: Job, sites: list[Site]) -> list[SiteLog]:
    """Each site's log tail, with how many older lines its quota dropped."""
    tails = selectors.log_tails_of(job, sites, limit=LOG_LINES)
    dropped = dict(job.participants.values_list("site_id", "log_lines_dropped"))
    totals = selectors.log_line_counts_of(job)
    return [
        SiteLog(
            site=site,
            lines=tails[site.pk],
            dropped=dropped.get(site.pk, 0),
            total=totals.get(site.pk, 0),
        )
        for site in sites
    ]


@login_required
@require_safe
def job_detail(request: SignedInRequest, uid: UUID) -> HttpResponse:
    job = job_for(request, uid)
    context = project_context(request, job.project)
    context.update(rounds_context(job))
    context.update(models_context(job))
    sites = [row.link.site for row in context["grid"]]
    files, archive_error = app_listing(job)
    context.update(
        can_manage=selectors.can_manage_job(request.user, job),
        abort_form=AbortForm(),
        logs=logs_of(job, sites),
        chart_snapshot=metric_snapshot(job),
        server_privacy=server_privacy(context["rounds"]),
        protection=protection_of_job(job),
        chart_points=MAX_CHART_POINTS,
        aggregate_name=AGGREGATE,
        files=files,
        archive_error=archive_error,
        log_limit=LOG_LINES,
        parameters=workflow_parameter_rows(job),
        metric_table=metric_table_of(job, request.GET.get("metric")),
        quorum_shortfall=selectors.quorum_shortfall_of(job),
        holders=round_holders_for_page(job),
    )
    return render(request, "dashboard/job.html", context)


@login_required
@require_safe
def job_rounds_fragment(request: SignedInRequest, uid: UUID) -> HttpResponse:
    job = job_for(request, uid)
    return render(request, "dashboard/_job_rounds.html", rounds_context(job))


@login_required
@require_safe
def job_models_fragment(request: SignedInRequest, uid: UUID) -> HttpResponse:
    job = job_for(request, uid)
    return render(request, "dashboard/_job_models.html", models_context(job))


@login_required
@require_safe
def job_logs_fragment(request: SignedInRequest, uid: UUID) -> HttpResponse:
    """Each site's log tail alone: the page fetches it again once its socket is connected."""
    job = job_for(request, uid)
    sites = [link.site for link in job.participants.select_related("site").order_by("site__name")]
    context = {"job": job, "logs": logs_of(job, sites)}
    return render(request, "dashboard/_job_logs.html", context)


@login_required
@require_safe
def job_metrics(request: SignedInRequest, uid: UUID) -> JsonResponse:
    """The charts' data (downsampled, see ``dashboard.metrics``) and each site's last point
    they hold (``metric_snapshot``), fetched again when the page's socket connects, when a
    round closes or a site's result is accepted (those points are stored by the round
    controller, which publishes the round, not each point)."""
    job = job_for(request, uid)
    return JsonResponse({**metric_snapshot(job), "max_points": MAX_CHART_POINTS})


@login_required
@require_safe
def job_metrics_csv(request: SignedInRequest, uid: UUID) -> StreamingHttpResponse:
    """Every metric point of the job as CSV, streamed: what the charts downsample."""
    job = job_for(request, uid)
    # Under ASGI a plain iterator would be read to its end before the first byte is sent.
    content = (
        metric_points_csv_async(job) if isinstance(request, ASGIRequest) else metric_points_csv(job)
    )
    response = StreamingHttpResponse(content, content_type="text/csv; charset=utf-8")
    name = download_filename(job.name, job.uid, "-metrics.csv")
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_POST
def job_abort_view(request: SignedInRequest, uid: UUID) -> HttpResponse:
    job = job_for(request, uid)
    require(selectors.can_manage_job(request.user, job), ONLY_MANAGERS)
    form = AbortForm(request.POST)
    reason = ""
    if form.is_valid():
        reason = form.cleaned_data["reason"]
    try:
        job_abort(
            job=job, actor=request.user, reason=reason, source_address=source_address(request)
        )
    except DomainError as exc:
        messages.error(request, f"The job was not aborted: {exc.message}")
    else:
        messages.success(request, f"Job {job.name} was aborted.")
    return redirect("dashboard:job", uid=job.uid)


@login_required
@require_http_methods(["GET", "HEAD", "POST"])
def job_submit_view(request: SignedInRequest, slug: str) -> HttpResponse:
    project = project_for(request, slug)
    require(selectors.can_submit_job(request.user, project), ONLY_SUBMITTERS)
    earlier = selectors.jobs_visible_to(request.user, project=project)
    source = None
    if request.method != "POST" and "from" in request.GET:
        uid = _uuid_or_none(request.GET["from"])
        source = earlier.filter(uid=uid).first() if uid else None
        if source is None:
            messages.error(request, "There is no such job to start from in this project.")
    form = JobSubmitForm(
        request.POST or None,
        request.FILES or None,
        earlier_jobs=earlier,
        sites=site_choices(project),
        initial=clone_initial(source) if source else None,
    )
    if source is not None:  # "clone and edit": the same archive, as the form offers it
        form.initial["earlier_app"] = form.offered_app(source)
    if request.method == "POST" and form.is_valid():
        try:
            with form.app_archive() as archive, form.initial_model_file() as model:
                job = job_submit(
                    project=project,
                    submitted_by=request.user,
                    spec=form.spec(),
                    initial_model=model,
                    app_archive=archive,
                    sites=form.cleaned_data.get("sites") or None,
                    round_timeout_seconds=form.cleaned_data.get("round_timeout_seconds"),
                    source_address=source_address(request),
                )
        except DomainError as exc:
            target = form.service_field(exc.field)
            form.add_error(target if target in form.fields else None, exc.message)
        else:
            messages.success(request, f"Job {job.name} was submitted.")
            return redirect("dashboard:job", uid=job.uid)
    context = project_context(request, project)
    context["form"] = form
    return render(request, "dashboard/job_submit.html", context)


def _uuid_or_none(text: str) -> UUID | None:
    try:
        return UUID(text)
    except ValueError:
        return None
