"""The Lightning adapter applies FedProx and SCAFFOLD by itself when the train task asks, as
NVFlare's ``patch`` does (NVFlare's hello-lightning ``--algorithm fedprox|scaffold``), and sends
the module's ``__fl_meta__``. One site, one round of a ``Linear(4, 3)`` on 4 fixed batches with
SGD, in SimEnv; the expected weights come from the same steps written out in plain torch."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch

from client_agent.pt import PTScaffoldHelper
from client_agent.wire import read_model_file
from jobs.envs import Run, RunStatus, SimEnv
from jobs.recipes import FedProxRecipe, ScaffoldRecipe

LR = 0.5
MU = 0.3

CLIENT = f"""
import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import client_agent.lightning as flare


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.__fl_meta__ = {{"CUSTOM_VAR": "value"}}

    def forward(self, x):
        return self.fc(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr={LR})


generator = torch.Generator().manual_seed(7)
x = torch.randn(32, 4, generator=generator)
y = torch.randint(0, 3, (32,), generator=generator)
data = DataLoader(TensorDataset(x, y), batch_size=8)
model = Tiny()
trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)
flare.patch(trainer)
while flare.is_running():
    flare.receive()
    trainer.fit(model, train_dataloaders=data)
"""


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(32, 4, generator=generator)
    y = torch.randint(0, 3, (32,), generator=generator)
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]


def initial() -> dict[str, torch.Tensor]:
    """The initial weights, named as the Lightning module names them (``fc.*``)."""
    torch.manual_seed(0)
    return {f"fc.{k}": v for k, v in torch.nn.Linear(4, 3).state_dict().items()}


def plain(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("fc."): v for k, v in weights.items()}


def run_job(tmp_path: Path, recipe_class: type, **kwargs: object) -> Run:
    app = tmp_path / "app"
    app.mkdir()
    (app / "client.py").write_text(textwrap.dedent(CLIENT))
    recipe = recipe_class(
        name="lit", min_clients=1, num_rounds=1, model=initial(), train_script=app / "client.py",
        **kwargs,
    )  # fmt: skip
    run: Run = recipe.execute(
        SimEnv(num_clients=1, workspace=tmp_path / "ws", show_progress=False, keep_updates=True)
    )
    assert run.status == RunStatus.COMPLETED, run.error
    return run


def hand_steps(mu: float = 0.0) -> torch.nn.Linear:
    """The round's 4 SGD steps in plain torch, with FedProx's term when ``mu``."""
    module = torch.nn.Linear(4, 3)
    module.load_state_dict(plain(initial()))
    received = {k: v.detach().clone() for k, v in module.named_parameters()}
    optimizer = torch.optim.SGD(module.parameters(), lr=LR)
    for x, y in data():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(module(x), y)
        if mu:
            loss = loss + mu / 2 * sum(
                ((p - received[n]) ** 2).sum() for n, p in module.named_parameters()
            )
        loss.backward()
        optimizer.step()
    return module


def sent(run: Run) -> object:
    return read_model_file(run.workspace / "sites" / "site-1" / "round-000.safetensors")


def test_fedprox_is_applied_to_a_patched_trainer_as_by_hand(tmp_path: Path) -> None:
    run = run_job(tmp_path, FedProxRecipe, fedprox_mu=MU)

    expected = hand_steps(mu=MU).state_dict()
    plain = hand_steps().state_dict()
    result = sent(run)
    for name, tensor in expected.items():
        assert torch.allclose(result.params[f"fc.{name}"], tensor, atol=1e-6), name  # type: ignore[attr-defined]
    assert not torch.allclose(expected["weight"], plain["weight"])  # the term changed something
    assert result.meta["CUSTOM_VAR"] == "value"  # type: ignore[attr-defined]
    assert result.meta["NUM_STEPS_CURRENT_ROUND"] == 4  # type: ignore[attr-defined]


def test_scaffold_is_applied_and_sends_the_control_change_as_by_hand(tmp_path: Path) -> None:
    run = run_job(tmp_path, ScaffoldRecipe)

    helper = PTScaffoldHelper()
    module = torch.nn.Linear(4, 3)
    helper.init(module)
    helper.load_global_controls({k: torch.zeros_like(v) for k, v in module.named_parameters()})
    # (c starts at zeros: the server's control before its first round)
    expected = hand_steps_with(helper, module)
    result = sent(run)
    diff = result.meta["scaffold_c_diff"]  # type: ignore[attr-defined]
    for name, value in helper.get_delta_controls().items():
        got = torch.as_tensor(diff[f"fc.{name}"])
        assert torch.allclose(got, torch.as_tensor(value), atol=1e-5), name
        assert torch.as_tensor(value).abs().sum() > 0
    for name, tensor in expected.items():
        assert torch.allclose(result.params[f"fc.{name}"], tensor, atol=1e-6), name  # type: ignore[attr-defined]


def hand_steps_with(helper: PTScaffoldHelper, module: torch.nn.Linear) -> dict[str, torch.Tensor]:
    module.load_state_dict(plain(initial()))
    received = {k: v.detach().clone() for k, v in module.named_parameters()}
    optimizer = torch.optim.SGD(module.parameters(), lr=LR)
    controls = helper.get_params()
    for x, y in data():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(module(x), y).backward()
        optimizer.step()
        helper.model_update(module, LR, *controls)
    helper.terms_update(module, LR, *controls, received)
    return dict(module.state_dict())
