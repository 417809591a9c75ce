"""Projects and people in a real Chromium: a project admin creates a project (after a name the
service refuses), invites someone, and the invitee signs in, opens the link, accepts and finds
the project on their home page. No page breaks the Content-Security-Policy. Every page visited
is screenshotted (see conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from playwright.sync_api import Page, expect

from sites.models import AuditAction, AuditEvent, Membership, Project
from tests.browser.conftest import CHROMIUM, Pages, in_thread
from tests.portal import api_world as sw

pytestmark = [
    pytest.mark.usefixtures("eager_celery"),
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason=f"needs Debian's Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)",
    ),
    pytest.mark.skipif(
        connection.vendor != "postgresql",
        reason="needs PostgreSQL: the portal process shares the test database",
    ),
    pytest.mark.django_db(transaction=True),
]


def _world_with_a_creator() -> sw.World:
    world = sw.build_world()
    world.users[sw.ADMIN].user_permissions.add(Permission.objects.get(codename="add_project"))
    return world


def _watch_policy(page: Page) -> list[str]:
    """Every Content-Security-Policy violation the browser reports on ``page``."""
    violations: list[str] = []
    page.on(
        "console",
        lambda message: (
            violations.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    return violations


def test_a_project_is_created_and_an_invitee_joins_it(pages: Pages) -> None:
    world = in_thread(_world_with_a_creator)
    admin = pages.new_page()
    admin_violations = _watch_policy(admin)
    pages.sign_in(admin, world.users[sw.ADMIN].username)
    admin.get_by_role("link", name="Create a project").click()
    pages.shot(admin, "new-project")

    # A name that gives no slug: the service's reason beside the field, focus on it.
    admin.get_by_label("Name").fill("!!!")
    admin.get_by_role("button", name="Create project").click()
    expect(admin.locator("#id_name-error")).to_contain_text("at least one letter or digit")
    expect(admin.locator("#id_name")).to_be_focused()
    pages.shot(admin, "new-project-error")
    assert not Project.objects.filter(name="!!!").exists()

    admin.get_by_label("Name").fill("Eye Clinics")
    admin.get_by_label("Description").fill("Retina scans from three clinics")
    admin.get_by_role("button", name="Create project").click()
    admin.wait_for_url(pages.base + "/projects/eye-clinics/")
    expect(admin.get_by_role("status").first).to_contain_text("Project Eye Clinics was created")
    pages.shot(admin, "project-created")

    nav = admin.get_by_role("navigation", name="Project Eye Clinics")
    nav.get_by_role("link", name="People").click()
    expect(admin.locator('tr[data-member="admin"]')).to_contain_text("Project admin")
    pages.shot(admin, "members")
    admin.get_by_role("link", name="Invitations").first.click()
    admin.get_by_label("Email of the invitee").fill("newcomer@example.org")
    admin.get_by_label("Role").select_option("lead")
    admin.get_by_role("button", name="Send invitation").click()
    link = admin.get_by_label("Link", exact=True).input_value()
    pages.shot(admin, "invitation-link-shown-once")
    assert link.startswith(pages.base + "/invitations/accept/?token=fpi_")
    assert admin_violations == []

    newcomer = pages.new_page()
    newcomer_violations = _watch_policy(newcomer)
    pages.sign_in(newcomer, world.newcomer.username)
    newcomer.goto(link)
    expect(newcomer.get_by_role("main")).to_contain_text(
        "invites you to join Eye Clinics in the project Eye Clinics as lead"
    )
    pages.shot(newcomer, "invitation-to-accept")
    newcomer.get_by_role("button", name="Accept and join Eye Clinics").click()
    newcomer.wait_for_url(pages.base + "/projects/eye-clinics/")
    expect(newcomer.get_by_role("status").first).to_contain_text("You joined Eye Clinics")
    pages.shot(newcomer, "joined-project")
    newcomer.goto(pages.base + "/")
    expect(newcomer.get_by_role("link", name="Eye Clinics")).to_be_visible()
    pages.shot(newcomer, "home-with-project")
    assert newcomer_violations == []

    joined = Membership.objects.get(user=world.newcomer, organization__project__slug="eye-clinics")
    assert joined.role == "lead"
    actors = set(
        AuditEvent.objects.filter(
            project=joined.organization.project, action=AuditAction.INVITATION_ACCEPTED
        ).values_list("actor", flat=True)
    )
    assert actors == {world.newcomer.pk}
