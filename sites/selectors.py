"""Reads of the sites app: who holds which role, and what each person may see.

The role model (see ``sites.models`` for why it is shaped so):

- **project admin** of P: a ``project_admin`` membership in P's host organisation, or an
  active Django superuser (who administers every project). Everything in P.
- **org admin** of O: an ``org_admin`` membership in O, or project admin of O's project. O's
  members, invitations and sites.
- **lead** / **member**: read what is in the project (leads also submit and manage their own
  jobs).
- Anyone else, including anonymous users and inactive accounts: nothing.

Visibility is per project: a person sees a project's organisations, memberships, sites and
certificates when they belong to any of its organisations; invitations when they are org
admin of its organisation; audit events when they are project admin, plus the events they
caused themselves. The ``*_visible_to`` querysets encode that, so an API view that filters
through them returns 404 for objects of another project, never 403 — existence does not leak.
The ``is_*``/``can_*`` helpers answer write-permission questions; the API layer combines
the two.

Site agents are not users: they authenticate with a signed request and see only what the API
gives a ``SiteIdentity`` (``sites.authentication``); nothing here applies to them.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import TYPE_CHECKING, Any, TypeAlias, TypeGuard

from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from client_agent.privacy.accounting import Step
from client_agent.privacy.policy import PolicyError, PrivacyPolicy
from sites.models import (
    ApiToken,
    AuditEvent,
    Certificate,
    Invitation,
    Membership,
    Organization,
    Project,
    Role,
    Site,
    SiteState,
)

if TYPE_CHECKING:
    from django.contrib.auth.models import User

# A string: the user model is only imported for type checking (it may be swapped).
UserLike: TypeAlias = "User | AnonymousUser"

# Roles an org admin may give inside their own organisation; only project admins give more.
ORG_ADMIN_GRANTABLE = frozenset({Role.ORG_ADMIN, Role.LEAD, Role.MEMBER})


def _active(user: UserLike | None) -> TypeGuard[User]:
    return bool(user is not None and user.is_authenticated and user.is_active)


def _superuser(user: UserLike | None) -> TypeGuard[User]:
    return _active(user) and bool(getattr(user, "is_superuser", False))


def _member_project_ids(user: User) -> QuerySet[Membership, Any]:
    return Membership.objects.filter(user=user).values("organization__project_id")


def _admin_project_ids(user: User) -> QuerySet[Membership, Any]:
    return Membership.objects.filter(
        user=user, role=Role.PROJECT_ADMIN, organization__is_host=True
    ).values("organization__project_id")


def _org_admin_org_ids(user: User) -> QuerySet[Membership, Any]:
    return Membership.objects.filter(user=user, role=Role.ORG_ADMIN).values("organization_id")


# --- roles ----------------------------------------------------------------------------------


def role_in_project(user: UserLike | None, project: Project) -> set[str]:
    """Every role ``user`` holds in any organisation of ``project`` (superusers: project_admin).

    Empty for outsiders, anonymous and inactive users.
    """
    if not _active(user):
        return set()
    roles = set(
        Membership.objects.filter(user=user, organization__project=project).values_list(
            "role", flat=True
        )
    )
    if _superuser(user):
        roles.add(Role.PROJECT_ADMIN)
    return roles


def roles_in_organization(user: UserLike | None, organization: Organization) -> set[str]:
    """The user's role in ``organization`` itself, plus ``project_admin`` if they are one."""
    if not _active(user):
        return set()
    roles = set(
        Membership.objects.filter(user=user, organization=organization).values_list(
            "role", flat=True
        )
    )
    if is_project_admin(user, organization.project):
        roles.add(Role.PROJECT_ADMIN)
    return roles


def is_project_admin(user: UserLike | None, project: Project) -> bool:
    if not _active(user):
        return False
    if _superuser(user):
        return True
    return Membership.objects.filter(
        user=user,
        role=Role.PROJECT_ADMIN,
        organization__project=project,
        organization__is_host=True,
    ).exists()


def is_project_member(user: UserLike | None, project: Project) -> bool:
    """Any role at all in the project: the condition for seeing it."""
    if not _active(user):
        return False
    return (
        _superuser(user)
        or Membership.objects.filter(user=user, organization__project=project).exists()
    )


def is_org_admin(user: UserLike | None, organization: Organization) -> bool:
    """Org admin of ``organization``, or project admin of its project."""
    if not _active(user):
        return False
    if Membership.objects.filter(
        user=user, organization=organization, role=Role.ORG_ADMIN
    ).exists():
        return True
    return is_project_admin(user, organization.project)


def is_org_member(user: UserLike | None, organization: Organization) -> bool:
    """Any role in ``organization``, or project admin of its project."""
    if not _active(user):
        return False
    return Membership.objects.filter(
        user=user, organization=organization
    ).exists() or is_project_admin(user, organization.project)


def can_create_project(user: UserLike | None) -> bool:
    """Superusers, and users given the ``sites.add_project`` permission (Django admin)."""
    return _active(user) and bool(user is not None and user.has_perm("sites.add_project"))


def can_grant_role(user: UserLike | None, organization: Organization, role: str) -> bool:
    """May ``user`` give ``role`` in ``organization`` (add, invite, change a member to it)?

    Project admins give any role (``project_admin`` only in the host organisation: the service
    refuses it elsewhere); org admins give org_admin, lead and member in their organisation.
    """
    if is_project_admin(user, organization.project):
        return True
    return role in ORG_ADMIN_GRANTABLE and is_org_admin(user, organization)


def can_manage_membership(user: UserLike | None, membership: Membership) -> bool:
    """May ``user`` change or remove ``membership``? Project admin memberships: project admins
    only."""
    if membership.role == Role.PROJECT_ADMIN:
        return is_project_admin(user, membership.organization.project)
    return is_org_admin(user, membership.organization)


def can_request_site(user: UserLike | None, organization: Organization) -> bool:
    return is_org_admin(user, organization)


def can_manage_site(user: UserLike | None, site: Site) -> bool:
    """Update contact, resources, job acceptance: the site's org admins and project admins."""
    return is_org_admin(user, site.organization)


def can_decide_site(user: UserLike | None, site: Site) -> bool:
    """Approve, deny, revoke, reissue a token, revoke a certificate: project admins."""
    return is_project_admin(user, site.project)


# --- what a person may see ------------------------------------------------------------------


def projects_visible_to(user: UserLike | None) -> QuerySet[Project]:
    if not _active(user):
        return Project.objects.none()
    if _superuser(user):
        return Project.objects.all()
    assert user is not None
    return Project.objects.filter(pk__in=_member_project_ids(user))


# A project's slug as a URL may carry it (``Project.slug`` is a SlugField of at most 64).
_SLUG = re.compile(r"^[-a-zA-Z0-9_]{1,64}$")


def project_visible_to(user: UserLike | None, ref: str) -> Project | None:
    """The project ``ref`` names, if ``user`` may see it; None otherwise, whether or not it
    exists elsewhere (the caller answers 404 either way, so existence does not leak).

    ``ref`` is the project's slug or its numeric id, tried in that order: the jobs API has
    always taken both, and the sites API and the dashboard take what it takes, so that one
    reference works everywhere and no API user loses one. A slug made of digits wins over
    another project's id. Anything else (too long, odd characters) is refused before a query.
    """
    if not _SLUG.fullmatch(ref):
        return None
    visible = projects_visible_to(user)
    found = visible.filter(slug=ref).first()
    if found is None and ref.isdigit():
        found = visible.filter(pk=int(ref)).first()
    return found


def organizations_visible_to(
    user: UserLike | None, *, project: Project | None = None
) -> QuerySet[Organization]:
    qs = Organization.objects.filter(project__in=projects_visible_to(user))
    if project is not None:
        qs = qs.filter(project=project)
    return qs.select_related("project")


def memberships_visible_to(
    user: UserLike | None,
    *,
    project: Project | None = None,
    organization: Organization | None = None,
) -> QuerySet[Membership]:
    qs = Membership.objects.filter(organization__project__in=projects_visible_to(user))
    if project is not None:
        qs = qs.filter(organization__project=project)
    if organization is not None:
        qs = qs.filter(organization=organization)
    return qs.select_related("user", "organization")


def people_of_project(project: Project) -> QuerySet[User]:
    """Active accounts with a role in some organisation of ``project``: the only people who
    may be given a role directly (anyone else is invited, and joins by accepting)."""
    from django.contrib.auth import get_user_model

    model: Any = get_user_model()
    in_project = Membership.objects.filter(organization__project=project).values("user_id")
    people: QuerySet[User] = model.objects.filter(is_active=True, pk__in=in_project)
    return people


def invitations_visible_to(
    user: UserLike | None,
    *,
    project: Project | None = None,
    organization: Organization | None = None,
) -> QuerySet[Invitation]:
    """Project admins see their projects' invitations, org admins their organisation's."""
    if not _active(user):
        return Invitation.objects.none()
    if _superuser(user):
        qs = Invitation.objects.all()
    else:
        assert user is not None
        qs = Invitation.objects.filter(
            Q(organization__project_id__in=_admin_project_ids(user))
            | Q(organization_id__in=_org_admin_org_ids(user))
        )
    if project is not None:
        qs = qs.filter(organization__project=project)
    if organization is not None:
        qs = qs.filter(organization=organization)
    return qs.select_related("organization")


def sites_visible_to(
    user: UserLike | None,
    *,
    project: Project | None = None,
    organization: Organization | None = None,
    state: str | None = None,
) -> QuerySet[Site]:
    qs = Site.objects.filter(project__in=projects_visible_to(user))
    if project is not None:
        qs = qs.filter(project=project)
    if organization is not None:
        qs = qs.filter(organization=organization)
    if state is not None:
        qs = qs.filter(state=state)
    return qs.select_related("project", "organization")


def certificates_visible_to(
    user: UserLike | None,
    *,
    project: Project | None = None,
    site: Site | None = None,
    revoked: bool | None = None,
) -> QuerySet[Certificate]:
    qs = Certificate.objects.filter(site__project__in=projects_visible_to(user))
    if project is not None:
        qs = qs.filter(site__project=project)
    if site is not None:
        qs = qs.filter(site=site)
    if revoked is not None:
        qs = qs.filter(revoked_at__isnull=not revoked)
    return qs.select_related("site")


def audit_events_visible_to(
    user: UserLike | None,
    *,
    project: Project | None = None,
    action: str | None = None,
    target_type: str | None = None,
    target_id: str | int | None = None,
    actor: User | None = None,
    actor_username: str | None = None,
    actor_site_name: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> QuerySet[AuditEvent]:
    """Audit events, newest first, filtered by any of the keyword arguments.

    ``action`` matches exactly, or as a prefix when it ends with ``.`` (``"site."`` → every
    site event). ``actor_username`` matches the username recorded with the event (it outlives
    the account); ``actor_site_name`` the site whose agent acted. Project admins see their
    projects' events; everyone sees their own.
    """
    if not _active(user):
        return AuditEvent.objects.none()
    if _superuser(user):
        qs = AuditEvent.objects.all()
    else:
        assert user is not None
        qs = AuditEvent.objects.filter(Q(project_id__in=_admin_project_ids(user)) | Q(actor=user))
    if project is not None:
        qs = qs.filter(project=project)
    if action:
        qs = (
            qs.filter(action__startswith=action)
            if action.endswith(".")
            else qs.filter(action=action)
        )
    if target_type:
        qs = qs.filter(target_type=target_type)
    if target_id is not None:
        qs = qs.filter(target_id=str(target_id))
    if actor is not None:
        qs = qs.filter(actor=actor)
    if actor_username:
        qs = qs.filter(actor_repr=actor_username)
    if actor_site_name:
        qs = qs.filter(actor_site__name=actor_site_name)
    if since is not None:
        qs = qs.filter(created_at__gte=since)
    if until is not None:
        qs = qs.filter(created_at__lt=until)
    return qs.select_related("actor", "actor_site", "project")


def api_tokens_of(user: UserLike | None) -> QuerySet[ApiToken]:
    """A person's own API tokens (nobody sees another's, not even a project admin)."""
    if not _active(user):
        return ApiToken.objects.none()
    return ApiToken.objects.filter(user=user)


def site_current_certificate(site: Site, *, now: dt.datetime | None = None) -> Certificate | None:
    """The site's newest certificate that is unrevoked and valid now, if any."""
    now = now or timezone.now()
    return (
        Certificate.objects.filter(
            site=site, revoked_at__isnull=True, not_before__lte=now, not_after__gte=now
        )
        .order_by("-created_at", "-pk")
        .first()
    )


# --- liveness -------------------------------------------------------------------------------


def heartbeat_is_recent(heartbeat: dt.datetime | None, now: dt.datetime | None = None) -> bool:
    """Whether a heartbeat (a verified signed request) lies within
    ``FEDPORTAL_SITE_ONLINE_SECONDS``."""
    if heartbeat is None:
        return False
    now = now or timezone.now()
    return now - heartbeat <= dt.timedelta(seconds=settings.FEDPORTAL_SITE_ONLINE_SECONDS)


def site_is_online(site: Site, now: dt.datetime | None = None) -> bool:
    """The one rule for "online", for the pages, the API and the round controller alike.

    A site is online when it is enrolled, its agent was heard from (a verified signed request
    or a heartbeat on its WebSocket) within ``FEDPORTAL_SITE_ONLINE_SECONDS``, and not cut off
    since: an agent whose WebSocket closed, or whose certificate was revoked or superseded, is
    offline at once rather than when its last heartbeat grows old, until it is heard again.
    """
    if site.state != SiteState.ENROLLED:
        return False
    heartbeat = site.last_heartbeat
    if heartbeat is None or not heartbeat_is_recent(heartbeat, now):
        return False
    gone = site.agent_disconnected_at
    return gone is None or heartbeat > gone


def online_at(now: dt.datetime) -> Q:
    """:func:`site_is_online` at ``now`` as a filter on sites' rows (the same rule)."""
    recent = now - dt.timedelta(seconds=settings.FEDPORTAL_SITE_ONLINE_SECONDS)
    return Q(state=SiteState.ENROLLED, last_heartbeat__gte=recent) & (
        Q(agent_disconnected_at__isnull=True) | Q(agent_disconnected_at__lt=F("last_heartbeat"))
    )


def site_privacy_policy(site: Site) -> PrivacyPolicy | None:
    """The privacy policy ``site``'s agent last reported, or None when it never did.

    The stored copy was checked when it came in; one that no longer passes the check (a
    stricter portal since) counts as not reported rather than as a policy with no rules."""
    if site.privacy_policy is None:
        return None
    try:
        return PrivacyPolicy.from_json(site.privacy_policy)
    except PolicyError:
        return None


def site_privacy_project_spent(site: Site) -> list[Step]:
    """What the project has spent at ``site``, as the accountant's history entries."""
    return [(float(s), float(q), int(n)) for s, q, n in site.privacy_project_history or []]
