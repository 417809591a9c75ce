"""The update check (``jobs.services.rounds.round_updates_check``, and ``update_check`` of
one task) as a worker runs it after uploads: every update of the round waiting for its check
is decided by one call, in statements that do not grow with their number, and a task another
worker decided meanwhile is left alone.

The uploads' check tasks and the job's kicks are collected here instead of run, so that the
test decides when a check runs and which updates are waiting for it."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext

from client_agent.config import PRIVACY_META_KEY
from client_agent.fl_model import FLModel
from client_agent.privacy.ledger import PrivacyLedger
from client_agent.privacy.policy import PrivacyPolicy
from client_agent.privacy.release import json_report
from client_agent.wire import write_model_file
from jobs import tasks as job_tasks
from jobs.models import Job, JobSite, MetricPoint, SiteTask, TaskState
from jobs.services import rounds
from jobs.services.privacy import upload_privacy_report
from sites.models import Site
from tests.portal.rounds_helpers import submit, three_sites, upload, upload_bytes

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("eager_celery", "media"),
]

GOOD = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(1)}
NAN = {"w": torch.tensor([float("nan"), 0.0]), "n": torch.tensor(1)}


@dataclass
class Enqueued:
    """What was enqueued: the update checks' round ids and the job advances' job ids."""

    checks: list[int] = field(default_factory=list)
    kicks: list[int] = field(default_factory=list)


@pytest.fixture
def running(tmp_path: Path) -> tuple[Job, list[Site]]:
    """A one-round FedAvg job that needs all three sites, its round open, and the sites."""
    project, sites = three_sites()
    return submit(tmp_path, project, min_clients=3, num_rounds=1), sites


@pytest.fixture
def enqueued(running: tuple[Job, list[Site]], monkeypatch: pytest.MonkeyPatch) -> Enqueued:
    """Once the job runs, its update checks and advances are collected, not run: the worker
    is the test."""
    collected = Enqueued()
    monkeypatch.setattr(job_tasks.round_updates_check_task, "delay", collected.checks.append)
    monkeypatch.setattr(job_tasks.job_advance_task, "delay", collected.kicks.append)
    return collected


def check_counted(task: SiteTask) -> tuple[dict[int, str], int]:
    """The check of ``task``'s round as the worker runs it: what it decided, and its
    statements."""
    with CaptureQueriesContext(connection) as captured:
        decided = rounds.round_updates_check(round_id=task.round_id)
    return decided, len(captured.captured_queries)


def result_points(job: Job) -> list[tuple[str, str, float]]:
    """The result metric points stored for ``job``: (site, key, value)."""
    points = MetricPoint.objects.filter(job=job, source=MetricPoint.Source.RESULT)
    return sorted(points.values_list("site__name", "key", "value"))


def test_one_check_decides_every_waiting_update_in_statements_that_do_not_grow(
    running: tuple[Job, list[Site]], enqueued: Enqueued
) -> None:
    job, (first, second, third) = running
    alone = upload(job, first, 0, GOOD, weight=2, metrics={"loss": 0.5, "accuracy": 0.9})
    assert enqueued.checks == [alone.round_id]

    decided, statements_alone = check_counted(alone)
    assert decided == {alone.pk: TaskState.ACCEPTED}
    assert enqueued.kicks == []  # two sites have not answered yet

    accepted = upload(job, second, 0, GOOD, weight=3, metrics={"loss": 0.25, "accuracy": 0.8})
    rejected = upload(job, third, 0, NAN, metrics={"loss": float("nan")})
    decided, statements_together = check_counted(accepted)

    # Two updates recorded in the statements of one: the round's row locked once, the
    # tasks selected, updated and their points inserted once each, one count of the rest.
    assert decided == {accepted.pk: TaskState.ACCEPTED, rejected.pk: TaskState.REJECTED}
    assert statements_together == statements_alone
    site_1, site_2, site_3 = SiteTask.objects.filter(round__job=job).order_by("site__name")
    assert (site_1.state, site_1.weight, site_1.metrics) == (
        TaskState.ACCEPTED,
        2.0,
        {"loss": 0.5, "accuracy": 0.9},
    )
    assert (site_2.state, site_2.weight, site_2.metrics) == (
        TaskState.ACCEPTED,
        3.0,
        {"loss": 0.25, "accuracy": 0.8},
    )
    # A rejected update's metrics were never checked (NaN here): none is kept.
    assert (site_3.state, site_3.weight, site_3.metrics) == (TaskState.REJECTED, None, {})
    assert "NaN" in site_3.reason
    assert result_points(job) == [
        ("site-1", "accuracy", 0.9),
        ("site-1", "loss", 0.5),
        ("site-2", "accuracy", 0.8),
        ("site-2", "loss", 0.25),
    ]
    # Every site answered: the job is advanced once, by the check that decided the last.
    assert enqueued.kicks == [job.pk]

    # The third upload's own check finds nothing waiting and records nothing more; so does a
    # check of its task alone (what portals before the round's check enqueued).
    assert enqueued.checks == [alone.round_id] * 3
    assert rounds.round_updates_check(round_id=rejected.round_id) == {}
    assert rounds.update_check(task_id=rejected.pk) == "nothing: task is rejected"
    assert len(result_points(job)) == 4
    assert enqueued.kicks == [job.pk]


def decided_by_another_worker_while_read(
    monkeypatch: pytest.MonkeyPatch, task: SiteTask, reason: str
) -> None:
    """While the check reads ``task``'s file (before its transaction), another worker's check
    of the same task commits: ``task`` is rejected with ``reason``."""

    def read_while_another_worker_decides(path: Any) -> Any:
        if Path(path) == Path(task.update.path):
            SiteTask.objects.filter(pk=task.pk).update(state=TaskState.REJECTED, reason=reason)
        return upload_privacy_report(path)

    monkeypatch.setattr(rounds, "upload_privacy_report", read_while_another_worker_decides)


def test_a_task_another_worker_decided_meanwhile_is_left_as_that_worker_left_it(
    running: tuple[Job, list[Site]], enqueued: Enqueued, monkeypatch: pytest.MonkeyPatch
) -> None:
    job, (first, second, _) = running
    mine = upload(job, first, 0, GOOD, metrics={"loss": 0.5})
    other = upload(job, second, 0, GOOD, metrics={"loss": 0.25})
    decided_by_another_worker_while_read(monkeypatch, mine, "decided by the other worker")

    assert rounds.update_check(task_id=mine.pk) == "nothing: checked meanwhile"

    mine.refresh_from_db()
    other.refresh_from_db()
    assert (mine.state, mine.reason) == (TaskState.REJECTED, "decided by the other worker")
    assert other.state == TaskState.ACCEPTED
    # Only the task this check decided has its points: the other worker's is not written over.
    assert result_points(job) == [("site-2", "loss", 0.25)]
    assert enqueued.kicks == []  # site-3 has not answered


@pytest.mark.skipif(
    connection.vendor != "postgresql", reason="needs PostgreSQL: two connections and row locks"
)
def test_two_workers_checking_the_same_updates_at_once_decide_each_task_once(
    running: tuple[Job, list[Site]], enqueued: Enqueued, monkeypatch: pytest.MonkeyPatch
) -> None:
    job, (first, second, _) = running
    tasks = [
        upload(job, first, 0, GOOD, metrics={"loss": 0.5}),
        upload(job, second, 0, GOOD, metrics={"loss": 0.25}),
    ]
    # Each worker waits at each file for the other: both have found both updates waiting, and
    # both read both files, before either records.
    both_reading = threading.Barrier(2, timeout=30)

    def read_in_step(path: Any) -> Any:
        both_reading.wait()
        return upload_privacy_report(path)

    monkeypatch.setattr(rounds, "upload_privacy_report", read_in_step)
    outcomes: list[str] = []
    errors: list[BaseException] = []

    def worker(task: SiteTask) -> None:
        try:
            outcomes.append(rounds.update_check(task_id=task.pk))
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()  # this thread's own connection

    workers = [threading.Thread(target=worker, args=(task,)) for task in tasks]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(60)

    assert errors == []
    # The first to lock the round decided both; the second found nothing left to decide.
    assert sorted(outcomes) == [TaskState.ACCEPTED, "nothing: checked meanwhile"]
    assert [t.state for t in SiteTask.objects.filter(pk__in=[t.pk for t in tasks])] == [
        TaskState.ACCEPTED,
        TaskState.ACCEPTED,
    ]
    assert result_points(job) == [("site-1", "loss", 0.5), ("site-2", "loss", 0.25)]


def test_a_metric_name_no_database_column_takes_rejects_that_update_alone(
    running: tuple[Job, list[Site]], enqueued: Enqueued
) -> None:
    """A NUL in a metric's name (PostgreSQL refuses it in a text column) is refused by the
    check, naming it: the batch's other update is recorded with it, in the same call."""
    job, (first, second, _) = running
    refused = upload(job, first, 0, GOOD, metrics={"lo\x00ss": 0.5})
    accepted = upload(job, second, 0, GOOD, metrics={"loss": 0.25})

    assert rounds.update_check(task_id=accepted.pk) == TaskState.ACCEPTED

    refused.refresh_from_db()
    accepted.refresh_from_db()
    assert (refused.state, refused.metrics) == (TaskState.REJECTED, {})
    assert "metric names cannot hold a NUL character" in refused.reason
    assert accepted.state == TaskState.ACCEPTED
    assert result_points(job) == [("site-2", "loss", 0.25)]


def private_update(tmp: Path, site: Site, releases: int) -> bytes:
    """``site``'s update carrying its privacy ledger's report after ``releases`` rounds."""
    policy = PrivacyPolicy(clip_norm=1.0, noise_multiplier=1.1, max_epsilon=30.0, sha256="c" * 64)
    ledger = PrivacyLedger(tmp / f"ledger-{site.name}.json")
    report: dict[str, Any] = {}
    for number in range(releases):
        report = ledger.record("a-job", round=number, policy=policy)
    path = tmp / f"update-{site.name}.safetensors"
    meta = {"NUM_STEPS_CURRENT_ROUND": 1.0, PRIVACY_META_KEY: json_report(report)}
    write_model_file(path, FLModel(params=GOOD, meta=meta))
    return path.read_bytes()


def test_the_privacy_reports_of_updates_checked_together_are_each_kept(
    tmp_path: Path, running: tuple[Job, list[Site]], enqueued: Enqueued
) -> None:
    job, sites = running
    tasks = [
        upload_bytes(job, site, 0, private_update(tmp_path, site, releases))
        for releases, site in enumerate(sites, start=1)
    ]

    assert rounds.update_check(task_id=tasks[0].pk) == TaskState.ACCEPTED

    for releases, site in enumerate(sites, start=1):
        task = SiteTask.objects.get(round__job=job, site=site)
        assert (task.state, task.privacy["releases"]) == (TaskState.ACCEPTED, releases)
        assert JobSite.objects.get(job=job, site=site).privacy["releases"] == releases
    assert enqueued.kicks == [job.pk]


def test_a_rounds_close_reads_its_plan_once_not_with_every_accepted_task(
    running: tuple[Job, list[Site]], enqueued: Enqueued
) -> None:
    # The round's plan and the job's site list grow with the sites: read with each accepted
    # task, a round's close decoded them once a site (the square of the sites in all).
    job, sites = running
    for site in sites:
        rounds.update_check(task_id=upload(job, site, 0, GOOD).pk)
    with CaptureQueriesContext(connection) as captured:
        while rounds.job_advance(job_id=job.pk).step != rounds.Step.NOTHING:
            pass

    job.refresh_from_db()
    assert job.state == "completed"
    reading_plans = [
        q["sql"] for q in captured.captured_queries if '"jobs_round"."plan"' in q["sql"]
    ]
    assert reading_plans and not [sql for sql in reading_plans if '"jobs_sitetask"' in sql]
