"""Services of the sites app: an audit event for every change, state machines that refuse
invalid moves, the rules on memberships, invitations and API tokens, and the role selectors."""

from __future__ import annotations

import datetime as dt
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from django.contrib.auth.models import AnonymousUser
from django.utils import timezone
from rest_framework.request import Request
from rest_framework.test import APIRequestFactory

from client_agent import signing
from common.exceptions import AlreadyExists, InvalidTransition, ValidationFailed
from sites import selectors, services
from sites.authentication import ApiTokenAuthentication
from sites.exceptions import (
    InvitationNotForYou,
    LastProjectAdmin,
    TokenAlreadyUsed,
    TokenExpired,
    TokenInvalid,
)
from sites.models import (
    ApiToken,
    AuditEvent,
    EnrolmentToken,
    Invitation,
    Membership,
    Project,
    Role,
    Site,
    SiteState,
)
from tests.portal.factories import (
    MembershipFactory,
    OrganizationFactory,
    ProjectFactory,
    SiteFactory,
    UserFactory,
    approved_site,
    creator_of,
    enrolled_site,
)

pytestmark = pytest.mark.django_db


# --- an audit event for every state change --------------------------------------------------


@dataclass
class Scene:
    """What a service call needs, made before the events are counted."""

    actor: Any
    project: Project | None
    call: Callable[[], Any]


def _project_create() -> Scene:
    user = UserFactory.create()
    return Scene(user, None, lambda: services.project_create(name="Neuro", created_by=user))


def _project_update() -> Scene:
    p = ProjectFactory.create()
    return Scene(
        creator_of(p),
        p,
        lambda: services.project_update(project=p, description="brains", updated_by=creator_of(p)),
    )


def _organization_create() -> Scene:
    p = ProjectFactory.create()
    return Scene(
        creator_of(p),
        p,
        lambda: services.organization_create(project=p, name="Clinic", created_by=creator_of(p)),
    )


def _organization_update() -> Scene:
    o = OrganizationFactory.create()
    admin = creator_of(o.project)
    return Scene(
        admin,
        o.project,
        lambda: services.organization_update(organization=o, name="Renamed", updated_by=admin),
    )


def _membership_add() -> Scene:
    o = OrganizationFactory.create()
    user, admin = UserFactory.create(), creator_of(o.project)
    return Scene(
        admin,
        o.project,
        lambda: services.membership_add(organization=o, user=user, role=Role.LEAD, added_by=admin),
    )


def _membership_update_role() -> Scene:
    m = MembershipFactory.create()
    admin = creator_of(m.organization.project)
    return Scene(
        admin,
        m.organization.project,
        lambda: services.membership_update_role(
            membership=m, role=Role.ORG_ADMIN, updated_by=admin
        ),
    )


def _membership_remove() -> Scene:
    m = MembershipFactory.create()
    admin = creator_of(m.organization.project)
    return Scene(
        admin,
        m.organization.project,
        lambda: services.membership_remove(membership=m, removed_by=admin),
    )


def _invitation_create() -> Scene:
    o = OrganizationFactory.create()
    admin = creator_of(o.project)
    return Scene(
        admin,
        o.project,
        lambda: services.invitation_create(
            organization=o, role=Role.MEMBER, email="new@example.org", invited_by=admin
        ),
    )


def _invitation_accept() -> Scene:
    o = OrganizationFactory.create()
    _, token = services.invitation_create(
        organization=o, role=Role.MEMBER, email="new@example.org", invited_by=creator_of(o.project)
    )
    user = UserFactory.create(username="newcomer", email="New@Example.org")
    return Scene(user, o.project, lambda: services.invitation_accept(token=token, user=user))


def _invitation_revoke() -> Scene:
    o = OrganizationFactory.create()
    admin = creator_of(o.project)
    invitation, _ = services.invitation_create(
        organization=o, role=Role.MEMBER, username="someone", invited_by=admin
    )
    return Scene(
        admin,
        o.project,
        lambda: services.invitation_revoke(invitation=invitation, revoked_by=admin),
    )


def _site_request() -> Scene:
    o = OrganizationFactory.create()
    admin = creator_of(o.project)
    return Scene(
        admin,
        o.project,
        lambda: services.site_request(
            organization=o, name="lab-1", contact_email="a@b.org", requested_by=admin
        ),
    )


def _site_update() -> Scene:
    s = SiteFactory.create()
    admin = creator_of(s.project)
    return Scene(
        admin,
        s.project,
        lambda: services.site_update(site=s, auto_accept_jobs=True, updated_by=admin),
    )


def _site_approve() -> Scene:
    s = SiteFactory.create()
    admin = creator_of(s.project)
    return Scene(admin, s.project, lambda: services.site_approve(site=s, approved_by=admin))


def _site_deny() -> Scene:
    s = SiteFactory.create()
    admin = creator_of(s.project)
    return Scene(admin, s.project, lambda: services.site_deny(site=s, reason="no", denied_by=admin))


def _enrolment_token_reissue() -> Scene:
    s, _ = approved_site()
    admin = creator_of(s.project)
    return Scene(
        admin, s.project, lambda: services.enrolment_token_reissue(site=s, issued_by=admin)
    )


def _site_enrol() -> Scene:
    s, token = approved_site()
    csr = signing.make_csr(signing.generate_key(), s.name, s.project.name)
    return Scene(None, s.project, lambda: services.site_enrol(token=token, csr_pem=csr))


def _certificate_revoke() -> Scene:
    e = enrolled_site()
    admin = creator_of(e.site.project)
    return Scene(
        admin,
        e.site.project,
        lambda: services.certificate_revoke(
            certificate=e.certificate, reason="rotated", revoked_by=admin
        ),
    )


def _site_revoke() -> Scene:
    e = enrolled_site()
    admin = creator_of(e.site.project)
    return Scene(
        admin,
        e.site.project,
        lambda: services.site_revoke(site=e.site, reason="left", revoked_by=admin),
    )


def _api_token_create() -> Scene:
    user = UserFactory.create()
    return Scene(user, None, lambda: services.api_token_create(user=user, name="ci"))


def _api_token_revoke() -> Scene:
    user = UserFactory.create()
    token, _ = services.api_token_create(user=user, name="ci")
    return Scene(user, None, lambda: services.api_token_revoke(token=token, revoked_by=user))


AUDITED: dict[str, tuple[Callable[[], Scene], list[str]]] = {
    "project_create": (
        _project_create,
        ["project.created", "organization.created", "membership.added"],
    ),
    "project_update": (_project_update, ["project.updated"]),
    "organization_create": (_organization_create, ["organization.created"]),
    "organization_update": (_organization_update, ["organization.updated"]),
    "membership_add": (_membership_add, ["membership.added"]),
    "membership_update_role": (_membership_update_role, ["membership.role_changed"]),
    "membership_remove": (_membership_remove, ["membership.removed"]),
    "invitation_create": (_invitation_create, ["invitation.created"]),
    "invitation_accept": (_invitation_accept, ["invitation.accepted", "membership.added"]),
    "invitation_revoke": (_invitation_revoke, ["invitation.revoked"]),
    "site_request": (_site_request, ["site.requested"]),
    "site_update": (_site_update, ["site.updated"]),
    "site_approve": (_site_approve, ["site.approved"]),
    "site_deny": (_site_deny, ["site.denied"]),
    "enrolment_token_reissue": (_enrolment_token_reissue, ["enrolment_token.reissued"]),
    "site_enrol": (_site_enrol, ["certificate.issued", "site.enrolled"]),
    "certificate_revoke": (_certificate_revoke, ["certificate.revoked"]),
    "site_revoke": (_site_revoke, ["certificate.revoked", "site.revoked"]),
    "api_token_create": (_api_token_create, ["api_token.created"]),
    "api_token_revoke": (_api_token_revoke, ["api_token.revoked"]),
}
NOT_AUDITED = {
    "audit_event_record",  # the recorder
    "enrolment_token_check",  # a read: the token stays unused
    # An agent's connection and heartbeats are liveness, shown live on the dashboard, not
    # changes anyone made; its certificate's issue and revocation are audited.
    "site_agent_connect",
    "site_agent_disconnect",
    "site_agent_heartbeat",
}


def test_every_service_has_an_audit_case() -> None:
    public = {
        name
        for name in services.__all__
        if inspect.isfunction(getattr(services, name)) and name not in NOT_AUDITED
    }
    assert public == set(AUDITED)


@pytest.mark.parametrize("service", sorted(AUDITED))
def test_service_records_its_audit_events(service: str) -> None:
    make, actions = AUDITED[service]
    assert actions
    scene = make()
    last = AuditEvent.objects.order_by("-pk").values_list("pk", flat=True).first() or 0

    scene.call()

    events = list(AuditEvent.objects.filter(pk__gt=last).order_by("pk"))
    assert [e.action for e in events] == actions
    for event in events:
        assert event.actor == scene.actor
        if scene.actor is None:  # the agent enrolling
            assert event.actor_site is not None
        if scene.project is not None:
            assert event.project == scene.project
        assert event.target_id and event.target_type and event.target_repr


def test_audit_events_are_append_only() -> None:
    ProjectFactory.create()
    event = AuditEvent.objects.first()
    assert event is not None

    event.action = "project.forged"
    with pytest.raises(TypeError, match="append-only"):
        event.save()
    with pytest.raises(TypeError, match="append-only"):
        event.delete()
    assert AuditEvent.objects.filter(action="project.forged").count() == 0


def test_audit_event_keeps_a_valid_source_address_and_drops_garbage() -> None:
    user = UserFactory.create()
    services.api_token_create(user=user, name="a", source_address="2001:db8::1")
    services.api_token_create(user=user, name="b", source_address="not-an-ip, 10.0.0.1")

    assert list(AuditEvent.objects.order_by("pk").values_list("source_address", flat=True)) == [
        "2001:db8::1",
        None,
    ]


# --- state machines refuse invalid moves ----------------------------------------------------

ALLOWED = {
    "approve": {SiteState.REQUESTED},
    "deny": {SiteState.REQUESTED, SiteState.APPROVED},
    "enrol": {SiteState.APPROVED, SiteState.ENROLLED},
    "revoke": {SiteState.ENROLLED},
}
RESULT = {
    "approve": SiteState.APPROVED,
    "deny": SiteState.DENIED,
    "enrol": SiteState.ENROLLED,
    "revoke": SiteState.REVOKED,
}


@pytest.mark.parametrize("state", list(SiteState))
@pytest.mark.parametrize("move", sorted(ALLOWED))
def test_site_transitions(state: SiteState, move: str) -> None:
    organization = OrganizationFactory.create()
    site = Site.objects.create(
        project=organization.project,
        organization=organization,
        name="lab",
        contact_email="a@b.org",
        state=state,
    )
    method = getattr(site, move)
    args = ("a reason",) if move in {"deny", "revoke"} else ()

    if state in ALLOWED[move]:
        method(*args)
        assert Site.objects.get(pk=site.pk).state == RESULT[move]
    else:
        with pytest.raises(InvalidTransition, match=f"site 'lab' is {state}"):
            method(*args)
        assert Site.objects.get(pk=site.pk).state == state


def test_state_sets_partition_the_states() -> None:
    assert set(SiteState.values) == Site.ACTIVE_STATES | Site.TERMINAL_STATES
    assert not Site.ACTIVE_STATES & Site.TERMINAL_STATES


def test_approving_twice_is_refused_and_issues_no_second_token() -> None:
    site, _ = approved_site()
    events = AuditEvent.objects.count()

    with pytest.raises(InvalidTransition, match="is approved"):
        services.site_approve(site=site, approved_by=creator_of(site.project))
    assert EnrolmentToken.objects.filter(site=site).count() == 1
    assert AuditEvent.objects.count() == events


def test_service_uses_the_current_state_not_a_stale_instance() -> None:
    site = SiteFactory.create()
    stale = Site.objects.get(pk=site.pk)
    services.site_deny(site=site, reason="no", denied_by=creator_of(site.project))

    with pytest.raises(InvalidTransition, match="is denied"):
        services.site_approve(site=stale, approved_by=creator_of(site.project))


def test_revoking_twice_is_refused() -> None:
    e = enrolled_site()
    admin = creator_of(e.site.project)
    services.certificate_revoke(certificate=e.certificate, reason="x", revoked_by=admin)

    with pytest.raises(InvalidTransition, match="already revoked"):
        services.certificate_revoke(certificate=e.certificate, reason="x", revoked_by=admin)
    token, _ = services.api_token_create(user=admin, name="t")
    services.api_token_revoke(token=token, revoked_by=admin)
    with pytest.raises(InvalidTransition, match="already revoked"):
        services.api_token_revoke(token=token, revoked_by=admin)


def test_a_site_that_never_enrolled_is_denied_not_revoked() -> None:
    site, _ = approved_site()
    with pytest.raises(InvalidTransition):
        services.site_revoke(site=site, reason="x", revoked_by=creator_of(site.project))
    with pytest.raises(InvalidTransition, match="only for approved or enrolled"):
        services.enrolment_token_reissue(
            site=SiteFactory.create(), issued_by=creator_of(site.project)
        )


def test_site_revoke_revokes_every_certificate_and_token() -> None:
    e = enrolled_site()
    admin = creator_of(e.site.project)
    services.enrolment_token_reissue(site=e.site, issued_by=admin)

    services.site_revoke(site=e.site, reason="breach", revoked_by=admin)

    assert not e.site.certificates.filter(revoked_at__isnull=True).exists()
    assert not EnrolmentToken.objects.filter(site=e.site, revoked_at__isnull=True, used_at=None)
    assert selectors.site_current_certificate(e.site) is None
    with pytest.raises(InvalidTransition, match="cannot be changed"):
        services.site_update(site=e.site, auto_accept_jobs=True, updated_by=admin)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"contact_email": "nope"}, "contact_email"),
        ({"resources": {"GPUs": 1}}, "resources"),
        ({"resources": {"gpus": -1}}, "resources"),
        ({"resources": {"gpus": [1]}}, "resources"),
        ({"resources": [1]}, "resources"),
    ],
)
def test_site_request_names_the_bad_field(kwargs: dict[str, Any], field: str) -> None:
    o = OrganizationFactory.create()
    args: dict[str, Any] = {"organization": o, "name": "lab", "contact_email": "a@b.org"} | kwargs

    with pytest.raises(ValidationFailed) as caught:
        services.site_request(requested_by=creator_of(o.project), **args)
    assert caught.value.field == field
    assert not Site.objects.exists()


def test_reasons_must_be_given() -> None:
    site = SiteFactory.create()
    with pytest.raises(ValidationFailed, match="reason must be given") as caught:
        services.site_deny(site=site, reason="  ", denied_by=creator_of(site.project))
    assert caught.value.field == "reason"


# --- projects, organisations and memberships ------------------------------------------------


def test_project_creator_is_project_admin_of_the_host_organisation() -> None:
    admin = UserFactory.create()
    project = services.project_create(
        name="Rare Diseases", created_by=admin, host_organization_name="Consortium Office"
    )

    host = project.host_organization
    assert (host.name, host.is_host, project.slug) == ("Consortium Office", True, "rare-diseases")
    assert Membership.objects.get(user=admin).organization == host
    assert selectors.is_project_admin(admin, project)


def test_project_names_and_slugs_are_unique() -> None:
    ProjectFactory.create(name="Oncology")
    with pytest.raises(AlreadyExists, match="exists already"):
        ProjectFactory.create(name="oncology")
    with pytest.raises(AlreadyExists, match="slug 'oncology'"):
        ProjectFactory.create(name="Oncology!")
    with pytest.raises(ValidationFailed, match="letter or digit"):
        ProjectFactory.create(name="!!!")
    assert Project.objects.count() == 1


def test_organisation_names_are_unique_per_project_in_any_case() -> None:
    o = OrganizationFactory.create(name="Hospital A")
    with pytest.raises(AlreadyExists):
        OrganizationFactory.create(project=o.project, name="hospital a")
    assert OrganizationFactory.create(name="Hospital A").project != o.project


def test_project_admin_role_exists_only_in_the_host_organisation() -> None:
    o = OrganizationFactory.create()
    admin = creator_of(o.project)

    with pytest.raises(ValidationFailed, match="host organisation") as caught:
        services.membership_add(
            organization=o, user=UserFactory.create(), role=Role.PROJECT_ADMIN, added_by=admin
        )
    assert caught.value.field == "role"
    with pytest.raises(ValidationFailed, match="is not one of"):
        services.membership_add(
            organization=o, user=UserFactory.create(), role="owner", added_by=admin
        )


def test_a_user_is_a_member_of_an_organisation_once() -> None:
    m = MembershipFactory.create()
    with pytest.raises(AlreadyExists, match="already a member"):
        services.membership_add(
            organization=m.organization,
            user=m.user,
            role=Role.LEAD,
            added_by=creator_of(m.organization.project),
        )


def test_the_last_project_admin_cannot_be_removed_or_demoted() -> None:
    project = ProjectFactory.create()
    admin = creator_of(project)
    only = Membership.objects.get(user=admin)

    with pytest.raises(LastProjectAdmin):
        services.membership_remove(membership=only, removed_by=admin)
    with pytest.raises(LastProjectAdmin):
        services.membership_update_role(membership=only, role=Role.MEMBER, updated_by=admin)

    second = services.membership_add(
        organization=project.host_organization,
        user=UserFactory.create(),
        role=Role.PROJECT_ADMIN,
        added_by=admin,
    )
    services.membership_remove(membership=only, removed_by=second.user)
    assert not selectors.is_project_admin(admin, project)


# --- invitations ----------------------------------------------------------------------------


def test_invitation_is_accepted_once_by_its_addressee() -> None:
    o = OrganizationFactory.create()
    invitation, token = services.invitation_create(
        organization=o, role=Role.LEAD, email="dana@example.org", invited_by=creator_of(o.project)
    )
    assert invitation.token_hash != token and token.startswith("fpi_")
    stranger = UserFactory.create(email="eve@example.org")
    dana = UserFactory.create(email="dana@example.org")

    with pytest.raises(InvitationNotForYou):
        services.invitation_accept(token=token, user=stranger)
    membership = services.invitation_accept(token=token, user=dana)

    assert (membership.organization, membership.role) == (o, Role.LEAD)
    with pytest.raises(TokenAlreadyUsed):
        services.invitation_accept(token=token, user=dana)
    with pytest.raises(TokenInvalid, match="not known"):
        services.invitation_accept(token="fpi_nope", user=dana)


def test_expired_or_revoked_invitations_are_refused() -> None:
    o = OrganizationFactory.create()
    admin = creator_of(o.project)
    user = UserFactory.create(username="sam")
    expired, token1 = services.invitation_create(
        organization=o, role=Role.MEMBER, username="sam", invited_by=admin
    )
    Invitation.objects.filter(pk=expired.pk).update(expires_at=timezone.now())
    revoked, token2 = services.invitation_create(
        organization=o, role=Role.MEMBER, username="sam", invited_by=admin
    )
    services.invitation_revoke(invitation=revoked, revoked_by=admin)

    with pytest.raises(TokenExpired):
        services.invitation_accept(token=token1, user=user)
    with pytest.raises(TokenInvalid, match="withdrawn"):
        services.invitation_accept(token=token2, user=user)
    assert not Membership.objects.filter(user=user).exists()
    with pytest.raises(ValidationFailed):
        services.invitation_create(organization=o, role=Role.MEMBER, invited_by=admin)


# --- API tokens -----------------------------------------------------------------------------


def authenticate(header: str) -> Any:
    request = Request(APIRequestFactory().get("/api/v1/", HTTP_AUTHORIZATION=header))
    return ApiTokenAuthentication().authenticate(request)


def test_api_token_authenticates_its_owner_until_revoked() -> None:
    user = UserFactory.create()
    token, key = services.api_token_create(user=user, name="ci")
    assert token.key_hash != key and key.startswith(token.prefix) and len(token.prefix) == 12

    got_user, got_token = authenticate(f"Bearer {key}")

    assert (got_user, got_token) == (user, token)
    assert ApiToken.objects.get(pk=token.pk).last_used_at is not None
    services.api_token_revoke(token=token, revoked_by=user)
    from rest_framework.exceptions import AuthenticationFailed

    with pytest.raises(AuthenticationFailed, match="revoked"):
        authenticate(f"Bearer {key}")
    with pytest.raises(AuthenticationFailed, match="not known"):
        authenticate("Token fpt_unknown")
    assert authenticate("Bearer someone-elses-jwt") is None
    assert authenticate("Basic dXNlcjpwdw==") is None


def test_expired_api_token_and_inactive_owner_are_refused() -> None:
    from rest_framework.exceptions import AuthenticationFailed

    user = UserFactory.create()
    _, key = services.api_token_create(
        user=user, name="short", expires_at=timezone.now() + dt.timedelta(hours=1)
    )
    ApiToken.objects.update(expires_at=timezone.now())
    with pytest.raises(AuthenticationFailed, match="expired"):
        authenticate(f"Bearer {key}")
    _, key2 = services.api_token_create(user=user, name="long")
    user.is_active = False
    user.save()
    with pytest.raises(AuthenticationFailed, match="inactive"):
        authenticate(f"Bearer {key2}")
    with pytest.raises(ValidationFailed, match="future"):
        services.api_token_create(user=user, name="past", expires_at=timezone.now())


# --- roles and visibility -------------------------------------------------------------------


@dataclass
class World:
    project: Project
    other: Project
    admin: Any
    org_admin_a: Any
    org_admin_b: Any
    lead: Any
    member: Any
    outsider: Any
    superuser: Any
    org_a: Any
    org_b: Any


@pytest.fixture
def each_role() -> World:
    """Project "Main" with one person per role (and a superuser, an outsider), sites in both
    of its organisations, and project "Other" beside it."""
    project = ProjectFactory.create(name="Main")
    admin = creator_of(project)
    org_a = OrganizationFactory.create(project=project, name="A")
    org_b = OrganizationFactory.create(project=project, name="B")
    people = {}
    for name, org, role in [
        ("org_admin_a", org_a, Role.ORG_ADMIN),
        ("org_admin_b", org_b, Role.ORG_ADMIN),
        ("lead", org_a, Role.LEAD),
        ("member", org_a, Role.MEMBER),
    ]:
        people[name] = UserFactory.create(username=name)
        services.membership_add(organization=org, user=people[name], role=role, added_by=admin)
    other = ProjectFactory.create(name="Other")
    SiteFactory.create(organization=org_a, name="site-a")
    SiteFactory.create(organization=org_b, name="site-b")
    SiteFactory.create(organization=OrganizationFactory.create(project=other), name="site-x")
    for org in (org_a, org_b):
        services.invitation_create(
            organization=org, role=Role.MEMBER, username="x", invited_by=admin
        )
    return World(
        project=project,
        other=other,
        admin=admin,
        outsider=UserFactory.create(username="outsider"),
        superuser=UserFactory.create(username="root", is_superuser=True, is_staff=True),
        org_a=org_a,
        org_b=org_b,
        **people,
    )


def test_roles_per_persona(each_role: World) -> None:
    p = each_role.project
    assert selectors.role_in_project(each_role.admin, p) == {Role.PROJECT_ADMIN}
    assert selectors.role_in_project(each_role.org_admin_a, p) == {Role.ORG_ADMIN}
    assert selectors.role_in_project(each_role.lead, p) == {Role.LEAD}
    assert selectors.role_in_project(each_role.outsider, p) == set()
    assert selectors.role_in_project(AnonymousUser(), p) == set()
    assert selectors.role_in_project(each_role.superuser, p) == {Role.PROJECT_ADMIN}
    assert selectors.role_in_project(each_role.admin, each_role.other) == set()

    assert selectors.is_org_admin(each_role.org_admin_a, each_role.org_a)
    assert not selectors.is_org_admin(each_role.org_admin_a, each_role.org_b)
    assert selectors.is_org_admin(each_role.admin, each_role.org_b)
    assert not selectors.is_org_admin(each_role.lead, each_role.org_a)
    assert selectors.roles_in_organization(each_role.admin, each_role.org_a) == {Role.PROJECT_ADMIN}
    assert selectors.is_org_member(each_role.member, each_role.org_a)
    assert not selectors.is_org_member(each_role.member, each_role.org_b)

    assert selectors.can_grant_role(each_role.org_admin_a, each_role.org_a, Role.LEAD)
    assert not selectors.can_grant_role(each_role.org_admin_a, each_role.org_a, Role.PROJECT_ADMIN)
    assert not selectors.can_grant_role(each_role.org_admin_a, each_role.org_b, Role.MEMBER)
    assert selectors.can_grant_role(each_role.admin, each_role.org_b, Role.ORG_ADMIN)
    site_a = Site.objects.get(name="site-a")
    assert selectors.can_manage_site(each_role.org_admin_a, site_a)
    assert not selectors.can_manage_site(each_role.org_admin_b, site_a)
    assert not selectors.can_decide_site(each_role.org_admin_a, site_a)
    assert selectors.can_decide_site(each_role.admin, site_a)

    assert selectors.can_create_project(each_role.superuser)
    assert not selectors.can_create_project(each_role.admin)
    each_role.lead.is_active = False
    assert selectors.role_in_project(each_role.lead, p) == set()


def test_nobody_sees_another_projects_objects(each_role: World) -> None:
    def names(qs: Any, field: str = "name") -> set[str]:
        return set(qs.values_list(field, flat=True))

    for persona in (each_role.admin, each_role.org_admin_b, each_role.lead, each_role.member):
        assert names(selectors.projects_visible_to(persona)) == {"Main"}
        assert names(selectors.sites_visible_to(persona)) == {"site-a", "site-b"}
        assert each_role.other.pk not in set(
            selectors.organizations_visible_to(persona).values_list("project_id", flat=True)
        )
    assert names(selectors.sites_visible_to(each_role.admin, organization=each_role.org_a)) == {
        "site-a"
    }
    assert not selectors.sites_visible_to(each_role.outsider).exists()
    assert not selectors.projects_visible_to(AnonymousUser()).exists()
    assert names(selectors.projects_visible_to(each_role.superuser)) == {"Main", "Other"}
    assert names(selectors.memberships_visible_to(each_role.member), "user__username") >= {
        "org_admin_a",
        "org_admin_b",
    }


def test_a_project_is_found_by_slug_then_by_id_and_only_when_visible(each_role: World) -> None:
    main, other = each_role.project, each_role.other
    assert selectors.project_visible_to(each_role.lead, main.slug) == main
    assert selectors.project_visible_to(each_role.lead, str(main.pk)) == main
    for hidden in (other.slug, str(other.pk)):
        assert selectors.project_visible_to(each_role.lead, hidden) is None
        assert selectors.project_visible_to(each_role.outsider, hidden) is None
        assert selectors.project_visible_to(each_role.superuser, hidden) == other
    assert selectors.project_visible_to(AnonymousUser(), main.slug) is None
    for junk in ("", "not a slug", "x" * 65, "9" * 64, "-1", f"{main.pk}.0", "\x00"):
        assert selectors.project_visible_to(each_role.superuser, junk) is None, junk
    # A slug made of digits names its own project, never the project with that id.
    Project.objects.filter(pk=other.pk).update(slug=str(main.pk))
    assert selectors.project_visible_to(each_role.superuser, str(main.pk)) == other
    assert selectors.project_visible_to(each_role.lead, str(main.pk)) == main


def test_invitations_are_seen_by_project_admins_and_their_org_admins(each_role: World) -> None:
    def orgs(user: Any) -> set[str]:
        return set(
            selectors.invitations_visible_to(user).values_list("organization__name", flat=True)
        )

    assert orgs(each_role.admin) == {"A", "B"}
    assert orgs(each_role.org_admin_a) == {"A"}
    assert orgs(each_role.org_admin_b) == {"B"}
    assert orgs(each_role.member) == set()


def test_audit_log_is_seen_by_project_admins_and_own_actions(each_role: World) -> None:
    services.api_token_create(user=each_role.member, name="mine")

    admin_sees = selectors.audit_events_visible_to(each_role.admin, project=each_role.project)
    assert admin_sees.filter(action="site.requested").count() == 2
    assert (
        not selectors.audit_events_visible_to(each_role.admin)
        .filter(project=each_role.other)
        .exists()
    )
    assert list(
        selectors.audit_events_visible_to(each_role.member).values_list("action", flat=True)
    ) == ["api_token.created"]
    assert set(
        selectors.audit_events_visible_to(each_role.admin, action="site.").values_list(
            "action", flat=True
        )
    ) == {"site.requested"}
    assert not selectors.audit_events_visible_to(each_role.outsider).exists()
