"""A site's privacy policy and budget in a real Chromium: the site page shows the policy its
agent reported and the budget bar of the job that spent there (also on a 390 px wide screen),
and the approval page says what a waiting job would spend; neither page logs an error."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.db import connection
from playwright.sync_api import ConsoleMessage, Page, expect

from client_agent.privacy import accounting
from sites.models import Site
from tests.browser.conftest import CHROMIUM, Pages, in_thread
from tests.portal import jobs_api_world as jw
from tests.portal.dashboard.test_privacy_pages import (
    HOSPITAL_POLICY,
    record_spend,
    report_policy,
    site_policy,
)

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


def _world(tmp: Path) -> tuple[jw.World, Site]:
    """A waiting job; site 2 reported the hospital policy and spent one round of it."""
    world = jw.build_world(tmp, start=False)
    site = Site.objects.get(project=world.project, name="site-2")
    policy = site_policy(tmp, HOSPITAL_POLICY)
    report_policy(site, policy)
    record_spend(world, tmp, site, policy, rounds=1, excluded=2)
    return world, site


def _errors(page: Page) -> list[str]:
    """Every error the page logs to its console, and every exception it throws."""
    errors: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(message.text)

    page.on("console", on_console)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return errors


def test_the_site_and_approval_pages_show_the_privacy_budget(pages: Pages, tmp_path: Path) -> None:
    world, site = in_thread(_world, tmp_path)
    assert world.job is not None
    spent = f"ε {accounting.epsilon_after(1.1, 1, 1e-5):.1f}"
    page = pages.new_page()
    errors = _errors(page)
    pages.sign_in(page, world.users[jw.ORG_ADMIN].username)

    pages.visit(page, f"/projects/{world.project.slug}/sites/{site.pk}/", "site-privacy")
    rules = page.get_by_role("table", name="Privacy rules the agent of site-2 enforces")
    expect(rules).to_contain_text("Gaussian, std 1.1 × clip norm")
    expect(rules).to_contain_text("stay at the site")
    budget = page.locator("#privacy-budget")
    row = budget.get_by_role("row", name="api-job")
    expect(row).to_contain_text(f"{spent} of 8.0")
    expect(row.locator("meter")).to_be_visible()
    expect(budget.locator("#privacy-project-budget")).to_contain_text(f"{spent} of 20.0")

    # On a phone-wide screen the bar and its text still show.
    page.set_viewport_size({"width": 390, "height": 844})
    expect(row.locator(".budget-text")).to_be_visible()
    expect(row.locator("meter")).to_be_visible()
    pages.shot(page, "site-privacy-narrow")
    page.set_viewport_size({"width": 1366, "height": 900})

    pages.visit(page, f"/jobs/{world.job.uid}/sites/site-2/review/", "approval-privacy")
    expected = accounting.epsilon_after(1.1, 2, 1e-5)
    assert expected <= 8.0
    expect(page.locator("#privacy-spend")).to_have_text(
        f"This job will spend about ε = {expected:.1f} of your 8.0."
    )
    expect(page.locator("#privacy-project-budget")).to_contain_text(f"{spent} of 20.0")
    expect(page.get_by_role("button", name="Accept for site-2")).to_be_enabled()

    assert errors == []
