"""Every dashboard page of a large project: server time and SQL queries per page.

A project of ``--sites`` enrolled sites (100) and ``--jobs`` jobs (1,000: every state, five
submitters, ten experiments, tags; each job on five sites), one running job on every site with
``--rounds`` rounds (20) of tasks, 50 log lines a site, two metric keys a site and round, and
the round aggregates, and ``--compare-runs`` finished jobs (10) of ``--compare-rounds`` rounds
(100) with per-site and aggregate points for two keys, the compare page's worst case. Then,
through Django's test client signed in as the project admin (who sees the most: every
approval, the sites' settings), each page's median and largest time over ``--runs`` requests
(after one warm-up) and its number of SQL queries.

The pages are found from ``dashboard.urls``: every route must be either timed here
(:data:`PAGES`) or named an action in :data:`ACTIONS` (POST only, or signing in and out), else
the bench stops and names it, so a page added later cannot go unmeasured.

Everything is the bench's own and removed at the end: a PostgreSQL database
``fedportal_bench_dashboard_<pid>`` (server from BENCH_POSTGRES_URL, default
postgres://postgres@127.0.0.1:5432) and a temporary media folder.

    .venv/bin/python bench/dashboard_pages.py
    .venv/bin/python bench/dashboard_pages.py --runs 9 --jobs 2000
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POSTGRES = os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432")
PAGE_TARGET = 0.5  # seconds, every page
COMPARE_TARGET = 1.0  # seconds, the compare page of 10 runs × 100 rounds
SITES_A_JOB = 5
LOG_LINES = 50
KEYS = ("loss", "accuracy")
STATES = ("completed", "completed", "completed", "failed", "aborted", "submitted", "waiting")


@dataclass
class Seeded:
    """What the pages are opened with."""

    slug: str
    admin: Any
    site_pk: int
    certificate_pk: int
    running: Any  # the job on every site, mid-way
    finished: Any  # a finished job of the compare set
    pending: Any  # a job waiting for its sites' decisions
    pending_site: str
    compared: list[Any] = field(default_factory=list)


def bench_env(tmp: Path, db_name: str) -> dict[str, str]:
    return {
        "DJANGO_SETTINGS_MODULE": "fedportal.settings.base",
        "DATABASE_URL": f"{POSTGRES}/{db_name}",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(32),
        "DJANGO_DEBUG": "false",
        "DJANGO_ALLOWED_HOSTS": "testserver",
        "DJANGO_MEDIA_ROOT": str(tmp / "media"),
        "FEDPORTAL_DATA_DIR": str(tmp / "data"),
        "FEDPORTAL_CA_KEY_ENCRYPTION_KEY": "bench-only-ca-key-encryption-key",
        # Nothing listens: events of the set-up go to groups of the bench's own, and nowhere.
        "FEDPORTAL_CHANNELS_PREFIX": f"bench-dashboard-{os.getpid()}",
    }


def _submit(project: Any, user: Any, name: str, sites: list[str], tmp: Path) -> Any:
    """A real submission: the stored archive and initial model the copies below share."""
    import torch

    from client_agent.wire import save_state_dict
    from jobs.bundle import build_spec
    from jobs.services.submission import job_submit
    from jobs.workflows import FedAvg

    spec = build_spec(
        name=name,
        workflow=FedAvg(min_clients=min(3, len(sites)), num_rounds=5),
        train_script="client.py",
        train_args="--epochs 1",
    )
    model = tmp / "initial.safetensors"
    save_state_dict(model, {"w": torch.zeros(4)})
    app = io.BytesIO()
    with zipfile.ZipFile(app, "w") as zf:
        zf.writestr("client.py", "print('bench')\n")
    return job_submit(
        project=project,
        submitted_by=user,
        spec=spec,
        initial_model=io.BytesIO(model.read_bytes()),
        app_archive=io.BytesIO(app.getvalue()),
        sites=sites,
    )


def _sites(project: Any, org: Any, admin: Any, count: int) -> list[Any]:
    from client_agent import signing
    from sites import services

    key = signing.generate_key()  # one key for all: the bench measures pages, not enrolment
    sites = []
    for index in range(count):
        site = services.site_request(
            organization=org,
            name=f"site-{index:03d}",
            contact_email=f"ops@site-{index:03d}.example.org",
            requested_by=admin,
        )
        site, token = services.site_approve(site=site, approved_by=admin)
        services.site_enrol(token=token, csr_pem=signing.make_csr(key, site.name, project.name))
        site.refresh_from_db()
        sites.append(site)
    return sites


def _copies(template: Any, users: list[Any], sites: list[Any], count: int) -> None:
    """``count`` jobs like ``template`` (sharing its stored files), in every state, on five
    sites each, over the last ``count`` hours."""
    from django.utils import timezone

    from jobs.models import Job, JobSite

    now = timezone.now()
    jobs = []
    for i in range(count):
        state = STATES[i % len(STATES)]
        created = now - dt.timedelta(hours=count - i)
        jobs.append(
            Job(
                uid=uuid.uuid4(),
                project_id=template.project_id,
                name=f"run-{i:04d}",
                experiment=f"exp-{i % 10}",
                tags=[f"lr-{i % 4}", "baseline" if i % 3 == 0 else "tuned"],
                submitted_by=users[i % len(users)],
                workflow=template.workflow,
                params=template.params,
                spec=template.spec,
                min_clients=template.min_clients,
                num_rounds=template.num_rounds,
                round_timeout_seconds=template.round_timeout_seconds,
                app_archive=template.app_archive.name,
                app_sha256=template.app_sha256,
                state=state,
                completed_rounds=5 if state == "completed" else 0,
                total_rounds=5,
                created_at=created,
                started_at=created if state not in ("submitted", "waiting") else None,
                finished_at=created + dt.timedelta(minutes=30)
                if state in ("completed", "failed", "aborted")
                else None,
            )
        )
    Job.objects.bulk_create(jobs, batch_size=500)
    decision = {"submitted": "pending", "waiting": "pending"}
    JobSite.objects.bulk_create(
        (
            JobSite(
                job=job,
                site=sites[(n + k) % len(sites)],
                decision=decision.get(job.state, "accepted"),
            )
            for n, job in enumerate(jobs)
            for k in range(SITES_A_JOB)
        ),
        batch_size=2000,
    )


def _rounds(job: Any, sites: list[Any], rounds: int, *, open_last: bool) -> None:
    """``rounds`` rounds of tasks and metric points (each site and the aggregate, two keys),
    and model versions sharing the initial model's file."""
    from django.utils import timezone

    from jobs.models import (
        Job,
        JobSite,
        MetricPoint,
        ModelVersion,
        Round,
        RoundState,
        SiteTask,
        TaskState,
    )

    now = timezone.now()
    JobSite.objects.filter(job=job).update(decision="accepted")
    made = Round.objects.bulk_create(
        Round(
            job=job,
            number=n,
            state=RoundState.OPEN if open_last and n == rounds - 1 else RoundState.CLOSED,
            opened_at=now,
            deadline=now + dt.timedelta(minutes=10),
            closed_at=None if open_last and n == rounds - 1 else now,
            metrics={"loss": 1 / (n + 1), "accuracy": n / rounds},
        )
        for n in range(rounds)
    )
    SiteTask.objects.bulk_create(
        (
            SiteTask(
                round=rnd,
                site=site,
                state=TaskState.TRAINING
                if rnd.state == RoundState.OPEN and i % 2
                else TaskState.ASSIGNED
                if rnd.state == RoundState.OPEN
                else TaskState.ACCEPTED,
            )
            for rnd in made
            for i, site in enumerate(sites)
        ),
        batch_size=2000,
    )
    points = [
        MetricPoint(job=job, site=site, key=key, value=1 / (n + s + 1), round_number=n)
        for n in range(rounds)
        for s, site in enumerate(sites)
        for key in KEYS
    ]
    points += [
        MetricPoint(job=job, key=key, value=1 / (n + 1), round_number=n, source="aggregate")
        for n in range(rounds)
        for key in KEYS
    ]
    MetricPoint.objects.bulk_create(points, batch_size=5000)
    initial = ModelVersion.objects.get(job=job, round_number=0)
    ModelVersion.objects.bulk_create(
        ModelVersion(
            job=job,
            round_number=n,
            file=initial.file.name,
            sha256=initial.sha256,
            size=initial.size,
            metrics={"loss": 1 / n},
        )
        for n in range(1, min(rounds, 20) + 1)
    )
    closed = rounds - 1 if open_last else rounds
    Job.objects.filter(pk=job.pk).update(
        state="running" if open_last else "completed",
        completed_rounds=closed,
        total_rounds=rounds,
        round_sites=sorted(s.name for s in sites),
        started_at=now,
        finished_at=None if open_last else now,
    )
    job.refresh_from_db()


def seed(
    tmp: Path,
    *,
    jobs: int = 1000,
    sites: int = 100,
    rounds: int = 20,
    compare_runs: int = 10,
    compare_rounds: int = 100,
) -> Seeded:
    """The bench's project, in the database Django is set up on."""
    from django.contrib.auth import get_user_model

    from jobs.models import LogLine
    from sites import services
    from sites.models import Certificate, Role

    users_model = get_user_model().objects
    admin = users_model.create_user("bench-admin", "admin@example.org", None)
    project = services.project_create(name="Dashboard bench", created_by=admin)
    org = services.organization_create(project=project, name="Bench hospital", created_by=admin)
    submitters = [admin]
    for index in range(4):
        user = users_model.create_user(f"bench-lead-{index}", f"lead{index}@example.org", None)
        services.membership_add(organization=org, user=user, role=Role.LEAD, added_by=admin)
        submitters.append(user)
    enrolled = _sites(project, org, admin, sites)
    names = [s.name for s in enrolled]

    running = _submit(project, admin, "running-on-every-site", names, tmp)
    _rounds(running, enrolled, rounds, open_last=True)
    LogLine.objects.bulk_create(
        (
            LogLine(job=running, site=site, round_number=i % rounds, text=f"epoch {i}: loss {i}")
            for site in enrolled
            for i in range(LOG_LINES)
        ),
        batch_size=5000,
    )
    compared = []
    for index in range(compare_runs):
        job = _submit(
            project, submitters[index % len(submitters)], f"compare-{index}", names[:5], tmp
        )
        _rounds(job, enrolled[:5], compare_rounds, open_last=False)
        compared.append(job)
    pending = _submit(project, submitters[1], "waiting-for-decisions", names[:3], tmp)
    _copies(running, submitters, enrolled, max(0, jobs - compare_runs - 2))
    return Seeded(
        slug=project.slug,
        admin=admin,
        site_pk=enrolled[0].pk,
        certificate_pk=Certificate.objects.filter(site=enrolled[0]).first().pk,  # type: ignore[union-attr]
        running=running,
        finished=compared[0] if compared else running,
        pending=pending,
        pending_site=names[1],
        compared=compared,
    )


# Each timed route: its rows, as (label, path). A route listed twice shows two cases.
Case = tuple[str, str]
PAGES: dict[str, Callable[[Seeded], list[Case]]] = {
    "login": lambda s: [("sign-in page (anonymous)", "/login/")],
    "project": lambda s: [
        ("project, first page of jobs", f"/projects/{s.slug}/"),
        (
            "project, jobs filtered (state, experiment, tag)",
            f"/projects/{s.slug}/?state=completed&experiment=exp-3&tag=tuned",
        ),
    ],
    "project-sites-rows": lambda s: [("project: sites table", f"/projects/{s.slug}/sites-status/")],
    "project-jobs-rows": lambda s: [("project: jobs table", f"/projects/{s.slug}/jobs-rows/")],
    "sites": lambda s: [("sites", f"/projects/{s.slug}/sites/")],
    "site": lambda s: [("a site", f"/projects/{s.slug}/sites/{s.site_pk}/")],
    "site-request": lambda s: [("request a site (form)", f"/projects/{s.slug}/sites/request/")],
    "certificate-revoke": lambda s: [
        (
            "revoke a certificate (confirmation)",
            f"/projects/{s.slug}/certificates/{s.certificate_pk}/revoke/",
        )
    ],
    "job-submit": lambda s: [("submit a job (form)", f"/projects/{s.slug}/jobs/new/")],
    "approvals": lambda s: [("job approvals", f"/projects/{s.slug}/approvals/")],
    "compare": lambda s: [
        (
            f"compare {len(s.compared)} runs",
            f"/projects/{s.slug}/compare/?" + "&".join(f"job={j.uid}" for j in s.compared),
        ),
        (
            f"compare {len(s.compared)} runs, per site",
            f"/projects/{s.slug}/compare/?sites=1&" + "&".join(f"job={j.uid}" for j in s.compared),
        ),
    ],
    "job": lambda s: [
        ("job, running on every site", f"/jobs/{s.running.uid}/"),
        ("job, finished", f"/jobs/{s.finished.uid}/"),
    ],
    "job-rounds": lambda s: [("job: rounds fragment", f"/jobs/{s.running.uid}/rounds/")],
    "job-models": lambda s: [("job: models fragment", f"/jobs/{s.running.uid}/models/")],
    "job-logs": lambda s: [("job: logs fragment", f"/jobs/{s.running.uid}/logs/")],
    "job-metrics": lambda s: [("job: charts' JSON", f"/jobs/{s.running.uid}/metrics.json")],
    "job-metrics-csv": lambda s: [
        ("job: every point as CSV (streamed)", f"/jobs/{s.running.uid}/metrics.csv")
    ],
    "approval": lambda s: [
        ("review a job for a site", f"/jobs/{s.pending.uid}/sites/{s.pending_site}/review/")
    ],
    "audit": lambda s: [("audit log", "/audit/")],
    "api-tokens": lambda s: [("API tokens", "/api-tokens/")],
}
# Routes that are not pages: what they do instead.
ACTIONS: dict[str, str] = {
    "logout": "POST: sign out",
    "site-approve": "POST",
    "site-deny": "POST",
    "site-token": "POST: shows the token once",
    "site-settings": "POST",
    "job-abort": "POST",
    "job-labels": "POST",
    "approval-decide": "POST",
    "approvals-decide": "POST",
    "api-token-revoke": "POST",
}


def unmeasured_routes() -> list[str]:
    """Dashboard routes neither timed nor named an action."""
    from django.urls import URLPattern

    from dashboard import urls

    names = {p.name for p in urls.urlpatterns if isinstance(p, URLPattern) and p.name}
    return sorted(names - set(PAGES) - set(ACTIONS))


@dataclass(frozen=True)
class Timing:
    label: str
    path: str
    status: int
    times: list[float]
    queries: int

    @property
    def median(self) -> float:
        ordered = sorted(self.times)
        return ordered[len(ordered) // 2]


def walk(seeded: Seeded, runs: int) -> list[Timing]:
    """Every case of :data:`PAGES`, ``runs`` times after one warm-up."""
    from django.core.signals import request_finished, request_started
    from django.db import close_old_connections, connection
    from django.http import StreamingHttpResponse
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    signed_in = Client()
    signed_in.force_login(seeded.admin)

    def get(path: str, client: Client) -> int:
        response = client.get(path)
        if isinstance(response, StreamingHttpResponse):
            for _ in response.streaming_content:
                pass
        return response.status_code

    timings = []
    for name, cases in PAGES.items():
        client = Client() if name == "login" else signed_in
        for label, path in cases(seeded):
            # The warm-up, whose queries are counted: with the connection kept open through
            # it (Django closes it at each request's end, which would drop the log).
            request_started.disconnect(close_old_connections)
            request_finished.disconnect(close_old_connections)
            try:
                with CaptureQueriesContext(connection) as captured:
                    status = get(path, client)
                queries = len(captured)  # now: a new connection starts an empty log
            finally:
                request_started.connect(close_old_connections)
                request_finished.connect(close_old_connections)
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                get(path, client)
                times.append(time.perf_counter() - started)
            timings.append(Timing(label, path, status, times, queries))
    return timings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed requests per page (median)")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=20, help="rounds of the running job")
    parser.add_argument("--compare-runs", type=int, default=10)
    parser.add_argument("--compare-rounds", type=int, default=100)
    args = parser.parse_args(argv)
    import benchlib
    from benchlib import md_table

    benchlib.print_header(
        "Dashboard pages of a large project (bench/dashboard_pages.py)",
        f"{args.jobs:,} jobs, {args.sites} sites; median and largest of {args.runs} requests "
        f"after one warm-up, Django test client, PostgreSQL; target under {PAGE_TARGET} s a "
        f"page, under {COMPARE_TARGET} s for comparing {args.compare_runs} runs × "
        f"{args.compare_rounds} rounds.",
    )
    import psycopg

    tmp = Path(tempfile.mkdtemp(prefix="fedportal-bench-dashboard-"))
    db_name = f"fedportal_bench_dashboard_{os.getpid()}"
    os.environ.update(bench_env(tmp, db_name))  # before django.setup(): settings read them
    server = psycopg.connect(f"{POSTGRES}/postgres", autocommit=True)
    try:
        server.execute(f'CREATE DATABASE "{db_name}"')
        import django

        django.setup()
        logging.getLogger().setLevel(logging.WARNING)
        missing = unmeasured_routes()
        if missing:
            print(f"dashboard routes with no case in PAGES or ACTIONS: {', '.join(missing)}")
            return 2
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        started = time.perf_counter()
        seeded = seed(
            tmp,
            jobs=args.jobs,
            sites=args.sites,
            rounds=args.rounds,
            compare_runs=args.compare_runs,
            compare_rounds=args.compare_rounds,
        )
        seeding = time.perf_counter() - started
        timings = walk(seeded, args.runs)
    finally:
        if "django" in sys.modules:
            from django.db import connections

            connections.close_all()
        server.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        server.close()
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    failed = False
    for t in timings:
        target = COMPARE_TARGET if t.label.startswith("compare") else PAGE_TARGET
        ok = t.status == 200 and t.median < target
        failed |= not ok
        rows.append(
            [
                t.label,
                t.status,
                f"**{t.median:.3f} s** {'✓' if ok else '✗'}",
                f"{max(t.times):.3f} s",
                t.queries,
            ]
        )
    print(md_table(["page", "status", "median", "largest", "SQL queries"], rows))
    verdict = "some pages missed their target (✗)" if failed else "every page met its target"
    print(f"\nseeding took {seeding:.1f} s; {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
