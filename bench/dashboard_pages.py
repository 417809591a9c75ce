"""Every dashboard page of a large project: server time and SQL queries per page.

A project of ``--sites`` enrolled sites (100) and ``--jobs`` jobs (1,000: every state, five
submitters, ten experiments, tags; each job on five sites), one running job on every site with
``--rounds`` rounds (20) of tasks, 50 log lines a site, two metric keys a site and round, and
the round aggregates, and ``--compare-runs`` finished jobs (10) of ``--compare-rounds`` rounds
(100) with per-site and aggregate points for two keys, the compare page's worst case; and
organisations, members and invitations in proportion to the sites, and a staged job bundle.
Then, through Django's test client signed in as the project admin (who sees the most: every
approval, the sites' settings, the people pages), each page's median and largest time over
``--runs`` requests (after one warm-up) and its number of SQL queries. A second project of a
tenth of the jobs and sites is walked once: a page with more queries in the large project
than in the small one has queries that grow with jobs, sites or people (marked ▲).

The pages are found from ``dashboard.urls`` (and the home page the top-level URLs mount):
every route must be either timed here (:data:`PAGES`) or named an action in :data:`ACTIONS`
(POST only, or signing out), else the bench stops with exit status 2 and names it, so a page
added later cannot go unmeasured; a page that does not answer 200 ends it with status 1.

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
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    bundle_token: str = ""  # a bundle the admin uploaded, waiting on its preview page
    invitation_token: str = ""  # an invitation to someone else, as its link carries it


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


def _stage_bundle(project: Any, user: Any, tmp: Path) -> str:
    """A bundle as ``recipe.export`` writes it, zipped and staged as the upload page does."""
    import json

    import torch

    from client_agent.wire import save_state_dict
    from dashboard import bundle_upload
    from jobs.bundle import APP_DIR, MODEL_FILE, SPEC_FILE, build_spec
    from jobs.workflows import FedAvg

    spec = build_spec(
        name="uploaded-bundle",
        workflow=FedAvg(min_clients=2, num_rounds=5),
        train_script="client.py",
        train_args="--epochs 1",
    )
    model = tmp / "bundle.safetensors"
    save_state_dict(model, {"w": torch.zeros(4), "b": torch.zeros(2, 3)})
    bundle = io.BytesIO()
    with zipfile.ZipFile(bundle, "w") as zf:
        zf.writestr(SPEC_FILE, json.dumps(spec))
        zf.writestr(MODEL_FILE, model.read_bytes())
        zf.writestr(f"{APP_DIR}/client.py", "print('bench')\n")
    bundle.seek(0)
    return bundle_upload.stage(bundle, project_id=project.pk, user_id=user.pk)


def _people(project: Any, host: Any, admin: Any, name: str, sites: int) -> str:
    """Organisations (a twentieth of the sites, at least two) with members (a fifth of the
    sites, at least two), and pending invitations; the token of the last invitation."""
    from django.contrib.auth import get_user_model

    from sites import services
    from sites.models import Role

    users = get_user_model().objects
    orgs = [host] + [
        services.organization_create(project=project, name=f"Partner {i}", created_by=admin)
        for i in range(max(2, sites // 20))
    ]
    for i in range(max(2, sites // 5)):
        user = users.create_user(f"{name}-member-{i}", f"member{i}@{name}.example.org", None)
        services.membership_add(
            organization=orgs[i % len(orgs)], user=user, role=Role.MEMBER, added_by=admin
        )
    token = ""
    for i in range(5):
        _, token = services.invitation_create(
            organization=orgs[i % len(orgs)],
            role=Role.MEMBER,
            invited_by=admin,
            email=f"invitee{i}@{name}.example.org",
        )
    return token


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
    name: str = "bench",
) -> Seeded:
    """The bench's project, in the database Django is set up on; ``name`` tells apart the
    projects (and their people) of one database."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission

    from jobs.models import LogLine
    from sites import services
    from sites.models import Certificate, Role

    users_model = get_user_model().objects
    admin = users_model.create_user(f"{name}-admin", f"admin@{name}.example.org", None)
    # One who may create projects, so that the new-project page opens too.
    admin.user_permissions.add(
        Permission.objects.get(content_type__app_label="sites", codename="add_project")
    )
    project = services.project_create(name=f"Dashboard {name}", created_by=admin)
    org = services.organization_create(project=project, name="Bench hospital", created_by=admin)
    submitters = [admin]
    for index in range(4):
        user = users_model.create_user(
            f"{name}-lead-{index}", f"lead{index}@{name}.example.org", None
        )
        services.membership_add(organization=org, user=user, role=Role.LEAD, added_by=admin)
        submitters.append(user)
    invitation = _people(project, org, admin, name, sites)
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
        bundle_token=_stage_bundle(project, admin, tmp),
        invitation_token=invitation,
    )


# Each timed route: its rows, as (label, path). A route listed twice shows two cases.
Case = tuple[str, str]
PAGES: dict[str, Callable[[Seeded], list[Case]]] = {
    "login": lambda s: [("sign-in page (anonymous)", "/login/")],
    "home": lambda s: [("home (your projects)", "/")],
    "project-new": lambda s: [("new project (form)", "/new-project/")],
    "project-settings": lambda s: [("project settings", f"/projects/{s.slug}/settings/")],
    "organizations": lambda s: [("organisations", f"/projects/{s.slug}/organizations/")],
    "members": lambda s: [("members", f"/projects/{s.slug}/members/")],
    "invitations": lambda s: [("invitations", f"/projects/{s.slug}/invitations/")],
    "invitation-accept": lambda s: [
        ("an invitation's link", f"/invitations/accept/?token={s.invitation_token}")
    ],
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
    "job-bundle": lambda s: [("upload a job bundle (form)", f"/projects/{s.slug}/jobs/upload/")],
    "job-bundle-preview": lambda s: [
        ("uploaded bundle's preview", f"/projects/{s.slug}/jobs/upload/{s.bundle_token}/")
    ],
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
    "job-site-log": lambda s: [
        (
            "job: a site's whole log (streamed)",
            f"/jobs/{s.running.uid}/sites/{s.pending_site}/log.txt",
        )
    ],
    "job-log-search": lambda s: [
        ("job: search the logs", f"/jobs/{s.running.uid}/logs/search/?q=loss+1")
    ],
    "job-metric-table": lambda s: [
        ("job: metric table as CSV", f"/jobs/{s.running.uid}/metric-table.csv")
    ],
    "job-round-sites": lambda s: [
        ("job: who holds the round", f"/jobs/{s.running.uid}/round-sites/")
    ],
    "job-record": lambda s: [("job: whole record (JSON)", f"/jobs/{s.running.uid}/record.json")],
    "project-lagging": lambda s: [("project: sites lagging", f"/projects/{s.slug}/lagging/")],
    "approval": lambda s: [
        ("review a job for a site", f"/jobs/{s.pending.uid}/sites/{s.pending_site}/review/")
    ],
    "audit": lambda s: [("audit log", "/audit/")],
    "api-tokens": lambda s: [("API tokens", "/api-tokens/")],
}
# Routes that are not pages: what they do instead.
ACTIONS: dict[str, str] = {
    "organization-rename": "POST",
    "member-role": "POST",
    "member-remove": "POST",
    "invitation-revoke": "POST",
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


def dashboard_routes() -> set[str]:
    """Names of the dashboard's routes: ``dashboard.urls`` and the dashboard views the
    top-level URL configuration mounts itself (the home page)."""
    from django.urls import URLPattern

    from dashboard import urls
    from fedportal import urls as root

    names = {p.name for p in urls.urlpatterns if isinstance(p, URLPattern) and p.name}
    names |= {
        p.name
        for p in root.urlpatterns
        if isinstance(p, URLPattern) and p.name and p.callback.__module__.startswith("dashboard.")
    }
    return names


def unmeasured_routes() -> list[str]:
    """Dashboard routes neither timed nor named an action."""
    return sorted(dashboard_routes() - set(PAGES) - set(ACTIONS))


def stale_cases() -> list[str]:
    """Names in :data:`PAGES` or :data:`ACTIONS` that are no longer routes."""
    return sorted((set(PAGES) | set(ACTIONS)) - dashboard_routes())


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

    # A page that fails shows as its status (500) in the table rather than ending the walk.
    signed_in = Client(raise_request_exception=False)
    signed_in.force_login(seeded.admin)

    def get(path: str, client: Client) -> int:
        response = client.get(path)
        if isinstance(response, StreamingHttpResponse):
            for _ in response.streaming_content:
                pass
        return response.status_code

    timings = []
    for name, cases in PAGES.items():
        client = Client(raise_request_exception=False) if name == "login" else signed_in
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
    from benchlib.portal import scratch_portal

    benchlib.print_header(
        "Dashboard pages of a large project (bench/dashboard_pages.py)",
        f"{args.jobs:,} jobs, {args.sites} sites; median and largest of {args.runs} requests "
        f"after one warm-up, Django test client, PostgreSQL; target under {PAGE_TARGET} s a "
        f"page, under {COMPARE_TARGET} s for comparing {args.compare_runs} runs × "
        f"{args.compare_rounds} rounds.",
    )
    print(f"date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC\n", flush=True)
    load_before = benchlib.load_average()
    with scratch_portal("dashboard") as tmp:
        missing, stale = unmeasured_routes(), stale_cases()
        if missing or stale:
            if missing:
                print(f"dashboard routes with no case in PAGES or ACTIONS: {', '.join(missing)}")
            if stale:
                print(f"names in PAGES or ACTIONS that are no routes: {', '.join(stale)}")
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
        # A tenth of the jobs and sites, the same rounds and runs: a page whose queries differ
        # between the two has queries that grow with jobs or sites.
        small = seed(
            tmp,
            jobs=max(args.compare_runs + 12, args.jobs // 10),
            sites=max(SITES_A_JOB + 1, args.sites // 10),
            rounds=args.rounds,
            compare_runs=args.compare_runs,
            compare_rounds=args.compare_rounds,
            name="small",
        )
        seeding = time.perf_counter() - started
        timings = walk(seeded, args.runs)
        small_queries = [t.queries for t in walk(small, 1)]
    rows = []
    missed, broken, growing = [], [], []
    for t, few in zip(timings, small_queries, strict=True):
        target = COMPARE_TARGET if t.label.startswith("compare") else PAGE_TARGET
        ok = t.status == 200 and t.median < target
        if t.status != 200:
            broken.append(f"{t.label} ({t.status}: {t.path})")
        elif not ok:
            missed.append(t.label)
        if t.queries > few:
            growing.append(f"{t.label} ({few} → {t.queries})")
        rows.append(
            [
                t.label,
                t.status,
                f"**{t.median:.3f} s** {'✓' if ok else '✗'}",
                f"{max(t.times):.3f} s",
                f"{t.queries}{' ▲' if t.queries > few else ''}",
                few,
            ]
        )
    print(
        md_table(
            [
                "page",
                "status",
                "median",
                "largest",
                "SQL queries",
                f"queries with {max(args.compare_runs + 12, args.jobs // 10)} jobs, "
                f"{max(SITES_A_JOB + 1, args.sites // 10)} sites",
            ],
            rows,
        )
    )
    print(f"\nseeding took {seeding:.1f} s")
    print(f"load average before: {load_before}; after: {benchlib.load_average()}")
    print(f"missed the target (✗): {', '.join(missed) or 'none'}")
    print(f"queries grow with jobs or sites (▲): {', '.join(growing) or 'none'}")
    if broken:
        print(f"did not answer 200: {', '.join(broken)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
