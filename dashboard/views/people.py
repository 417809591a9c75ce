"""A project's people side in the browser: a new project, its settings, its organisations, its
members and their roles, invitations, and accepting one.

Each page checks the same ``sites.selectors`` rule as the API view for the same action and
calls the same service, so the permissions and the audit events are the API's.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Q, QuerySet
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_http_methods, require_POST

from common.exceptions import DomainError
from dashboard.http import SignedInRequest
from dashboard.people_forms import (
    InvitationAcceptForm,
    InvitationForm,
    MemberAddForm,
    MemberRoleForm,
    OrganizationForm,
    ProjectNewForm,
    ProjectSettingsForm,
)
from dashboard.presenters import MemberRow
from dashboard.views._common import (
    form_error,
    project_for,
    render_once,
    require,
    source_address,
)
from dashboard.views.projects import project_context
from sites import selectors, services
from sites.models import Invitation, Membership, Organization, Project, Role
from sites.secret_tokens import hash_secret

ONLY_PROJECT_CREATORS = "Creating projects needs a superuser or the sites.add_project permission."
ONLY_PROJECT_ADMIN = "Only a project admin of this project may do this."
ONLY_ORG_ADMIN = "Only an org admin of the organisation (or a project admin) may do this."
# The API's first check for people writes (``require_manager``): only these roles make them.
MANAGER_ROLES = frozenset({Role.PROJECT_ADMIN, Role.ORG_ADMIN})

GET_OR_POST = ["GET", "HEAD", "POST"]


# --- projects -----------------------------------------------------------------------------------


@login_required
@require_http_methods(GET_OR_POST)
def project_new(request: SignedInRequest) -> HttpResponse:
    require(selectors.can_create_project(request.user), ONLY_PROJECT_CREATORS)
    form = ProjectNewForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            project = services.project_create(
                name=form.cleaned_data["name"],
                description=form.cleaned_data["description"],
                host_organization_name=form.cleaned_data["host_organization_name"] or None,
                created_by=request.user,
                source_address=source_address(request),
            )
        except DomainError as exc:
            form_error(form, exc)
        else:
            messages.success(request, f"Project {project.name} was created; you are its admin.")
            return redirect("dashboard:project", slug=project.slug)
    return render(request, "dashboard/project_new.html", {"form": form})


@login_required
@require_http_methods(GET_OR_POST)
def project_settings(request: SignedInRequest, slug: str) -> HttpResponse:
    project = project_for(request, slug)
    require(selectors.is_project_admin(request.user, project), ONLY_PROJECT_ADMIN)
    form = ProjectSettingsForm(request.POST or None, initial={"description": project.description})
    if request.method == "POST" and form.is_valid():
        try:
            services.project_update(
                project=project,
                updated_by=request.user,
                description=form.cleaned_data["description"],
                source_address=source_address(request),
            )
        except DomainError as exc:
            form_error(form, exc)
        else:
            messages.success(request, "The project's settings were saved.")
            return redirect("dashboard:project-settings", slug=project.slug)
    context = _people_context(request, project)
    context["form"] = form
    return render(request, "dashboard/project_settings.html", context)


# --- organisations ------------------------------------------------------------------------------


def _organizations_page(
    request: SignedInRequest,
    project: Project,
    *,
    new_form: OrganizationForm | None = None,
    rename: tuple[int, OrganizationForm] | None = None,
) -> HttpResponse:
    context = _people_context(request, project)
    context.update(
        organizations=list(
            selectors.organizations_visible_to(request.user, project=project).order_by(
                "-is_host", "name"
            )
        ),
        new_form=new_form or OrganizationForm(prefix="new"),
        rename_pk=rename[0] if rename else None,
        rename_form=rename[1] if rename else None,
    )
    return render(request, "dashboard/organizations.html", context)


@login_required
@require_http_methods(GET_OR_POST)
def organization_list(request: SignedInRequest, slug: str) -> HttpResponse:
    """Every member sees the organisations (as the API's list); project admins add them."""
    project = project_for(request, slug)
    if request.method != "POST":
        return _organizations_page(request, project)
    require(selectors.is_project_admin(request.user, project), ONLY_PROJECT_ADMIN)
    form = OrganizationForm(request.POST, prefix="new")
    if form.is_valid():
        try:
            organization = services.organization_create(
                project=project,
                name=form.cleaned_data["name"],
                created_by=request.user,
                source_address=source_address(request),
            )
        except DomainError as exc:
            form_error(form, exc)
        else:
            messages.success(request, f"Organisation {organization.name} was added.")
            return redirect("dashboard:organizations", slug=project.slug)
    return _organizations_page(request, project, new_form=form)


@login_required
@require_POST
def organization_rename(request: SignedInRequest, slug: str, pk: int) -> HttpResponse:
    project = project_for(request, slug)
    organization = get_object_or_404(
        selectors.organizations_visible_to(request.user, project=project), pk=pk
    )
    require(selectors.is_project_admin(request.user, project), ONLY_PROJECT_ADMIN)
    form = OrganizationForm(request.POST, prefix="rename")
    if form.is_valid():
        try:
            services.organization_update(
                organization=organization,
                name=form.cleaned_data["name"],
                updated_by=request.user,
                source_address=source_address(request),
            )
        except DomainError as exc:
            form_error(form, exc)
        else:
            messages.success(request, f"The organisation is now called {organization.name}.")
            return redirect("dashboard:organizations", slug=project.slug)
    return _organizations_page(request, project, rename=(organization.pk, form))


# --- members ------------------------------------------------------------------------------------


class _Grants:
    """What the viewer may do in each organisation, asked of the selectors once per organisation
    (and role), not once per member: the roles they may give (``can_grant_role``;
    ``project_admin`` offered only in the host organisation, the only one where the service
    accepts it) and whether they may manage a membership (``can_manage_membership``, which
    reads only the membership's organisation and role)."""

    def __init__(self, request: SignedInRequest) -> None:
        self.user = request.user
        self.known: dict[int, tuple[tuple[str, str], ...]] = {}
        self.manages: dict[tuple[int, str], bool] = {}

    def can_manage(self, membership: Membership) -> bool:
        key = (membership.organization_id, membership.role)
        if key not in self.manages:
            self.manages[key] = selectors.can_manage_membership(self.user, membership)
        return self.manages[key]

    def roles(self, organization: Organization) -> tuple[tuple[str, str], ...]:
        if organization.pk not in self.known:
            self.known[organization.pk] = tuple(
                (value, label)
                for value, label in Role.choices
                if (organization.is_host or value != Role.PROJECT_ADMIN)
                and selectors.can_grant_role(self.user, organization, value)
            )
        return self.known[organization.pk]


def _grantable(
    request: SignedInRequest, project: Project, grants: _Grants
) -> tuple[QuerySet[Organization], list[tuple[str, str]]]:
    """The organisations where the viewer may give some role, and every role they may give
    in one of them (the service and ``can_grant_role`` judge the pair when it is sent)."""
    organizations = list(selectors.organizations_visible_to(request.user, project=project))
    allowed = [org for org in organizations if grants.roles(org)]
    given = {value for org in allowed for value, _ in grants.roles(org)}
    roles = [(value, label) for value, label in Role.choices if value in given]
    queryset = project.organizations.filter(pk__in=[org.pk for org in allowed]).order_by(
        "-is_host", "name"
    )
    return queryset, roles


def _is_manager(request: SignedInRequest, project: Project) -> bool:
    return bool(selectors.role_in_project(request.user, project) & MANAGER_ROLES)


def _people_context(request: SignedInRequest, project: Project) -> dict[str, Any]:
    context = project_context(request, project)
    context["can_manage_people"] = _is_manager(request, project)
    return context


def _members_page(
    request: SignedInRequest,
    project: Project,
    *,
    add_form: MemberAddForm | None = None,
    row_error: tuple[int, str] | None = None,
) -> HttpResponse:
    grants = _Grants(request)
    memberships = selectors.memberships_visible_to(request.user, project=project).order_by(
        "organization__name", "user__username"
    )
    rows = []
    for membership in memberships:
        can_manage = grants.can_manage(membership)
        rows.append(
            MemberRow(
                membership=membership,
                role_choices=grants.roles(membership.organization) if can_manage else (),
                can_manage=can_manage,
                error=row_error[1] if row_error and row_error[0] == membership.pk else "",
            )
        )
    context = _people_context(request, project)
    if _is_manager(request, project):
        organizations, roles = _grantable(request, project, grants)
        context["add_form"] = add_form or MemberAddForm(organizations=organizations, roles=roles)
    context["members"] = rows
    return render(request, "dashboard/members.html", context)


def _person_of(project: Project, person: str) -> Any:
    """Someone who already has a role in the project, by username or email: the only people the
    API adds directly (``selectors.people_of_project``); anyone else is invited."""
    person = person.strip()
    return (
        selectors.people_of_project(project)
        .filter(Q(username=person) | (Q(email__iexact=person) & ~Q(email="")))
        .order_by("pk")
        .first()
    )


@login_required
@require_http_methods(GET_OR_POST)
def member_list(request: SignedInRequest, slug: str) -> HttpResponse:
    project = project_for(request, slug)
    if request.method != "POST":
        return _members_page(request, project)
    require(_is_manager(request, project), ONLY_ORG_ADMIN)
    organizations, roles = _grantable(request, project, _Grants(request))
    form = MemberAddForm(request.POST, organizations=organizations, roles=roles)
    if form.is_valid():
        organization: Organization = form.cleaned_data["organization"]
        role: str = form.cleaned_data["role"]
        require(
            selectors.can_grant_role(request.user, organization, role),
            f"You may not give the role {role} in {organization.name}.",
        )
        person = _person_of(project, form.cleaned_data["person"])
        if person is None:
            form.add_error(
                "person",
                f"nobody in this project is called {form.cleaned_data['person']}; "
                "invite people from outside it",
            )
        else:
            try:
                services.membership_add(
                    organization=organization,
                    user=person,
                    role=role,
                    added_by=request.user,
                    source_address=source_address(request),
                )
            except DomainError as exc:
                form_error(form, exc, {"user": "person"})
            else:
                messages.success(request, f"{person.get_username()} joined {organization.name}.")
                return redirect("dashboard:members", slug=project.slug)
    return _members_page(request, project, add_form=form)


def _membership(request: SignedInRequest, project: Project, pk: int) -> Membership:
    found: Membership = get_object_or_404(
        selectors.memberships_visible_to(request.user, project=project), pk=pk
    )
    require(selectors.can_manage_membership(request.user, found), ONLY_ORG_ADMIN)
    return found


@login_required
@require_POST
def member_role(request: SignedInRequest, slug: str, pk: int) -> HttpResponse:
    project = project_for(request, slug)
    membership = _membership(request, project, pk)
    form = MemberRoleForm(request.POST)
    if not form.is_valid():
        return _members_page(request, project, row_error=(pk, "choose one of the roles"))
    role: str = form.cleaned_data["role"]
    require(
        selectors.can_grant_role(request.user, membership.organization, role),
        f"You may not give the role {role} in {membership.organization.name}.",
    )
    try:
        services.membership_update_role(
            membership=membership,
            role=role,
            updated_by=request.user,
            source_address=source_address(request),
        )
    except DomainError as exc:
        return _members_page(request, project, row_error=(pk, exc.message))
    messages.success(request, f"{membership.user.get_username()} is now {membership.role}.")
    return redirect("dashboard:members", slug=project.slug)


@login_required
@require_POST
def member_remove(request: SignedInRequest, slug: str, pk: int) -> HttpResponse:
    project = project_for(request, slug)
    membership = _membership(request, project, pk)
    name = membership.user.get_username()
    try:
        services.membership_remove(
            membership=membership, removed_by=request.user, source_address=source_address(request)
        )
    except DomainError as exc:
        return _members_page(request, project, row_error=(pk, exc.message))
    messages.success(request, f"{name} was removed from {membership.organization.name}.")
    return redirect("dashboard:members", slug=project.slug)


# --- invitations --------------------------------------------------------------------------------


def _invitations_page(
    request: SignedInRequest, project: Project, form: InvitationForm | None = None
) -> HttpResponse:
    now = timezone.now()
    pending = [
        invitation
        for invitation in selectors.invitations_visible_to(request.user, project=project)
        .select_related("created_by")
        .order_by("-created_at")
        if invitation.status_at(now) == "pending"
    ]
    if form is None:
        organizations, roles = _grantable(request, project, _Grants(request))
        form = InvitationForm(organizations=organizations, roles=roles)
    context = _people_context(request, project)
    context.update(form=form, pending=pending)
    return render(request, "dashboard/invitations.html", context)


@login_required
@require_http_methods(GET_OR_POST)
def invitation_list(request: SignedInRequest, slug: str) -> HttpResponse:
    """Project admins manage their project's invitations, org admins their organisation's (the
    API's ``invitations_visible_to``); nobody else has any to see, so the page is refused."""
    project = project_for(request, slug)
    require(_is_manager(request, project), ONLY_ORG_ADMIN)
    if request.method != "POST":
        return _invitations_page(request, project)
    organizations, roles = _grantable(request, project, _Grants(request))
    form = InvitationForm(request.POST, organizations=organizations, roles=roles)
    if form.is_valid():
        organization: Organization = form.cleaned_data["organization"]
        role: str = form.cleaned_data["role"]
        require(
            selectors.can_grant_role(request.user, organization, role),
            f"You may not give the role {role} in {organization.name}.",
        )
        try:
            invitation, token = services.invitation_create(
                organization=organization,
                role=role,
                email=form.cleaned_data["email"],
                invited_by=request.user,
                source_address=source_address(request),
            )
        except DomainError as exc:
            form_error(form, exc)
        else:
            # The POST's own answer, never a redirect: the token is stored only as a hash.
            link = request.build_absolute_uri(
                reverse("dashboard:invitation-accept") + "?" + urlencode({"token": token})
            )
            context = _people_context(request, project)
            context.update(invitation=invitation, link=link)
            return render_once(request, "dashboard/invitation_sent.html", context)
    return _invitations_page(request, project, form)


@login_required
@require_POST
def invitation_revoke(request: SignedInRequest, slug: str, pk: int) -> HttpResponse:
    project = project_for(request, slug)
    invitation = get_object_or_404(
        selectors.invitations_visible_to(request.user, project=project), pk=pk
    )
    require(
        selectors.can_grant_role(request.user, invitation.organization, invitation.role),
        ONLY_ORG_ADMIN,
    )
    try:
        services.invitation_revoke(
            invitation=invitation, revoked_by=request.user, source_address=source_address(request)
        )
    except DomainError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(
            request, f"The invitation to {invitation.email or invitation.username} was withdrawn."
        )
    return redirect("dashboard:invitations", slug=project.slug)


def _invitation_of(token: str) -> Invitation | None:
    """The invitation a token opens, to show what accepting it means; ``invitation_accept``
    checks everything again when it is accepted."""
    if not token:
        return None
    return (
        Invitation.objects.select_related("organization__project", "created_by")
        .filter(token_hash=hash_secret(token))
        .first()
    )


@login_required
@require_http_methods(GET_OR_POST)
def invitation_accept(request: SignedInRequest) -> HttpResponse:
    """The page an invitation link opens: what it invites to (GET), and accepting it (POST),
    which leads to the project."""
    # A GET without a token shows that the link holds nothing, not a form error.
    form = InvitationAcceptForm(request.POST if request.method == "POST" else request.GET or None)
    token: str = form.cleaned_data["token"] if form.is_valid() else ""
    if request.method == "POST" and form.is_valid():
        try:
            membership = services.invitation_accept(
                token=form.cleaned_data["token"],
                user=request.user,
                source_address=source_address(request),
            )
        except DomainError as exc:
            form_error(form, exc, {"token": ""})
        else:
            project = membership.organization.project
            messages.success(
                request, f"You joined {membership.organization.name} in {project.name}."
            )
            return redirect("dashboard:project", slug=project.slug)
    invitation = _invitation_of(token)
    context: dict[str, Any] = {
        "form": form,
        "invitation": invitation,
        "status": invitation.status_at(timezone.now()) if invitation else None,
    }
    # The page carries the token in its form: like a token page, it is never cached.
    return render_once(request, "dashboard/invitation_accept.html", context)
