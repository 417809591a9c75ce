"""The job page in a real Chromium catches up with what happened before its socket connected
(state, progress, rounds, metrics and log lines all current, without a reload), shows sites'
decisions and their agents going online and offline as they happen, and copy buttons never
claim a copy that did not happen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from django.db import connection
from playwright.sync_api import expect

from fedportal import events as fedportal_events
from jobs import events as jobs_events
from jobs.models import Job, JobState
from jobs.services.participation import job_abort, site_job_decide
from jobs.services.telemetry import log_lines_record, metrics_record
from sites.services import certificate_revoke
from tests.browser.conftest import CHROMIUM, Pages, in_thread
from tests.portal import jobs_api_world as jw
from tests.portal.rounds_helpers import upload

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


def happen_meanwhile(world: jw.World) -> None:
    """A round closes (every site's update), a site logs a line and a point, and the lead
    aborts the job: all published while no socket of the page is listening."""
    job = world.job
    assert job is not None
    for weight, enrolled in enumerate(world.sites, start=1):
        upload(
            job,
            enrolled.site,
            0,
            {"w": torch.tensor([1.0, 2.0]) * weight, "n": torch.tensor(5)},
            weight=weight,
            metrics={"accuracy": weight / 10},
        )
    site = world.sites[0].site
    log_lines_record(job=job, site=site, lines=[{"text": "said while nobody listened"}])
    metrics_record(job=job, site=site, points=[{"key": "loss", "value": 0.125, "step": 9}])
    job_abort(job=Job.objects.get(pk=job.pk), actor=world.users[jw.LEAD], reason="stopped early")


def test_the_job_page_catches_up_after_its_socket_connects(pages: Pages, tmp_path: Path) -> None:
    world = in_thread(jw.build_world, tmp_path)
    job = world.job
    assert job is not None and job.state == JobState.RUNNING
    page: Any = pages.new_page()
    pages.sign_in(page, world.users[jw.LEAD].username)

    # The page is rendered, but its live script is held back: no socket yet.
    held: list[Any] = []
    page.route("**/static/dashboard/live.js", lambda route: held.append(route))
    page.goto(f"{pages.base}/jobs/{job.uid}/", wait_until="commit")
    expect(page.locator("#job-state")).to_have_text("running")
    for _ in range(200):
        if held:
            break
        page.wait_for_timeout(25)
    assert held, "the page never asked for its live script"

    in_thread(happen_meanwhile, world)
    assert Job.objects.get(pk=job.pk).state == JobState.ABORTED
    # Nothing told the page: it still shows what it was rendered with.
    expect(page.locator("#job-state")).to_have_text("running")
    expect(page.locator("#job-progress-text")).to_have_text("0 of 2 rounds")
    pages.shot(page, "rendered-before")
    page.evaluate("window.notReloaded = true")

    held[0].continue_()
    expect(page.locator("[data-live-status]")).to_contain_text("Live:")
    expect(page.locator("#job-state")).to_have_text("aborted")
    expect(page.locator("#job-failure")).to_have_text(": stopped early")
    expect(page.locator("#job-progress-text")).to_have_text("1 of 2 rounds")
    expect(page.locator('#task-grid tr[data-site="site-2"] td[data-round="0"]')).to_contain_text(
        "accepted"
    )
    expect(page.locator('.log[data-site="site-1"] pre')).to_contain_text(
        "said while nobody listened"
    )
    latest = page.locator('figure[data-chart="loss · by step"] tr[data-series="site-1"]')
    expect(latest).to_contain_text("0.125")
    expect(page.get_by_role("button", name="Abort job")).to_be_hidden()
    assert page.evaluate("window.notReloaded") is True
    pages.shot(page, "caught-up")


def test_a_point_or_line_heard_again_after_a_snapshot_that_holds_it_shows_once(
    pages: Pages, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page may hear of a point after fetching charts that hold it already (the event was
    on its way while the charts were read), and the channel layer may deliver an event twice.
    Either way the point and the line are shown once: the page skips what its snapshot holds
    (by id) and what it heard already."""
    world = in_thread(jw.build_world, tmp_path)
    job = world.job
    assert job is not None
    page: Any = pages.new_page()
    pages.sign_in(page, world.users[jw.LEAD].username)
    pages.visit(page, f"/jobs/{job.uid}/", "job-running")
    expect(page.locator("[data-live-status]")).to_contain_text("Live:")

    # What the portal publishes, as the page's socket carries it.
    sent: list[dict[str, Any]] = []
    publish = fedportal_events.send_after_commit

    def kept(groups: Any, payload: dict[str, Any]) -> None:
        sent.append(payload)
        publish(groups, payload)

    monkeypatch.setattr(jobs_events, "send_after_commit", kept)
    site = world.sites[0].site
    in_thread(metrics_record, job=job, site=site, points=[{"key": "loss", "value": 0.5, "step": 3}])
    in_thread(log_lines_record, job=job, site=site, lines=[{"text": "heard once"}])
    heard = [event for event in sent if event["kind"] in ("metrics", "log")]
    assert [event["kind"] for event in heard] == ["metrics", "log"]

    series = "window.FedPortalJob.charts()['loss · by step']?.series['site-1']"
    lines = '.log[data-site="site-1"] pre span.line'
    latest = page.locator('figure[data-chart="loss · by step"] tr[data-series="site-1"]')
    expect(latest).to_contain_text("0.5")
    expect(page.locator(lines)).to_have_count(1)

    def hear_again() -> None:
        for event in heard:
            page.evaluate("event => window.FedPortalJob.receive(event)", event)

    # Delivered twice.
    hear_again()
    assert page.evaluate(series) == [[3, 0.5]]
    expect(page.locator(lines)).to_have_count(1)

    # Heard after the charts and the log were fetched again (as when the socket connects).
    with (
        page.expect_response(lambda answer: "/metrics.json" in answer.url),
        page.expect_response(lambda answer: "/logs/" in answer.url),
    ):
        page.evaluate("window.FedPortalJob.receive({kind: 'synced'})")
    page.wait_for_timeout(200)  # the answers' handlers
    hear_again()
    assert page.evaluate(series) == [[3, 0.5]]
    expect(page.locator(lines)).to_have_count(1)

    # Heard by a page rendered with them.
    page.reload()
    expect(page.locator("[data-live-status]")).to_contain_text("Live:")
    hear_again()
    assert page.evaluate(series) == [[3, 0.5]]
    expect(page.locator(lines)).to_have_count(1)

    # A later point and line are shown.
    in_thread(
        metrics_record, job=job, site=site, points=[{"key": "loss", "value": 0.25, "step": 4}]
    )
    in_thread(log_lines_record, job=job, site=site, lines=[{"text": "heard next"}])
    expect(latest).to_contain_text("0.25")
    expect(page.locator(lines)).to_have_count(2)
    assert page.evaluate(series) == [[3, 0.5], [4, 0.25]]
    pages.shot(page, "heard-once")


def test_the_copy_button_says_copied_only_when_it_copied(pages: Pages, tmp_path: Path) -> None:
    world = in_thread(jw.build_world, tmp_path, submit=False)
    page: Any = pages.new_page()
    pages.sign_in(page, world.users[jw.MEMBER].username)
    pages.visit(page, "/api-tokens/", "api-tokens")
    page.get_by_label("Name").fill("laptop")
    page.get_by_role("button", name="Create").click()
    key = page.locator("#new-token-key").input_value()
    assert key.startswith("fpt_")
    status = page.locator("[data-copy-status]")
    button = page.get_by_role("button", name="Copy the key")
    selected = (
        "() => { const el = document.getElementById('new-token-key');"
        " return document.activeElement === el && el.selectionStart === 0"
        " && el.selectionEnd === el.value.length; }"
    )
    page.evaluate("window.realClipboard = navigator.clipboard")

    # A plain-http origin has no navigator.clipboard at all.
    page.evaluate(
        "Object.defineProperty(navigator, 'clipboard', {value: undefined, configurable: true})"
    )
    button.click()
    expect(status).to_contain_text("Not copied")
    expect(status).to_contain_text("Ctrl+C")
    assert page.evaluate(selected) is True
    pages.shot(page, "copy-unavailable")

    # The browser refuses the write.
    page.evaluate(
        "Object.defineProperty(navigator, 'clipboard', {configurable: true, value:"
        " {writeText: () => Promise.reject(new DOMException('denied', 'NotAllowedError'))}})"
    )
    button.click()
    expect(status).to_contain_text("Not copied")
    assert page.evaluate(selected) is True

    # Allowed: then, and only then, "Copied.", and the clipboard holds the key.
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=pages.base)
    page.evaluate(
        "Object.defineProperty(navigator, 'clipboard', {configurable: true,"
        " value: window.realClipboard})"
    )
    button.click()
    expect(status).to_have_text("Copied.")
    assert page.evaluate("navigator.clipboard.readText()") == key
    pages.shot(page, "copied")


def test_decisions_and_agent_liveness_show_live_on_the_job_page(
    pages: Pages, tmp_path: Path
) -> None:
    world = in_thread(jw.build_world, tmp_path, start=False)  # waiting; no site heard from
    job = world.job
    assert job is not None
    page: Any = pages.new_page()
    pages.sign_in(page, world.users[jw.MEMBER].username)
    pages.visit(page, f"/jobs/{job.uid}/", "job-waiting")
    expect(page.locator("[data-live-status]")).to_contain_text("Live:")
    row_1 = page.locator('#task-grid tr[data-site="site-1"]')
    row_2 = page.locator('#task-grid tr[data-site="site-2"]')
    expect(row_1.locator('[data-field="online"]')).to_have_text("offline")
    page.evaluate("window.notReloaded = true")

    in_thread(
        site_job_decide,
        job=job,
        site=world.sites[1].site,
        accept=False,
        decided_by=world.users[jw.ORG_ADMIN],
    )
    expect(row_2.locator('[data-field="decision"]')).to_have_text(f"declined by {jw.ORG_ADMIN}")

    # site-1's agent is heard from (a signed request): online; its certificate revoked: offline.
    listed = in_thread(world.agent, world.sites[0], "GET", "/api/v1/agent/jobs/")
    assert listed.status_code == 200
    expect(row_1.locator('[data-field="online"]')).to_have_text("online")
    in_thread(
        certificate_revoke,
        certificate=world.sites[0].certificate,
        reason="key leaked",
        revoked_by=world.users[jw.ADMIN],
    )
    expect(row_1.locator('[data-field="online"]')).to_have_text("offline")
    assert page.evaluate("window.notReloaded") is True
    pages.shot(page, "decided-and-offline")
