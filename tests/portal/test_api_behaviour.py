"""What people see and get from the sites API beyond yes/no: who may create projects, what
each list holds, invitations end to end, the rules on roles, and the errors for bad input."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import Group, Permission
from rest_framework.test import APIClient

from sites import services
from sites.models import Invitation, Membership, Project, Role, Site
from tests.portal.api_world import (
    ADMIN,
    LEAD,
    MEMBER,
    ORG_ADMIN_A,
    ORG_ADMIN_B,
    OUTSIDER,
    World,
    build_world,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def world() -> World:
    return build_world()


def p(world: World) -> str:
    return f"/api/v1/projects/{world.project.slug}"


def results(response: Any) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.content[:300]
    found: list[dict[str, Any]] = response.json()["results"]
    return found


def error(response: Any) -> tuple[int, str, str | None]:
    body = response.json()
    return response.status_code, body["code"], body.get("field")


# --- projects ------------------------------------------------------------------------------


def test_a_superuser_creates_a_project_and_becomes_its_admin(world: World) -> None:
    world.users[MEMBER].is_superuser = True
    world.users[MEMBER].save()

    made = world.call(MEMBER, "POST", "/api/v1/projects/", {"name": "Cardio Net"})

    assert made.status_code == 201, made.json()
    body = made.json()
    assert (body["name"], body["slug"]) == ("Cardio Net", "cardio-net")
    assert "BEGIN CERTIFICATE" in body["ca_certificate_pem"] and len(body["ca_fingerprint"]) == 64
    assert "project_admin" in body["my_roles"]
    project = Project.objects.get(slug="cardio-net")
    assert Membership.objects.filter(
        user=world.users[MEMBER], organization__project=project, role=Role.PROJECT_ADMIN
    ).exists()


def test_the_add_project_permission_through_a_group_allows_creating(world: World) -> None:
    creators = Group.objects.create(name="project creators")
    creators.permissions.add(Permission.objects.get(codename="add_project"))
    world.users[LEAD].groups.add(creators)

    made = world.call(LEAD, "POST", "/api/v1/projects/", {"name": "Cardio Net", "description": "x"})
    taken = world.call(LEAD, "POST", "/api/v1/projects/", {"name": "cardio net"})

    assert made.status_code == 201
    assert error(taken) == (409, "already_exists", "name")


def test_without_the_permission_creating_a_project_is_refused(world: World) -> None:
    refused = world.call(ADMIN, "POST", "/api/v1/projects/", {"name": "Cardio Net"})

    assert error(refused) == (403, "permission_denied", None)
    assert "sites.add_project" in refused.json()["message"]
    assert not Project.objects.filter(name="Cardio Net").exists()


def test_each_person_lists_only_their_projects(world: World) -> None:
    assert [x["slug"] for x in results(world.call(ADMIN, "GET", "/api/v1/projects/"))] == [
        world.project.slug
    ]
    outsider = results(world.call(OUTSIDER, "GET", "/api/v1/projects/"))
    assert [x["slug"] for x in outsider] == [world.other.slug]
    assert outsider[0]["my_roles"] == ["project_admin"]
    lead = results(world.call(LEAD, "GET", "/api/v1/projects/"))
    assert lead[0]["my_roles"] == ["lead"]


def test_an_unknown_project_and_an_invisible_one_look_the_same(world: World) -> None:
    hidden = world.call(OUTSIDER, "GET", f"{p(world)}/sites/")
    unknown = world.call(OUTSIDER, "GET", "/api/v1/projects/no-such-project/sites/")
    odd = world.call(OUTSIDER, "GET", "/api/v1/projects/not%20a%20slug/sites/")

    assert error(hidden) == error(unknown) == error(odd) == (404, "not_found", None)
    assert hidden.json()["message"].replace(world.project.slug, "X") == unknown.json()[
        "message"
    ].replace("no-such-project", "X")


def test_the_project_name_cannot_be_changed(world: World) -> None:
    changed = world.call(ADMIN, "PATCH", f"{p(world)}/", {"name": "Renamed", "description": "d"})

    assert changed.status_code == 200
    assert (changed.json()["name"], changed.json()["description"]) == ("Hospital Net", "d")


# --- lists hold what the caller may see ----------------------------------------------------


def test_lists_inside_a_project(world: World) -> None:
    orgs = results(world.call(MEMBER, "GET", f"{p(world)}/organizations/"))
    assert sorted(o["name"] for o in orgs) == ["Hospital Net", "Org A", "Org B"]
    assert [o["name"] for o in orgs if o["is_host"]] == ["Hospital Net"]

    sites = results(world.call(MEMBER, "GET", f"{p(world)}/sites/"))
    assert sorted(x["name"] for x in sites) == ["site-a", "site-b", "site-r"]  # not site-q
    requested = results(world.call(MEMBER, "GET", f"{p(world)}/sites/?state=requested"))
    assert [x["name"] for x in requested] == ["site-r"]
    in_b = results(world.call(MEMBER, "GET", f"{p(world)}/sites/?organization={world.org_b.pk}"))
    assert [x["name"] for x in in_b] == ["site-b"]

    members = results(
        world.call(MEMBER, "GET", f"{p(world)}/memberships/?organization={world.org_a.pk}")
    )
    assert sorted((m["username"], m["role"]) for m in members) == [
        ("lead", "lead"),
        ("member", "member"),
        ("org_admin_a", "org_admin"),
    ]
    certs = results(world.call(MEMBER, "GET", f"{p(world)}/certificates/?revoked=false"))
    assert sorted(c["site_name"] for c in certs) == ["site-a", "site-b"]
    assert results(world.call(MEMBER, "GET", f"{p(world)}/certificates/?revoked=true")) == []


def test_invitations_are_seen_by_the_admins_who_manage_them(world: World) -> None:
    assert [i["email"] for i in results(world.call(ADMIN, "GET", f"{p(world)}/invitations/"))] == [
        "invitee@example.org"
    ]
    assert len(results(world.call(ORG_ADMIN_A, "GET", f"{p(world)}/invitations/"))) == 1
    assert results(world.call(ORG_ADMIN_B, "GET", f"{p(world)}/invitations/")) == []
    assert results(world.call(LEAD, "GET", f"{p(world)}/invitations/")) == []


def test_lists_are_paginated(world: World) -> None:
    page = world.call(MEMBER, "GET", f"{p(world)}/sites/?limit=2&offset=1")

    assert page.json()["count"] == 3
    assert len(page.json()["results"]) == 2
    assert page.json()["previous"] is not None


# --- invitations end to end ----------------------------------------------------------------


def test_an_invitee_accepts_and_joins_with_the_role(world: World) -> None:
    made = world.call(
        ORG_ADMIN_A,
        "POST",
        f"{p(world)}/invitations/",
        {"organization": world.org_a.pk, "username": "newcomer", "role": "lead"},
    )
    assert made.status_code == 201 and made["Cache-Control"] == "no-store"
    token = made.json()["token"]
    assert made.json()["status"] == "pending" and token.startswith("fpi_")
    shown = world.call(ADMIN, "GET", f"{p(world)}/invitations/{made.json()['id']}/")
    assert "token" not in shown.json()

    not_for_them = world.call(LEAD, "POST", "/api/v1/invitations/accept/", {"token": token})
    assert error(not_for_them) == (403, "invitation_not_for_you", None)

    _, key = services.api_token_create(user=world.newcomer, name="n")
    auth = {"Authorization": f"Bearer {key}"}
    accepted = world.call(
        "newcomer", "POST", "/api/v1/invitations/accept/", {"token": token}, **auth
    )
    assert accepted.status_code == 201, accepted.json()
    assert (accepted.json()["username"], accepted.json()["role"]) == ("newcomer", "lead")
    assert accepted.json()["organization"] == world.org_a.pk
    projects = world.call("newcomer", "GET", "/api/v1/projects/", **auth)
    assert [x["slug"] for x in results(projects)] == [world.project.slug]

    again = world.call("newcomer", "POST", "/api/v1/invitations/accept/", {"token": token}, **auth)
    assert error(again) == (410, "token_used", "token")
    status = world.call(ADMIN, "GET", f"{p(world)}/invitations/{made.json()['id']}/")
    assert status.json()["status"] == "accepted" and status.json()["accepted_by"] == "newcomer"


def test_a_revoked_invitation_cannot_be_accepted(world: World) -> None:
    invitation, token = services.invitation_create(
        organization=world.org_a, role=Role.MEMBER, invited_by=world.users[ADMIN], username="lead"
    )
    Membership.objects.filter(user=world.users[LEAD]).delete()
    revoked = world.call(ORG_ADMIN_A, "POST", f"{p(world)}/invitations/{invitation.pk}/revoke/")
    assert revoked.json()["status"] == "revoked"

    refused = world.call(LEAD, "POST", "/api/v1/invitations/accept/", {"token": token})

    assert error(refused) == (400, "token_invalid", "token")
    again = world.call(ORG_ADMIN_A, "POST", f"{p(world)}/invitations/{invitation.pk}/revoke/")
    assert error(again) == (409, "invalid_transition", None)


def test_an_invitation_needs_an_addressee(world: World) -> None:
    refused = world.call(
        ADMIN, "POST", f"{p(world)}/invitations/", {"organization": world.org_a.pk, "role": "lead"}
    )

    assert error(refused) == (400, "invalid", "email")
    assert Invitation.objects.count() == 1


# --- roles ---------------------------------------------------------------------------------


def test_an_org_admin_cannot_make_a_project_admin_nor_act_in_another_org(world: World) -> None:
    body = {"organization": world.org_a.pk, "username": ORG_ADMIN_B, "role": "project_admin"}
    assert error(world.call(ORG_ADMIN_A, "POST", f"{p(world)}/memberships/", body))[0] == 403
    # The project admin may, but only in the host organisation.
    assert error(world.call(ADMIN, "POST", f"{p(world)}/memberships/", body)) == (
        400,
        "invalid",
        "role",
    )
    in_host = {**body, "organization": world.host.pk}
    assert world.call(ADMIN, "POST", f"{p(world)}/memberships/", in_host).status_code == 201

    in_b = {"organization": world.org_b.pk, "username": LEAD, "role": "member"}
    assert error(world.call(ORG_ADMIN_A, "POST", f"{p(world)}/memberships/", in_b))[0] == 403
    host_admin = Membership.objects.get(user=world.users[ADMIN])
    path = f"{p(world)}/memberships/{host_admin.pk}/"
    assert error(world.call(ORG_ADMIN_A, "DELETE", path))[0] == 403


def test_the_last_project_admin_cannot_leave(world: World) -> None:
    own = Membership.objects.get(user=world.users[ADMIN])
    path = f"{p(world)}/memberships/{own.pk}/"

    assert error(world.call(ADMIN, "DELETE", path)) == (409, "last_project_admin", None)
    assert error(world.call(ADMIN, "PATCH", path, {"role": "member"})) == (
        409,
        "last_project_admin",
        None,
    )
    assert Membership.objects.filter(pk=own.pk, role=Role.PROJECT_ADMIN).exists()


def test_adding_someone_twice_or_an_unknown_user(world: World) -> None:
    path = f"{p(world)}/memberships/"
    twice = {"organization": world.org_a.pk, "username": "lead", "role": "member"}
    unknown = {"organization": world.org_a.pk, "username": "nobody", "role": "member"}
    other_org = {"organization": world.site_q.site.organization.pk, "username": "lead"}

    assert error(world.call(ADMIN, "POST", path, twice)) == (409, "already_exists", "user")
    assert error(world.call(ADMIN, "POST", path, unknown)) == (400, "invalid", "username")
    refused = world.call(ADMIN, "POST", path, {**other_org, "role": "member"})
    assert error(refused) == (400, "invalid", "organization")


@pytest.mark.parametrize("adder", [ORG_ADMIN_A, ADMIN])
def test_people_outside_the_project_are_invited_not_added(world: World, adder: str) -> None:
    """An account outside the project (here: the other project's owner, and one in no
    project) cannot be given a role directly, and the answer is the one a name nobody has
    gets: the API does not tell which accounts exist."""
    path = f"{p(world)}/memberships/"
    answers = []
    for username in (OUTSIDER, "newcomer", "nobody-at-all"):
        body = {"organization": world.org_a.pk, "username": username, "role": "member"}
        response = world.call(adder, "POST", path, body)
        assert error(response) == (400, "invalid", "username")
        answers.append(response.json()["message"].replace(username, "<name>"))
    assert len(set(answers)) == 1
    assert "invite" in answers[0]
    assert (
        not Membership.objects.filter(user__username__in=[OUTSIDER, "newcomer"])
        .filter(organization__project=world.project)
        .exists()
    )
    # Someone already in the project (org B) may be given a role in org A.
    colleague = {"organization": world.org_a.pk, "username": ORG_ADMIN_B, "role": "member"}
    assert world.call(adder, "POST", path, colleague).status_code == 201


def test_no_endpoint_lists_accounts_outside_the_callers_projects(world: World) -> None:
    """The API renders JSON only (a browsable form would list every account in a select)."""
    for path in (f"{p(world)}/memberships/", f"{p(world)}/invitations/"):
        for accept in ("text/html", "application/json"):
            response = world.call(ORG_ADMIN_A, "GET", path, Accept=accept)
            assert response["Content-Type"].startswith("application/json"), path
            assert OUTSIDER.encode() not in response.content


# --- sites ---------------------------------------------------------------------------------


def test_site_decisions_follow_the_state_machine(world: World) -> None:
    site = f"{p(world)}/sites/{world.site_requested.pk}"

    assert world.call(ADMIN, "POST", f"{site}/approve/").status_code == 200
    assert error(world.call(ADMIN, "POST", f"{site}/approve/")) == (
        409,
        "invalid_transition",
        None,
    )
    assert error(world.call(ADMIN, "POST", f"{site}/revoke/", {"reason": "x"}))[1] == (
        "invalid_transition"
    )
    denied = world.call(ADMIN, "POST", f"{site}/deny/", {"reason": "not a hospital"})
    assert (denied.json()["state"], denied.json()["state_reason"]) == ("denied", "not a hospital")
    assert error(world.call(ADMIN, "POST", f"{site}/enrolment-token/"))[1] == "invalid_transition"
    assert error(world.call(ADMIN, "PATCH", f"{site}/", {"contact_email": "a@b.org"}))[0] == 409


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "Not A DNS Label", "contact_email": "a@b.org"}, "name"),
        ({"name": "site-a", "contact_email": "a@b.org"}, "name"),  # taken
        ({"name": "site-x", "contact_email": "not an email"}, "contact_email"),
        ({"name": "site-x", "contact_email": "a@b.org", "resources": {"GPUs": 1}}, "resources"),
        ({"name": "site-x", "contact_email": "a@b.org", "resources": {"gpus": -1}}, "resources"),
        ({"name": "site-x", "contact_email": "a@b.org", "resources": [1]}, "resources"),
        # PostgreSQL's jsonb cannot store NUL: refused as input, not a 500.
        ({"name": "site-x", "contact_email": "a@b.org", "resources": {"os": "a\x00"}}, "resources"),
        ({"contact_email": "a@b.org"}, "name"),
    ],
)
def test_a_bad_site_request_names_the_field(world: World, body: dict[str, Any], field: str) -> None:
    before = Site.objects.count()

    refused = world.call(
        ORG_ADMIN_A, "POST", f"{p(world)}/sites/", {"organization": world.org_a.pk, **body}
    )

    assert refused.status_code in (400, 409)
    assert refused.json()["field"] == field
    assert Site.objects.count() == before


def test_deny_and_revoke_need_a_reason(world: World) -> None:
    site = f"{p(world)}/sites/{world.site_requested.pk}"

    assert error(world.call(ADMIN, "POST", f"{site}/deny/", {})) == (400, "invalid", "reason")
    assert error(world.call(ADMIN, "POST", f"{site}/deny/", {"reason": "  "}))[2] == "reason"


def test_whoami_tells_the_agent_who_it_is(world: World) -> None:
    path = "/api/v1/agent/whoami/"

    me = world.call("site_b_agent", "GET", path)

    assert me.status_code == 200
    body = me.json()
    assert (body["site"], body["organization"], body["project"], body["state"]) == (
        "site-b",
        "Org B",
        world.project.slug,
        "enrolled",
    )
    assert body["certificate_serial"] == world.site_b.certificate.serial
    assert body["last_heartbeat"] is not None


def test_malformed_json_is_a_400(world: World) -> None:
    response = APIClient().generic(
        "POST",
        f"{p(world)}/sites/",
        data=b"{not json",
        content_type="application/json",
        headers={"Authorization": f"Bearer {world.keys[ADMIN]}"},
    )

    assert error(response)[:2] == (400, "parse_error")
