"""The projects list (the home page of a signed-in person) and a project's overview."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.template.defaultfilters import pluralize
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_safe

from dashboard.compare import MAX_COMPARED
from dashboard.forms import JobFilterForm
from dashboard.http import SignedInRequest
from dashboard.job_records import lagging_of_project
from dashboard.presenters import NextStep, ProjectRow, site_rows
from dashboard.views._common import project_for
from jobs import selectors as job_selectors
from jobs.models import JOB_ACTIVE, JobSite
from sites import selectors
from sites.models import Invitation, Project, Role, SiteState

if TYPE_CHECKING:
    from django.contrib.auth.models import User

JOBS_PAGE = 50


@require_safe
def home(request: HttpRequest) -> HttpResponse:
    """The landing page; a signed-in person sees their projects on it."""
    context: dict[str, Any] = {}
    if request.user.is_authenticated:
        context["projects"] = [
            ProjectRow(
                project=project,
                my_roles=sorted(selectors.role_in_project(request.user, project)),
                active_jobs=project.jobs.filter(state__in=JOB_ACTIVE).count(),
                enrolled_sites=project.sites.filter(state=SiteState.ENROLLED).count(),
            )
            for project in selectors.projects_visible_to(request.user)
        ]
        context["can_create_project"] = selectors.can_create_project(request.user)
        context["next_steps"] = next_steps(request, request.user, context["projects"])
    return render(request, "home.html", context)


def next_steps(request: HttpRequest, user: User, rows: list[ProjectRow]) -> list[NextStep]:
    """What ``user`` can do next: invitations addressed to them, then per project the sites
    waiting for their approval and the job decisions waiting for them. Each project is asked
    only what the person's roles there allow, so the page stays a few queries per project."""
    now = timezone.now()
    addressed = Q(username=user.get_username())
    if user.email:
        addressed |= Q(email__iexact=user.email)
    steps = [
        NextStep(
            f"You are invited to join {invitation.organization.name} in "
            f"{invitation.organization.project.name} as {invitation.get_role_display().lower()}: "
            "open the link you were sent to accept."
        )
        for invitation in Invitation.objects.filter(addressed, accepted_at=None)
        .select_related("organization__project")
        .order_by("expires_at")
        if invitation.status_at(now) == "pending"
    ]
    for row in rows:
        project = row.project
        if Role.PROJECT_ADMIN in row.my_roles:
            waiting = project.sites.filter(state=SiteState.REQUESTED).count()
            if waiting:
                steps.append(
                    NextStep(
                        f"{waiting} site{pluralize(waiting)} of {project.name} "
                        f"wait{pluralize(waiting, 's,')} for your approval",
                        reverse("dashboard:sites", args=[project.slug]),
                    )
                )
        if {Role.PROJECT_ADMIN, Role.ORG_ADMIN} & set(row.my_roles):
            decisions = pending_decision_count(request, project)
            if decisions:
                steps.append(
                    NextStep(
                        f"{decisions} job decision{pluralize(decisions)} in {project.name} "
                        f"wait{pluralize(decisions, 's,')} for you",
                        reverse("dashboard:approvals", args=[project.slug]),
                    )
                )
    return steps


def project_jobs(request: HttpRequest, project: Project) -> dict[str, Any]:
    """One page of the project's jobs, newest first, filtered by the GET form: ``jobs_form``,
    ``jobs_page`` and ``jobs_query`` (the filters, for links to other pages)."""
    form = JobFilterForm(request.GET or None)
    filters: dict[str, Any] = {}
    if form.is_valid():
        filters = {k: v for k, v in form.cleaned_data.items() if v}
    jobs = job_selectors.jobs_visible_to(request.user, project=project, **filters)
    if form.is_bound and not form.is_valid():
        jobs = jobs.none()
    page = Paginator(jobs, JOBS_PAGE).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    return {
        "jobs_form": form,
        "jobs_page": page,
        "jobs": list(page),
        "jobs_query": query.urlencode(),
    }


def pending_decision_count(request: HttpRequest, project: Project) -> int:
    """How many job-site decisions wait for this person: one count in SQL."""
    return decisions_before_start(request, project, JobSite.Decision.PENDING).count()


def decisions_before_start(
    request: HttpRequest, project: Project, decision: str
) -> QuerySet[JobSite]:
    """The job-site links with ``decision`` of jobs not started yet, at the sites this person
    may decide for (``jobs.selectors.organizations_deciding``), oldest job first: a query, so
    that a page of them or their count is read in SQL."""
    return (
        JobSite.objects.filter(
            job__in=job_selectors.jobs_visible_to(request.user, project=project),
            decision=decision,
            job__state__in=["submitted", "waiting"],
            site__organization_id__in=job_selectors.organizations_deciding(request.user, project),
        )
        .select_related("job__submitted_by", "site__organization__project", "decided_by")
        .order_by("job__created_at", "job_id", "site__name")
    )


def project_context(request: HttpRequest, project: Project) -> dict[str, Any]:
    roles = selectors.role_in_project(request.user, project)
    return {
        "project": project,
        "roles": sorted(roles),
        "is_project_admin": selectors.is_project_admin(request.user, project),
        "can_submit": job_selectors.can_submit_job(request.user, project),
        "can_request_site": any(
            selectors.can_request_site(request.user, org) for org in project.organizations.all()
        ),
    }


@login_required
@require_safe
def project_detail(request: SignedInRequest, slug: str) -> HttpResponse:
    project = project_for(request, slug)
    context = project_context(request, project)
    context.update(
        sites=site_rows(selectors.sites_visible_to(request.user, project=project)),
        pending_count=pending_decision_count(request, project),
        compare_max=MAX_COMPARED,
        lagging=lagging_of_project(request, project),
        **project_jobs(request, project),
    )
    return render(request, "dashboard/project.html", context)


@login_required
@require_safe
def project_sites_fragment(request: SignedInRequest, slug: str) -> HttpResponse:
    """The sites table alone: the page fetches it again to keep heartbeats current."""
    project = project_for(request, slug)
    sites = site_rows(selectors.sites_visible_to(request.user, project=project))
    return render(request, "dashboard/_site_status_rows.html", {"sites": sites})


@login_required
@require_safe
def project_jobs_fragment(request: SignedInRequest, slug: str) -> HttpResponse:
    """The jobs table alone (the same page and filters): the page fetches it again when a job
    of the project changes."""
    project = project_for(request, slug)
    return render(request, "dashboard/_job_rows.html", project_jobs(request, project))
