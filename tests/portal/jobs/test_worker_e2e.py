"""A whole job driven by a real Celery worker process on the real Redis, with the sites'
updates PUT over HTTP, signed with their keys.

The worker is killed with SIGKILL in the middle of aggregating a round (after it wrote the new
model file, before it committed the round), restarted, and the job finishes with the same
final model, bit for bit, as an undisturbed run.

Needs PostgreSQL (the worker process must see the test database, and the test holds an
uncommitted row to catch the worker mid-aggregation) and Redis; `.ci/run` and `make test`
provide both.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import torch
from django.db import connection, connections, transaction
from django.test import Client

from client_agent.fl_model import FLModel
from client_agent.wire import load_state_dict, write_model_file
from fedportal.celery import app as celery_app
from jobs.api.authentication import HEADER_CONTENT_SHA256
from jobs.bundle import pack_app
from jobs.models import Job, JobState, ModelVersion, Round, RoundState
from jobs.recipes import FedAvgRecipe, FedOptRecipe, Recipe
from jobs.services.submission import job_submit
from jobs.storage import local_path
from jobs.workflows import ServerState
from tests.portal.rounds_helpers import three_enrolled_sites

ROOT = Path(__file__).resolve().parents[3]

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        connection.vendor != "postgresql",
        reason="needs PostgreSQL: the worker shares the test database and row locks",
    ),
]


class Worker:
    """A `celery worker` process for the test database, restartable."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = self._spawn(log)

    def _spawn(self, log) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "fedportal",
                "worker",
                "--pool=solo",
                "--concurrency=1",
                "--without-mingle",
                "--without-gossip",
                "--without-heartbeat",
                "--loglevel=INFO",
            ],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def worker(tmp_path: Path, media: Path) -> Iterator[Worker]:
    broker = celery_app.conf.broker_url
    redis.Redis.from_url(broker).flushdb()
    db = connection.settings_dict
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "fedportal.settings.test",
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "TEST_CELERY_BROKER_URL": broker,
        "DJANGO_MEDIA_ROOT": str(media),
        "PYTHONPATH": str(ROOT),
    }
    handle = Worker(env, tmp_path / "worker.log")
    handle.start()
    yield handle
    handle.stop()


def wait_for(what: str, check: Callable[[], object], timeout: float = 60.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def submit(tmp_path: Path, project, name: str, workflow: str = "fedavg") -> Job:
    app = tmp_path / name
    app.mkdir()
    (app / "client.py").write_text("print('client')\n")
    torch.manual_seed(0)
    model = {"w": torch.randn(1_000_000), "b": torch.randn(1000), "n": torch.tensor(0)}
    script = str(app / "client.py")
    recipe: Recipe
    if workflow == "fedopt":
        # FedAdam: its moments and step count are server state that the killed round's
        # re-run must read back exactly as the undisturbed run had them.
        recipe = FedOptRecipe(
            name=name,
            min_clients=3,
            num_rounds=3,
            model=model,
            train_script=script,
            optimizer_args={"path": "FedAdam", "args": {"lr": 0.05}},
        )
    else:
        recipe = FedAvgRecipe(
            name=name, min_clients=3, num_rounds=3, model=model, train_script=script
        )
    bundle = recipe.export(tmp_path / f"{name}-bundle")
    archive = pack_app(bundle / "app", tmp_path / f"{name}.zip")
    with open(bundle / "initial_model.safetensors", "rb") as m, open(archive, "rb") as a:
        return job_submit(
            project=project,
            submitted_by=project.created_by,
            spec=recipe.spec(),
            initial_model=m,
            app_archive=a,
        )


def upload_round(tmp_path: Path, job: Job, sites, number: int) -> None:
    """Each site PUTs, signed, the round's global model plus its site number, weighted by it."""
    start = ModelVersion.objects.get(job=job, round_number=number)
    base = load_state_dict(Path(start.file.path))
    client = Client()
    for index, enrolled in enumerate(sites, start=1):
        params = {k: v + index if v.is_floating_point() else v + 1 for k, v in base.items()}
        path = tmp_path / f"{job.pk}-{enrolled.site.name}-{number}.safetensors"
        write_model_file(
            path,
            FLModel(
                params=params,
                metrics={"accuracy": index / 10},
                meta={"NUM_STEPS_CURRENT_ROUND": index},
            ),
        )
        data = path.read_bytes()
        url = f"/api/v1/agent/jobs/{job.uid}/rounds/{number}/update/"
        response = client.generic(
            "PUT",
            url,
            data=data,
            content_type="application/octet-stream",
            headers={
                HEADER_CONTENT_SHA256: hashlib.sha256(data).hexdigest(),
                **enrolled.headers("PUT", url, data),
            },
        )
        assert response.status_code == 202, response.content


def round_state(job: Job, number: int) -> str | None:
    rnd = Round.objects.filter(job=job, number=number).first()
    return rnd.state if rnd else None


def hold_model_slot(
    job_id: int, round_number: int, release: threading.Event, held: threading.Event
) -> None:
    """In its own connection and an open transaction, insert the ModelVersion row the worker
    will insert when it commits the round, and keep it uncommitted until ``release``.

    The unique (job, round_number) index makes the worker's insert wait for this transaction:
    so the worker stops after it computed and wrote the new model, before the round commits —
    in the middle of aggregation, whatever the machine's speed. The row is rolled back.
    """
    try:
        with transaction.atomic():
            ModelVersion.objects.create(
                job_id=job_id, round_number=round_number, file="held", sha256="0" * 64, size=0
            )
            held.set()
            release.wait(timeout=60)
            transaction.set_rollback(True)
    finally:
        connections.close_all()


def run_job(
    tmp_path: Path,
    worker: Worker,
    project,
    sites,
    name: str,
    *,
    kill_in_round: int | None,
    workflow: str = "fedavg",
):
    job = submit(tmp_path, project, name, workflow)
    killed = False
    for number in range(3):

        def opened(number: int = number) -> bool:
            return round_state(job, number) == RoundState.OPEN

        wait_for(f"round {number + 1} to open", opened)
        if number != kill_in_round:
            upload_round(tmp_path, job, sites, number)
            continue
        release, held = threading.Event(), threading.Event()
        holder = threading.Thread(target=hold_model_slot, args=(job.pk, number + 1, release, held))
        holder.start()
        assert held.wait(timeout=10)
        upload_round(tmp_path, job, sites, number)
        new_model = (
            Path(settings_media())
            / f"jobs/{job.project_id}/{job.uid}/models"
            / f"round-{number + 1:03d}.safetensors"
        )
        # The worker claims the round, writes the new model, then waits on the held row.
        wait_for("the worker to write the new model", new_model.exists, timeout=60)
        time.sleep(0.3)
        assert round_state(job, number) == RoundState.AGGREGATING
        worker.kill()
        killed = True
        release.set()
        holder.join()
        worker.start()
    wait_for(
        "the job to finish",
        lambda: Job.objects.get(pk=job.pk).state in (JobState.COMPLETED, JobState.FAILED),
        timeout=120,
    )
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, job.failure_reason
    assert killed == (kill_in_round is not None)
    final = ModelVersion.objects.get(job=job, round_number=3)
    return final


def settings_media() -> str:
    from django.conf import settings

    return str(settings.MEDIA_ROOT)


@pytest.mark.parametrize("workflow", ["fedavg", "fedopt"])
def test_a_worker_killed_mid_aggregation_loses_nothing(
    tmp_path: Path, worker: Worker, workflow: str
) -> None:
    sites = three_enrolled_sites()
    project = sites[0].site.project

    undisturbed = run_job(
        tmp_path, worker, project, sites, "calm", kill_in_round=None, workflow=workflow
    )
    disturbed = run_job(
        tmp_path, worker, project, sites, "killed", kill_in_round=1, workflow=workflow
    )

    assert disturbed.sha256 == undisturbed.sha256
    calm, killed = (load_state_dict(Path(v.file.path)) for v in (undisturbed, disturbed))
    assert all(torch.equal(calm[k], killed[k]) for k in calm)
    assert killed["n"].item() == 3
    start = load_state_dict(
        Path(ModelVersion.objects.get(job=disturbed.job, round_number=0).file.path)
    )
    # Weights 1, 2, 3 and changes +1, +2, +3: each round's mean adds (1 + 4 + 9) / 6.
    fedavg_final = start["w"] + 3 * 14 / 6
    if workflow == "fedavg":
        assert torch.allclose(killed["w"], fedavg_final)
        return
    # FedAdam stepped from the stored moments: not FedAvg's model, and its state is stored.
    assert not torch.allclose(killed["w"], fedavg_final)
    last = Round.objects.get(job=disturbed.job, number=2)
    state = ServerState.load(local_path(last.server_state))
    assert any(name.startswith("optimizer/w/") for name in state.tensors)
