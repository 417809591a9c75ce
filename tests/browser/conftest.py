"""The browser tests' world: the portal served by Daphne in a subprocess (HTTP and WebSocket)
against the test database, Debian's Chromium driven by Playwright, and a screenshot of every
page a test visits, in a folder printed at the end of the run.

Needs /usr/bin/chromium (`.ci/run` installs it), PostgreSQL (the portal process shares the test
database) and Redis (the channel layer between the two processes, database 13).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
REDIS_URL = os.environ.get("BROWSER_TEST_REDIS_URL") or "redis://127.0.0.1:6379/13"
_taken: list[Path] = []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("browser-media")


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
def portal_url(django_db_setup: None, media_root: Path) -> Iterator[str]:
    """The portal's server (``python -m fedportal.serve``, Daphne) on a free port, on the test
    database; its log is printed when it fails to start."""
    import redis
    from django.db import connection

    redis.Redis.from_url(REDIS_URL).flushdb()
    db = connection.settings_dict
    port = _free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.browser.daphne_settings",
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "DJANGO_MEDIA_ROOT": str(media_root),
        # Development mode: plain HTTP on 127.0.0.1 (cookies not Secure), and the portal
        # serves its own static files; DEBUG stays off, as in a deployment.
        "FEDPORTAL_DEV": "1",
        "DJANGO_DEBUG": "false",
        "BROWSER_TEST_REDIS_URL": REDIS_URL,
        "PYTHONPATH": str(ROOT),
    }
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    log = media_root.parent / "daphne.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedportal.serve", "-b", "127.0.0.1", "-p", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"daphne did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def browser(async_unsafe_allowed: None) -> Iterator[object]:
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


class Pages:
    """Opens pages for one test, and screenshots each one it visits."""

    def __init__(self, browser: object, base: str, test_name: str) -> None:
        self.browser = browser
        self.base = base
        self.prefix = re.sub(r"[^A-Za-z0-9_-]+", "-", test_name)
        self.count = 0
        self.contexts: list[object] = []

    def new_page(self) -> object:
        context = self.browser.new_context(viewport={"width": 1366, "height": 900})  # type: ignore[attr-defined]
        self.contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(10_000)
        return page

    def shot(self, page: object, name: str) -> Path:
        self.count += 1
        path = SCREENSHOTS / f"{self.prefix}-{self.count:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
        _taken.append(path)
        return path

    def visit(self, page: object, path: str, name: str) -> None:
        page.goto(self.base + path)  # type: ignore[attr-defined]
        self.shot(page, name)

    def sign_in(self, page: object, username: str, password: str = "pw") -> None:
        page.goto(self.base + "/login/")  # type: ignore[attr-defined]
        page.fill("#id_username", username)  # type: ignore[attr-defined]
        page.fill("#id_password", password)  # type: ignore[attr-defined]
        self.shot(page, f"login-{username}")
        page.get_by_role("button", name="Sign in").click()  # type: ignore[attr-defined]
        page.wait_for_url(self.base + "/")  # type: ignore[attr-defined]
        self.shot(page, f"projects-{username}")

    def close(self) -> None:
        for context in self.contexts:
            context.close()  # type: ignore[attr-defined]


@pytest.fixture
def pages(portal: str, browser: object, request: pytest.FixtureRequest) -> Iterator[Pages]:
    handle = Pages(browser, portal, request.node.name)
    yield handle
    handle.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _taken:
        terminalreporter.write_line(
            f"browser tests: {len(_taken)} screenshots of the pages visited are in {SCREENSHOTS}"
        )
