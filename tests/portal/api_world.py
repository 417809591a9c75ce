"""The world the API tests run in, and the personas that call it.

Project P ("Hospital Net") has a host organisation (its project admin), organisation A (an
org admin, a lead, a member; site A enrolled, site R requested) and organisation B (an org
admin; site B enrolled). Project Q belongs to the outsider, who is its project admin and has
site Q enrolled there. Every person calls with their own API token; a site agent signs its
requests with its own key; anonymous sends nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from django.contrib.auth.models import User
from rest_framework.test import APIClient

from sites import services
from sites.models import ApiToken, Invitation, Membership, Organization, Project, Role, Site
from tests.portal.factories import (
    EnrolledSite,
    MembershipFactory,
    OrganizationFactory,
    ProjectFactory,
    SiteFactory,
    UserFactory,
    enrolled_site,
)

ADMIN = "project_admin"
ORG_ADMIN_A = "org_admin_a"
ORG_ADMIN_B = "org_admin_b"
LEAD = "lead"
MEMBER = "member"
OUTSIDER = "outsider"
ANONYMOUS = "anonymous"
AGENT_A = "site_a_agent"
AGENT_B = "site_b_agent"

PEOPLE = (ADMIN, ORG_ADMIN_A, ORG_ADMIN_B, LEAD, MEMBER, OUTSIDER)
AGENTS = (AGENT_A, AGENT_B)
PERSONAS = (*PEOPLE, ANONYMOUS, *AGENTS)


@dataclass
class World:
    project: Project
    other: Project
    host: Organization
    org_a: Organization
    org_b: Organization
    users: dict[str, User]
    keys: dict[str, str]
    api_tokens: dict[str, ApiToken]
    site_a: EnrolledSite
    site_b: EnrolledSite
    site_requested: Site
    site_q: EnrolledSite
    member_membership: Membership
    invitation_a: Invitation
    newcomer: User
    agents: dict[str, EnrolledSite] = field(default_factory=dict)

    def ids(self) -> dict[str, Any]:
        """What URL templates and request bodies may name: ``{p}``, ``{site_a}``…"""
        return {
            "p": f"/api/v1/projects/{self.project.slug}",
            "q": f"/api/v1/projects/{self.other.slug}",
            "org_a": self.org_a.pk,
            "org_b": self.org_b.pk,
            "host": self.host.pk,
            "site_a": self.site_a.site.pk,
            "site_b": self.site_b.site.pk,
            "site_r": self.site_requested.pk,
            "site_q": self.site_q.site.pk,
            "cert_a": self.site_a.certificate.pk,
            "cert_q": self.site_q.certificate.pk,
            "membership": self.member_membership.pk,
            "invitation": self.invitation_a.pk,
            "admin_token": self.api_tokens[ADMIN].pk,
            "newcomer": self.newcomer.username,
            # In the project (org B), so that org A's admins may give them a role in org A.
            "colleague": self.users[ORG_ADMIN_B].username,
        }

    def call(self, persona: str, method: str, path: str, body: Any = None, **headers: str) -> Any:
        """Send a request as ``persona``; a JSON body is encoded (and signed) as sent."""
        data = b"" if body is None else json.dumps(body).encode()
        if persona in self.keys:
            headers.setdefault("Authorization", f"Bearer {self.keys[persona]}")
        elif persona in self.agents:
            headers.update(self.agents[persona].headers(method, path, data))
        # drf-stubs type generic()'s data as str; DRF hands bytes to Django unchanged.
        return APIClient().generic(
            method,
            path,
            data=data,  # type: ignore[arg-type]
            content_type="application/json",
            headers=headers,
        )


def build_world() -> World:
    admin = UserFactory.create(username="admin")
    project = ProjectFactory.create(name="Hospital Net", created_by=admin)
    host = project.host_organization
    org_a = OrganizationFactory.create(project=project, name="Org A")
    org_b = OrganizationFactory.create(project=project, name="Org B")
    users = {ADMIN: admin}
    for persona, organization, role in [
        (ORG_ADMIN_A, org_a, Role.ORG_ADMIN),
        (ORG_ADMIN_B, org_b, Role.ORG_ADMIN),
        (LEAD, org_a, Role.LEAD),
        (MEMBER, org_a, Role.MEMBER),
    ]:
        users[persona] = UserFactory.create(username=persona)
        membership = MembershipFactory.create(
            user=users[persona], organization=organization, role=role
        )
    member_membership = membership
    users[OUTSIDER] = UserFactory.create(username=OUTSIDER)
    other = ProjectFactory.create(name="Other Net", created_by=users[OUTSIDER])
    site_q = enrolled_site(organization=OrganizationFactory.create(project=other), name="site-q")

    site_a = enrolled_site(organization=org_a, name="site-a")
    site_b = enrolled_site(organization=org_b, name="site-b")
    site_requested = SiteFactory.create(organization=org_a, name="site-r")
    invitation_a, _ = services.invitation_create(
        organization=org_a, role=Role.MEMBER, invited_by=admin, email="invitee@example.org"
    )
    keys: dict[str, str] = {}
    api_tokens: dict[str, ApiToken] = {}
    for persona, user in users.items():
        api_tokens[persona], keys[persona] = services.api_token_create(user=user, name="tests")
    return World(
        project=project,
        other=other,
        host=host,
        org_a=org_a,
        org_b=org_b,
        users=users,
        keys=keys,
        api_tokens=api_tokens,
        site_a=site_a,
        site_b=site_b,
        site_requested=site_requested,
        site_q=site_q,
        member_membership=member_membership,
        invitation_a=invitation_a,
        newcomer=UserFactory.create(username="newcomer"),
        agents={AGENT_A: site_a, AGENT_B: site_b},
    )
