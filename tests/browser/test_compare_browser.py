"""Comparing runs in a real Chromium: two finished jobs with metrics in one project; on the
project page a person ticks both and chooses "Compare selected", sees both curves (the chart's
legend) and the scores table, picks another metric, and a reload shows the same view."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from playwright.sync_api import expect

from jobs.models import Job
from tests.browser.conftest import CHROMIUM, Pages, in_thread
from tests.portal import jobs_api_world as jw
from tests.portal.dashboard.test_dashboard_compare import POINTS, finish, record, submit

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

LEGEND = (
    "() => Chart.getChart(document.getElementById('compare-canvas')).data.datasets"
    ".map((d) => d.label)"
)
# The chart is drawn once Chart.js has loaded, which may come after the page's heading.
CHART_DRAWN = (
    "() => window.Chart !== undefined"
    " && Chart.getChart(document.getElementById('compare-canvas')) !== undefined"
)


def legend_of(page: Any) -> Any:
    """The chart's series, once it is drawn."""
    page.wait_for_function(CHART_DRAWN)
    return page.evaluate(LEGEND)


def two_finished_runs(tmp_path: Path) -> tuple[jw.World, Job, Job]:
    world = jw.build_world(tmp_path, start=False)
    assert world.job is not None
    run_a = world.job
    Job.objects.filter(pk=run_a.pk).update(name="run-a", experiment="sweep", tags=["cnn"])
    run_b = submit(world, "run-b", num_rounds=3, train_args="--epochs 2")
    finish(run_a, rounds=2, seconds=90)
    finish(run_b, rounds=3, seconds=3725)
    record(run_a, POINTS["run-a"])
    record(run_b, POINTS["run-b"])
    record(run_a, {"accuracy": [0.45, 0.65]}, site=world.sites[0].site)
    return world, run_a, run_b


def test_two_runs_are_ticked_compared_and_the_view_survives_a_reload(
    pages: Pages, tmp_path: Path
) -> None:
    world, run_a, run_b = in_thread(two_finished_runs, tmp_path)
    page = pages.new_page()
    pages.sign_in(page, world.users[jw.MEMBER].username)
    page.goto(f"{pages.base}/projects/{world.project.slug}/")
    # Tick at once: the jobs table is fetched again once the page's socket is connected, and
    # that refresh keeps what was ticked.
    with page.expect_response(lambda response: "/jobs-rows/" in response.url):
        page.get_by_label("Compare run-a").check()
        page.get_by_label("Compare run-b").check()
    expect(page.locator("[data-live-status]")).to_contain_text("Live")
    page.wait_for_timeout(300)
    expect(page.get_by_label("Compare run-a")).to_be_checked()
    expect(page.get_by_label("Compare run-b")).to_be_checked()
    pages.shot(page, "project-ticked")
    page.get_by_role("button", name="Compare selected").click()

    expect(page.get_by_role("heading", level=1)).to_have_text("Compare runs")
    assert f"job={run_a.uid}" in page.url and f"job={run_b.uid}" in page.url
    legend: Any = legend_of(page)
    # The project page lists the newest first: run-b, then run-a.
    assert legend == ["run-b", "run-a"]
    scores = page.locator("#scores")
    expect(scores.locator('tr[data-row="final:accuracy"] td')).to_have_text(["0.8", "0.7"])
    expect(scores.locator('tr[data-row="best:loss"] td')).to_have_text(
        ["0.4 (round 2)", "0.6 (round 2)"]
    )
    expect(page.locator('#parameters tr.differs[data-param="num_rounds"]')).to_be_visible()
    pages.shot(page, "compare-accuracy")

    # Another metric and each site's series: the form is sent as soon as a choice changes.
    page.get_by_label("Metric", exact=True).select_option("loss")
    page.wait_for_url("**metric=loss**")
    page.get_by_label("Each site's series too").check()
    page.wait_for_url("**sites=1**")
    page.get_by_label("Metric", exact=True).select_option("accuracy")
    page.wait_for_url("**metric=accuracy**")
    expect(page.get_by_label("Each site's series too")).to_be_checked()
    legend = legend_of(page)
    assert legend == ["run-b", "run-a", "run-a · site-1"]
    pages.shot(page, "compare-per-site")

    page.reload()
    expect(page.get_by_label("Metric", exact=True)).to_have_value("accuracy")
    expect(page.get_by_label("Each site's series too")).to_be_checked()
    assert legend_of(page) == ["run-b", "run-a", "run-a · site-1"]
    expect(scores.locator('tr[data-row="state"] td')).to_have_text(["completed", "completed"])
    pages.shot(page, "compare-reloaded")
