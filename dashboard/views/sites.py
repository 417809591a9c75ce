"""Sites of a project: an org admin's request, the project admin's approval queue, the one-time
enrolment token with the command to run at the site, and certificates with revocation.

Each write checks the same ``sites.selectors`` rule as the API view that makes it, then calls
the same service.
"""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods, require_POST, require_safe

from client_agent.privacy.policy import POLICY_FILE
from common.exceptions import DomainError
from dashboard.forms import ReasonForm, SiteRequestForm, SiteSettingsForm
from dashboard.http import SignedInRequest
from dashboard.presenters import site_policy_rows, site_rows
from dashboard.privacy import site_budget, site_privacy_policy
from dashboard.views._common import form_error, project_for, render_once, require, source_address
from dashboard.views.projects import project_context
from jobs.models import JobSite
from sites import conf, selectors, services
from sites.models import Certificate, Project, Site, SiteState

ONLY_PROJECT_ADMIN = "Only a project admin of this project may do this."
ONLY_ORG_ADMIN = "Only an org admin of an organisation of this project may request a site."
ONLY_SITE_MANAGERS = "Only the site's org admins (or a project admin) may change its settings."
SITE_JOBS = 50


def _site(request: HttpRequest, project: Project, pk: int) -> Site:
    return get_object_or_404(selectors.sites_visible_to(request.user, project=project), pk=pk)


@login_required
@require_safe
def site_list(request: SignedInRequest, slug: str) -> HttpResponse:
    project = project_for(request, slug)
    context = project_context(request, project)
    sites = site_rows(selectors.sites_visible_to(request.user, project=project))
    context.update(
        sites=sites,
        queue=[row.site for row in sites if row.site.state == SiteState.REQUESTED],
        awaiting_enrolment=[row.site for row in sites if row.site.state == SiteState.APPROVED],
        certificates=selectors.certificates_visible_to(request.user, project=project),
        deny_form=ReasonForm(),
    )
    return render(request, "dashboard/sites.html", context)


@login_required
@require_safe
def site_detail(request: SignedInRequest, slug: str, pk: int) -> HttpResponse:
    """A site: its enrolment, agent, certificate, policy (with the privacy policy its agent
    reported), the privacy budget its latest jobs spent there, and those jobs with the site's
    decision on each."""
    project = project_for(request, slug)
    site = _site(request, project, pk)
    context = project_context(request, project)
    links = list(
        JobSite.objects.filter(site=site)
        .select_related("job", "decided_by")
        .order_by("-job__created_at")[:SITE_JOBS]
    )
    context.update(
        site=site,
        online=selectors.site_is_online(site),
        certificate=selectors.site_current_certificate(site),
        policy=site_policy_rows(site),
        privacy_policy=site_privacy_policy(site),
        privacy_budget=site_budget(site),
        policy_file=POLICY_FILE,
        links=links,
        site_jobs_shown=SITE_JOBS,
        can_manage=selectors.can_manage_site(request.user, site) and not site.is_terminal,
        settings_form=SiteSettingsForm(initial={"auto_accept_jobs": site.auto_accept_jobs}),
    )
    return render(request, "dashboard/site.html", context)


@login_required
@require_POST
def site_settings(request: SignedInRequest, slug: str, pk: int) -> HttpResponse:
    """Change whether the site's agent accepts the project's jobs by itself (the API's
    ``PATCH`` of the site, with its permission rule and audit event)."""
    project = project_for(request, slug)
    site = _site(request, project, pk)
    require(selectors.can_manage_site(request.user, site), ONLY_SITE_MANAGERS)
    form = SiteSettingsForm(request.POST)
    if form.is_valid():
        try:
            services.site_update(
                site=site,
                updated_by=request.user,
                auto_accept_jobs=form.cleaned_data["auto_accept_jobs"],
                source_address=source_address(request),
            )
        except DomainError as exc:
            messages.error(request, f"Nothing was changed: {exc.message}")
        else:
            messages.success(request, f"The settings of {site.name} were saved.")
    return redirect("dashboard:site", slug=project.slug, pk=site.pk)


@login_required
@require_http_methods(["GET", "HEAD", "POST"])
def site_request(request: SignedInRequest, slug: str) -> HttpResponse:
    project = project_for(request, slug)
    organizations = [
        org
        for org in selectors.organizations_visible_to(request.user, project=project)
        if selectors.can_request_site(request.user, org)
    ]
    require(bool(organizations), ONLY_ORG_ADMIN)
    choices = project.organizations.filter(pk__in=[o.pk for o in organizations])
    form = SiteRequestForm(request.POST or None, organizations=choices)
    if request.method == "POST" and form.is_valid():
        organization = form.cleaned_data["organization"]
        require(selectors.can_request_site(request.user, organization), ONLY_ORG_ADMIN)
        try:
            site = services.site_request(
                organization=organization,
                name=form.cleaned_data["name"],
                contact_email=form.cleaned_data["contact_email"],
                resources=form.resources(),
                requested_by=request.user,
                source_address=source_address(request),
            )
        except DomainError as exc:
            form_error(form, exc, {"resources": "gpus"})
        else:
            messages.success(
                request,
                f"Site {site.name} was requested. A project admin of {project.name} approves it; "
                "you will then get its enrolment token.",
            )
            return redirect("dashboard:sites", slug=project.slug)
    context = project_context(request, project)
    context["form"] = form
    return render(request, "dashboard/site_request.html", context)


@login_required
@require_POST
def site_approve(request: SignedInRequest, slug: str, pk: int) -> HttpResponse:
    project = project_for(request, slug)
    site = _site(request, project, pk)
    require(selectors.can_decide_site(request.user, site), ONLY_PROJECT_ADMIN)
    try:
        site, token = services.site_approve(
            site=site, approved_by=request.user, source_address=source_address(request)
        )
    except DomainError as exc:
        messages.error(request, exc.message)
        return redirect("dashboard:sites", slug=project.slug)
    return _show_token(request, project, site, token, approved=True)


@login_required
@require_POST
def site_token(request: SignedInRequest, slug: str, pk: int) -> HttpResponse:
    """A new one-time enrolment token (e.g. to enrol again with a new key)."""
    project = project_for(request, slug)
    site = _site(request, project, pk)
    require(selectors.can_decide_site(request.user, site), ONLY_PROJECT_ADMIN)
    try:
        _, token = services.enrolment_token_reissue(
            site=site, issued_by=request.user, source_address=source_address(request)
        )
    except DomainError as exc:
        messages.error(request, exc.message)
        return redirect("dashboard:sites", slug=project.slug)
    return _show_token(request, project, site, token, approved=False)


def _show_token(
    request: HttpRequest, project: Project, site: Site, token: str, *, approved: bool
) -> HttpResponse:
    """The token page is the POST's own answer, never a redirect: the plaintext is nowhere to
    be fetched again, and the response is marked not to be cached."""
    row = site.enrolment_tokens.order_by("-created_at", "-pk").first()
    context = project_context(request, project)
    context.update(
        site=site,
        token=token,
        expires_at=row.expires_at if row else None,
        command=conf.enrol_command(request, token),
        approved=approved,
    )
    return render_once(request, "dashboard/site_token.html", context)


@login_required
@require_POST
def site_deny(request: SignedInRequest, slug: str, pk: int) -> HttpResponse:
    project = project_for(request, slug)
    site = _site(request, project, pk)
    require(selectors.can_decide_site(request.user, site), ONLY_PROJECT_ADMIN)
    form = ReasonForm(request.POST)
    if form.is_valid():
        try:
            services.site_deny(
                site=site,
                reason=form.cleaned_data["reason"],
                denied_by=request.user,
                source_address=source_address(request),
            )
        except DomainError as exc:
            messages.error(request, exc.message)
        else:
            messages.success(request, f"Site {site.name} was denied.")
    else:
        messages.error(request, f"Site {site.name} was not denied: give a reason.")
    return redirect("dashboard:sites", slug=project.slug)


@login_required
@require_http_methods(["GET", "HEAD", "POST"])
def certificate_revoke(request: SignedInRequest, slug: str, pk: int) -> HttpResponse:
    """Asks for a reason and a confirmation (this page), then revokes (its POST)."""
    project = project_for(request, slug)
    certificate: Certificate = get_object_or_404(
        selectors.certificates_visible_to(request.user, project=project), pk=pk
    )
    require(selectors.can_decide_site(request.user, certificate.site), ONLY_PROJECT_ADMIN)
    form = ReasonForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            services.certificate_revoke(
                certificate=certificate,
                reason=form.cleaned_data["reason"],
                revoked_by=request.user,
                source_address=source_address(request),
            )
        except DomainError as exc:
            form_error(form, exc)
        else:
            messages.success(
                request,
                f"Certificate {certificate.serial[:12]}… of {certificate.site.name} was revoked; "
                "its agent is refused from its next request.",
            )
            return redirect("dashboard:sites", slug=project.slug)
    context = project_context(request, project)
    context.update(certificate=certificate, form=form)
    return render(request, "dashboard/certificate_revoke.html", context)
