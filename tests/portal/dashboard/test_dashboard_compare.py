"""The compare page: two finished runs with known metric points give the scores and the
differing parameter rows a person can check by hand; jobs the viewer may not see are left out
with a message; the project page filters by experiment and tag and offers "Compare selected"."""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jobs.models import Job, JobState, MetricPoint
from jobs.services.submission import job_submit
from sites.models import Site
from tests.portal import jobs_api_world as jw

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("eager_celery", "media")]

START = dt.datetime(2026, 1, 5, 9, 0, tzinfo=dt.UTC)
# Aggregates by round (index from 0): run A has 2 rounds, run B 3.
POINTS: dict[str, dict[str, list[float]]] = {
    "run-a": {"accuracy": [0.5, 0.7], "loss": [1.0, 0.6]},
    "run-b": {"accuracy": [0.6, 0.9, 0.8], "loss": [0.9, 0.4, 0.5]},
}


def client_for(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def row_cells(html: str, marker: str) -> list[str]:
    """The text of each cell of the table row that ``marker`` opens, tags dropped."""
    row = html.split(marker, 1)[1].split("</tr>", 1)[0]
    found = re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)
    return [" ".join(re.sub(r"<[^>]+>", " ", cell).split()) for cell in found]


def chart_data(html: str) -> Any:
    found = re.search(r'<script id="compare-data" type="application/json">(.*?)</script>', html)
    assert found is not None
    return json.loads(found.group(1))


def submit(
    world: jw.World, name: str, *, project: Any = None, user: Any = None, **spec: Any
) -> Job:
    made = jw.make_bundle(world.tmp, **spec)
    sites = [s.site.name for s in world.sites]
    if project is not None:
        sites = list(Site.objects.filter(project=project).values_list("name", flat=True))
    return job_submit(
        project=project or world.project,
        submitted_by=user or world.users[jw.LEAD],
        spec={**made.spec, "name": name},
        initial_model=io.BytesIO(made.model),
        app_archive=io.BytesIO(made.app),
        sites=sites,
    )


def finish(job: Job, *, rounds: int, seconds: int) -> None:
    Job.objects.filter(pk=job.pk).update(
        state=JobState.COMPLETED,
        started_at=START,
        finished_at=START + dt.timedelta(seconds=seconds),
        completed_rounds=rounds,
        total_rounds=rounds,
    )


def record(job: Job, points: dict[str, list[float]], site: Site | None = None) -> None:
    MetricPoint.objects.bulk_create(
        MetricPoint(
            job=job,
            site=site,
            round_number=index,
            key=key,
            value=value,
            source=MetricPoint.Source.AGGREGATE if site is None else MetricPoint.Source.RESULT,
        )
        for key, values in points.items()
        for index, value in enumerate(values)
    )


@pytest.fixture
def runs(tmp_path: Path) -> tuple[jw.World, Job, Job]:
    world = jw.build_world(tmp_path, start=False)
    assert world.job is not None
    run_a = world.job
    Job.objects.filter(pk=run_a.pk).update(name="run-a")
    run_b = submit(world, "run-b", num_rounds=3, train_args="--epochs 2")
    finish(run_a, rounds=2, seconds=90)
    finish(run_b, rounds=3, seconds=3725)
    record(run_a, POINTS["run-a"])
    record(run_b, POINTS["run-b"])
    record(run_a, {"accuracy": [0.45]}, site=world.sites[0].site)
    run_a.refresh_from_db()
    run_b.refresh_from_db()
    return world, run_a, run_b


def compare_url(world: jw.World, *jobs: Job | str, **query: str) -> str:
    uids = "&".join(f"job={j.uid if isinstance(j, Job) else j}" for j in jobs)
    extra = "".join(f"&{key}={value}" for key, value in query.items())
    return f"/projects/{world.project.slug}/compare/?{uids}{extra}"


def test_the_scores_table_gives_each_runs_last_and_best_values(runs: Any) -> None:
    world, run_a, run_b = runs
    response = client_for(world.users[jw.MEMBER]).get(compare_url(world, run_a, run_b))
    assert response.status_code == 200
    html = response.content.decode()
    assert row_cells(html, '<tr data-row="state">')[1:] == ["completed", "completed"]
    assert row_cells(html, '<tr data-row="duration">')[1:] == ["1 min 30 s", "1 h 02 min"]
    assert row_cells(html, '<tr data-row="rounds">')[1:] == ["2 of 2", "3 of 3"]
    assert row_cells(html, '<tr data-row="final:accuracy">')[1:] == ["0.7", "0.8"]
    # Higher accuracy is better; lower loss is.
    assert row_cells(html, '<tr data-row="best:accuracy">')[1:] == [
        "0.7 (round 2)",
        "0.9 (round 2)",
    ]
    assert row_cells(html, '<tr data-row="final:loss">')[1:] == ["0.6", "0.5"]
    assert row_cells(html, '<tr data-row="best:loss">')[1:] == ["0.6 (round 2)", "0.4 (round 2)"]
    assert "lower is better" in row_cells(html, '<tr data-row="best:loss">')[0]


def test_the_parameters_are_side_by_side_with_the_differing_rows_marked(runs: Any) -> None:
    world, run_a, run_b = runs
    html = client_for(world.users[jw.MEMBER]).get(compare_url(world, run_a, run_b)).content
    text = html.decode()
    differing = re.findall(r'<tr data-param="([^"]+)" class="differs">', text)
    assert differing == ["train_args", "num_rounds"]
    assert row_cells(text, '<tr data-param="num_rounds" class="differs">') == [
        "num_rounds differs",
        "2",
        "3",
    ]
    assert row_cells(text, '<tr data-param="workflow">') == ["workflow", "fedavg", "fedavg"]
    assert row_cells(text, '<tr data-param="sites">')[1:] == ["site-1, site-2, site-3"] * 2
    # Each workflow parameter has a row too (FedAvg's key metric, the same in both).
    assert row_cells(text, '<tr data-param="key_metric">') == [
        "key_metric",
        "accuracy",
        "accuracy",
    ]


def test_the_chart_overlays_the_chosen_metric_and_the_choices_are_in_the_url(runs: Any) -> None:
    world, run_a, run_b = runs
    client = client_for(world.users[jw.MEMBER])
    # By default: the first job's key metric (FedAvg's: accuracy), by round, all sites only.
    data = chart_data(client.get(compare_url(world, run_a, run_b)).content.decode())
    assert (data["metric"], data["axis"]) == ("accuracy", "round")
    assert [(j["name"], j["series"]) for j in data["jobs"]] == [
        ("run-a", {"all sites": [[1, 0.5], [2, 0.7]]}),
        ("run-b", {"all sites": [[1, 0.6], [2, 0.9], [3, 0.8]]}),
    ]
    html = client.get(compare_url(world, run_a, run_b, metric="accuracy", sites="1")).content
    text = html.decode()
    data = chart_data(text)
    assert data["jobs"][0]["series"] == {"all sites": [[1, 0.5], [2, 0.7]], "site-1": [[1, 0.45]]}
    # The controls show what the URL chose, so a reload shows the same view.
    assert '<option value="accuracy" selected>' in text
    assert '<input type="checkbox" id="compare-sites" name="sites" value="1" checked>' in text
    assert text.count(f'<input type="hidden" name="job" value="{run_a.uid}">') == 1
    data = chart_data(client.get(compare_url(world, run_a, run_b, metric="loss")).content.decode())
    assert data["jobs"][1]["series"] == {"all sites": [[1, 0.9], [2, 0.4], [3, 0.5]]}
    # A metric no job has is said so; a step axis without points says there is nothing to draw.
    text = client.get(compare_url(world, run_a, metric="f1", x="step")).content.decode()
    assert "None of these jobs has the metric “f1”." in text
    assert 'id="chart-empty"' in text


def test_jobs_the_viewer_may_not_see_are_left_out_with_a_message(runs: Any) -> None:
    world, run_a, run_b = runs
    elsewhere = submit(
        world,
        "secret-run",
        project=world.other,
        user=world.users[jw.OUTSIDER],
        min_clients=1,
    )
    missing = uuid.uuid4()
    url = compare_url(world, run_a, elsewhere, str(missing), "not-a-uid")
    response = client_for(world.users[jw.MEMBER]).get(url)
    assert response.status_code == 200
    text = response.content.decode()
    assert "Not job ids: “not-a-uid”." in text
    assert f"No job of Hospital Net has the id “{elsewhere.uid}”, “{missing}”" in text
    assert "secret-run" not in text
    assert [j["name"] for j in chart_data(text)["jobs"]] == ["run-a"]
    # Someone outside the project gets no page at all.
    outsider = client_for(world.users[jw.OUTSIDER]).get(compare_url(world, run_a, run_b))
    assert outsider.status_code == 404
    # No jobs: the page says how to choose some.
    text = client_for(world.users[jw.MEMBER]).get(compare_url(world)).content.decode()
    assert 'id="compare-empty"' in text


def test_at_most_ten_jobs_are_compared_and_the_page_says_so(runs: Any) -> None:
    world, run_a, run_b = runs
    others = [str(uuid.uuid4()) for _ in range(9)]
    text = (
        client_for(world.users[jw.MEMBER])
        .get(compare_url(world, run_a, run_b, *others))
        .content.decode()
    )
    assert "At most 10 jobs are compared at once: these are the first 10 of the 11 selected." in (
        text
    )
    assert [j["name"] for j in chart_data(text)["jobs"]] == ["run-a", "run-b"]


def test_the_page_reads_a_bounded_number_of_queries_however_many_rounds(runs: Any) -> None:
    world, run_a, run_b = runs
    client = client_for(world.users[jw.MEMBER])
    url = compare_url(world, run_a, run_b)

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert client.get(url).status_code == 200
        return len(captured)

    before = queries()
    record(run_b, {"accuracy": [0.1 * (i % 10) for i in range(100)], "f1": [0.5] * 100})
    # Session, user, project, the viewer's roles (may submit, is project admin), the jobs, the
    # participants, and two a job (its metric points and its project's site names): nothing
    # per round or per point.
    assert queries() == before <= 7 + 2 * 2


def test_the_project_page_filters_by_experiment_and_tag_and_offers_compare(runs: Any) -> None:
    world, run_a, run_b = runs
    Job.objects.filter(pk=run_a.pk).update(experiment="Baseline", tags=["cnn", "lr-0.1"])
    Job.objects.filter(pk=run_b.pk).update(experiment="Tuned", tags=["lr-0.1"])
    client = client_for(world.users[jw.MEMBER])
    base = f"/projects/{world.project.slug}/"

    def names(query: str) -> list[str]:
        html = client.get(base + query).content.decode()
        return re.findall(r'<th scope="row"><a href="/jobs/[^"]+/">([^<]+)</a></th>', html)

    assert names("") == ["run-b", "run-a"]
    assert names("?tag=cnn") == ["run-a"]
    assert names("?tag=lr-0.1") == ["run-b", "run-a"]  # the second tag of run-a matches too
    assert names("?tag=lr") == []  # a whole tag, not a part of one
    assert names("?experiment=baseline") == ["run-a"]  # the whole name, in any case
    assert names("?experiment=Tuned&tag=cnn") == []
    html = client.get(base + "?tag=cnn").content.decode()
    # The filters stay in the URL (GET form), the rows show the labels and a box to tick.
    assert 'name="tag" value="cnn"' in html
    assert f'<input type="checkbox" name="job" value="{run_a.uid}" form="compare-form"' in html
    assert f'action="/projects/{world.project.slug}/compare/" id="compare-form"' in html
    assert row_cells(html, f'<tr data-job-id="{run_a.pk}">')[2] == "Baseline cnn lr-0.1"


def test_a_run_still_going_shows_its_duration_so_far(runs: Any) -> None:
    world, run_a, run_b = runs
    Job.objects.filter(pk=run_b.pk).update(
        state=JobState.RUNNING,
        started_at=timezone.now() - dt.timedelta(seconds=30),
        finished_at=None,
    )
    html = client_for(world.users[jw.MEMBER]).get(compare_url(world, run_b)).content.decode()
    cells = row_cells(html, '<tr data-row="duration">')
    assert re.fullmatch(r"3\d s", cells[1])
