"""The job page with 100,000 metric points: time to render it, its charts' JSON and the full CSV.

A FedAvg job of 4 sites and 20 closed rounds, with 100,000 metric points as a script that logs
every batch leaves them: each site's ``loss`` and ``accuracy`` logged with a step (12,225
each), each site's ``lr`` logged with neither step nor round (500 each: the points that used
to make the charts quadratic), each site's train results by round and the rounds' aggregates
(200), and 200 log lines per site. Then, through Django's test client signed in as a project member
(the whole request: middleware, permission checks, queries, template or JSON), the median of
``--runs`` requests for:

* ``GET /jobs/<uid>/`` (the page, its charts embedded, downsampled);
* ``GET /jobs/<uid>/metrics.json`` (what the page fetches again when a round closes);
* ``GET /jobs/<uid>/metrics.csv`` (every point, streamed; read to the end);

and, to show the former worst case on its own, the charts' JSON of a second job whose
20,000 points have no step and no round. Last, how fast a site's points are stored: 5,000
``flare.log`` points in reports of 100, as an agent sends them, through ``metrics_record`` (the
service behind the socket and the API: checks, de-duplication, insert, the live event).

Everything is the bench's own and removed at the end: a PostgreSQL database
``fedportal_bench_job_page_<pid>`` (server from BENCH_POSTGRES_URL, default
postgres://postgres@127.0.0.1:5432) and a temporary folder for the media root.

    .venv/bin/python bench/job_page.py
    .venv/bin/python bench/job_page.py --runs 9
"""

from __future__ import annotations

import argparse
import io
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchlib
from benchlib import md_table, median
from benchlib.portal import scratch_portal

TOTAL = 100_000
SITES = 4
ROUNDS = 20
UNPLACED = 500  # per site: lr, logged without step or round
# per site and stepped key (loss, accuracy): the rest of the points after the unplaced ones
# and the train results and aggregates of every round
STEPS = (TOTAL - SITES * UNPLACED - (SITES + 1) * 2 * ROUNDS) // (SITES * 2)
LOG_LINES = 200  # per site
WORST_CASE = 20_000
INGESTED, PER_REPORT = 5_000, 100
TARGET_SECONDS = 0.5


def make_world() -> tuple[Any, Any, list[Any]]:
    """A project with SITES enrolled sites, a member to sign in as, and the admin."""
    from django.contrib.auth import get_user_model

    from client_agent import signing
    from sites import services
    from sites.models import Role

    users = get_user_model().objects
    admin = users.create_user("bench-admin", "admin@example.org", None)
    member = users.create_user("bench-member", "member@example.org", None)
    project = services.project_create(name="Job page bench", created_by=admin)
    org = services.organization_create(project=project, name="Bench hospital", created_by=admin)
    services.membership_add(organization=org, user=member, role=Role.MEMBER, added_by=admin)
    sites = []
    for index in range(1, SITES + 1):
        site = services.site_request(
            organization=org,
            name=f"site-{index}",
            contact_email=f"ops@site-{index}.example.org",
            requested_by=admin,
        )
        site, token = services.site_approve(site=site, approved_by=admin)
        key = signing.generate_key()
        services.site_enrol(token=token, csr_pem=signing.make_csr(key, site.name, project.name))
        site.refresh_from_db()
        sites.append(site)
    return admin, member, sites


def submit_job(admin: Any, name: str, tmp: Path) -> Any:
    import torch

    from client_agent.wire import save_state_dict
    from jobs.bundle import build_spec
    from jobs.services.submission import job_submit
    from jobs.workflows import FedAvg
    from sites.models import Project

    spec = build_spec(
        name=name,
        workflow=FedAvg(min_clients=SITES, num_rounds=ROUNDS),
        train_script="client.py",
        train_args="",
    )
    model = tmp / "initial.safetensors"
    save_state_dict(model, {"w": torch.zeros(4)})
    app = io.BytesIO()
    with zipfile.ZipFile(app, "w") as zf:
        zf.writestr("client.py", "print('bench')\n")
    return job_submit(
        project=Project.objects.get(name="Job page bench"),
        submitted_by=admin,
        spec=spec,
        initial_model=io.BytesIO(model.read_bytes()),
        app_archive=io.BytesIO(app.getvalue()),
    )


def fill_long_job(job: Any, sites: list[Any]) -> int:
    """ROUNDS closed rounds with a task per site, log lines, and TOTAL metric points."""
    from django.utils import timezone

    from jobs.models import Job, LogLine, MetricPoint, Round, RoundState, SiteTask, TaskState

    now = timezone.now()
    rounds = Round.objects.bulk_create(
        Round(
            job=job,
            number=n,
            state=RoundState.CLOSED,
            opened_at=now,
            deadline=now,
            closed_at=now,
            metrics={"loss": 1 / (n + 1), "accuracy": n / ROUNDS},
        )
        for n in range(ROUNDS)
    )
    SiteTask.objects.bulk_create(
        SiteTask(round=rnd, site=site, state=TaskState.ACCEPTED) for rnd in rounds for site in sites
    )
    Job.objects.filter(pk=job.pk).update(state="running", completed_rounds=ROUNDS)
    LogLine.objects.bulk_create(
        LogLine(job=job, site=site, round_number=i % ROUNDS, text=f"epoch {i}: loss {1 / (i + 1)}")
        for site in sites
        for i in range(LOG_LINES)
    )
    points: list[MetricPoint] = []
    for site in sites:
        for key in ("loss", "accuracy"):
            points += [
                MetricPoint(job=job, site=site, key=key, value=1 / (s + 1), step=s)
                for s in range(STEPS)
            ]
            points += [
                MetricPoint(job=job, site=site, key=key, value=n / ROUNDS, round_number=n)
                for n in range(ROUNDS)
            ]
        points += [
            MetricPoint(job=job, site=site, key="lr", value=0.01 / (i + 1)) for i in range(UNPLACED)
        ]
    for key in ("loss", "accuracy"):
        points += [
            MetricPoint(job=job, key=key, value=n / ROUNDS, round_number=n, source="aggregate")
            for n in range(ROUNDS)
        ]
    MetricPoint.objects.bulk_create(points, batch_size=5000)
    return len(points)


def fill_worst_case(job: Any, site: Any) -> None:
    from jobs.models import MetricPoint

    MetricPoint.objects.bulk_create(
        (MetricPoint(job=job, site=site, key="loss", value=1 / (i + 1)) for i in range(WORST_CASE)),
        batch_size=5000,
    )


def ingest_rate(admin: Any, site: Any, tmp: Path) -> tuple[float, float]:
    """Points per second, and seconds in all, for INGESTED points in reports of PER_REPORT."""
    from jobs.services.telemetry import metrics_record

    job = submit_job(admin, "ingest", tmp)
    metrics_record(job=job, site=site, points=[{"key": "warm-up", "value": 1.0, "id": "w"}])
    started = time.perf_counter()
    for first in range(0, INGESTED, PER_REPORT):
        points = [
            {"key": "loss", "value": 0.5, "step": i, "round": 0, "id": f"p:{i}"}
            for i in range(first, first + PER_REPORT)
        ]
        stored = metrics_record(job=job, site=site, points=points)
        assert stored == PER_REPORT, stored
    seconds = time.perf_counter() - started
    return INGESTED / seconds, seconds


def timed(runs: int, call: Callable[[], int]) -> tuple[list[float], int]:
    """Seconds of each run (after one warm-up), and the size of the last answer."""
    size = call()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        size = call()
        times.append(time.perf_counter() - started)
    return times, size


def measure(runs: int, tmp: Path) -> tuple[list[list[str]], str]:
    from django.http import StreamingHttpResponse
    from django.test import Client

    from jobs.models import MetricPoint

    admin, member, sites = make_world()
    job = submit_job(admin, "long-job", tmp)
    total = fill_long_job(job, sites)
    worst = submit_job(admin, "unplaced-points", tmp)
    fill_worst_case(worst, sites[0])
    assert MetricPoint.objects.filter(job=job).count() == total == TOTAL

    client = Client()
    client.force_login(member)

    def get(path: str) -> Callable[[], int]:
        def call() -> int:
            response = client.get(path, secure=True)
            assert response.status_code == 200, (path, response.status_code)
            if isinstance(response, StreamingHttpResponse):
                return sum(len(chunk) for chunk in response.streaming_content)
            return len(response.content)

        return call

    rows = []
    for what, path, points in [
        ("job page (HTML, charts embedded)", f"/jobs/{job.uid}/", total),
        ("charts' JSON", f"/jobs/{job.uid}/metrics.json", total),
        ("all points as CSV (streamed, read to the end)", f"/jobs/{job.uid}/metrics.csv", total),
        ("charts' JSON, no step and no round", f"/jobs/{worst.uid}/metrics.json", WORST_CASE),
    ]:
        times, size = timed(runs, get(path))
        verdict = "" if "CSV" in what else (" ✓" if median(times) < TARGET_SECONDS else " ✗")
        rows.append(
            [
                what,
                f"{points:,}",
                f"**{median(times):.3f} s**{verdict}",
                f"{min(times):.3f}–{max(times):.3f} s",
                f"{size / 1e6:.2f} MB",
            ]
        )
    rate, seconds = ingest_rate(admin, sites[0], tmp)
    ingest = (
        f"points stored through metrics_record: **{rate:,.0f} points/s** "
        f"({INGESTED:,} points in reports of {PER_REPORT} took {seconds:.2f} s)"
    )
    return rows, ingest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed requests per URL (median)")
    args = parser.parse_args()
    benchlib.print_header(
        "Job page with 100,000 metric points (bench/job_page.py)",
        f"Median of {args.runs} requests after one warm-up, Django test client, PostgreSQL; "
        f"target under {TARGET_SECONDS} s for the page and its JSON.",
    )
    load_before = benchlib.load_average()
    with scratch_portal("job-page") as tmp:
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        rows, ingest = measure(args.runs, tmp)
    print(md_table(["request", "points", "median", "range", "answer"], rows))
    print(f"\n{ingest}")
    print(f"\nload average before: {load_before}; after: {benchlib.load_average()}")


if __name__ == "__main__":
    main()
