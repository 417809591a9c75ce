"""A site admin in a real Chromium: ticks two waiting jobs, declines both with a reason, sees
them under "Declined, not started yet" and accepts one after all; then turns on the site's
auto-accept on the site page."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from django.db import connection
from playwright.sync_api import expect

from jobs.models import JobSite
from jobs.services.submission import job_submit
from sites.models import Site
from tests.browser.conftest import CHROMIUM, Pages, in_thread
from tests.portal import jobs_api_world as jw

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


def _two_jobs(tmp: Path) -> jw.World:
    world = jw.build_world(tmp, start=False)
    made = jw.make_bundle(tmp, name="second-job")
    job_submit(
        project=world.project,
        submitted_by=world.users[jw.LEAD],
        spec=made.spec,
        initial_model=io.BytesIO(made.model),
        app_archive=io.BytesIO(made.app),
        sites=[s.site.name for s in world.sites],
    )
    return world


def test_bulk_decline_with_a_reason_then_accept_after_all(pages: Pages, tmp_path: Path) -> None:
    world = in_thread(_two_jobs, tmp_path)
    page = pages.new_page()
    pages.sign_in(page, world.users[jw.ORG_ADMIN].username)
    pages.visit(page, f"/projects/{world.project.slug}/approvals/", "approvals")

    page.get_by_label("api-job at site-2").check()
    page.get_by_label("second-job at site-2").check()
    page.get_by_label("Reason").fill("Our GPU is booked this week")
    pages.shot(page, "ticked")
    page.get_by_role("button", name="Decline selected").click()

    expect(page.get_by_role("status")).to_contain_text(
        "Declined: api-job at site-2, second-job at site-2."
    )
    declined = page.get_by_role("table", name="Jobs your sites declined")
    expect(declined.get_by_text("“Our GPU is booked this week”").first).to_be_visible()
    expect(declined.locator("tbody tr")).to_have_count(2)
    pages.shot(page, "declined")

    declined.get_by_label("second-job at site-2").check()
    page.get_by_role("button", name="Accept selected after all").click()
    expect(page.get_by_role("status")).to_contain_text("Accepted: second-job at site-2.")
    expect(
        page.get_by_role("table", name="Jobs your sites declined").locator("tbody tr")
    ).to_have_count(1)
    pages.shot(page, "accepted-after-all")

    decisions = in_thread(
        lambda: dict(
            JobSite.objects.filter(site__name="site-2").values_list("job__name", "decision")
        )
    )
    assert decisions == {"api-job": "declined", "second-job": "accepted"}


def test_the_site_page_turns_auto_accept_on(pages: Pages, tmp_path: Path) -> None:
    world = in_thread(jw.build_world, tmp_path, start=False)
    site = in_thread(lambda: Site.objects.get(project=world.project, name="site-2"))
    page = pages.new_page()
    pages.sign_in(page, world.users[jw.ORG_ADMIN].username)
    pages.visit(page, f"/projects/{world.project.slug}/sites/", "sites")
    page.get_by_role("link", name="site-2", exact=True).click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Site site-2")
    expect(page.get_by_role("table", name="Policy")).to_contain_text("a site admin, job by job")
    pages.shot(page, "site-page")

    page.get_by_label("Accept this project's jobs automatically").check()
    page.get_by_role("button", name="Save the settings of site-2").click()

    expect(page.get_by_role("status")).to_contain_text("The settings of site-2 were saved.")
    expect(page.get_by_role("table", name="Policy")).to_contain_text(
        "the site's agent, automatically"
    )
    pages.shot(page, "site-page-saved")
    assert in_thread(lambda: Site.objects.get(pk=site.pk).auto_accept_jobs) is True
