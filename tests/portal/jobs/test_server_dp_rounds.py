"""A job with server-side DP driven through the portal's services, as a worker drives it:
every closed round stores the site-level ε spent so far as a round metric, the one the job
page charts, equal to Opacus's accountant."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant

from client_agent.wire import load_state_dict
from jobs.bundle import pack_app
from jobs.models import Job, JobState, MetricPoint, ModelVersion, Round
from jobs.recipes import FedAvgRecipe, ServerDP
from jobs.services.submission import job_submit
from jobs.workflows.dp import CLIP_NORM_METRIC, DELTA_METRIC, EPSILON_METRIC
from sites.models import Project
from tests.portal.rounds_helpers import three_sites, upload

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("eager_celery")]


def submit_dp_job(tmp_path: Path, project: Project, dp: ServerDP, num_rounds: int) -> Job:
    app = tmp_path / "app"
    app.mkdir()
    (app / "client.py").write_text("print('a client script')\n")
    recipe = FedAvgRecipe(
        name="dp-job",
        min_clients=3,
        num_rounds=num_rounds,
        model={"w": torch.zeros(8), "n": torch.tensor(4)},
        train_script=str(app / "client.py"),
        dp=dp,
    )
    bundle = recipe.export(tmp_path / "bundle")
    archive = pack_app(bundle / "app", tmp_path / "app.zip")
    with open(bundle / "initial_model.safetensors", "rb") as m, open(archive, "rb") as a:
        return job_submit(
            project=project,
            submitted_by=project.created_by,
            spec=recipe.spec(),
            initial_model=m,
            app_archive=a,
        )


def test_every_round_stores_the_epsilon_spent_so_far(tmp_path: Path) -> None:
    project, sites = three_sites()
    dp = ServerDP(noise_multiplier=1.2, clip_norm=0.5, delta=1e-6)
    job = submit_dp_job(tmp_path, project, dp, num_rounds=3)
    job.refresh_from_db()
    assert job.state == JobState.RUNNING, job.failure_reason
    assert job.spec["params"]["dp"]["noise_multiplier"] == 1.2

    for rnd in range(3):
        version = ModelVersion.objects.get(job=job, round_number=rnd)
        base = load_state_dict(Path(version.file.path))
        for number, site in enumerate(sites, start=1):
            # A change of norm 100 per site: clipped to 0.5 before it is averaged.
            params = {"w": base["w"] + 100 / 8**0.5 * number, "n": base["n"] + 1}
            upload(job, site, rnd, params, metrics={"accuracy": number / 10})

    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, job.failure_reason
    accountant = RDPAccountant()
    expected = []
    for _ in range(3):
        accountant.step(noise_multiplier=1.2, sample_rate=1.0)
        expected.append(accountant.get_epsilon(delta=1e-6))
    stored = MetricPoint.objects.filter(job=job, source="aggregate", key=EPSILON_METRIC)
    spent = [p.value for p in stored.order_by("round_number")]
    assert spent == pytest.approx(expected, abs=1e-6)
    for number in range(3):
        metrics = Round.objects.get(job=job, number=number).metrics
        assert metrics[DELTA_METRIC] == 1e-6
        assert metrics[CLIP_NORM_METRIC] == 0.5
    final = load_state_dict(Path(ModelVersion.objects.get(job=job, round_number=3).file.path))
    assert final["n"].item() == 4  # integer buffers keep the global values under DP
