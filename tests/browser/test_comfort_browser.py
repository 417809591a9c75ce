"""The dashboard's comfort in a real Chromium: dark mode follows the system setting, no page
scrolls sideways on a 390 px phone (wide tables scroll inside), the skip link moves focus to
the main content, and the favicon is served."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from django.db import connection

from tests.browser.conftest import CHROMIUM, Pages, in_thread
from tests.portal import jobs_api_world as jw

if TYPE_CHECKING:
    from playwright.sync_api import Page

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


def _pages_of(world: jw.World) -> list[tuple[str, str]]:
    assert world.job is not None
    slug = world.project.slug
    return [
        ("/", "home"),
        (f"/projects/{slug}/", "project"),
        (f"/jobs/{world.job.uid}/", "job"),
        (f"/projects/{slug}/sites/", "sites"),
        (f"/projects/{slug}/sites/{world.sites[0].site.pk}/", "site"),
        (f"/projects/{slug}/approvals/", "approvals"),
        (f"/projects/{slug}/jobs/new/", "job-submit"),
        (f"/projects/{slug}/compare/?job={world.job.uid}", "compare"),
        (f"/projects/{slug}/members/", "members"),
        (f"/projects/{slug}/organizations/", "organizations"),
        ("/audit/", "audit"),
        ("/api-tokens/", "api-tokens"),
    ]


def _sign_in(pages: Pages, page: Page, username: str) -> None:
    page.goto(pages.base + "/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", "pw")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(pages.base + "/")


def test_no_page_scrolls_sideways_on_a_390_px_screen(pages: Pages, tmp_path: Path) -> None:
    world = in_thread(jw.build_world, tmp_path)
    context = pages.browser.new_context(viewport={"width": 390, "height": 844})
    pages.contexts.append(context)
    page = context.new_page()
    _sign_in(pages, page, world.users[jw.LEAD].username)
    too_wide = {}
    for path, name in _pages_of(world):
        pages.visit(page, path, f"narrow-{name}")
        width = page.evaluate("document.documentElement.scrollWidth")
        if width > 390:
            too_wide[name] = width
    assert too_wide == {}
    # A wide table still shows all its columns: it scrolls inside its own box.
    pages.visit(page, f"/jobs/{world.job.uid}/" if world.job else "/", "narrow-job-again")
    scrollable = page.evaluate(
        "[...document.querySelectorAll('main table')]"
        ".some(t => t.scrollWidth > t.clientWidth && getComputedStyle(t).overflowX === 'auto')"
    )
    assert scrollable


def test_dark_mode_follows_the_system_setting(pages: Pages, tmp_path: Path) -> None:
    world = in_thread(jw.build_world, tmp_path)
    backgrounds = {}
    for scheme in ("light", "dark"):
        context = pages.browser.new_context(
            viewport={"width": 1366, "height": 900}, color_scheme=scheme
        )
        pages.contexts.append(context)
        page = context.new_page()
        _sign_in(pages, page, world.users[jw.LEAD].username)
        assert world.job is not None
        pages.visit(page, f"/jobs/{world.job.uid}/", f"{scheme}-job")
        backgrounds[scheme] = page.evaluate("getComputedStyle(document.body).backgroundColor")
        if scheme == "dark":
            colour = page.evaluate("getComputedStyle(document.body).color")
            assert colour == "rgb(232, 232, 232)"
    assert backgrounds == {"light": "rgb(255, 255, 255)", "dark": "rgb(21, 21, 21)"}


def test_the_skip_link_moves_focus_to_the_main_content(pages: Pages, tmp_path: Path) -> None:
    world = in_thread(jw.build_world, tmp_path, start=False, submit=False)
    page = pages.new_page()
    pages.sign_in(page, world.users[jw.LEAD].username)
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip-link"
    pages.shot(page, "skip-link-shown")
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"
    # The next Tab goes on from the main content, not from the top of the page.
    page.keyboard.press("Tab")
    assert page.evaluate("document.getElementById('main').contains(document.activeElement)")


def test_the_favicon_is_an_icon_the_browser_gets(pages: Pages, tmp_path: Path) -> None:
    in_thread(jw.build_world, tmp_path, start=False, submit=False)
    page = pages.new_page()
    response = page.goto(pages.base + "/favicon.ico")
    assert response is not None and response.ok
    assert response.headers["content-type"].startswith("image/svg+xml")
