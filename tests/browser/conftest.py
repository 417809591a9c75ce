"""The browser tests' world: the portal served by Daphne in a subprocess (HTTP and WebSocket)
against the test database (``tests.daphne_portal``), Debian's Chromium driven by Playwright,
and a screenshot of every page a test visits, in a folder printed at the end of the run.

Needs /usr/bin/chromium (`.ci/run` installs it), PostgreSQL (the portal process shares the test
database) and Redis (the channel layer between the two processes, database 13).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from django.db import connections

from tests import daphne_portal

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
REDIS_URL = daphne_portal.REDIS_URL
_taken: list[Path] = []
T = TypeVar("T")

# The portal's server, one per module.
media_root = daphne_portal.media_root
portal_url = daphne_portal.portal_url


@pytest.fixture(scope="module")
def async_unsafe_allowed() -> Iterator[None]:
    """Playwright's sync API runs an event loop in this thread, and Django refuses database
    calls from a thread with a running loop; the tests' own calls are synchronous, so they are
    allowed while the browser tests run (and only then)."""
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    yield
    if previous is None:
        del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]
    else:
        os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture(scope="module")
def browser(async_unsafe_allowed: None) -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    if not _taken:
        shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield chromium
        chromium.close()


@pytest.fixture
def portal(settings, portal_url: str, media_root: Path) -> str:
    """The portal's address, with this process sharing its media folder and channel layer, so
    that what a test does through the services reaches the browser as it would from a worker."""
    settings.MEDIA_ROOT = str(media_root)
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": 30}]},
        }
    }
    return portal_url


def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` in another thread. Playwright's event loop runs in this one, where the
    channel layer's ``async_to_sync`` sends (events after commit) cannot run."""

    def run() -> T:
        try:
            return fn(*args, **kwargs)
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(run).result()


class Pages:
    """Opens pages for one test, and screenshots each one it visits."""

    def __init__(self, browser: Browser, base: str, test_name: str) -> None:
        self.browser = browser
        self.base = base
        self.prefix = re.sub(r"[^A-Za-z0-9_-]+", "-", test_name)
        self.count = 0
        self.contexts: list[BrowserContext] = []

    def new_page(self) -> Page:
        context = self.browser.new_context(viewport={"width": 1366, "height": 900})
        self.contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(10_000)
        return page

    def shot(self, page: Page, name: str) -> Path:
        self.count += 1
        path = SCREENSHOTS / f"{self.prefix}-{self.count:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        _taken.append(path)
        return path

    def visit(self, page: Page, path: str, name: str) -> None:
        page.goto(self.base + path)
        self.shot(page, name)

    def sign_in(self, page: Page, username: str, password: str = "pw") -> None:
        page.goto(self.base + "/login/")
        page.fill("#id_username", username)
        page.fill("#id_password", password)
        self.shot(page, f"login-{username}")
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(self.base + "/")
        self.shot(page, f"projects-{username}")

    def close(self) -> None:
        for context in self.contexts:
            context.close()


@pytest.fixture
def pages(portal: str, browser: Browser, request: pytest.FixtureRequest) -> Iterator[Pages]:
    handle = Pages(browser, portal, request.node.name)
    yield handle
    handle.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _taken:
        terminalreporter.write_line(
            f"browser tests: {len(_taken)} screenshots of the pages visited are in {SCREENSHOTS}"
        )
