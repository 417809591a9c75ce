"""The job page's charts (linear, downsampled for drawing, the full series as a streamed CSV
with the page's permission), its log fragment, the liveness it shows, and the project's jobs
list (paged, filtered by state, name and submitter, filters kept in the URL; the API filters
by name too)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.http import StreamingHttpResponse
from django.test import AsyncClient, Client
from django.utils import timezone

from dashboard.metrics import MAX_CHART_POINTS, downsample, metric_charts, metric_snapshot
from jobs import events as jobs_events
from jobs.models import Job, MetricPoint
from jobs.services.participation import job_abort
from jobs.services.submission import job_submit
from jobs.services.telemetry import log_lines_record, metrics_record
from sites import services
from sites.models import Site
from tests.portal import jobs_api_world as jw

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("eager_celery")]


def as_user(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


# --- charts ---------------------------------------------------------------------------------


def test_downsampling_keeps_the_ends_and_every_stretchs_extremes() -> None:
    points = [[x, float(x % 7)] for x in range(10_000)]
    points[4321][1] = 99.0  # a spike that taking every n-th point would miss
    points[8765][1] = -5.0  # and a dip
    kept = downsample(points, 100)
    assert len(kept) <= 100
    assert kept[0] == [0, 0.0] and kept[-1] == points[-1]
    assert [4321, 99.0] in kept and [8765, -5.0] in kept
    assert [p[0] for p in kept] == sorted(p[0] for p in kept)
    assert downsample(points[:50], 100) == points[:50]


def test_charts_place_points_as_before_and_bound_each_series(jobs_world: jw.World) -> None:
    job = jobs_world.job
    assert job is not None
    site = jobs_world.sites[0].site
    # Without step or round, each point goes one after its series' largest x so far.
    metrics_record(
        job=job,
        site=site,
        points=[{"key": "acc", "value": 0.1, "step": 5}]
        + [{"key": "acc", "value": v} for v in (0.2, 0.3)]
        + [{"key": "loss", "value": 0.5, "round": 1}],
    )
    charts = metric_charts(job)
    assert charts["acc · by step"]["series"]["site-1"] == [[5, 0.1], [6, 0.2], [7, 0.3]]
    assert charts["loss · by round"]["series"]["site-1"] == [[2, 0.5]]

    many = [
        MetricPoint(job=job, site=jobs_world.sites[1].site, key="loss", value=float(i % 13), step=i)
        for i in range(3 * MAX_CHART_POINTS)
    ]
    MetricPoint.objects.bulk_create(many)
    body = as_user(jobs_world.users[jw.MEMBER]).get(f"/jobs/{job.uid}/metrics.json").json()
    chart = body["charts"]["loss · by step"]
    assert chart["counts"]["site-2"] == 3 * MAX_CHART_POINTS
    assert len(chart["series"]["site-2"]) <= MAX_CHART_POINTS == body["max_points"]
    page = as_user(jobs_world.users[jw.MEMBER]).get(f"/jobs/{job.uid}/")
    drawn = page.context["chart_snapshot"]["charts"]["loss · by step"]["series"]["site-2"]
    assert len(drawn) <= MAX_CHART_POINTS
    assert f"/jobs/{job.uid}/metrics.csv" in page.content.decode()


def test_a_snapshot_names_each_sites_last_logged_point_it_holds(
    jobs_world: jw.World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the page skips when it hears of a point again: a site's logged points only (a
    train result or an aggregate comes with no event of its own), the last by id even when
    several share a step, and the same ids the points' events carry."""
    job = jobs_world.job
    assert job is not None
    site_1, site_2 = (enrolled.site for enrolled in jobs_world.sites[:2])
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(jobs_events, "send_after_commit", lambda _groups, e: sent.append(e))
    points = [{"key": "loss", "value": value, "step": 1} for value in (0.5, 0.4)]
    metrics_record(job=job, site=site_1, points=points)
    logged = list(MetricPoint.objects.filter(job=job, site=site_1).order_by("id"))
    assert [point["id"] for point in sent[0]["points"]] == [point.pk for point in logged]
    # Stored after them: a train result of site-1, an aggregate, a point of another job.
    MetricPoint.objects.create(
        job=job, site=site_1, key="acc", value=0.9, round_number=0, source=MetricPoint.Source.RESULT
    )
    MetricPoint.objects.create(
        job=job,
        site=None,
        key="acc",
        value=0.9,
        round_number=0,
        source=MetricPoint.Source.AGGREGATE,
    )
    assert metric_snapshot(job)["through"] == {"site-1": logged[-1].pk}
    assert site_2.name not in metric_snapshot(job)["through"]  # nothing logged yet

    metrics_record(job=job, site=site_2, points=[{"key": "loss", "value": 0.3}])
    latest = MetricPoint.objects.filter(job=job, site=site_2).get()
    snapshot = metric_snapshot(job)
    assert snapshot["through"] == {"site-1": logged[-1].pk, "site-2": latest.pk}
    assert snapshot["charts"] == metric_charts(job)


def _reference_charts(points: list[dict[str, Any]]) -> dict[tuple[str, str], list[list[Any]]]:
    """The placement rule written the plain way, point by point (quadratic, fine for a few)."""
    series: dict[tuple[str, str], list[list[Any]]] = {}
    for p in points:
        axis = "round" if p["step"] is None and p["round"] is not None else "step"
        line = series.setdefault((f"{p['key']} · by {axis}", p["site"]), [])
        if p["step"] is not None:
            x = p["step"]
        elif p["round"] is not None:
            x = p["round"] + 1
        else:
            x = max((q[0] for q in line), default=0) + 1
        line.append([x, p["value"]])
    return {ref: sorted(line, key=lambda q: q[0]) for ref, line in series.items()}


def test_charts_follow_the_placement_rule_for_any_mix_of_points(jobs_world: jw.World) -> None:
    job = jobs_world.job
    assert job is not None
    rng = random.Random(7)
    sites = {s.site.name: s.site for s in jobs_world.sites}
    points: list[dict[str, Any]] = []
    for _ in range(600):
        kind = rng.choice(["step", "round", "neither", "negative"])
        points.append(
            {
                "site": rng.choice([*sites, None]),
                "key": rng.choice(["loss", "acc"]),
                "value": rng.uniform(-1, 1),
                "step": rng.randint(0, 50)
                if kind == "step"
                else rng.randint(-9, -1)
                if kind == "negative"
                else None,
                "round": rng.randint(0, 5) if kind == "round" else None,
            }
        )
    start = timezone.now()
    MetricPoint.objects.bulk_create(
        MetricPoint(
            job=job,
            site=sites.get(p["site"]) if p["site"] else None,
            key=p["key"],
            value=p["value"],
            step=p["step"],
            round_number=p["round"],
            created_at=start + dt.timedelta(microseconds=i),
        )
        for i, p in enumerate(points)
    )
    for p in points:
        p["site"] = p["site"] or "all sites"
    charts = metric_charts(job)
    got = {
        (chart_id, name): line
        for chart_id, chart in charts.items()
        for name, line in chart["series"].items()
    }
    assert got == _reference_charts(points)


def _csv_rows(body: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(body.decode())))


def test_the_full_series_downloads_as_csv_with_the_pages_permission(jobs_world: jw.World) -> None:
    job = jobs_world.job
    assert job is not None
    metrics_record(
        job=job,
        site=jobs_world.sites[0].site,
        points=[
            {"key": "loss", "value": 0.5, "step": 1, "round": 0},
            {"key": "=HYPERLINK(1)", "value": -2.0},
        ],
    )
    MetricPoint.objects.bulk_create(
        MetricPoint(job=job, site=jobs_world.sites[1].site, key="acc", value=i / 10, step=i)
        for i in range(12_000)  # more than two batches
    )
    url = f"/jobs/{job.uid}/metrics.csv"

    response = as_user(jobs_world.users[jw.MEMBER]).get(url)
    assert response.status_code == 200 and response.streaming
    assert response["Content-Type"].startswith("text/csv")
    assert "attachment;" in response["Content-Disposition"]
    rows = _csv_rows(jw.body_of(response))
    assert len(rows) == 12_002
    assert rows[0] == {
        "site": "site-1",
        "round": "1",
        "step": "1",
        "key": "loss",
        "value": "0.5",
        "source": "log",
        "recorded_at": rows[0]["recorded_at"],
    }
    assert rows[1]["key"] == "'=HYPERLINK(1)"  # never a formula in a spreadsheet
    assert rows[-1]["value"] == "1199.9" and rows[-1]["site"] == "site-2"

    assert as_user(jobs_world.users[jw.OUTSIDER]).get(url).status_code == 404
    anonymous = Client().get(url)
    assert anonymous.status_code == 302 and "/login/" in anonymous["Location"]


def test_the_csv_streams_under_asgi_too(jobs_world: jw.World) -> None:
    job = jobs_world.job
    assert job is not None
    MetricPoint.objects.bulk_create(
        MetricPoint(job=job, site=jobs_world.sites[0].site, key="acc", value=1.0, step=i)
        for i in range(7000)
    )
    client = AsyncClient()
    client.force_login(jobs_world.users[jw.LEAD])

    async def fetch() -> tuple[int, bytes, bool]:
        response = await client.get(f"/jobs/{job.uid}/metrics.csv")
        # The test client types every response as the base class: this one streams, async.
        assert isinstance(response, StreamingHttpResponse)
        content = response.streaming_content
        assert isinstance(content, AsyncIterator)
        chunks = [chunk async for chunk in content]
        return response.status_code, b"".join(chunks), response.is_async

    status, body, is_async = async_to_sync(fetch)()
    assert status == 200 and is_async
    assert len(_csv_rows(body)) == 7000


def test_the_log_fragment_shows_each_sites_tail_to_the_projects_people(
    jobs_world: jw.World,
) -> None:
    job = jobs_world.job
    assert job is not None
    log_lines_record(job=job, site=jobs_world.sites[1].site, lines=[{"text": "epoch 3: loss 0.1"}])
    fragment = as_user(jobs_world.users[jw.MEMBER]).get(f"/jobs/{job.uid}/logs/")
    assert fragment.status_code == 200
    assert 'data-site="site-2"' in fragment.content.decode()
    assert "epoch 3: loss 0.1" in fragment.content.decode()
    assert as_user(jobs_world.users[jw.OUTSIDER]).get(f"/jobs/{job.uid}/logs/").status_code == 404


# --- liveness as the pages show it ----------------------------------------------------------


def test_a_disconnected_or_revoked_site_shows_offline_though_heard_from_recently(
    jobs_world: jw.World,
) -> None:
    job = jobs_world.job
    assert job is not None
    site_1, site_2 = jobs_world.sites[0].site, jobs_world.sites[1].site
    now = timezone.now()
    Site.objects.filter(pk__in=[site_1.pk, site_2.pk]).update(last_heartbeat=now)
    # site-1's agent disconnected after its last heartbeat; site-2 is revoked.
    Site.objects.filter(pk=site_1.pk).update(agent_disconnected_at=now + dt.timedelta(1))
    services.site_revoke(
        site=site_2, reason="left the project", revoked_by=jobs_world.users[jw.ADMIN]
    )

    member = as_user(jobs_world.users[jw.MEMBER])
    grid = member.get(f"/jobs/{job.uid}/rounds/").content.decode()
    for name in ("site-1", "site-2"):
        row = grid.split(f'<tr data-site="{name}">')[1].split("</tr>")[0]
        assert "offline" in row and "online</span>" not in row, name
    rows = member.get(f"/projects/{jobs_world.project.slug}/sites-status/").content.decode()
    row = rows.split('data-site="site-1"')[1].split("</tr>")[0]
    assert 'badge offline">offline' in row
    api = jw.World.call(jobs_world, jw.MEMBER, "GET", f"{jobs_world.j}/sites/").json()
    online = {entry["site"]: entry["online"] for entry in api["results"]}
    assert online["site-1"] is False and online["site-2"] is False and online["site-3"] is True


# --- the jobs list --------------------------------------------------------------------------


def submit_jobs(world: jw.World, names: list[str], by: str = jw.LEAD) -> list[Job]:
    made = jw.make_bundle(world.tmp)
    jobs = []
    for name in names:
        job = job_submit(
            project=world.project,
            submitted_by=world.users[by],
            spec={**made.spec, "name": name},
            initial_model=io.BytesIO(made.model),
            app_archive=io.BytesIO(made.app),
            sites=[s.site.name for s in world.sites],
        )
        jobs.append(job)
    return jobs


def listed(response: Any) -> list[str]:
    return [job.name for job in response.context["jobs"]]


def test_the_jobs_list_pages_past_the_fiftieth_and_keeps_filters(jobs_world: jw.World) -> None:
    submit_jobs(jobs_world, [f"alpha-{i:02d}" for i in range(55)])
    submit_jobs(jobs_world, ["Beta-one"], by=jw.OTHER_LEAD)
    member = as_user(jobs_world.users[jw.MEMBER])
    url = f"/projects/{jobs_world.project.slug}/"

    first = member.get(url)
    assert len(listed(first)) == 50 and listed(first)[0] == "Beta-one"
    assert "57 jobs, page 1 of 2" in first.content.decode()
    second = member.get(url, {"page": 2})
    assert listed(second) == ["alpha-05", "alpha-04", "alpha-03", "alpha-02", "alpha-01"] + [
        "alpha-00",
        "api-job",
    ]

    alpha_page_2: dict[str, str | int] = {"name": "ALPHA", "page": 2}
    alphas = member.get(url, alpha_page_2)
    assert listed(alphas) == [f"alpha-{i:02d}" for i in range(4, -1, -1)]
    html = alphas.content.decode()
    assert 'href="?name=ALPHA&amp;page=1" rel="prev"' in html
    assert (
        f'data-refresh="/projects/{jobs_world.project.slug}/jobs-rows/?name=ALPHA&amp;page=2"'
        in html
    )
    rows = member.get(f"/projects/{jobs_world.project.slug}/jobs-rows/", alpha_page_2)
    assert listed(rows) == listed(alphas)

    assert listed(member.get(url, {"submitter": jw.OTHER_LEAD})) == ["Beta-one"]
    job_abort(job=Job.objects.get(name="alpha-07"), actor=None, reason="test")
    assert listed(member.get(url, {"state": "aborted"})) == ["alpha-07"]
    assert listed(member.get(url, {"state": "aborted", "name": "beta"})) == []


def test_a_bad_filter_is_shown_beside_its_field_and_lists_nothing(jobs_world: jw.World) -> None:
    page = as_user(jobs_world.users[jw.MEMBER]).get(
        f"/projects/{jobs_world.project.slug}/", {"state": "exploded"}
    )
    assert page.status_code == 200
    assert listed(page) == []
    assert "Select a valid choice" in page.content.decode()


def test_the_api_filters_jobs_by_name_in_any_case(jobs_world: jw.World) -> None:
    submit_jobs(jobs_world, ["alpha-1", "ALPHABET", "gamma"])
    found = jobs_world.call(jw.MEMBER, "GET", f"{jobs_world.p}/jobs/?name=Alpha")
    assert found.status_code == 200
    assert sorted(job["name"] for job in found.json()["results"]) == ["ALPHABET", "alpha-1"]
    paged = jobs_world.call(jw.MEMBER, "GET", f"{jobs_world.p}/jobs/?name=alpha&limit=1&offset=1")
    assert paged.json()["count"] == 2 and len(paged.json()["results"]) == 1
    blank = jobs_world.call(
        jw.MEMBER, "GET", f"{jobs_world.p}/jobs/?name="
    )  # no filter, as submitter=
    assert blank.status_code == 200 and blank.json()["count"] == 4
    too_long = jobs_world.call(jw.MEMBER, "GET", f"{jobs_world.p}/jobs/?name={'x' * 101}")
    assert too_long.status_code == 400 and too_long.json()["field"] == "name"
