"""The job state machine through its services, with Celery tasks run inline (eager).

A whole job: submission, sites accepting, every round's updates, the exact FedAvg result,
rejected and late updates, quorum failure and abort. The same steps a real worker runs.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
import torch
from django.utils import timezone

from client_agent.fl_model import FLModel
from client_agent.wire import load_state_dict, write_model_file
from common.exceptions import ValidationFailed
from jobs.bundle import pack_app
from jobs.models import Job, JobState, MetricPoint, ModelVersion, RoundState, TaskState
from jobs.recipes import FedAvgRecipe
from jobs.services import rounds
from jobs.services.sites import job_abort, task_for_site, update_upload
from jobs.services.submission import job_submit
from tests.portal.factories import OrganizationFactory, enrolled_site

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("eager_celery")]


def make_bundle(tmp_path: Path, *, min_clients: int = 3, num_rounds: int = 2):
    app = tmp_path / "app"
    app.mkdir()
    (app / "client.py").write_text("print('a client script')\n")
    recipe = FedAvgRecipe(
        name="portal-job",
        min_clients=min_clients,
        num_rounds=num_rounds,
        model={"w": torch.tensor([0.0, 1.0]), "n": torch.tensor(4)},
        train_script=str(app / "client.py"),
    )
    bundle = recipe.export(tmp_path / "bundle")
    archive = pack_app(bundle / "app", tmp_path / "app.zip")
    return recipe.spec(), bundle / "initial_model.safetensors", archive


def three_sites():
    organization = OrganizationFactory()
    sites = [enrolled_site(organization=organization, name=f"site-{i}") for i in (1, 2, 3)]
    for enrolled in sites:
        enrolled.site.auto_accept_jobs = True
        enrolled.site.last_heartbeat = timezone.now()
        enrolled.site.save()
    return organization.project, [e.site for e in sites]


def submit(tmp_path: Path, project, **kwargs) -> Job:
    spec, model, archive = make_bundle(tmp_path, **kwargs)
    with open(model, "rb") as m, open(archive, "rb") as a:
        return job_submit(
            project=project,
            submitted_by=project.created_by,
            spec=spec,
            initial_model=m,
            app_archive=a,
        )


def upload(job: Job, site, round_number: int, params, *, weight: float = 1.0, metrics=None):
    path = Path(f"/tmp/fedportal-test-{site.name}-{round_number}.safetensors")
    write_model_file(
        path,
        FLModel(params=params, metrics=metrics or {}, meta={"NUM_STEPS_CURRENT_ROUND": weight}),
    )
    data = path.read_bytes()
    path.unlink()
    buffer = io.BytesIO(data)
    task = task_for_site(job=job, site=site, round_number=round_number)
    return update_upload(
        task=task, stream=buffer, sha256=hashlib.sha256(data).hexdigest(), length=len(data)
    )


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

    job = job_abort(job=job)

    assert job.state == JobState.ABORTED
    assert job.rounds.get().state == RoundState.FAILED
    assert rounds.job_advance(job_id=job.pk) == "nothing: job is aborted"


def test_a_site_coming_online_starts_a_waiting_job(tmp_path: Path) -> None:
    from sites.authentication import verify_signed_request

    organization = OrganizationFactory()
    enrolled = [enrolled_site(organization=organization, name=f"site-{i}") for i in (1, 2)]
    for e in enrolled:
        e.site.auto_accept_jobs = True
        e.site.last_heartbeat = timezone.now() if e is enrolled[0] else None
        e.site.save()
    job = submit(tmp_path, organization.project, min_clients=2)
    job.refresh_from_db()
    assert job.state == JobState.WAITING

    path = "/api/v1/agent/jobs/"
    verify_signed_request(
        method="GET", path=path, headers=enrolled[1].headers("GET", path), body=b""
    )

    job.refresh_from_db()
    assert job.state == JobState.RUNNING
    assert job.rounds.get().tasks.count() == 2
