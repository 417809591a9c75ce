"""NVFlare's env and Run surface, used as NVFlare's documentation shows it.

``SimEnv(num_clients=…, workspace_root=…)``, ``PocEnv(num_clients=2, gpu_ids=…, …)`` and a run's
``get_job_id()``, ``get_status()``, ``get_result()``, ``abort()``; a failed simulation raises.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from client_agent.portal import PortalError
from client_agent.wire import load_state_dict
from jobs.envs import PocEnv, RunFailed, RunStatus, SimEnv
from jobs.envs.portal import PortalRun
from jobs.envs.sim import gpu_groups
from jobs.recipes import FedAvgRecipe

# site-N adds N to every weight and reports accuracy N/10 + round; it prints the GPUs it sees.
CLIENT = """
import os
import sys
import client_agent.api as flare

flare.init()
site = flare.get_site_name()
number = int(site.rsplit("-", 1)[1])
print("gpus:", os.environ.get("CUDA_VISIBLE_DEVICES"), flush=True)
while flare.is_running():
    model = flare.receive()
    if sys.argv[1:] == ["crash"] and site == "site-2":
        raise RuntimeError("site-2 cannot read its data")
    params = {k: v + number for k, v in model.params.items()}
    flare.send(flare.FLModel(params=params, metrics={"accuracy": number / 10 + model.current_round},
                             meta={"NUM_STEPS_CURRENT_ROUND": 1}))
"""


def recipe_in(folder: Path, train_args: str = "") -> FedAvgRecipe:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "client.py").write_text(textwrap.dedent(CLIENT))
    return FedAvgRecipe(
        name="hello-nvflare",
        min_clients=2,
        num_rounds=2,
        model={"w": torch.tensor([0.0, 1.0])},
        train_script=str(folder / "client.py"),
        train_args=train_args,
    )


def test_a_simenv_run_answers_nvflares_run_methods(tmp_path: Path) -> None:
    env = SimEnv(num_clients=2, workspace_root=str(tmp_path / "sim"), show_progress=False)
    run = recipe_in(tmp_path / "app").execute(env)

    assert run.get_job_id() == run.job_id and run.job_id.startswith("hello-nvflare-")
    assert run.get_status() == "FINISHED:COMPLETED"
    result = run.get_result()
    assert isinstance(result, str) and Path(result) == tmp_path / "sim" / run.job_id
    models = Path(result) / "models"
    # +1.5 a round (sites add 1 and 2, equal weights): final [3, 4] after two rounds.
    assert torch.equal(
        load_state_dict(models / "round-002.safetensors")["w"], torch.tensor([3.0, 4.0])
    )
    # Round 2's accuracy (1.15) beats round 1's (0.15) and scores the model after one round.
    assert torch.equal(load_state_dict(models / "best.safetensors")["w"], torch.tensor([1.5, 2.5]))
    run.abort()  # returns None, as NVFlare's
    assert run.get_status() == "FINISHED:COMPLETED"  # a finished simulation stays finished


def test_a_failed_simulation_raises_a_runtime_error_that_carries_the_run(tmp_path: Path) -> None:
    env = SimEnv(num_clients=2, workspace_root=tmp_path / "sim", show_progress=False)

    with pytest.raises(RuntimeError, match="site-2 cannot read its data") as failed:
        recipe_in(tmp_path / "app", train_args="crash").execute(env)

    assert isinstance(failed.value, RunFailed)
    run = failed.value.run
    assert run.status == RunStatus.FAILED and run.rounds == []
    assert run.get_status() == "FINISHED:EXECUTION_EXCEPTION"
    assert str(run.workspace / "sites") in str(failed.value)  # where to look


def test_gpu_config_gives_each_site_its_gpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    env = SimEnv(num_clients=2, gpu_config="1,0", workspace_root=tmp_path, show_progress=False)
    run = recipe_in(tmp_path / "app").execute(env)

    for site, gpus in (("site-1", "1"), ("site-2", "0")):
        assert f"gpus: {gpus}\n" in (run.workspace / "sites" / site / "log.txt").read_text()


def test_gpu_config_groups_are_taken_in_turn() -> None:
    assert gpu_groups("[0,1],[2]", device_count=3) == ["0,1", "2"]
    assert gpu_groups(" 0, 2 ", device_count=3) == ["0", "2"]
    assert gpu_groups(None, device_count=0) == []


@pytest.mark.parametrize(
    ("gpu_config", "message"),
    [
        ("0", "gpu_config: GPU 0 asked for, but this machine has 0 CUDA GPU"),
        ("cuda:0", "gpu_config: expected like '0,1' or '\\[0,1\\],\\[2\\]', got 'cuda:0'"),
        ("[0,1]x", "gpu_config: expected like"),
        (0, "gpu_config: expected a string like '0,1', got 0"),
    ],
)
def test_a_gpu_config_this_machine_cannot_honour_is_refused(
    gpu_config: Any, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match=message):
        SimEnv(num_clients=2, gpu_config=gpu_config, python="python3")


def test_simenv_takes_nvflares_defaults_and_names(tmp_path: Path) -> None:
    # num_clients=0 (NVFlare's default) takes the number from clients.
    env = SimEnv(clients=["hospital-a", "hospital-b"], python="python3")
    assert (env.num_clients, env.clients, env.num_threads) == (2, ["hospital-a", "hospital-b"], 2)
    with pytest.raises(ValueError, match="num_clients: must be an integer of at least 1, got 0"):
        SimEnv(python="python3")

    env = SimEnv(
        num_clients=2,
        num_threads=1,
        gpu_config=None,
        log_config="concise",
        workspace_root=str(tmp_path),
        extra={"note": "kept"},
        python="python3",
    )
    assert env.workspace == env.workspace_root == tmp_path
    assert (env.log_config, env.extra, env.num_threads) == ("concise", {"note": "kept"}, 1)


def test_workspace_and_workspace_root_together_are_refused(tmp_path: Path) -> None:
    for make in (
        lambda **kw: SimEnv(num_clients=2, python="python3", **kw),
        lambda **kw: PocEnv(**kw),
    ):
        with pytest.raises(ValueError, match="workspace, workspace_root: give one of them"):
            make(workspace=tmp_path / "a", workspace_root=tmp_path / "b")


def test_pocenv_takes_nvflares_defaults_and_names(tmp_path: Path) -> None:
    assert PocEnv().clients == ["site-1", "site-2"]
    # With clients, the default num_clients gives way (NVFlare: "will be ignored").
    assert PocEnv(clients=["a", "b", "c"]).clients == ["a", "b", "c"]
    env = PocEnv(
        num_clients=2,
        gpu_ids=None,
        use_he=True,  # accepted: an HE job's sites make its contexts, nothing to provision
        docker_image=None,
        project_conf_path="",
        username="admin@nvidia.com",
        study="cancer-study",
        extra={"note": "kept"},
        workspace_root=tmp_path,
    )
    assert (env.username, env.study, env.extra) == (
        "admin@nvidia.com",
        "cancer-study",
        {"note": "kept"},
    )
    assert env.workspace == tmp_path


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"docker_image": "nvflare/nvflare"}, "docker_image: PocEnv runs the sites as processes"),
        ({"project_conf_path": "project.yml"}, "project_conf_path: PocEnv takes its sites"),
        ({"study": "Cancer_Study"}, "study: use only lower-case letters, digits and hyphens"),
        ({"username": ""}, "username: must be a non-empty string"),
        ({"gpu_ids": [0]}, "gpu_ids: GPU 0 asked for, but this machine has 0 CUDA GPU"),
        ({"gpu_ids": ["0"]}, "gpu_ids: expected a list of GPU numbers"),
        ({"extra": ["x"]}, "extra: expected a dict"),
    ],
)
def test_pocenv_refuses_what_it_cannot_honour(
    kwargs: dict[str, Any], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match=message):
        PocEnv(**kwargs)


def test_pocenv_gpu_ids_are_what_its_sites_see(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    env = PocEnv(gpu_ids=[1, 3])
    monkeypatch.setattr(env, "_secret", lambda name: name)  # no workspace needed

    assert env._env()["CUDA_VISIBLE_DEVICES"] == "1,3"


class RecordingPortal:
    """A portal's job endpoints: answers with the job in ``state``; records what was posted."""

    url = "https://portal.example"

    def __init__(self, state: str, abort_answer: PortalError | None = None) -> None:
        self.state = state
        self.abort_answer = abort_answer
        self.posted: list[tuple[str, dict[str, Any]]] = []

    def job(self) -> dict[str, Any]:
        return {"uid": "u-1", "name": "job", "num_rounds": 1, "state": self.state}

    def get(self, path: str) -> dict[str, Any]:
        if path.endswith("/cross-site/"):
            return {"models": [], "sites": [], "matrix": {}}
        return self.job()

    def get_all(self, path: str) -> list[object]:
        return []

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.posted.append((path, body))
        if self.abort_answer is not None:
            self.state = "completed"  # it ended before the abort came
            raise self.abort_answer
        self.state = "aborted"
        return self.job()


def portal_run(portal: RecordingPortal, tmp_path: Path) -> PortalRun:
    return PortalRun(
        client=portal,  # type: ignore[arg-type]
        job={"uid": "u-1", "name": "job", "num_rounds": 1, "state": "running"},
        workspace=tmp_path,
        show_progress=False,
        poll_seconds=0.01,
    )


def test_a_portal_run_aborts_through_the_jobs_abort_endpoint(tmp_path: Path) -> None:
    portal = RecordingPortal("running")
    run = portal_run(portal, tmp_path)

    assert run.get_job_id() == "u-1" and run.get_status() == "RUNNING"
    run.abort()

    assert portal.posted == [("/api/v1/jobs/u-1/abort/", {"reason": "aborted from job.py"})]
    assert run.get_status() == "FINISHED:ABORTED"
    run.abort()  # ended: nothing more is sent
    assert len(portal.posted) == 1


def test_aborting_a_portal_job_that_just_ended_leaves_it_as_it_ended(tmp_path: Path) -> None:
    portal = RecordingPortal("running", PortalError(409, "conflict", "job is completed"))
    run = portal_run(portal, tmp_path)

    run.abort()

    assert run.get_status() == "FINISHED:COMPLETED"


def test_a_portal_runs_result_is_its_folder_once_the_job_ends(tmp_path: Path) -> None:
    portal = RecordingPortal("running")
    run = portal_run(portal, tmp_path / "runs")

    assert run.get_result(timeout=0.05) is None  # still running: NVFlare's answer too
    portal.state = "completed"
    assert run.get_result(timeout=5) == str(tmp_path / "runs")
    assert run.get_status() == "FINISHED:COMPLETED"
