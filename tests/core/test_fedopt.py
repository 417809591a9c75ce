"""FedOpt through the workflow protocol: FedAvgM and FedAdam against hand-computed models,
and the server state surviving a save and a reload between every round, bit for bit."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from client_agent.fl_model import FLModel
from common.validators import FieldError
from jobs.aggregation import SiteUpdate
from jobs.envs import Run, RunStatus, SimEnv
from jobs.recipes import FedOptRecipe
from jobs.workflows import ServerState, TrainResult
from jobs.workflows.fedopt import FedOpt

# Each site adds its number to every weight: the round's mean change is +2 with 3 sites.
CLIENT = """
import client_agent.api as flare

flare.init()
number = int(flare.get_site_name().rsplit("-", 1)[1])
while flare.is_running():
    model = flare.receive()
    flare.send(flare.FLModel(params={k: v + number for k, v in model.params.items()}))
"""

W0 = torch.tensor([0.0, 1.0, -2.5], dtype=torch.float64)


def final_weights(run: Run) -> dict[str, torch.Tensor]:
    weights = run.global_model
    assert weights is not None, "the run made no global model"
    return weights


def app(tmp_path: Path) -> Path:
    (tmp_path / "app").mkdir()
    script = tmp_path / "app" / "client.py"
    script.write_text(textwrap.dedent(CLIENT))
    return script


def test_fedavgm_in_simenv_steps_sgd_with_momentum_on_the_mean_change(tmp_path: Path) -> None:
    recipe = FedOptRecipe(
        "fedavgm",
        3,
        3,
        {"w": W0.clone()},
        app(tmp_path),
        optimizer_args={"path": "torch.optim.SGD", "args": {"lr": 1.0, "momentum": 0.6}},
        key_metric=None,
    )

    run = recipe.execute(SimEnv(num_clients=3, workspace=tmp_path / "ws", show_progress=False))

    assert run.status == RunStatus.COMPLETED, run.error
    # By hand: g = global - mean = -2 every round; v = 0.6 v + g; x = x - v.
    # v: -2, -3.2, -3.92; x: w0 + 2, w0 + 5.2, w0 + 9.12.
    assert torch.allclose(final_weights(run)["w"], W0 + 9.12, atol=1e-12)
    saved = ServerState.load(run.workspace / "models" / "state-003.safetensors")
    (momentum,) = [t for name, t in saved.tensors.items() if name.startswith("optimizer/w/")]
    assert torch.allclose(momentum, torch.full((3,), -3.92, dtype=torch.float64))


def test_fedadam_step_is_the_papers_formula(tmp_path: Path) -> None:
    # Reddi et al. 2021, Algorithm 2 (FedAdam) with Δ = mean change = +2, β1 = 0.9, β2 = 0.99,
    # τ = 0.001, η = 0.1: m = 0.1 Δ = 0.2; v = 0.99 τ² + 0.01 Δ² = 0.04 + 0.99e-6;
    # x = x0 + η m / (√v + τ).
    workflow = FedOpt(
        min_clients=3,
        num_rounds=1,
        key_metric=None,
        optimizer_args={
            "path": "jobs.aggregation.server_opt.FedAdam",
            "args": {"lr": 0.1, "betas": [0.9, 0.99], "tau": 0.001},
        },
    )
    glob = {"w": W0.clone()}
    results = [
        TrainResult(f"site-{n}", SiteUpdate.from_model(f"site-{n}", _model(W0 + n)))
        for n in (1, 2, 3)
    ]
    plan = workflow.plan(0, [r.site for r in results], ServerState())

    outcome = workflow.close(0, plan, glob, results, ServerState())
    assert outcome.global_params is not None

    v = 0.99 * 0.001**2 + 0.01 * 4.0
    expected = W0 + 0.1 * 0.2 / (v**0.5 + 0.001)
    assert torch.allclose(outcome.global_params["w"], expected, atol=1e-12)


def _model(w: torch.Tensor) -> FLModel:
    return FLModel(params={"w": w.clone()})


@pytest.mark.parametrize(
    "optimizer_args",
    [
        {"path": "jobs.aggregation.server_opt.FedYogi", "args": {"lr": 0.05}},
        {"path": "torch.optim.Adam", "args": {"lr": 0.1}},
    ],
)
def test_the_server_state_saved_and_reloaded_every_round_gives_the_same_bits(
    tmp_path: Path, optimizer_args: dict
) -> None:
    workflow = FedOpt(min_clients=2, num_rounds=4, key_metric=None, optimizer_args=optimizer_args)
    sites = ["site-1", "site-2"]

    def run(reload: bool) -> dict[str, torch.Tensor]:
        glob = {"w": W0.clone()}
        state = workflow.initial_state(sites)
        for rnd in range(4):
            changes = {"site-1": 0.5 + rnd, "site-2": -1.25 * rnd}
            results = [
                TrainResult(s, SiteUpdate.from_model(s, _model(glob["w"] + changes[s])))
                for s in sites
            ]
            outcome = workflow.close(rnd, workflow.plan(rnd, sites, state), glob, results, state)
            assert outcome.global_params is not None
            glob, state = outcome.global_params, outcome.state
            if reload:  # what a resumed worker reads: the file the driver stored
                path = state.save(tmp_path / f"state-{rnd}.safetensors")
                state = ServerState.load(path)
        return glob

    kept, reloaded = run(reload=False), run(reload=True)

    assert torch.equal(kept["w"], reloaded["w"])
    assert not torch.equal(kept["w"], W0)


def test_fedopt_refuses_an_optimizer_outside_the_allow_list(tmp_path: Path) -> None:
    with pytest.raises(FieldError) as caught:
        FedOptRecipe(
            "x", 2, 1, {"w": W0.clone()}, app(tmp_path), optimizer_args={"path": "os.system"}
        )
    assert caught.value.field == "optimizer_args" and "os.system" in str(caught.value)


def test_the_recipe_fills_in_num_rounds_and_the_models_buffers(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    recipe = FedOptRecipe(
        "x",
        2,
        5,
        model,
        app(tmp_path),
        lr_scheduler_args={
            "path": "torch.optim.lr_scheduler.CosineAnnealingLR",
            "args": {"T_max": "{num_rounds}", "eta_min": 0.9},
        },
    )
    params = recipe.workflow.to_params()
    assert params["lr_scheduler_args"]["args"]["T_max"] == 5
    assert params["buffers"] == ["1.running_mean", "1.running_var"]
