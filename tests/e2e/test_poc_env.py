"""PocEnv end to end: a real portal (Daphne), a real Celery worker on Redis, and three site
agents as real processes, enrolled with one-time tokens. One PocEnv serves every test here,
one job after another, so the platform starts once."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from client_agent.portal import PortalClient
from jobs.envs import PocEnv, ProdEnv, Run, RunStatus, SimEnv
from jobs.envs.poc import PROJECT_ROOT
from jobs.envs.poc.env import _redis_answers
from jobs.recipes import FedAvgRecipe

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not _redis_answers("redis://127.0.0.1:6379/0"),
        reason="needs Redis at 127.0.0.1:6379 (make test and CI start one)",
    ),
]

SITES = ["site-1", "site-2", "site-3"]
CANARY = "PATIENT-RECORD-7f3a91"  # a site's private data: must never cross the wire
# SCAFFOLD's control changes travel as meta tensors under this prefix (client_agent.wire).
SCAFFOLD_DIFF = "__meta__/scaffold_c_diff/"

# Deterministic: every site adds (its round + 1) to every parameter and logs LOGS points a round.
SCRIPT = textwrap.dedent(
    """
    import sys, time
    import client_agent.api as flare

    LOGS = 4
    private = open(sys.argv[1]).read() if len(sys.argv) > 1 else ""  # stays here
    flare.init()
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 0)
        for step in range(LOGS):
            flare.log("loss", 1.0 / (step + 1), step=step)
        print(f"round {model.current_round} done", flush=True)
        params = {k: v + (model.current_round + 1) for k, v in model.params.items()}
        flare.send(flare.FLModel(params=params, metrics={"accuracy": 0.5},
                                 meta={"NUM_STEPS_CURRENT_ROUND": 1}))
    """
)


def recipe(
    app: Path, *, rounds: int, min_clients: int = 3, name: str = "echo", delay: float = 0
) -> FedAvgRecipe:
    torch.manual_seed(0)
    return FedAvgRecipe(
        name=name,
        min_clients=min_clients,
        num_rounds=rounds,
        model=torch.nn.Linear(3, 2),
        train_script=str(app / "client.py"),
        train_args=f"{app / 'private.txt'} {delay}",
        key_metric="accuracy",
    )


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("app")
    (folder / "client.py").write_text(SCRIPT)
    (folder / "private.txt").write_text(CANARY)
    return folder


@pytest.fixture(scope="module")
def poc(tmp_path_factory: pytest.TempPathFactory) -> Any:
    env = PocEnv(
        clients=SITES,
        workspace=tmp_path_factory.mktemp("poc"),
        redis_db=11,  # not the tests' worker db (15), nor a developer's (0)
        round_timeout_seconds=8,
        show_progress=False,
        wire_log=True,
    )
    env.start()
    yield env
    env.stop()


def prod(poc: PocEnv, *, wait: bool = True, round_timeout: int | None = None) -> ProdEnv:
    return ProdEnv(
        poc.url,
        token=poc.credentials["api_token"],
        project=poc.credentials["project"],
        round_timeout_seconds=round_timeout or poc.round_timeout_seconds,
        workspace=poc.workspace / "runs",
        show_progress=False,
        wait=wait,
    )


def people(poc: PocEnv) -> PortalClient:
    return PortalClient(poc.url, api_token=poc.credentials["api_token"])


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_nothing_in_its_workspace_is_readable_by_others(poc: PocEnv) -> None:
    # First in the module: the workspace as PocEnv started it, secrets and all.
    assert (poc.workspace / "credentials.json").exists()
    assert any((poc.workspace / "logs").iterdir()) and any((poc.workspace / "sites").iterdir())
    seen = 0
    for folder, dirs, files in os.walk(poc.workspace):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            mode = stat.S_IMODE(path.lstat().st_mode)
            assert not mode & 0o077, f"{path} is mode {mode:o}"
            seen += 1
    assert not stat.S_IMODE(poc.workspace.stat().st_mode) & 0o077
    assert seen > 20  # the database, logs, every site's key and certificate, ...


def test_the_same_job_gives_the_same_model_in_simenv_and_pocenv(
    poc: PocEnv, app: Path, tmp_path: Path
) -> None:
    sim = recipe(app, rounds=3).execute(
        SimEnv(clients=SITES, workspace=tmp_path, show_progress=False)
    )
    run = recipe(app, rounds=3).execute(prod(poc))

    assert run.status == RunStatus.COMPLETED, run.error
    assert sim.status == RunStatus.COMPLETED
    final, expected = run.global_model, sim.global_model
    assert final is not None and expected is not None
    for key in expected:
        assert torch.equal(final[key], expected[key]), key
    # Every site added 1, 2, 3 over the rounds: by hand, the initial weights plus 6.
    torch.manual_seed(0)
    initial = torch.nn.Linear(3, 2).state_dict()
    assert torch.allclose(final["weight"], initial["weight"] + 6)
    # Every flare.log point is stored once: 3 sites x 3 rounds x 4 points.
    assert len(run.metrics.logged("loss")) == len(SITES) * 3 * 4
    assert {p.site for p in run.metrics.logged()} == set(SITES)
    assert [r.round for r in run.rounds] == [0, 1, 2]


# Every workflow's tasks: train adds half the site's number (and answers SCAFFOLD's control with
# a change made from it), evaluate scores the received model by its sum, submit_model sends the
# site's last trained weights. Deterministic, so SimEnv and PocEnv must agree to the bit.
WORKFLOW_SCRIPT = textwrap.dedent(
    """
    import client_agent.api as flare
    from client_agent.fl_model import AlgorithmConstants

    flare.init()
    number = int(flare.get_site_name().rsplit("-", 1)[1])
    local = None
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        if flare.is_train():
            local = {k: v + number / 2 for k, v in model.params.items()}
            meta = {}
            controls = model.meta.get(AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL)
            if controls:
                meta[AlgorithmConstants.SCAFFOLD_CTRL_DIFF] = {
                    k: v / 10 + number for k, v in controls.items()
                }
            flare.send(flare.FLModel(params=local, metrics={"accuracy": number / 10}, meta=meta))
        elif flare.is_evaluate():
            score = float(sum(v.sum() for v in model.params.values())) + number / 100
            flare.send(flare.FLModel(metrics={"accuracy": score}))
        else:
            flare.send(flare.FLModel(params=local))
    """
)


NUMPY_SCRIPT = textwrap.dedent(
    """
    import numpy as np

    import client_agent.api as flare
    from client_agent.fl_model import NPConstants
    from client_agent.tracking import SummaryWriter

    flare.init()
    number = int(flare.get_site_name().rsplit("-", 1)[1])
    writer = SummaryWriter()
    while flare.is_running():
        model = flare.receive()
        array = model.params[NPConstants.NUMPY_KEY]
        assert isinstance(array, np.ndarray), type(array)
        new = array + number
        writer.add_scalar("weight_mean", float(np.mean(new)), global_step=model.current_round)
        flare.send(flare.FLModel(params={NPConstants.NUMPY_KEY: new}))
    """
)


def workflow_recipe(app: Path, which: str) -> Any:
    from client_agent.wire import save_state_dict
    from jobs.recipes import (
        CyclicRecipe,
        FedEvalRecipe,
        FedOptRecipe,
        FedProxRecipe,
        ScaffoldRecipe,
        add_cross_site_evaluation,
        add_experiment_tracking,
        add_final_global_evaluation,
    )

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    script = str(app / "workflow_client.py")
    if which == "fedopt":
        return FedOptRecipe(
            "fedadam",
            3,
            2,
            model,
            script,
            optimizer_args={"path": "FedAdam", "args": {"lr": 0.05}},
        )
    if which == "scaffold":
        return ScaffoldRecipe("scaffold", 3, 2, model, script)
    if which == "cyclic":
        return CyclicRecipe("cyclic", model, 2, script, min_clients=3, order="random", seed=5)
    if which == "fedprox":
        return FedProxRecipe("fedprox", 3, 2, model, script, fedprox_mu=0.1)
    if which == "fedeval":
        checkpoint = app / "checkpoint.safetensors"
        save_state_dict(checkpoint, {k: v + 1 for k, v in model.state_dict().items()})
        return FedEvalRecipe("fedeval", model, checkpoint, 3, script)
    if which == "numpy_fedavg":
        # NVFlare's hello-numpy pattern: numpy arrays only, SummaryWriter, DIFF sends.
        from jobs.recipes import NumpyFedAvgRecipe

        (app / "numpy_client.py").write_text(NUMPY_SCRIPT)
        return NumpyFedAvgRecipe(
            name="hello-numpy",
            min_clients=3,
            num_rounds=2,
            model=[[1, 2, 3], [4, 5, 6]],
            train_script=str(app / "numpy_client.py"),
            params_transfer_type="DIFF",
        )
    if which == "numpy_cross_site":
        import numpy as np

        from jobs.recipes import NumpyCrossSiteEvalRecipe

        folder = app / "np_models"
        folder.mkdir(exist_ok=True)
        np.save(folder / "one.npy", np.array([1.0, 2.0, 4.0], dtype=np.float32))
        np.save(folder / "two.npy", np.array([3.0, 3.0], dtype=np.float32))
        return NumpyCrossSiteEvalRecipe(
            name="numpy-cse",
            min_clients=3,
            model_dir=str(folder),
            model_name={"model_1": "one.npy", "model_2": "two.npy"},
        )
    if which == "nvflare_options":
        # NVFlare's FedAvg options at once: patience stops after round 2 of 5 (the accuracy
        # never improves), the biases stay at the sites, the script's FULL sends become
        # DIFF in the Client API, site-1 weighs double; then the final model is evaluated.
        options = FedAvgRecipe(
            "options",
            3,
            5,
            model,
            script,
            stop_cond="accuracy >= 0.9",
            patience=1,
            exclude_vars="bias",
            params_transfer_type="DIFF",
            aggregation_weights={"site-1": 2.0},
        )
        add_experiment_tracking(options, "tensorboard")
        return add_final_global_evaluation(options)
    return add_cross_site_evaluation(FedAvgRecipe("xsite", 3, 1, model, script))


@pytest.fixture(scope="module")
def portal_run(poc: PocEnv, app: Path) -> Callable[[str], Run]:
    """The run of a workflow's job on the PocEnv, run once in the module: the first test that
    asks for it runs it. The wire test below checks what the agents sent for these jobs, so
    it needs them whether or not the workflow test ran first (``-k`` alone, say)."""
    runs: dict[str, Run] = {}

    def run_of(which: str) -> Run:
        if which not in runs:
            (app / "workflow_client.py").write_text(WORKFLOW_SCRIPT)
            if which == "nvflare_options":  # its TensorBoard tracking: the portal says so
                with pytest.warns(UserWarning, match="download the job's TensorBoard events"):
                    runs[which] = workflow_recipe(app, which).execute(prod(poc))
            else:
                runs[which] = workflow_recipe(app, which).execute(prod(poc))
        return runs[which]

    return run_of


@pytest.mark.parametrize(
    "which",
    [
        "fedopt",
        "scaffold",
        "cyclic",
        "cross_site",
        "fedprox",
        "fedeval",
        "nvflare_options",
        "numpy_cross_site",
        "numpy_fedavg",
    ],
)
def test_every_workflow_gives_the_same_model_in_simenv_and_pocenv(
    portal_run: Callable[[str], Run], app: Path, tmp_path: Path, which: str
) -> None:
    run = portal_run(which)
    sim = workflow_recipe(app, which).execute(
        SimEnv(clients=SITES, workspace=tmp_path, show_progress=False)
    )

    assert sim.status == RunStatus.COMPLETED, sim.error
    assert run.status == RunStatus.COMPLETED, run.error
    assert [r.accepted for r in run.rounds] == [r.accepted for r in sim.rounds]
    final, expected = run.global_model, sim.global_model
    assert final is not None and expected is not None
    assert sorted(final) == sorted(expected)
    for key in expected:
        assert torch.equal(final[key], expected[key]), key
    assert run.cross_site_matrix == sim.cross_site_matrix
    if which == "cross_site":
        assert sorted(run.cross_site_matrix) == ["global", *(f"site:{s}" for s in SITES)]
    if which == "fedeval":
        assert sorted(run.cross_site_matrix["global"]) == SITES
    if which == "numpy_fedavg":
        # Two rounds of + mean(1, 2, 3), sent as DIFF; SummaryWriter's points arrived.
        assert final["numpy_key"].tolist() == [[5.0, 6.0, 7.0], [8.0, 9.0, 10.0]]
        assert len(run.metrics.logged("weight_mean")) == len(sim.metrics.logged("weight_mean"))
        assert len(run.metrics.logged("weight_mean")) == 6  # 3 sites × 2 rounds
    if which == "numpy_cross_site":
        # The built-in validator's sum(x / max(x)) of [1, 2, 4], the same at every site.
        assert run.cross_site_matrix["model_1"] == {s: {"accuracy": 1.75} for s in SITES}
    if which == "nvflare_options":
        assert [r.label for r in run.rounds][1].endswith(
            "stopped early: 1 round(s) without improvement of accuracy"
        )
        assert len(run.rounds) == 3  # 2 training rounds, then the evaluation of global
        assert torch.equal(final["bias"], workflow_recipe(app, which).initial_params["bias"])
        events = Path(sim.get_result() or "") / "server" / "tb_events" / "aggregate"
        assert any(events.iterdir())  # SimEnv wrote the aggregates' TensorBoard events
        saved = torch.load(Path(run.get_result() or "") / "models" / "FL_global_model.pt")
        assert all(torch.equal(saved[k], v) for k, v in final.items())


def test_the_agents_send_only_updates_metrics_log_lines_and_task_states(
    poc: PocEnv, portal_run: Callable[[str], Run]
) -> None:
    # Every agent logged all it sent (wire_log). Among the jobs so far: SCAFFOLD's, whose
    # updates carry control changes, and nvflare_options', whose updates leave out the bias.
    for which in ("scaffold", "nvflare_options"):
        assert portal_run(which).status == RunStatus.COMPLETED
    allowed_ws = {"heartbeat", "task", "report"}
    for site in SITES:
        entries = [json.loads(line) for line in (poc.site_dir(site) / "wire.jsonl").open()]
        assert entries, site
        kinds = set()
        without_excluded = 0
        on_the_socket = 0
        for entry in entries:
            text = json.dumps(entry)
            assert CANARY not in text
            if entry["channel"] == "ws" and entry["method"] == "SEND":
                kinds.add(entry["json"]["type"])
                assert entry["json"]["type"] in allowed_ws
                assert set(entry["json"]) <= {
                    "type",
                    "id",
                    "job",
                    "points",
                    "lines",
                    "round",
                    "state",
                    "reason",
                }
            elif entry["method"] in ("PUT", "UPDATE"):
                # An update: on the socket when the portal's welcome takes one that size (these
                # models are tiny), uploaded over HTTP otherwise.
                if entry["method"] == "PUT":
                    assert entry["path"].endswith("/update/")
                else:
                    assert entry["channel"] == "ws"
                    on_the_socket += 1
                # The model's weights (none for an evaluate answer) and, from the SCAFFOLD
                # job, its control changes: tensors of the same names and shapes, no other.
                tensors = dict(entry["safetensors"])
                controls = {
                    name.removeprefix(SCAFFOLD_DIFF): shape
                    for name, shape in tensors.items()
                    if name.startswith(SCAFFOLD_DIFF)
                }
                weights = {n: s for n, s in tensors.items() if not n.startswith(SCAFFOLD_DIFF)}
                # The nvflare_options job's exclude_vars="bias": its updates hold no bias.
                without_excluded += weights == {"weight": [2, 3]}
                assert weights in (
                    {"bias": [2], "weight": [2, 3]},
                    {"weight": [2, 3]},
                    {"numpy_key": [2, 3]},  # the NumPy job's
                    {},
                ), tensors
                assert controls in ({"bias": [2], "weight": [2, 3]}, {}), tensors
            elif entry["method"] == "POST" and entry["path"].endswith("/privacy-policy/"):
                # The site's own privacy policy and what it has spent: the portal shows them.
                assert set(entry["json"]) == {"policy", "project_history", "project_epsilon"}
            elif entry["method"] == "POST":
                assert entry["path"].endswith("/status/")  # a failure, with its reason
                assert set(entry["json"]) <= {"state", "reason", "privacy"}
            else:
                assert entry["method"] == "GET" and entry["bytes"] == 0
        assert "report" in kinds
        assert without_excluded == 2, site  # that job's two training rounds
        assert on_the_socket > 0, site


def test_an_agent_started_with_a_relative_dir_runs_jobs(poc: PocEnv, app: Path) -> None:
    # What `enrol` prints and the default (./fedportal-site) are relative: the agent's folder
    # is given relative to its working directory, which is not the script's.
    poc.kill("agent:site-1")
    relative = os.path.relpath(poc.site_dir("site-1"), PROJECT_ROOT)
    assert not os.path.isabs(relative)
    poc._spawn(
        "agent:site-1",
        [sys.executable, "-m", "client_agent", "run", "--dir", relative, "-v"],
        log_name="agent-site-1",
    )

    run = recipe(app, rounds=2, name="relative").execute(prod(poc))

    assert run.status == RunStatus.COMPLETED, run.error
    assert all("site-1" in r.accepted for r in run.rounds), run.rounds


def job_sites(poc: PocEnv, uid: str) -> list[dict[str, Any]]:
    return people(poc).get_all(f"/api/v1/jobs/{uid}/sites/")


# Prints 10,000 lines of 500 characters (5 MB: past the portal's burst for a site's output,
# so the rest comes at the site's rate) and one line of 3 MB, then logs a point and answers.
FLOOD = textwrap.dedent(
    """
    import client_agent.api as flare

    flare.init()
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        for i in range(10_000):
            print(f"{i:05d} " + "y" * 500)
        print("x" * 3_000_000)
        print("after the flood", flush=True)
        flare.log("loss", 0.5, step=0)
        flare.send(flare.FLModel(params=model.params, metrics={"accuracy": 0.5},
                                 meta={"NUM_STEPS_CURRENT_ROUND": 1}))
    """
)


def test_a_flood_of_output_arrives_whole_and_cut_without_the_agent_reconnecting(
    poc: PocEnv, tmp_path: Path
) -> None:
    (tmp_path / "client.py").write_text(FLOOD)
    agent_log = poc.workspace / "logs" / "agent-site-1.log"
    connects = wait_for(
        lambda: agent_log.read_text().count("connected to"), 30, "site-1's agent to connect"
    )
    torch.manual_seed(0)
    job = FedAvgRecipe(
        name="flood",
        min_clients=1,
        num_rounds=1,
        model=torch.nn.Linear(3, 2),
        train_script=str(tmp_path / "client.py"),
    )
    env = prod(poc, round_timeout=120)
    env.sites = ["site-1"]

    run = job.execute(env)

    assert run.status == RunStatus.COMPLETED, run.error
    assert len(run.metrics.logged("loss")) == 1  # reports after the flood still arrive

    def site1() -> dict[str, Any]:
        (mine,) = job_sites(poc, run.job_id)
        return mine

    # The script's 10,002 lines and the agent's own line about starting it.
    wait_for(lambda: site1()["log_lines"] >= 10_003, 120, "every output line to arrive")
    assert site1()["log_lines_dropped"] == 0
    with sqlite3.connect(f"file:{poc.workspace / 'db.sqlite3'}?mode=ro", uri=True) as db:
        texts = [
            text
            for (text,) in db.execute(
                "SELECT text FROM jobs_logline l JOIN jobs_job j ON l.job_id = j.id "
                "WHERE j.uid = ? AND stream = 'script' ORDER BY l.id",
                (run.job_id.replace("-", ""),),
            )
        ]
    assert len(texts) == 10_002
    assert texts[0] == "00000 " + "y" * 500 and texts[9_999] == "09999 " + "y" * 500
    assert texts[10_000].startswith("xxx")
    assert texts[10_000].endswith(" … [line cut: 3000000 bytes in all]")
    assert texts[10_001] == "after the flood"
    assert agent_log.read_text().count("connected to") == connects  # one socket all along


def test_a_killed_agent_misses_a_round_then_rejoins(poc: PocEnv, app: Path) -> None:
    job = recipe(app, rounds=4, min_clients=2, name="rejoin", delay=1.5)
    run = prod(poc, wait=False).run(job)  # a PortalRun: followed here

    def site3_training() -> bool:
        (site3,) = [p for p in job_sites(poc, run.job_id) if p["site"] == "site-3"]
        return any(t["state"] == "training" for t in site3["tasks"])

    wait_for(site3_training, 60, "site-3 to train in round 1")
    poc.kill("agent:site-3")  # mid-round: its script sleeps 1.5 s before it answers
    # The round closes on the other two at its deadline; the job goes on.
    wait_for(lambda: run.refresh().completed_rounds >= 1, 60, "a round to close without site-3")
    poc.restart("agent:site-3")
    run.wait(timeout=120)
    assert run.status == RunStatus.COMPLETED, run.error
    assert run.rounds[0].accepted == ["site-1", "site-2"]
    assert "site-3" in run.rounds[0].rejected  # late: no update before the deadline
    assert "site-3" in run.rounds[-1].accepted  # it rejoined


def test_the_job_finishes_when_the_portal_restarts_mid_job(poc: PocEnv, app: Path) -> None:
    # A deadline the restart cannot eat (the 8 s of the other tests could).
    run = prod(poc, wait=False, round_timeout=120).run(recipe(app, rounds=4, name="restart"))
    wait_for(lambda: run.refresh().completed_rounds >= 1, 60, "round 1 to close")
    poc.kill("portal")
    time.sleep(1.0)
    poc.restart("portal")
    poc._wait_for_portal()
    run.wait(timeout=120)
    assert run.status == RunStatus.COMPLETED, run.error
    assert len(run.rounds) == 4


def test_a_site_admin_enrols_with_the_command_line_and_doctor_passes(
    poc: PocEnv, tmp_path: Path
) -> None:
    client = people(poc)
    p = f"/api/v1/projects/{poc.credentials['project']}"
    (org,) = [o for o in client.get_all(f"{p}/organizations/") if o["name"] == "PoC sites"]
    requested = client.post(
        f"{p}/sites/",
        {"organization": org["id"], "name": "site-cli", "contact_email": "ops@cli.example"},
    )
    approval = client.post(f"{p}/sites/{requested['id']}/approve/", {})
    command = approval["enrolment"]["command"]
    assert command.startswith(f"python -m client_agent enrol --portal {poc.url} --token fpe_")
    folder = tmp_path / "site-cli"
    agent = [sys.executable, "-m", "client_agent"]

    enrol = subprocess.run(
        [*agent, *command.split()[3:], "--dir", str(folder)],
        capture_output=True,
        text=True,
        env=poc._env(),
    )

    assert enrol.returncode == 0, enrol.stderr
    assert "enrolled site 'site-cli'" in enrol.stdout
    assert (folder / "site.key").stat().st_mode & 0o777 == 0o600
    again = subprocess.run(
        [*agent, *command.split()[3:], "--dir", str(folder)],
        capture_output=True,
        text=True,
        env=poc._env(),
    )
    assert again.returncode == 1 and "already holds site 'site-cli'" in again.stderr
    doctor = subprocess.run(
        [*agent, "doctor", "--dir", str(folder)], capture_output=True, text=True, env=poc._env()
    )
    assert doctor.returncode == 0, doctor.stdout
    for check in ("site folder", "private key", "certificate dates", "portal reachable", "clock"):
        assert f"[ok] {check}" in doctor.stdout
    assert "[ok] certificate accepted" in doctor.stdout


def test_a_revoked_site_is_refused_and_its_agent_stops(poc: PocEnv) -> None:
    client = people(poc)
    project = poc.credentials["project"]
    certificates = client.get_all(f"/api/v1/projects/{project}/certificates/")
    live = [c for c in certificates if c["site_name"] == "site-2" and not c.get("revoked_at")]
    assert live, certificates
    client.post(
        f"/api/v1/projects/{project}/certificates/{live[0]['id']}/revoke/", {"reason": "test"}
    )
    agent = poc.processes["agent:site-2"]
    assert agent.wait(timeout=30) == 3  # refused for good: it stops, saying why
    log = (poc.workspace / "logs" / "agent-site-2.log").read_text()
    assert "revoked" in log
    status = subprocess.run(
        [sys.executable, "-m", "client_agent", "status", "--dir", str(poc.site_dir("site-2"))],
        capture_output=True,
        text=True,
        env=poc._env(),
    )
    assert status.returncode == 3
    assert "revoked" in status.stderr
