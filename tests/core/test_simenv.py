"""SimEnv end to end: real site processes, scripted clients whose final model is known."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from client_agent.wire import load_state_dict
from jobs.envs import RunFailed, RunStatus, SimEnv
from jobs.recipes import FedAvgRecipe

ROOT = Path(__file__).resolve().parents[2]

# Each site adds its number (site-2 adds 2.0) to every float weight it receives and sends the
# result back, so with equal weights the global model grows by the mean site number a round.
SCRIPTED_CLIENT = """
import sys
import torch
import client_agent.api as flare

mode = sys.argv[1] if len(sys.argv) > 1 else "ok"
flare.init()
site = flare.get_site_name()
number = int(site.rsplit("-", 1)[1])
rounds_seen = []
while flare.is_running():
    model = flare.receive()
    rounds_seen.append(model.current_round)
    assert model.total_rounds == {num_rounds}, model.total_rounds
    assert model.meta["SITE_NAME"] == site and model.meta["JOB_ID"] == flare.get_job_id()
    params = {{k: v + (number if v.is_floating_point() else 1) for k, v in model.params.items()}}
    if mode == "crash" and site == "site-2" and model.current_round == 1:
        raise RuntimeError("site-2 lost its data volume")
    if mode == "nan" and site == "site-3":
        params["w"][0] = float("nan")
    if mode == "shape" and site == "site-3":
        params["w"] = torch.zeros(5)
    for step in range(3):
        flare.log("loss", 1.0 / (step + 1), step=step)
    accuracy = number / 10 + model.current_round
    flare.send(flare.FLModel(params=params, metrics={{"accuracy": accuracy}},
                             meta={{"NUM_STEPS_CURRENT_ROUND": 1}}))
assert flare.receive() is None, "receive() must return None once the job is over"
assert rounds_seen == list(range({num_rounds})), rounds_seen
print(f"{{site}} done", flush=True)
"""


def write_client(folder: Path, num_rounds: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "client.py"
    script.write_text(textwrap.dedent(SCRIPTED_CLIENT.format(num_rounds=num_rounds)))
    return script


def initial_model() -> dict[str, torch.Tensor]:
    return {
        "w": torch.tensor([0.0, 1.0, -2.5], dtype=torch.float32),
        "b": torch.tensor(0.5, dtype=torch.float64),
        "num_batches_tracked": torch.tensor(7, dtype=torch.int64),
    }


def run_scripted(
    tmp_path: Path,
    *,
    workspace: Path | None = None,
    mode: str = "ok",
    num_rounds: int = 3,
    min_clients: int = 3,
    clients: list[str] | None = None,
):
    script = write_client(tmp_path / "app", num_rounds)
    recipe = FedAvgRecipe(
        name="scripted",
        min_clients=min_clients,
        num_rounds=num_rounds,
        model=initial_model(),
        train_script=str(script),
        train_args=mode,
    )
    env = SimEnv(
        num_clients=None if clients else 3,
        clients=clients,
        workspace=workspace or tmp_path / "ws",
        show_progress=False,
    )
    return recipe.execute(env)


def test_three_sites_reach_the_exact_model_computed_by_hand(tmp_path: Path) -> None:
    run = run_scripted(tmp_path, num_rounds=3)

    assert run.status == RunStatus.COMPLETED, run.error
    final = run.global_model
    assert final is not None
    # Each round adds mean(1, 2, 3) = 2 to floats and 1 to integer buffers.
    assert torch.equal(final["w"], torch.tensor([6.0, 7.0, 3.5]))
    assert final["w"].dtype == torch.float32
    assert torch.equal(final["b"], torch.tensor(6.5, dtype=torch.float64))
    assert final["num_batches_tracked"].dtype == torch.int64
    assert final["num_batches_tracked"].item() == 10
    # Every round's global model is kept in the workspace.
    for completed, expected_w0 in [(0, 0.0), (1, 2.0), (2, 4.0), (3, 6.0)]:
        name = "initial.safetensors" if completed == 0 else f"round-{completed:03d}.safetensors"
        assert load_state_dict(run.workspace / "models" / name)["w"][0].item() == expected_w0


def test_metrics_per_site_per_round_and_aggregated(tmp_path: Path) -> None:
    run = run_scripted(tmp_path, num_rounds=2)

    assert run.status == RunStatus.COMPLETED, run.error
    # The weighted mean of 0.1, 0.2, 0.3 (+ round) with equal weights.
    assert run.metrics.aggregated("accuracy") == [(0, pytest.approx(0.2)), (1, pytest.approx(1.2))]
    assert run.metrics.site("site-3", "accuracy") == [
        (0, pytest.approx(0.3)),
        (1, pytest.approx(1.3)),
    ]
    by_round = run.metrics.by_round()
    assert by_round[1]["site-1"]["accuracy"] == pytest.approx(1.1)
    # Every flare.log() point arrives once: 3 sites × 2 rounds × 3 steps.
    logged = run.metrics.logged("loss")
    assert len(logged) == 18
    assert sorted(p.step for p in logged if p.site == "site-2" and p.round == 1) == [0, 1, 2]
    lines = (run.workspace / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(run.metrics.points)
    # Best model: round 1's metrics score the model after round 1, the higher accuracy.
    assert run.best_round == 1
    assert torch.equal(run.best_model["w"], torch.tensor([2.0, 3.0, -0.5]))


def test_a_workspace_inside_the_script_folder_is_not_copied_into_the_bundle(
    tmp_path: Path,
) -> None:
    run = run_scripted(tmp_path, num_rounds=1, workspace=tmp_path / "app" / "runs")

    assert run.status == RunStatus.COMPLETED, run.error
    app = run.workspace / "bundle" / "app"
    assert sorted(p.name for p in app.iterdir()) == ["client.py"]


def test_site_output_goes_to_its_own_log_file(tmp_path: Path) -> None:
    run = run_scripted(tmp_path, num_rounds=1, clients=["alpha-1", "beta-2", "gamma-3"])

    assert run.status == RunStatus.COMPLETED, run.error
    for site in ("alpha-1", "beta-2", "gamma-3"):
        log_text = (run.workspace / "sites" / site / "log.txt").read_text()
        assert f"{site} done" in log_text
        assert "done" in log_text and all(
            other not in log_text for other in {"alpha-1", "beta-2", "gamma-3"} - {site}
        )


def test_a_crashing_site_fails_the_run_naming_the_site_and_showing_its_stderr(
    tmp_path: Path,
) -> None:
    with pytest.raises(RunFailed, match="site-2 lost its data volume") as failed:
        run_scripted(tmp_path, mode="crash", num_rounds=3)

    run = failed.value.run
    assert run.status == RunStatus.FAILED and run.error is not None
    assert "site-2" in run.error
    assert "site-2 lost its data volume" in run.error  # the end of its stderr
    assert len(run.rounds) == 1  # round 1 completed, round 2 did not


def test_an_update_with_nan_is_rejected_and_the_round_aggregates_the_rest(tmp_path: Path) -> None:
    run = run_scripted(tmp_path, mode="nan", num_rounds=2, min_clients=2)

    assert run.status == RunStatus.COMPLETED, run.error
    for record in run.rounds:
        assert record.accepted == ["site-1", "site-2"]
        assert "NaN" in record.rejected["site-3"] and "'w'" in record.rejected["site-3"]
    # Only sites 1 and 2 count: +1.5 a round.
    assert torch.equal(run.global_model["w"], torch.tensor([3.0, 4.0, 0.5]))
    # Aggregated updates are deleted; the rejected one stays for inspection.
    assert not (run.workspace / "sites" / "site-1" / "round-000.safetensors").exists()
    assert (run.workspace / "sites" / "site-3" / "round-000.safetensors").exists()
    rounds_file = (run.workspace / "rounds.jsonl").read_text().splitlines()
    assert "NaN" in json.loads(rounds_file[0])["rejected"]["site-3"]


def test_a_rejected_update_below_min_clients_fails_the_run_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(RunFailed, match="min_clients is 3") as failed:
        run_scripted(tmp_path, mode="shape", num_rounds=2, min_clients=3)

    run = failed.value.run
    assert run.status == RunStatus.FAILED and run.error is not None
    assert "min_clients is 3" in run.error
    assert "site-3" in run.error and "shape [5], expected [3]" in run.error
    assert run.rounds == []


def test_hello_pt_learns_and_beats_every_single_site(tmp_path: Path) -> None:
    example = ROOT / "examples" / "hello-pt"
    sys.path.insert(0, str(example))
    try:
        from model import Net  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(example))
    recipe = FedAvgRecipe(
        name="hello-pt",
        min_clients=3,
        num_rounds=5,
        model=Net(),
        train_script=str(example / "client.py"),
        train_args="--epochs 2",
    )
    run = recipe.execute(SimEnv(num_clients=3, workspace=tmp_path, show_progress=False))

    assert run.status == RunStatus.COMPLETED, run.error
    accuracy = [value for _, value in run.metrics.aggregated("accuracy")]
    assert accuracy[-1] > accuracy[0] + 0.5
    assert accuracy[-1] > 0.9
    # The same number of rounds trained on one site alone scores lower on every site.
    for site in ("site-1", "site-2", "site-3"):
        out = subprocess.run(
            [sys.executable, "train.py", "--site", site, "--rounds", "5"],
            cwd=example,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        alone = float(out.strip().splitlines()[-1].rsplit(" ", 1)[1])
        assert max(accuracy) > alone + 0.05, (site, alone, accuracy)


def test_client_py_is_train_py_plus_at_most_six_changed_lines() -> None:
    example = ROOT / "examples" / "hello-pt"
    train = (example / "train.py").read_text().splitlines()
    client = (example / "client.py").read_text().splitlines()
    # Count code lines that differ, ignoring the module docstring (the first 4 lines).
    import difflib

    changed = [
        line
        for line in difflib.unified_diff(train[4:], client[4:], lineterm="", n=0)
        if line[:1] in "+" and not line.startswith("+++") and line[1:].strip()
    ]
    assert 0 < len(changed) <= 6, changed
