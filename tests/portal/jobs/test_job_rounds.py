"""The job state machine through its services, with Celery tasks run inline (eager).

A whole job: submission, sites accepting, every round's updates, the exact FedAvg result,
rejected and late updates, quorum failure and abort. The same steps a real worker runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from django.utils import timezone

from client_agent.wire import load_state_dict
from common.exceptions import ValidationFailed
from jobs.models import Job, JobState, MetricPoint, ModelVersion, RoundState, TaskState
from jobs.selectors import task_for_site
from jobs.services import rounds
from jobs.services.participation import job_abort
from jobs.services.submission import job_submit
from tests.portal.factories import OrganizationFactory, enrolled_site
from tests.portal.rounds_helpers import make_bundle, submit, three_sites, upload

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("eager_celery")]


def test_a_job_runs_every_round_to_the_exact_fedavg_result(tmp_path: Path) -> None:
    project, sites = three_sites()
    job = submit(tmp_path, project)
    job.refresh_from_db()
    assert job.state == JobState.RUNNING
    assert job.rounds.get().state == RoundState.OPEN

    for rnd in range(2):
        base = load_state_dict(Path(ModelVersion.objects.get(job=job, round_number=rnd).file.path))
        for number, site in enumerate(sites, start=1):
            params = {"w": base["w"] + number, "n": base["n"] + 1}
            upload(job, site, rnd, params, weight=number, metrics={"accuracy": number / 10})

    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, job.failure_reason
    final = load_state_dict(Path(ModelVersion.objects.get(job=job, round_number=2).file.path))
    # Weights 1, 2, 3: each round adds (1·1 + 2·2 + 3·3) / 6 = 14/6 to w and 1 to n.
    expected = torch.tensor([0.0, 1.0]) + 2 * torch.tensor(14 / 6, dtype=torch.float32)
    assert torch.allclose(final["w"], expected)
    assert final["n"].item() == 6 and final["n"].dtype == torch.int64
    aggregate = MetricPoint.objects.filter(job=job, source="aggregate", key="accuracy")
    assert [round(p.value, 6) for p in aggregate.order_by("round_number")] == [
        round(14 / 60, 6)
    ] * 2
    assert MetricPoint.objects.filter(job=job, source="result").count() == 6


def test_two_long_metric_keys_with_a_common_prefix_are_both_recorded(tmp_path: Path) -> None:
    # 80 characters each, the first 64 the same: more than a point's id column holds.
    first, second = "m" * 64 + "a" * 16, "m" * 64 + "b" * 16
    project, sites = three_sites()
    job = submit(tmp_path, project, num_rounds=1)

    for number, site in enumerate(sites, start=1):
        params = {"w": torch.tensor([1.0, 2.0]) * number, "n": torch.tensor(5)}
        upload(job, site, 0, params, metrics={first: number / 10, second: number})

    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, job.failure_reason
    results = MetricPoint.objects.filter(job=job, source="result")
    assert sorted(results.values_list("site__name", "key", "value")) == sorted(
        (site.name, key, value)
        for number, site in enumerate(sites, start=1)
        for key, value in ((first, number / 10), (second, float(number)))
    )
    aggregate = MetricPoint.objects.filter(job=job, source="aggregate")
    assert {p.key: round(p.value, 6) for p in aggregate} == {
        first: round(0.2, 6),
        second: round(2.0, 6),
    }
    assert all(len(p.client_id) <= 64 for p in MetricPoint.objects.filter(job=job))


def test_a_nan_update_is_rejected_and_the_round_needs_min_clients(tmp_path: Path) -> None:
    project, sites = three_sites()
    job = submit(tmp_path, project, min_clients=3, num_rounds=1)
    upload(job, sites[0], 0, {"w": torch.tensor([float("nan"), 0.0]), "n": torch.tensor(1)})
    task = task_for_site(job=job, site=sites[0], round_number=0)
    assert task.state == TaskState.REJECTED and "NaN" in task.reason
    for site in sites[1:]:
        upload(job, site, 0, {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(1)})

    job.refresh_from_db()
    assert job.state == JobState.FAILED
    assert "min_clients is 3" in job.failure_reason and "site-1" in job.failure_reason


def test_an_update_after_the_round_closed_is_kept_as_late(tmp_path: Path) -> None:
    project, sites = three_sites()
    job = submit(tmp_path, project, min_clients=2, num_rounds=2)
    rnd = job.rounds.get(number=0)
    for site in sites[:2]:
        upload(job, site, 0, {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(1)})
    rnd.deadline = timezone.now()
    rnd.save()
    rounds.job_advance(job_id=job.pk)

    late = upload(job, sites[2], 0, {"w": torch.tensor([9.0, 9.0]), "n": torch.tensor(1)})

    assert late.state == TaskState.LATE
    round_one = load_state_dict(Path(ModelVersion.objects.get(job=job, round_number=1).file.path))
    assert torch.equal(round_one["w"], torch.tensor([1.0, 1.0]))


def test_bad_submissions_name_the_field_and_store_nothing(tmp_path: Path) -> None:
    project, _ = three_sites()
    spec, model, archive = make_bundle(tmp_path)
    bad_spec = {**spec, "params": {**spec["params"], "min_clients": 0}}
    with open(model, "rb") as m, open(archive, "rb") as a, pytest.raises(ValidationFailed) as err:
        job_submit(
            project=project,
            submitted_by=project.created_by,
            spec=bad_spec,
            initial_model=m,
            app_archive=a,
        )
    assert err.value.field == "spec.min_clients"
    with open(archive, "rb") as m, open(archive, "rb") as a, pytest.raises(ValidationFailed) as err:
        job_submit(
            project=project,
            submitted_by=project.created_by,
            spec=spec,
            initial_model=m,
            app_archive=a,
        )
    assert err.value.field == "initial_model"
    with open(model, "rb") as m, open(model, "rb") as a, pytest.raises(ValidationFailed) as err:
        job_submit(
            project=project,
            submitted_by=project.created_by,
            spec=spec,
            initial_model=m,
            app_archive=a,
        )
    assert err.value.field == "app"
    assert Job.objects.count() == 0
    assert ModelVersion.objects.count() == 0


def test_abort_stops_a_running_job(tmp_path: Path) -> None:
    project, _ = three_sites()
    job = submit(tmp_path, project)

    job = job_abort(job=job, actor=job.submitted_by)

    assert job.state == JobState.ABORTED
    assert job.failure_reason == f"aborted by {job.submitted_by.get_username()}"
    assert job.rounds.get().state == RoundState.FAILED
    assert rounds.job_advance(job_id=job.pk) == rounds.Advance(
        rounds.Step.NOTHING, "nothing: job is aborted"
    )


def test_a_site_coming_online_starts_a_waiting_job(tmp_path: Path) -> None:
    from sites.authentication import verify_signed_request

    organization = OrganizationFactory.create()
    enrolled = [enrolled_site(organization=organization, name=f"site-{i}") for i in (1, 2)]
    for e in enrolled:
        e.site.auto_accept_jobs = True
        e.site.last_heartbeat = timezone.now() if e is enrolled[0] else None
        e.site.save()
    job = submit(tmp_path, enrolled[0].site.project, min_clients=2)
    job.refresh_from_db()
    assert job.state == JobState.WAITING

    path = "/api/v1/agent/jobs/"
    verify_signed_request(
        method="GET", path=path, headers=enrolled[1].headers("GET", path), body=b""
    )

    job.refresh_from_db()
    assert job.state == JobState.RUNNING
    assert job.rounds.get().tasks.count() == 2
