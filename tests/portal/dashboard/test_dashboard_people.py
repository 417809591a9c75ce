"""The people side in the dashboard: a new project, its settings, organisations, members and
invitations. Each page applies
the API's rule (``sites.selectors``) and records the API's audit event through the same
service; bad input shows the field's error and changes nothing."""

from __future__ import annotations

import html
import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from django.contrib.auth.models import Permission, User
from django.db.models import QuerySet
from django.test import Client

from jobs.models import JobSite
from sites.models import AuditAction, AuditEvent, Invitation, Membership, Project
from tests.portal import api_world as sw
from tests.portal import jobs_api_world as jw

pytestmark = pytest.mark.django_db


# The newest audit event the world's setting-up recorded (events are append-only): each test
# counts only the events recorded after it.
_MARK: dict[str, int] = {}


@pytest.fixture(autouse=True)
def _audit_from_here(request: pytest.FixtureRequest) -> None:
    if "sites_world" in request.fixturenames:
        request.getfixturevalue("sites_world")
    last = AuditEvent.objects.order_by("-pk").values_list("pk", flat=True).first()
    _MARK["pk"] = last or 0


def _events(**filters: object) -> QuerySet[AuditEvent]:
    return AuditEvent.objects.filter(pk__gt=_MARK.get("pk", 0), **filters)


def _client(user: User | None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def _creator(world: sw.World, persona: str = sw.LEAD) -> User:
    user = world.users[persona]
    user.user_permissions.add(Permission.objects.get(codename="add_project"))
    return User.objects.get(pk=user.pk)  # a fresh instance: permissions are cached


# --- a new project ------------------------------------------------------------------------------


def test_creating_a_project_needs_the_apis_permission(sites_world: sw.World) -> None:
    for persona in (sw.ADMIN, sw.ORG_ADMIN_A, sw.MEMBER, sw.OUTSIDER):
        client = _client(sites_world.users[persona])
        assert client.get("/new-project/").status_code == 403, persona
        refused = client.post("/new-project/", {"name": "Nope Net"})
        assert refused.status_code == 403, persona
    assert not Project.objects.filter(name="Nope Net").exists()
    anonymous = _client(None).get("/new-project/")
    assert anonymous.status_code == 302 and anonymous["Location"].startswith("/login/")


def test_a_creator_makes_a_project_and_becomes_its_admin(sites_world: sw.World) -> None:
    creator = _creator(sites_world)
    client = _client(creator)
    page = client.get("/new-project/")
    assert page.status_code == 200
    assert b'name="host_organization_name"' in page.content
    made = client.post(
        "/new-project/",
        {"name": "Eye Clinics", "description": "Retina scans", "host_organization_name": "HQ"},
    )
    project = Project.objects.get(name="Eye Clinics")
    assert made.status_code == 302 and made["Location"] == f"/projects/{project.slug}/"
    assert project.description == "Retina scans"
    assert project.host_organization.name == "HQ"
    actions = set(_events(project=project, actor=creator).values_list("action", flat=True))
    assert {
        AuditAction.PROJECT_CREATED,
        AuditAction.ORGANIZATION_CREATED,
        AuditAction.MEMBERSHIP_ADDED,
    } <= actions
    assert client.get(made["Location"]).status_code == 200


def test_a_taken_or_empty_name_is_shown_beside_the_field(sites_world: sw.World) -> None:
    client = _client(_creator(sites_world))
    before = Project.objects.count()
    events = _events().count()
    taken = client.post("/new-project/", {"name": "hospital net"})
    assert taken.status_code == 200
    assert taken.context["form"].errors["name"] == ["a project named 'hospital net' exists already"]
    assert b'id="id_name-error"' in taken.content
    symbols = client.post("/new-project/", {"name": "!!!"})
    assert "at least one letter or digit" in symbols.context["form"].errors["name"][0]
    empty = client.post("/new-project/", {"name": ""})
    assert "name" in empty.context["form"].errors
    assert Project.objects.count() == before
    assert _events().count() == events


# --- a project's settings -----------------------------------------------------------------------


def _settings(world: sw.World) -> str:
    return f"/projects/{world.project.slug}/settings/"


def test_only_project_admins_open_the_settings(sites_world: sw.World) -> None:
    url = _settings(sites_world)
    # The project admin goes last: the others' refused posts must leave the description alone.
    expected = {
        sw.ORG_ADMIN_A: 403,
        sw.LEAD: 403,
        sw.MEMBER: 403,
        sw.OUTSIDER: 404,
        sw.ADMIN: 200,
    }
    for persona, code in expected.items():
        client = _client(sites_world.users[persona])
        assert client.get(url).status_code == code, persona
        posted = client.post(url, {"description": "changed"})
        assert posted.status_code == (302 if code == 200 else code), persona
        if code != 200:
            sites_world.project.refresh_from_db()
            assert sites_world.project.description != "changed", persona
    sites_world.project.refresh_from_db()
    assert sites_world.project.description == "changed"


def test_saving_settings_records_the_apis_event(sites_world: sw.World) -> None:
    admin = sites_world.users[sw.ADMIN]
    client = _client(admin)
    page = client.get(_settings(sites_world))
    assert b'href="/projects/hospital-net/settings/"' in page.content
    saved = client.post(_settings(sites_world), {"description": "  Cardiology sites  "})
    assert saved.status_code == 302
    sites_world.project.refresh_from_db()
    assert sites_world.project.description == "Cardiology sites"
    event = _only_event(AuditAction.PROJECT_UPDATED)
    assert event.actor == admin and event.project == sites_world.project
    assert event.details == {"changed": ["description"]}


def _only_event(action: str) -> AuditEvent:
    return _events(action=action).get()


# --- organisations ------------------------------------------------------------------------------


def _orgs(world: sw.World) -> str:
    return f"/projects/{world.project.slug}/organizations/"


def test_everyone_in_the_project_sees_the_organisations(sites_world: sw.World) -> None:
    for persona in (sw.ADMIN, sw.ORG_ADMIN_A, sw.LEAD, sw.MEMBER):
        page = _client(sites_world.users[persona]).get(_orgs(sites_world))
        assert page.status_code == 200, persona
        assert b'data-organization="Org B"' in page.content
        assert (b"Add an organisation" in page.content) == (persona == sw.ADMIN), persona
    assert _client(sites_world.users[sw.OUTSIDER]).get(_orgs(sites_world)).status_code == 404


def test_only_project_admins_add_and_rename_organisations(sites_world: sw.World) -> None:
    rename = f"{_orgs(sites_world)}{sites_world.org_b.pk}/"
    for persona, code in [(sw.ORG_ADMIN_A, 403), (sw.MEMBER, 403), (sw.OUTSIDER, 404)]:
        client = _client(sites_world.users[persona])
        assert client.post(_orgs(sites_world), {"new-name": "Org C"}).status_code == code, persona
        assert client.post(rename, {"rename-name": "Org Z"}).status_code == code, persona
    assert not _events(
        action__in=[AuditAction.ORGANIZATION_CREATED, AuditAction.ORGANIZATION_UPDATED]
    ).exists()
    admin = sites_world.users[sw.ADMIN]
    client = _client(admin)
    assert client.post(_orgs(sites_world), {"new-name": "Org C"}).status_code == 302
    assert sites_world.project.organizations.filter(name="Org C").exists()
    assert _only_event(AuditAction.ORGANIZATION_CREATED).actor == admin
    assert client.post(rename, {"rename-name": "Org Z"}).status_code == 302
    sites_world.org_b.refresh_from_db()
    assert sites_world.org_b.name == "Org Z"
    event = _only_event(AuditAction.ORGANIZATION_UPDATED)
    assert event.actor == admin and event.details == {"name": ["Org B", "Org Z"]}


def test_a_taken_organisation_name_is_shown_and_nothing_changes(sites_world: sw.World) -> None:
    client = _client(sites_world.users[sw.ADMIN])
    taken = client.post(_orgs(sites_world), {"new-name": "org a"})
    assert taken.status_code == 200
    assert "already has an organisation named" in taken.context["new_form"].errors["name"][0]
    renamed = client.post(f"{_orgs(sites_world)}{sites_world.org_b.pk}/", {"rename-name": "Org A"})
    assert "already has an organisation named" in renamed.context["rename_form"].errors["name"][0]
    assert b'id="id_rename-name-error"' in renamed.content
    sites_world.org_b.refresh_from_db()
    assert sites_world.org_b.name == "Org B"
    assert sites_world.project.organizations.count() == 3
    assert not _events(action__startswith="organization.").exists()


# --- members ------------------------------------------------------------------------------------


def _members(world: sw.World) -> str:
    return f"/projects/{world.project.slug}/members/"


def _add(org: int, person: str, role: str) -> dict[str, object]:
    return {"add-organization": org, "add-person": person, "add-role": role}


def test_members_are_listed_and_only_managers_get_the_forms(sites_world: sw.World) -> None:
    for persona in (sw.ADMIN, sw.ORG_ADMIN_A, sw.LEAD, sw.MEMBER):
        page = _client(sites_world.users[persona]).get(_members(sites_world))
        assert page.status_code == 200, persona
        assert b'data-member="member" data-organization="Org A"' in page.content
        manager = persona in (sw.ADMIN, sw.ORG_ADMIN_A)
        assert (b"Add member" in page.content) == manager, persona
    assert _client(sites_world.users[sw.OUTSIDER]).get(_members(sites_world)).status_code == 404


def test_an_org_admin_offers_only_the_roles_they_may_give(sites_world: sw.World) -> None:
    page = _client(sites_world.users[sw.ORG_ADMIN_A]).get(_members(sites_world))
    form = page.context["add_form"]
    assert [org.name for org in form.fields["organization"].queryset] == ["Org A"]
    assert [value for value, _ in form.fields["role"].choices] == ["org_admin", "lead", "member"]
    rows = {row.membership.user.username: row for row in page.context["members"]}
    assert rows["member"].can_manage and not rows["org_admin_b"].can_manage
    assert not rows["admin"].can_manage


def test_adding_a_member_checks_the_apis_rules(sites_world: sw.World) -> None:
    url = _members(sites_world)
    org_a = sites_world.org_a.pk
    member = _client(sites_world.users[sw.MEMBER])
    assert member.post(url, _add(org_a, "org_admin_b", "member")).status_code == 403
    org_admin = sites_world.users[sw.ORG_ADMIN_A]
    client = _client(org_admin)
    # Another organisation's or a higher role: not offered, so a field error; nothing changes.
    other = client.post(url, _add(sites_world.org_b.pk, "lead", "member"))
    assert "organization" in other.context["add_form"].errors
    higher = client.post(url, _add(org_a, "org_admin_b", "project_admin"))
    assert "role" in higher.context["add_form"].errors
    outside = client.post(url, _add(org_a, "outsider@example.org", "member"))
    assert "nobody in this project" in outside.context["add_form"].errors["person"][0]
    again = client.post(url, _add(org_a, "lead", "member"))
    assert "already a member" in again.context["add_form"].errors["person"][0]
    assert not _events(action=AuditAction.MEMBERSHIP_ADDED).exists()
    # By email, as by username.
    added = client.post(url, _add(org_a, "ORG_ADMIN_B@example.org", "lead"))
    assert added.status_code == 302
    event = _only_event(AuditAction.MEMBERSHIP_ADDED)
    assert event.actor == org_admin
    assert event.details == {"user": "org_admin_b", "organization": "Org A", "role": "lead"}


def test_changing_a_role_and_removing_a_member(sites_world: sw.World) -> None:
    url = _members(sites_world)
    membership = sites_world.member_membership
    role_url = f"{url}{membership.pk}/role/"
    remove_url = f"{url}{membership.pk}/remove/"
    for persona, code in [(sw.ORG_ADMIN_B, 403), (sw.LEAD, 403), (sw.OUTSIDER, 404)]:
        client = _client(sites_world.users[persona])
        assert client.post(role_url, {"role": "lead"}).status_code == code, persona
        assert client.post(remove_url).status_code == code, persona
    org_admin = sites_world.users[sw.ORG_ADMIN_A]
    client = _client(org_admin)
    assert client.post(role_url, {"role": "project_admin"}).status_code == 403
    assert client.post(role_url, {"role": "lead"}).status_code == 302
    event = _only_event(AuditAction.MEMBERSHIP_ROLE_CHANGED)
    assert event.actor == org_admin and event.details["previous_role"] == "member"
    assert client.post(remove_url).status_code == 302
    assert not Membership.objects.filter(pk=membership.pk).exists()
    assert _only_event(AuditAction.MEMBERSHIP_REMOVED).actor == org_admin


def test_the_last_project_admin_stays_with_the_reason_beside_the_row(
    sites_world: sw.World,
) -> None:
    admin = sites_world.users[sw.ADMIN]
    mine = Membership.objects.get(user=admin, organization=sites_world.host)
    client = _client(admin)
    removed = client.post(f"{_members(sites_world)}{mine.pk}/remove/")
    assert removed.status_code == 200
    assert f'id="member-error-{mine.pk}"'.encode() in removed.content
    assert b"is the last project admin of" in removed.content
    demoted = client.post(f"{_members(sites_world)}{mine.pk}/role/", {"role": "member"})
    assert b"is the last project admin of" in demoted.content
    mine.refresh_from_db()
    assert mine.role == "project_admin"
    assert not _events(action__startswith="membership.").exists()


# --- invitations --------------------------------------------------------------------------------


def _invitations(world: sw.World) -> str:
    return f"/projects/{world.project.slug}/invitations/"


def _invite(org: int, email: str, role: str) -> dict[str, object]:
    return {"invite-organization": org, "invite-email": email, "invite-role": role}


def test_invitations_are_for_managers(sites_world: sw.World) -> None:
    url = _invitations(sites_world)
    for persona, code in [(sw.LEAD, 403), (sw.MEMBER, 403), (sw.OUTSIDER, 404)]:
        client = _client(sites_world.users[persona])
        assert client.get(url).status_code == code, persona
        posted = client.post(url, _invite(sites_world.org_a.pk, "x@example.org", "member"))
        assert posted.status_code == code, persona
    page = _client(sites_world.users[sw.ORG_ADMIN_A]).get(url)
    assert page.status_code == 200
    assert b'data-invitation="invitee@example.org"' in page.content
    assert _client(sites_world.users[sw.ORG_ADMIN_B]).get(url).context["pending"] == []
    assert Invitation.objects.count() == 1


def test_bad_invitations_show_the_field_and_change_nothing(sites_world: sw.World) -> None:
    client = _client(sites_world.users[sw.ORG_ADMIN_A])
    url = _invitations(sites_world)
    bad_email = client.post(url, _invite(sites_world.org_a.pk, "not-an-email", "member"))
    assert bad_email.status_code == 200 and "email" in bad_email.context["form"].errors
    assert b'id="id_invite-email-error"' in bad_email.content
    other_org = client.post(url, _invite(sites_world.org_b.pk, "x@example.org", "member"))
    assert "organization" in other_org.context["form"].errors
    assert Invitation.objects.count() == 1
    assert not _events(action=AuditAction.INVITATION_CREATED).exists()


def _link_of(page: str) -> str:
    found = re.search(r'id="invitation-link"[^>]* value="([^"]+)"', page)
    assert found is not None
    return html.unescape(found.group(1))


def test_an_invitation_is_sent_shown_once_and_accepted(sites_world: sw.World) -> None:
    org_admin = sites_world.users[sw.ORG_ADMIN_A]
    sent = _client(org_admin).post(
        _invitations(sites_world), _invite(sites_world.org_a.pk, "newcomer@example.org", "lead")
    )
    assert sent.status_code == 200
    assert sent["Cache-Control"] == "no-store"
    assert _only_event(AuditAction.INVITATION_CREATED).actor == org_admin
    link = urlsplit(_link_of(sent.content.decode()))
    assert link.path == "/invitations/accept/"
    accept_url = f"{link.path}?{link.query}"
    token = parse_qs(link.query)["token"][0]
    # Someone else: shown what it is, but refused; nothing changes.
    outsider = _client(sites_world.users[sw.OUTSIDER])
    refused = outsider.post(link.path, {"token": token})
    assert refused.status_code == 200
    assert "addressed to another email address" in refused.content.decode()
    anonymous = _client(None).get(accept_url)
    assert anonymous.status_code == 302 and anonymous["Location"].startswith("/login/")
    newcomer = _client(sites_world.newcomer)
    shown = newcomer.get(accept_url)
    assert shown.status_code == 200 and shown["Cache-Control"] == "no-store"
    assert b"Org A" in shown.content and b"Hospital Net" in shown.content
    accepted = newcomer.post(link.path, {"token": token})
    assert accepted.status_code == 302
    assert accepted["Location"] == f"/projects/{sites_world.project.slug}/"
    membership = Membership.objects.get(user=sites_world.newcomer)
    assert membership.organization == sites_world.org_a and membership.role == "lead"
    assert _only_event(AuditAction.INVITATION_ACCEPTED).actor == sites_world.newcomer
    again = newcomer.get(accept_url)
    assert b"This invitation is accepted" in again.content


def test_an_unknown_token_says_so(sites_world: sw.World) -> None:
    client = _client(sites_world.newcomer)
    page = client.get("/invitations/accept/?token=fpi_nothing")
    assert b"holds no invitation we know of" in page.content
    bare = client.get("/invitations/accept/")
    assert b"holds no invitation we know of" in bare.content
    assert b"form-errors" not in bare.content
    posted = client.post("/invitations/accept/", {"token": "fpi_nothing"})
    assert "this invitation token is not known" in posted.content.decode()
    assert not Membership.objects.filter(user=sites_world.newcomer).exists()


def test_withdrawing_an_invitation(sites_world: sw.World) -> None:
    invitation = sites_world.invitation_a
    url = f"{_invitations(sites_world)}{invitation.pk}/revoke/"
    for persona, code in [(sw.ORG_ADMIN_B, 404), (sw.LEAD, 404), (sw.OUTSIDER, 404)]:
        assert _client(sites_world.users[persona]).post(url).status_code == code, persona
    org_admin = sites_world.users[sw.ORG_ADMIN_A]
    assert _client(org_admin).post(url).status_code == 302
    invitation.refresh_from_db()
    assert invitation.revoked_at is not None
    assert _only_event(AuditAction.INVITATION_REVOKED).actor == org_admin
    page = _client(org_admin).get(_invitations(sites_world))
    assert page.context["pending"] == []


# --- the home page ------------------------------------------------------------------------------


def _next_steps(client: Client) -> list[str]:
    page = client.get("/")
    assert page.status_code == 200
    return [step.text for step in page.context["next_steps"]]


def test_home_lists_invitations_and_sites_waiting(sites_world: sw.World) -> None:
    newcomer = User.objects.get(pk=sites_world.newcomer.pk)
    newcomer.email = "Invitee@example.org"  # the world's invitation, in another case
    newcomer.save(update_fields=["email"])
    steps = _next_steps(_client(newcomer))
    assert steps == [
        "You are invited to join Org A in Hospital Net as member: open the link you were "
        "sent to accept."
    ]
    admin_page = _client(sites_world.users[sw.ADMIN]).get("/")
    assert [(s.text, s.url) for s in admin_page.context["next_steps"]] == [
        ("1 site of Hospital Net waits for your approval", "/projects/hospital-net/sites/")
    ]
    assert b"Create a project" not in admin_page.content
    assert _next_steps(_client(sites_world.users[sw.MEMBER])) == []
    creator_page = _client(_creator(sites_world)).get("/")
    assert b'href="/new-project/"' in creator_page.content
    sites_world.invitation_a.revoked_at = sites_world.invitation_a.expires_at
    sites_world.invitation_a.save(update_fields=["revoked_at"])
    assert _next_steps(_client(newcomer)) == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("eager_celery", "media")
def test_home_lists_job_decisions_waiting(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path, start=False)
    org_admin = _client(world.users[jw.ORG_ADMIN])
    steps = org_admin.get("/").context["next_steps"]
    waiting = JobSite.objects.filter(
        decision="pending", site__organization__memberships__user=world.users[jw.ORG_ADMIN]
    ).count()
    assert waiting > 0
    assert [s.url for s in steps] == [f"/projects/{world.project.slug}/approvals/"]
    assert steps[0].text.startswith(f"{waiting} job decision")
    assert _next_steps(_client(world.users[jw.MEMBER])) == []
