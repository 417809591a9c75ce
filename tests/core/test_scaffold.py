"""SCAFFOLD's server half against hand-computed control variates, and a whole run in SimEnv
with an NVFlare-style SCAFFOLD client script (PTScaffoldHelper)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from client_agent.fl_model import AlgorithmConstants, FLModel, ParamsType
from client_agent.wire import read_model_file, write_model_file
from jobs.aggregation import UpdateRejected
from jobs.envs import Run, RunStatus, SimEnv
from jobs.recipes import ScaffoldRecipe
from jobs.workflows import ServerState, result_from_file
from jobs.workflows.scaffold import Scaffold

DIFF = AlgorithmConstants.SCAFFOLD_CTRL_DIFF
GLOBAL = AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL


def final_weights(run: Run) -> dict[str, torch.Tensor]:
    weights = run.global_model
    assert weights is not None, "the run made no global model"
    return weights


def site_file(tmp_path: Path, site: str, w: list[float], c_diff: list[float]) -> Path:
    path = tmp_path / f"{site}.safetensors"
    write_model_file(
        path,
        FLModel(
            params_type=ParamsType.FULL,
            params={"w": torch.tensor(w), "steps": torch.tensor(3)},
            meta={DIFF: {"w": torch.tensor(c_diff)}},
        ),
    )
    return path


def test_the_server_control_moves_by_the_accepted_share_of_the_mean_change(
    tmp_path: Path,
) -> None:
    workflow = Scaffold(min_clients=2, num_rounds=2)
    glob = {"w": torch.tensor([0.0, 0.0]), "steps": torch.tensor(0)}
    state = ServerState(tensors={"w": torch.tensor([1.0, -1.0])})
    # Three sites asked, two answered: c ← c + 2/3 · mean(Δc).
    plan = workflow.plan(1, ["site-1", "site-2", "site-3"], state)
    specs = {name: (t.dtype, tuple(t.shape)) for name, t in glob.items()}
    results = [
        result_from_file(
            plan.tasks[0], site_file(tmp_path, "site-1", [1.0, 2.0], [1.0, 2.0]), specs
        ),
        result_from_file(
            plan.tasks[1], site_file(tmp_path, "site-2", [3.0, 4.0], [3.0, 6.0]), specs
        ),
    ]

    outcome = workflow.close(1, plan, glob, results, state)
    assert outcome.global_params is not None

    # By hand: mean Δc = [2, 4]; c = [1, -1] + 2/3 · [2, 4] = [7/3, 5/3].
    assert torch.allclose(outcome.state.tensors["w"], torch.tensor([7 / 3, 5 / 3]))
    assert "steps" not in outcome.state.tensors  # integer buffers have no control
    # The weights are FedAvg's mean.
    assert torch.equal(outcome.global_params["w"], torch.tensor([2.0, 3.0]))
    # The sites get c in the next model file's meta; zeros before the first round.
    sent = workflow.global_model_meta(outcome.state, outcome.global_params)
    assert torch.equal(sent[GLOBAL]["w"], outcome.state.tensors["w"])
    first = workflow.global_model_meta(ServerState(), glob)
    assert torch.equal(first[GLOBAL]["w"], torch.zeros(2))


def test_a_control_change_that_does_not_fit_the_model_is_rejected(tmp_path: Path) -> None:
    workflow = Scaffold(min_clients=1, num_rounds=1)
    plan = workflow.plan(0, ["site-1"], ServerState())
    specs = {"w": (torch.float32, (2,)), "steps": (torch.int64, ())}
    path = site_file(tmp_path, "site-1", [1.0, 2.0], [1.0, 2.0, 3.0])

    with pytest.raises(UpdateRejected, match=r"meta\['scaffold_c_diff'\]\['w'\] has shape \[3\]"):
        result_from_file(plan.tasks[0], path, specs)


# The shape of NVFlare's SCAFFOLD client script (examples/advanced/...: cifar10 scaffold),
# with only its import lines changed.
SCAFFOLD_CLIENT = """
import torch
from torch import nn

import client_agent.api as flare
from client_agent.fl_model import FLModel
from client_agent.pt import AlgorithmConstants, PTScaffoldHelper, get_lr_values
from client_agent.tracking import SummaryWriter

flare.init()
number = int(flare.get_site_name().rsplit("-", 1)[1])
torch.manual_seed(number)
x = torch.randn(32, 2)
y = x @ torch.tensor([[1.0], [-2.0]]) + number  # each site its own offset: non-IID
model = nn.Linear(2, 1)
helper = PTScaffoldHelper()
helper.init(model=model)
summary_writer = SummaryWriter()
while flare.is_running():
    input_model = flare.receive()
    model.load_state_dict(input_model.params)
    global_model = nn.Linear(2, 1)
    global_model.load_state_dict(input_model.params)
    global_ctrl_weights = input_model.meta.get(AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL)
    if not global_ctrl_weights:
        raise ValueError("global_ctrl_weights were empty!")
    helper.load_global_controls(weights=global_ctrl_weights)
    c_global_para, c_local_para = helper.get_params()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(4):
        optimizer.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        optimizer.step()
        summary_writer.add_scalar(tag="loss", scalar=float(loss), global_step=step)
        summary_writer.add_scalars("train", {"lr": 0.05}, global_step=step)
        curr_lr = get_lr_values(optimizer)[0]
        helper.model_update(model=model, curr_lr=curr_lr, c_global_para=c_global_para,
                            c_local_para=c_local_para)
    helper.terms_update(model=model, curr_lr=curr_lr, c_global_para=c_global_para,
                        c_local_para=c_local_para, model_global=global_model)
    output_model = FLModel(
        params=model.cpu().state_dict(),
        metrics={"accuracy": -float(loss)},
        meta={AlgorithmConstants.SCAFFOLD_CTRL_DIFF: helper.get_delta_controls()},
    )
    flare.send(output_model)
"""


def test_an_nvflare_scaffold_script_runs_in_simenv_and_the_controls_build_up(
    tmp_path: Path,
) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "client.py").write_text(textwrap.dedent(SCAFFOLD_CLIENT))
    model = torch.nn.Linear(2, 1)
    recipe = ScaffoldRecipe("scaffold", 2, 3, model, app / "client.py")

    run = recipe.execute(SimEnv(num_clients=2, workspace=tmp_path / "ws", show_progress=False))

    assert run.status == RunStatus.COMPLETED, run.error
    assert [r.accepted for r in run.rounds] == [["site-1", "site-2"]] * 3
    # Round 1's sites got c = 0; the models after rounds 1 and 2 carry a non-zero c.
    models = run.workspace / "models"
    first = read_model_file(models / "initial.safetensors").meta[GLOBAL]
    assert all(torch.count_nonzero(t) == 0 for t in first.values())
    later = read_model_file(models / "round-002.safetensors").meta[GLOBAL]
    assert sorted(later) == ["bias", "weight"]
    assert any(torch.count_nonzero(t) > 0 for t in later.values())
    # SummaryWriter's scalars are the run's logged metrics, 4 steps × 3 rounds per site.
    assert len(run.metrics.logged("loss", "site-1")) == 12
    assert [p.value for p in run.metrics.logged("train/lr", "site-2")] == [0.05] * 12
    # Meta tensors never leak into the weights.
    assert sorted(final_weights(run)) == ["bias", "weight"]
