"""A job's metric points as downloads: CSV, TensorBoard event files and an MLflow file store,
each read back by its own reader; and who may download them (as the job's metrics)."""

from __future__ import annotations

import csv
import io
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import (  # type: ignore[import-untyped]
    EventAccumulator,
)

from jobs.models import MetricPoint
from jobs.tracking import file_store_uri
from tests.portal.jobs_api_world import (
    AGENTS,
    ANONYMOUS,
    MEMBER,
    OUTSIDER,
    PEOPLE,
    World,
    body_of,
    build_world,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("eager_celery", "media")]

EXPORTS = ("metrics.csv", "tracking/tensorboard.zip", "tracking/mlflow.zip")
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _with_points(world: World) -> World:
    """The world's job with known points: two sites' logged and result values, an aggregate,
    and a key a spreadsheet would run as a formula."""
    job = world.job
    assert job is not None
    site_1, site_2 = world.sites[0].site, world.sites[1].site
    rows = [
        (site_1, 0, "loss", 0.5, 3, "log"),
        (site_1, 0, "loss", 0.25, 4, "log"),
        (site_2, 0, "loss", 0.75, 3, "log"),
        (site_1, 0, "accuracy", 0.1, None, "result"),
        (None, 0, "accuracy", 0.375, None, "aggregate"),
        (site_2, 1, "=cmd()", 1.5, None, "log"),
    ]
    for second, (site, rnd, key, value, step, source) in enumerate(rows):
        MetricPoint.objects.create(
            job=job,
            site=site,
            round_number=rnd,
            key=key,
            value=value,
            step=step,
            source=source,
            created_at=T0.replace(second=second),
        )
    return world


@pytest.fixture
def world(tmp_path: Path) -> World:
    return _with_points(build_world(tmp_path))


def test_metrics_csv_holds_every_point_exactly(world: World) -> None:
    response = world.call(MEMBER, "GET", f"{world.j}/metrics.csv")

    assert response.status_code == 200
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert f"{world.job.uid}-metrics.csv" in response["Content-Disposition"]  # type: ignore[union-attr]
    assert list(csv.reader(io.StringIO(body_of(response).decode()))) == [
        ["round", "site", "key", "value", "step", "source", "created_at"],
        ["0", "site-1", "loss", "0.5", "3", "log", "2026-01-02T03:04:00+00:00"],
        ["0", "site-1", "loss", "0.25", "4", "log", "2026-01-02T03:04:01+00:00"],
        ["0", "site-2", "loss", "0.75", "3", "log", "2026-01-02T03:04:02+00:00"],
        ["0", "site-1", "accuracy", "0.1", "", "result", "2026-01-02T03:04:03+00:00"],
        ["0", "", "accuracy", "0.375", "", "aggregate", "2026-01-02T03:04:04+00:00"],
        # A key that starts like a formula is not run by a spreadsheet.
        ["1", "site-2", "'=cmd()", "1.5", "", "log", "2026-01-02T03:04:05+00:00"],
    ]


def _unzip(data: bytes, dest: Path) -> Path:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = zf.namelist()
        assert all(not n.startswith("/") and ".." not in n for n in names), names
        zf.extractall(dest)
    return dest


def _scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return [(event.step, event.value) for event in acc.Scalars(tag)]


def test_tensorboard_zip_opens_and_tensorboard_reads_the_points(
    world: World, tmp_path: Path
) -> None:
    response = world.call(MEMBER, "GET", f"{world.j}/tracking/tensorboard.zip")

    assert response.status_code == 200
    assert response["Content-Type"] == "application/zip"
    root = _unzip(body_of(response), tmp_path / "unzipped") / "tb_events"
    assert sorted(p.name for p in root.iterdir()) == ["aggregate", "site-1", "site-2"]
    assert _scalars(root / "site-1", "loss") == [(3, 0.5), (4, 0.25)]
    assert _scalars(root / "site-2", "loss") == [(3, 0.75)]
    # A train result's metric, at its round (float32, as TensorBoard keeps scalars).
    ((step, value),) = _scalars(root / "site-1", "result/accuracy")
    assert step == 0 and value == pytest.approx(0.1)
    assert _scalars(root / "aggregate", "accuracy") == [(0, 0.375)]
    assert _scalars(root / "site-2", "=cmd()") == [(1, 1.5)]
    assert not (tmp_path / "unzipped" / "PROBLEMS.txt").exists()


def test_mlflow_zip_opens_as_a_store_with_a_run_per_site(world: World, tmp_path: Path) -> None:
    response = world.call(MEMBER, "GET", f"{world.j}/tracking/mlflow.zip")

    assert response.status_code == 200
    store = _unzip(body_of(response), tmp_path / "unzipped") / "mlruns"
    client = MlflowClient(tracking_uri=file_store_uri(store))
    experiment = client.get_experiment_by_name("api-job")
    assert experiment is not None
    runs = {r.data.tags["site"]: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["aggregate", "site-1", "site-2"]
    assert all(r.data.tags["job_id"] == str(world.job.uid) for r in runs.values())  # type: ignore[union-attr]

    def history(site: str, key: str) -> list[tuple[int, float]]:
        metrics = client.get_metric_history(runs[site].info.run_id, key)
        return sorted((m.step, m.value) for m in metrics)

    assert history("site-1", "loss") == [(3, 0.5), (4, 0.25)]
    assert history("site-1", "result/accuracy") == [(0, 0.1)]
    assert history("site-2", "loss") == [(3, 0.75)]
    assert history("aggregate", "accuracy") == [(0, 0.375)]
    # MLflow refuses "=cmd()" as a metric name: left out, and the download says so.
    assert set(runs["site-2"].data.metrics) == {"loss"}
    problems = (tmp_path / "unzipped" / "PROBLEMS.txt").read_text()
    assert problems.startswith("left out: site-2: '=cmd()': MLflow takes letters")


@pytest.mark.parametrize("export", EXPORTS)
def test_exports_are_readable_as_the_jobs_metrics_are(tmp_path: Path, export: str) -> None:
    world = build_world(tmp_path)
    # As GET /metrics/: every person of the project; the outsider 404; anonymous and site
    # agents 401.
    expected = {persona: 200 for persona in PEOPLE}
    expected.update({OUTSIDER: 404, ANONYMOUS: 401, **{agent: 401 for agent in AGENTS}})

    for persona, code in expected.items():
        response = world.call(persona, "GET", f"{world.j}/{export}")
        assert response.status_code == code, (persona, getattr(response, "data", response))
        if code >= 400:
            assert set(response.json()) >= {"code", "message"}
    unknown = world.call(
        MEMBER, "GET", f"/api/v1/jobs/{'0' * 8}-0000-0000-0000-{'0' * 12}/{export}"
    )
    assert unknown.status_code == 404


def test_the_exports_are_in_the_openapi_schema(client: Any) -> None:
    schema = client.get("/api/schema/?format=json").json()

    csv_get = schema["paths"]["/api/v1/jobs/{uid}/metrics.csv"]["get"]
    assert "text/csv" in csv_get["responses"]["200"]["content"]
    for export in ("tensorboard", "mlflow"):
        get = schema["paths"][f"/api/v1/jobs/{{uid}}/tracking/{export}.zip"]["get"]
        assert "application/zip" in get["responses"]["200"]["content"]
        assert "404" in get["responses"]


def test_the_job_page_links_the_exports_and_a_signed_in_browser_downloads_them(
    world: World,
) -> None:
    from django.test import Client

    browser = Client()
    browser.force_login(world.users[MEMBER])
    page = browser.get(f"/jobs/{world.job.uid}/").content.decode()  # type: ignore[union-attr]

    for export in EXPORTS[1:]:
        assert f'href="{world.j}/{export}"' in page
        assert browser.get(f"{world.j}/{export}").status_code == 200
