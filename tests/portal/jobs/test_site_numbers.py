"""No number a site sends can wedge a job, and a round that cannot close fails with the reason.

A site is run by another organisation: its update's weight and metrics, its ``flare.log``
points, are checked where they enter. Whatever still goes wrong while a round closes either
waits out a database that went away for a moment, or fails the round and the job, naming why:
it never leaves the job ``running`` with a round ``aggregating`` forever.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from django.conf import settings
from django.db import OperationalError
from safetensors.torch import save

from common.exceptions import ValidationFailed
from jobs.models import (
    Job,
    JobState,
    MetricPoint,
    ModelVersion,
    Round,
    RoundState,
    SiteTask,
    TaskState,
)
from jobs.selectors import task_for_site
from jobs.services import rounds
from jobs.services.telemetry import metrics_record
from jobs.workflows.fedavg import FedAvg
from tests.portal.rounds_helpers import submit, three_sites, upload, upload_bytes

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("eager_celery")]

ONE = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(1)}


def upload_raw_metadata(job: Job, site, round_number: int, fields: str) -> SiteTask:
    """An update whose FLModel metadata is exactly ``fields``: what a hostile site can send."""
    data = save(dict(ONE), metadata={"fedportal.flmodel": fields})
    return upload_bytes(job, site, round_number, data)


def test_a_huge_weight_is_rejected_and_the_round_closes_on_the_others(tmp_path: Path) -> None:
    # Before: weight 1e308 with loss 5 made the aggregate loss infinite; PostgreSQL refused to
    # store it, and the round stayed aggregating on every retry.
    project, sites = three_sites()
    job = submit(tmp_path, project, min_clients=2, num_rounds=1)
    upload(job, sites[0], 0, ONE, weight=1e308, metrics={"loss": 5.0})
    upload(job, sites[1], 0, ONE, weight=1, metrics={"loss": 1.0})
    upload(job, sites[2], 0, ONE, weight=3, metrics={"loss": 2.0})

    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, job.failure_reason
    first = task_for_site(job=job, site=sites[0], round_number=0)
    assert first.state == TaskState.REJECTED
    assert "NUM_STEPS_CURRENT_ROUND" in first.reason and "2**53" in first.reason
    assert job.rounds.get().metrics == {"loss": (1.0 + 3 * 2.0) / 4}


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ('{"metrics": {"loss": Infinity}}', "Infinity"),
        ('{"metrics": {"loss": NaN}}', "NaN"),
        ('{"metrics": {"loss": 1e999}}', "got inf"),  # json reads the literal as inf
        ('{"metrics": {"loss": "low"}}', "metrics['loss']"),
        ('{"meta": {"NUM_STEPS_CURRENT_ROUND": 1e999}}', "got inf"),
        ('{"meta": ' + "[" * 50_000 + "]" * 50_000 + "}", "not JSON"),
    ],
    ids=["Infinity", "NaN", "1e999", "a string", "infinite weight", "deep nesting"],
)
def test_an_update_with_numbers_no_database_stores_is_rejected_not_stuck(
    tmp_path: Path, fields: str, named: str
) -> None:
    # Before: the update check crashed storing the metrics and left the task ``uploaded``
    # until the round's deadline.
    project, sites = three_sites()
    job = submit(tmp_path, project, min_clients=2, num_rounds=1)

    task = upload_raw_metadata(job, sites[0], 0, fields)

    task.refresh_from_db()
    assert task.state == TaskState.REJECTED, task.reason
    assert named in task.reason
    assert task.metrics == {}
    for site in sites[1:]:
        upload(job, site, 0, ONE)
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, job.failure_reason


def test_the_largest_numbers_a_site_may_send_are_aggregated_and_stored(tmp_path: Path) -> None:
    project, sites = three_sites()
    job = submit(tmp_path, project, min_clients=3, num_rounds=1)
    upload(job, sites[0], 0, ONE, weight=2**53, metrics={"perplexity": 1.5e308})
    upload(job, sites[1], 0, ONE, weight=2**53, metrics={"perplexity": 1.5e308})
    upload(job, sites[2], 0, ONE, weight=1, metrics={"perplexity": -1.5e308})

    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, job.failure_reason
    stored = MetricPoint.objects.get(job=job, source="aggregate", key="perplexity").value
    assert math.isfinite(stored) and 1.4e308 < stored <= 1.5e308


@pytest.mark.parametrize(
    ("point", "field"),
    [
        ({"key": "loss", "value": 1.0, "step": 2**63}, "points[0].step"),
        ({"key": "loss", "value": 1.0, "step": -(2**63) - 1}, "points[0].step"),
        ({"key": "loss", "value": 1.0, "round": 2**31}, "points[0].round"),
        ({"key": "loss", "value": 1.0, "round": -1}, "points[0].round"),
        ({"key": "loss", "value": 10**400}, "points[0].value"),
        ({"key": "loss", "value": float("inf")}, "points[0].value"),
        ({"key": "loss", "value": True}, "points[0].value"),
        ({"key": "lo\x00ss", "value": 1.0}, "points[0].key"),
        ({"key": "lo\ud800ss", "value": 1.0}, "points[0].key"),
    ],
    ids=[
        "step 2**63",
        "step below int64",
        "round 2**31",
        "round -1",
        "10**400",
        "inf",
        "bool",
        "NUL in the key",
        "lone surrogate in the key",
    ],
)
def test_a_flare_log_point_out_of_bounds_is_refused_naming_the_field(
    tmp_path: Path, point: dict[str, object], field: str
) -> None:
    project, sites = three_sites()
    job = submit(tmp_path, project, min_clients=2, num_rounds=1)

    with pytest.raises(ValidationFailed) as refused:
        metrics_record(job=job, site=sites[0], points=[point])

    assert refused.value.field == field
    assert MetricPoint.objects.filter(source="log").count() == 0


def test_the_extreme_step_and_round_a_site_may_log_are_stored(tmp_path: Path) -> None:
    project, sites = three_sites()
    job = submit(tmp_path, project, min_clients=2, num_rounds=1)

    stored = metrics_record(
        job=job,
        site=sites[0],
        points=[
            {"key": "a", "value": -1.5e308, "step": 2**63 - 1, "round": 2**31 - 1},
            {"key": "b", "value": 1, "step": -(2**63)},
        ],
    )

    assert stored == 2
    steps = MetricPoint.objects.order_by("step").values_list("step", flat=True)
    assert list(steps) == [-(2**63), 2**63 - 1]


# --- a round that cannot close -----------------------------------------------------------------


def _upload_all_but_last(job: Job, sites, round_number: int = 0) -> None:
    for site in sites[:-1]:
        upload(job, site, round_number, ONE)


def test_a_round_whose_aggregation_fails_fails_the_job_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("the sites' tensors disagree")

    monkeypatch.setattr(FedAvg, "close", broken)
    project, sites = three_sites()
    job = submit(tmp_path, project, min_clients=3, num_rounds=2)
    for site in sites:
        upload(job, site, 0, ONE)

    job.refresh_from_db()
    assert job.state == JobState.FAILED
    assert job.failure_reason.startswith("round 1: the new global model could not be made")
    assert "the sites' tensors disagree" in job.failure_reason
    assert job.rounds.get().state == RoundState.FAILED
    # Asked again (a retry, a restarted worker), nothing is attempted any more.
    assert rounds.job_advance(job_id=job.pk) == rounds.Advance(
        rounds.Step.NOTHING, "nothing: job is failed"
    )


def test_a_database_that_goes_away_mid_aggregation_is_waited_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = FedAvg.close
    outage = {"calls": 0, "failing": 1}

    def disconnected_at_first(self, *args, **kwargs):
        outage["calls"] += 1
        if outage["calls"] <= outage["failing"]:
            raise OperationalError("server closed the connection unexpectedly")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FedAvg, "close", disconnected_at_first)
    project, sites = three_sites()
    job = submit(tmp_path, project, min_clients=3, num_rounds=2)
    for site in sites:
        upload(job, site, 0, ONE)

    # The task was retried (eager Celery retries at once) and the round closed.
    job.refresh_from_db()
    assert outage["calls"] == 2
    assert job.completed_rounds == 1 and job.state == JobState.RUNNING, job.failure_reason

    # Still down: the service leaves the round aggregating for the next retry (or the next
    # worker's resume), and the job running; an outage fails nothing, nor counts as a death.
    outage["failing"] = 10**6
    _upload_all_but_last(job, sites, round_number=1)
    upload(job, sites[-1], 1, ONE)  # the task spends all its retries, inline
    with pytest.raises(OperationalError):  # for Celery to retry, not a failure of the round
        rounds.job_advance(job_id=job.pk)
    job.refresh_from_db()
    assert job.state == JobState.RUNNING
    assert job.rounds.get(number=1).state == RoundState.AGGREGATING
    assert job.rounds.get(number=1).aggregation_attempts == 0

    outage["failing"] = 0
    rounds.job_advance_while_due(job_id=job.pk)
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, job.failure_reason
    assert ModelVersion.objects.filter(job=job, round_number=2).exists()


def test_a_round_started_too_often_without_finishing_fails(tmp_path: Path) -> None:
    # Three workers each died while aggregating (out of memory): the next does not try again.
    project, sites = three_sites()
    job = submit(tmp_path, project, min_clients=3, num_rounds=1)
    _upload_all_but_last(job, sites)
    Round.objects.filter(job=job).update(
        state=RoundState.AGGREGATING,
        aggregation_attempts=settings.FEDPORTAL_ROUND_MAX_AGGREGATION_ATTEMPTS,
    )

    outcome = rounds.job_advance(job_id=job.pk)

    job.refresh_from_db()
    assert outcome == rounds.Advance(rounds.Step.FAILED, "failed: round 1 cannot close")
    assert job.state == JobState.FAILED
    assert "started 3 times and never finished" in job.failure_reason


def test_an_upload_stored_while_the_broker_is_down_is_kept_and_checked_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The upload commits, then its check cannot be enqueued (Redis restarting): the agent's
    # update must stay stored, as its row says, and the beat's resume checks it.
    from kombu.exceptions import OperationalError as BrokerDown

    from jobs import tasks as job_tasks

    project, sites = three_sites()
    job = submit(tmp_path, project, min_clients=3, num_rounds=1)

    def broker_down(*args: object, **kwargs: object) -> None:
        raise BrokerDown("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(job_tasks.round_updates_check_task, "delay", broker_down)
    stored = upload(job, sites[0], 0, ONE)  # answered: the update is stored
    monkeypatch.undo()

    stored.refresh_from_db()
    assert stored.state == TaskState.UPLOADED
    assert Path(stored.update.path).is_file()
    rounds.jobs_resume()  # what the beat does every FEDPORTAL_RESUME_SECONDS
    stored.refresh_from_db()
    assert stored.state == TaskState.ACCEPTED


def test_the_checked_numbers_are_what_the_round_aggregates(tmp_path: Path) -> None:
    # The aggregate uses the weights and metrics the check accepted and stored (floats),
    # not the update file's raw metadata.
    project, sites = three_sites()
    job = submit(tmp_path, project, min_clients=3, num_rounds=1)
    for weight, site in zip((1, 2, 3), sites, strict=True):
        upload(job, site, 0, ONE, weight=weight, metrics={"accuracy": weight / 10})

    tasks = SiteTask.objects.filter(round__job=job).order_by("site__name")
    assert [(t.weight, t.metrics) for t in tasks] == [
        (1.0, {"accuracy": 0.1}),
        (2.0, {"accuracy": 0.2}),
        (3.0, {"accuracy": 0.3}),
    ]
    aggregate = Job.objects.get(pk=job.pk).rounds.get().metrics
    assert aggregate == {"accuracy": pytest.approx((0.1 + 2 * 0.2 + 3 * 0.3) / 6)}
