"""In a real Chromium: the job page's metric table and a site's whole log download as files
holding what the page says; a site whose agent disconnects is marked lagging, without a
reload, within 5 seconds on the job page and on the project page."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from playwright.sync_api import expect

from jobs.models import JobState, LogLine, MetricPoint
from sites.models import Site
from sites.services.agents import site_agent_disconnect
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


def _fill(world: jw.World) -> None:
    job = world.job
    assert job is not None
    one, two = world.sites[0].site, world.sites[1].site
    MetricPoint.objects.bulk_create(
        [
            MetricPoint(job=job, site=one, round_number=0, key="loss", value=0.5),
            MetricPoint(job=job, site=two, round_number=0, key="loss", value=0.75),
            MetricPoint(job=job, site=None, round_number=0, key="loss", value=0.625),
        ]
    )
    LogLine.objects.bulk_create(
        LogLine(job=job, site=one, round_number=0, text=f"epoch {i}") for i in range(250)
    )


def test_the_metric_table_and_a_whole_log_download(pages: Pages, tmp_path: Path) -> None:
    world = in_thread(jw.build_world, tmp_path)
    job = world.job
    assert job is not None
    in_thread(_fill, world)
    page: Any = pages.new_page()
    pages.sign_in(page, world.users[jw.MEMBER].username)
    pages.visit(page, f"/jobs/{job.uid}/?metric=loss", "metric-table")
    table = page.locator("#metric-table")
    expect(table.locator('tr[data-site="site-1"] td').first).to_have_text("0.5")

    with page.expect_download() as caught:
        page.locator("#metric-table-csv").click()
    rows = list(csv.reader(io.StringIO(Path(caught.value.path()).read_text())))
    assert rows[0][:2] == ["site", "round 1"]
    by_site = {row[0]: row[1] for row in rows[1:]}
    assert by_site == {"site-1": "0.5", "site-2": "0.75", "site-3": "", "all sites": "0.625"}

    link = page.get_by_role("link", name="Download the whole log (250 lines)")
    expect(link).to_be_visible()
    pages.shot(page, "log-download-link")
    with page.expect_download() as caught:
        link.click()
    lines = Path(caught.value.path()).read_text().splitlines()
    assert len(lines) == 250  # more than the page's 200-line tail
    assert [line.split(" | ", 1)[1] for line in lines] == [f"epoch {i}" for i in range(250)]
    assert " round 1 script | " in lines[0]


def _connect(site: Site, channel: str) -> None:
    Site.objects.filter(pk=site.pk).update(agent_channel=channel)


def test_a_disconnected_agent_shows_lagging_on_both_pages_within_5_seconds(
    pages: Pages, tmp_path: Path
) -> None:
    world = in_thread(jw.build_world, tmp_path)  # running, round 1 open, every agent online
    job = world.job
    assert job is not None and job.state == JobState.RUNNING
    site = world.sites[1].site
    in_thread(_connect, site, "agent-channel-2")

    job_page: Any = pages.new_page()
    pages.sign_in(job_page, world.users[jw.MEMBER].username)
    pages.visit(job_page, f"/jobs/{job.uid}/", "holders-before")
    project_page: Any = pages.new_page()
    pages.sign_in(project_page, world.users[jw.MEMBER].username)
    pages.visit(project_page, f"/projects/{job.project.slug}/", "lagging-before")
    for page in (job_page, project_page):
        expect(page.locator("[data-live-status]")).to_contain_text("Live:")
        page.evaluate("window.notReloaded = true")
    row = job_page.locator('#round-sites tr[data-site="site-2"]')
    expect(row).not_to_have_class("is-lagging")
    expect(row).to_contain_text("waiting to download")
    expect(job_page.locator(".countdown")).to_contain_text("left")
    expect(project_page.locator("#no-lagging")).to_be_visible()

    # The agent's socket closes, as when its process is killed.
    assert in_thread(site_agent_disconnect, site=site, channel="agent-channel-2")
    expect(row).to_have_class("is-lagging", timeout=5000)
    expect(row.locator('[data-field="lag"]')).to_contain_text("its agent is offline")
    lagging = project_page.locator(f'#lagging-sites tr[data-site="site-2"][data-job="{job.uid}"]')
    expect(lagging).to_be_visible(timeout=5000)
    expect(lagging).to_contain_text("waiting to download")
    expect(project_page.locator('#lagging-sites tr[data-site="site-1"]')).to_have_count(0)
    for page in (job_page, project_page):
        assert page.evaluate("window.notReloaded") is True
    pages.shot(job_page, "holders-lagging")
    pages.shot(project_page, "project-lagging")
