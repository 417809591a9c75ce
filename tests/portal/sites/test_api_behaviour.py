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
)

pytestmark = pytest.mark.django_db


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


def test_a_superuser_creates_a_project_and_becomes_its_admin(sites_world: World) -> None:
    sites_world.users[MEMBER].is_superuser = True
    sites_world.users[MEMBER].save()

    made = sites_world.call(MEMBER, "POST", "/api/v1/projects/", {"name": "Cardio Net"})

    assert made.status_code == 201, made.json()
    body = made.json()
    assert (body["name"], body["slug"]) == ("Cardio Net", "cardio-net")
    assert "BEGIN CERTIFICATE" in body["ca_certificate_pem"] and len(body["ca_fingerprint"]) == 64
    assert "project_admin" in body["my_roles"]
    project = Project.objects.get(slug="cardio-net")
    assert Membership.objects.filter(
        user=sites_world.users[MEMBER], organization__project=project, role=Role.PROJECT_ADMIN
    ).exists()


def test_the_add_project_permission_through_a_group_allows_creating(sites_world: World) -> None:
    creators = Group.objects.create(name="project creators")
    creators.permissions.add(Permission.objects.get(codename="add_project"))
    sites_world.users[LEAD].groups.add(creators)

    made = sites_world.call(
        LEAD, "POST", "/api/v1/projects/", {"name": "Cardio Net", "description": "x"}
    )
    taken = sites_world.call(LEAD, "POST", "/api/v1/projects/", {"name": "cardio net"})

    assert made.status_code == 201
    assert error(taken) == (409, "already_exists", "name")


def test_without_the_permission_creating_a_project_is_refused(sites_world: World) -> None:
    refused = sites_world.call(ADMIN, "POST", "/api/v1/projects/", {"name": "Cardio Net"})

    assert error(refused) == (403, "permission_denied", None)
    assert "sites.add_project" in refused.json()["message"]
    assert not Project.objects.filter(name="Cardio Net").exists()


def test_each_person_lists_only_their_projects(sites_world: World) -> None:
    assert [x["slug"] for x in results(sites_world.call(ADMIN, "GET", "/api/v1/projects/"))] == [
        sites_world.project.slug
    ]
    outsider = results(sites_world.call(OUTSIDER, "GET", "/api/v1/projects/"))
    assert [x["slug"] for x in outsider] == [sites_world.other.slug]
    assert outsider[0]["my_roles"] == ["project_admin"]
    lead = results(sites_world.call(LEAD, "GET", "/api/v1/projects/"))
    assert lead[0]["my_roles"] == ["lead"]


def test_an_unknown_project_and_an_invisible_one_look_the_same(sites_world: World) -> None:
    hidden = sites_world.call(OUTSIDER, "GET", f"{p(sites_world)}/sites/")
    unknown = sites_world.call(OUTSIDER, "GET", "/api/v1/projects/no-such-project/sites/")
    odd = sites_world.call(OUTSIDER, "GET", "/api/v1/projects/not%20a%20slug/sites/")

    assert error(hidden) == error(unknown) == error(odd) == (404, "not_found", None)
    assert hidden.json()["message"].replace(sites_world.project.slug, "X") == unknown.json()[
        "message"
    ].replace("no-such-project", "X")


def test_the_project_name_cannot_be_changed(sites_world: World) -> None:
    changed = sites_world.call(
        ADMIN, "PATCH", f"{p(sites_world)}/", {"name": "Renamed", "description": "d"}
    )

    assert changed.status_code == 200
    assert (changed.json()["name"], changed.json()["description"]) == ("Hospital Net", "d")


# --- lists hold what the caller may see ----------------------------------------------------


def test_lists_inside_a_project(sites_world: World) -> None:
    orgs = results(sites_world.call(MEMBER, "GET", f"{p(sites_world)}/organizations/"))
    assert sorted(o["name"] for o in orgs) == ["Hospital Net", "Org A", "Org B"]
    assert [o["name"] for o in orgs if o["is_host"]] == ["Hospital Net"]

    sites = results(sites_world.call(MEMBER, "GET", f"{p(sites_world)}/sites/"))
    assert sorted(x["name"] for x in sites) == ["site-a", "site-b", "site-r"]  # not site-q
    requested = results(sites_world.call(MEMBER, "GET", f"{p(sites_world)}/sites/?state=requested"))
    assert [x["name"] for x in requested] == ["site-r"]
    in_b = results(
        sites_world.call(
            MEMBER, "GET", f"{p(sites_world)}/sites/?organization={sites_world.org_b.pk}"
        )
    )
    assert [x["name"] for x in in_b] == ["site-b"]

    members = results(
        sites_world.call(
            MEMBER, "GET", f"{p(sites_world)}/memberships/?organization={sites_world.org_a.pk}"
        )
    )
    assert sorted((m["username"], m["role"]) for m in members) == [
        ("lead", "lead"),
        ("member", "member"),
        ("org_admin_a", "org_admin"),
    ]
    certs = results(
        sites_world.call(MEMBER, "GET", f"{p(sites_world)}/certificates/?revoked=false")
    )
    assert sorted(c["site_name"] for c in certs) == ["site-a", "site-b"]
    assert (
        results(sites_world.call(MEMBER, "GET", f"{p(sites_world)}/certificates/?revoked=true"))
        == []
    )


def test_invitations_are_seen_by_the_admins_who_manage_them(sites_world: World) -> None:
    assert [
        i["email"]
        for i in results(sites_world.call(ADMIN, "GET", f"{p(sites_world)}/invitations/"))
    ] == ["invitee@example.org"]
    assert len(results(sites_world.call(ORG_ADMIN_A, "GET", f"{p(sites_world)}/invitations/"))) == 1
    assert results(sites_world.call(ORG_ADMIN_B, "GET", f"{p(sites_world)}/invitations/")) == []
    assert results(sites_world.call(LEAD, "GET", f"{p(sites_world)}/invitations/")) == []


def test_lists_are_paginated(sites_world: World) -> None:
    page = sites_world.call(MEMBER, "GET", f"{p(sites_world)}/sites/?limit=2&offset=1")

    assert page.json()["count"] == 3
    assert len(page.json()["results"]) == 2
    assert page.json()["previous"] is not None


# --- invitations end to end ----------------------------------------------------------------


def test_an_invitee_accepts_and_joins_with_the_role(sites_world: World) -> None:
    made = sites_world.call(
        ORG_ADMIN_A,
        "POST",
        f"{p(sites_world)}/invitations/",
        {"organization": sites_world.org_a.pk, "username": "newcomer", "role": "lead"},
    )
    assert made.status_code == 201 and made["Cache-Control"] == "no-store"
    token = made.json()["token"]
    assert made.json()["status"] == "pending" and token.startswith("fpi_")
    shown = sites_world.call(ADMIN, "GET", f"{p(sites_world)}/invitations/{made.json()['id']}/")
    assert "token" not in shown.json()

    not_for_them = sites_world.call(LEAD, "POST", "/api/v1/invitations/accept/", {"token": token})
    assert error(not_for_them) == (403, "invitation_not_for_you", None)

    _, key = services.api_token_create(user=sites_world.newcomer, name="n")
    auth = {"Authorization": f"Bearer {key}"}
    accepted = sites_world.call(
        "newcomer", "POST", "/api/v1/invitations/accept/", {"token": token}, **auth
    )
    assert accepted.status_code == 201, accepted.json()
    assert (accepted.json()["username"], accepted.json()["role"]) == ("newcomer", "lead")
    assert accepted.json()["organization"] == sites_world.org_a.pk
    projects = sites_world.call("newcomer", "GET", "/api/v1/projects/", **auth)
    assert [x["slug"] for x in results(projects)] == [sites_world.project.slug]

    again = sites_world.call(
        "newcomer", "POST", "/api/v1/invitations/accept/", {"token": token}, **auth
    )
    assert error(again) == (410, "token_used", "token")
    status = sites_world.call(ADMIN, "GET", f"{p(sites_world)}/invitations/{made.json()['id']}/")
    assert status.json()["status"] == "accepted" and status.json()["accepted_by"] == "newcomer"


def test_a_revoked_invitation_cannot_be_accepted(sites_world: World) -> None:
    invitation, token = services.invitation_create(
        organization=sites_world.org_a,
        role=Role.MEMBER,
        invited_by=sites_world.users[ADMIN],
        username="lead",
    )
    Membership.objects.filter(user=sites_world.users[LEAD]).delete()
    revoked = sites_world.call(
        ORG_ADMIN_A, "POST", f"{p(sites_world)}/invitations/{invitation.pk}/revoke/"
    )
    assert revoked.json()["status"] == "revoked"

    refused = sites_world.call(LEAD, "POST", "/api/v1/invitations/accept/", {"token": token})

    assert error(refused) == (400, "token_invalid", "token")
    again = sites_world.call(
        ORG_ADMIN_A, "POST", f"{p(sites_world)}/invitations/{invitation.pk}/revoke/"
    )
    assert error(again) == (409, "invalid_transition", None)


def test_an_invitation_needs_an_addressee(sites_world: World) -> None:
    refused = sites_world.call(
        ADMIN,
        "POST",
        f"{p(sites_world)}/invitations/",
        {"organization": sites_world.org_a.pk, "role": "lead"},
    )

    assert error(refused) == (400, "invalid", "email")
    assert Invitation.objects.count() == 1


# --- roles ---------------------------------------------------------------------------------


def test_an_org_admin_cannot_make_a_project_admin_nor_act_in_another_org(
    sites_world: World,
) -> None:
    body = {"organization": sites_world.org_a.pk, "username": ORG_ADMIN_B, "role": "project_admin"}
    assert (
        error(sites_world.call(ORG_ADMIN_A, "POST", f"{p(sites_world)}/memberships/", body))[0]
        == 403
    )
    # The project admin may, but only in the host organisation.
    assert error(sites_world.call(ADMIN, "POST", f"{p(sites_world)}/memberships/", body)) == (
        400,
        "invalid",
        "role",
    )
    in_host = {**body, "organization": sites_world.host.pk}
    assert (
        sites_world.call(ADMIN, "POST", f"{p(sites_world)}/memberships/", in_host).status_code
        == 201
    )

    in_b = {"organization": sites_world.org_b.pk, "username": LEAD, "role": "member"}
    assert (
        error(sites_world.call(ORG_ADMIN_A, "POST", f"{p(sites_world)}/memberships/", in_b))[0]
        == 403
    )
    host_admin = Membership.objects.get(user=sites_world.users[ADMIN])
    path = f"{p(sites_world)}/memberships/{host_admin.pk}/"
    assert error(sites_world.call(ORG_ADMIN_A, "DELETE", path))[0] == 403


def test_the_last_project_admin_cannot_leave(sites_world: World) -> None:
    own = Membership.objects.get(user=sites_world.users[ADMIN])
    path = f"{p(sites_world)}/memberships/{own.pk}/"

    assert error(sites_world.call(ADMIN, "DELETE", path)) == (409, "last_project_admin", None)
    assert error(sites_world.call(ADMIN, "PATCH", path, {"role": "member"})) == (
        409,
        "last_project_admin",
        None,
    )
    assert Membership.objects.filter(pk=own.pk, role=Role.PROJECT_ADMIN).exists()


def test_adding_someone_twice_or_an_unknown_user(sites_world: World) -> None:
    path = f"{p(sites_world)}/memberships/"
    twice = {"organization": sites_world.org_a.pk, "username": "lead", "role": "member"}
    unknown = {"organization": sites_world.org_a.pk, "username": "nobody", "role": "member"}
    other_org = {"organization": sites_world.site_q.site.organization.pk, "username": "lead"}

    assert error(sites_world.call(ADMIN, "POST", path, twice)) == (409, "already_exists", "user")
    assert error(sites_world.call(ADMIN, "POST", path, unknown)) == (400, "invalid", "username")
    refused = sites_world.call(ADMIN, "POST", path, {**other_org, "role": "member"})
    assert error(refused) == (400, "invalid", "organization")


@pytest.mark.parametrize("adder", [ORG_ADMIN_A, ADMIN])
def test_people_outside_the_project_are_invited_not_added(sites_world: World, adder: str) -> None:
    """An account outside the project (here: the other project's owner, and one in no
    project) cannot be given a role directly, and the answer is the one a name nobody has
    gets: the API does not tell which accounts exist."""
    path = f"{p(sites_world)}/memberships/"
    answers = []
    for username in (OUTSIDER, "newcomer", "nobody-at-all"):
        body = {"organization": sites_world.org_a.pk, "username": username, "role": "member"}
        response = sites_world.call(adder, "POST", path, body)
        assert error(response) == (400, "invalid", "username")
        answers.append(response.json()["message"].replace(username, "<name>"))
    assert len(set(answers)) == 1
    assert "invite" in answers[0]
    assert (
        not Membership.objects.filter(user__username__in=[OUTSIDER, "newcomer"])
        .filter(organization__project=sites_world.project)
        .exists()
    )
    # Someone already in the project (org B) may be given a role in org A.
    colleague = {"organization": sites_world.org_a.pk, "username": ORG_ADMIN_B, "role": "member"}
    assert sites_world.call(adder, "POST", path, colleague).status_code == 201


def test_no_endpoint_lists_accounts_outside_the_callers_projects(sites_world: World) -> None:
    """The API renders JSON only (a browsable form would list every account in a select)."""
    for path in (f"{p(sites_world)}/memberships/", f"{p(sites_world)}/invitations/"):
        for accept in ("text/html", "application/json"):
            response = sites_world.call(ORG_ADMIN_A, "GET", path, Accept=accept)
            assert response["Content-Type"].startswith("application/json"), path
            assert OUTSIDER.encode() not in response.content


# --- sites ---------------------------------------------------------------------------------


def test_site_decisions_follow_the_state_machine(sites_world: World) -> None:
    site = f"{p(sites_world)}/sites/{sites_world.site_requested.pk}"

    assert sites_world.call(ADMIN, "POST", f"{site}/approve/").status_code == 200
    assert error(sites_world.call(ADMIN, "POST", f"{site}/approve/")) == (
        409,
        "invalid_transition",
        None,
    )
    assert error(sites_world.call(ADMIN, "POST", f"{site}/revoke/", {"reason": "x"}))[1] == (
        "invalid_transition"
    )
    denied = sites_world.call(ADMIN, "POST", f"{site}/deny/", {"reason": "not a hospital"})
    assert (denied.json()["state"], denied.json()["state_reason"]) == ("denied", "not a hospital")
    assert (
        error(sites_world.call(ADMIN, "POST", f"{site}/enrolment-token/"))[1]
        == "invalid_transition"
    )
    assert (
        error(sites_world.call(ADMIN, "PATCH", f"{site}/", {"contact_email": "a@b.org"}))[0] == 409
    )


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
def test_a_bad_site_request_names_the_field(
    sites_world: World, body: dict[str, Any], field: str
) -> None:
    before = Site.objects.count()

    refused = sites_world.call(
        ORG_ADMIN_A,
        "POST",
        f"{p(sites_world)}/sites/",
        {"organization": sites_world.org_a.pk, **body},
    )

    assert refused.status_code in (400, 409)
    assert refused.json()["field"] == field
    assert Site.objects.count() == before


def test_deny_and_revoke_need_a_reason(sites_world: World) -> None:
    site = f"{p(sites_world)}/sites/{sites_world.site_requested.pk}"

    assert error(sites_world.call(ADMIN, "POST", f"{site}/deny/", {})) == (400, "invalid", "reason")
    assert error(sites_world.call(ADMIN, "POST", f"{site}/deny/", {"reason": "  "}))[2] == "reason"


def test_whoami_tells_the_agent_who_it_is(sites_world: World) -> None:
    path = "/api/v1/agent/whoami/"

    me = sites_world.call("site_b_agent", "GET", path)

    assert me.status_code == 200
    body = me.json()
    assert (body["site"], body["organization"], body["project"], body["state"]) == (
        "site-b",
        "Org B",
        sites_world.project.slug,
        "enrolled",
    )
    assert body["certificate_serial"] == sites_world.site_b.certificate.serial
    assert body["last_heartbeat"] is not None


def test_malformed_json_is_a_400(sites_world: World) -> None:
    # drf-stubs type generic()'s data as str; DRF hands bytes to Django unchanged.
    response = APIClient().generic(
        "POST",
        f"{p(sites_world)}/sites/",
        data=b"{not json",  # type: ignore[arg-type]
        content_type="application/json",
        headers={"Authorization": f"Bearer {sites_world.keys[ADMIN]}"},
    )

    assert error(response)[:2] == (400, "parse_error")
