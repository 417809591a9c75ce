"""The Lightning adapter with real ``Trainer``s on the CPU: in SimEnv, and over a real
``ScriptProcess`` for the tasks SimEnv does not make (evaluate) and for failures.

The scripts are written into ``tmp_path``. Each one records what its Lightning side saw
(weights when training starts and ends, ``max_epochs``, Adam's step count, the scheduler's
epoch, the metrics ``validate()`` returned) in ``report.json`` in its working folder; the tests
compare that with what reached the runtime. The model is ``Linear(4, 3)`` on 32 samples, so
one epoch is 4 optimizer steps and a round of 2 epochs is 8.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from client_agent.fl_model import FLModel, ParamsType
from client_agent.runtime import (
    TASK_SUBMIT_MODEL,
    TASK_TRAIN,
    TASK_VALIDATE,
    ScriptFailed,
    ScriptProcess,
    Task,
)
from client_agent.wire import load_state_dict, read_model_file, write_model_file
from jobs.envs import Run, RunStatus, SimEnv
from jobs.recipes import FedAvgRecipe

ROOT = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = 4  # 32 samples, batches of 8
EPOCHS = 2
NUM_ROUNDS = 3

# The part every script shares: a tiny LightningModule, its data, and a callback that records
# what Lightning saw. ``pl`` is the Lightning package the script chose.
COMMON = """
import json
import sys

import lightning.pytorch
import pytorch_lightning
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import client_agent.lightning as flare


def weights(module):
    return {k: v.tolist() for k, v in module.state_dict().items()}


def adam_step(trainer):
    state = list(trainer.optimizers[0].state.values())
    return int(state[0]["step"]) if state else 0


def build(pl, seed):
    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            self.log("val_loss", nn.functional.cross_entropy(logits, y))
            self.log("val_acc", (logits.argmax(dim=1) == y).float().mean())

        def configure_optimizers(self):
            optimizer = torch.optim.Adam(self.parameters(), lr=0.05)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
            return {"optimizer": optimizer, "lr_scheduler": scheduler}

    class Data(pl.LightningDataModule):
        def setup(self, stage):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(32, 4, generator=g)
            y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
            self.data = TensorDataset(x, y)

        def train_dataloader(self):
            return DataLoader(self.data, batch_size=8, shuffle=True)

        def val_dataloader(self):
            return DataLoader(self.data, batch_size=32)

    class Recorder(pl.Callback):
        # Added after patch()'s callback, so it sees what that one did.
        def __init__(self):
            self.rounds = []

        def on_train_start(self, trainer, module):
            self.rounds.append({
                "max_epochs": trainer.max_epochs,
                "start_step": trainer.global_step,
                "adam_step_at_start": adam_step(trainer),
                "scheduler_epoch_at_start": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
                "weights_at_start": weights(module),
            })

        def on_validation_start(self, trainer, module):
            if trainer.state.fn == "validate":
                self.validate_weights = weights(module)

        def on_validation_end(self, trainer, module):
            if trainer.state.fn == "fit" and not trainer.sanity_checking:
                self.rounds[-1]["in_fit_val_loss"] = float(trainer.callback_metrics["val_loss"])

        def on_fit_end(self, trainer, module):
            if self.rounds and "end_step" not in self.rounds[-1]:
                self.rounds[-1].update(end_step=trainer.global_step,
                                       adam_step_at_end=adam_step(trainer),
                                       weights_at_end=weights(module))

    return Tiny, Data, Recorder


def make_trainer(pl, recorder, **kwargs):
    kwargs.setdefault("devices", 1)
    return pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[recorder], **kwargs)
""".replace("EPOCHS", str(EPOCHS))

# SimEnv's client: site-2 uses lightning.pytorch, the others pytorch_lightning; both imported.
SIM_CLIENT = (
    COMMON
    + """
flare.init()  # before patch(), as NVFlare allows: the site decides the package here
site = flare.get_site_name()
pl = lightning.pytorch if site == "site-2" else pytorch_lightning
number = int(site.rsplit("-", 1)[1])
torch.manual_seed(100 + number)  # the script's own weights differ from the global model
Tiny, Data, Recorder = build(pl, seed=number)
model, dm, recorder = Tiny(), Data(), Recorder()
trainer = make_trainer(pl, recorder)
report = {"package": pl.__name__, "own_weights": weights(model), "validate": []}
flare.patch(trainer)
report["callbacks"] = [[c.__module__ + "." + c.__qualname__ for c in type(cb).__mro__]
                       for cb in trainer.callbacks]
while flare.is_running():
    report["validate"].append(trainer.validate(model, datamodule=dm, verbose=False)[0])
    trainer.fit(model, datamodule=dm)
report["rounds"] = recorder.rounds
with open("report.json", "w") as fh:
    json.dump(report, fh)
"""
)


def write_script(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "client.py"
    script.write_text(textwrap.dedent(body).lstrip())
    return script


def initial_model() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"fc.weight": torch.randn(3, 4, generator=generator), "fc.bias": torch.zeros(3)}


def as_tensors(recorded: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in recorded.items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a and set(a) == set(b), (sorted(a), sorted(b))
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------------------------
# Three rounds in SimEnv, two sites: site-1 on pytorch_lightning, site-2 on lightning.pytorch
# --------------------------------------------------------------------------------------------


class SimRun:
    def __init__(self, run: Run) -> None:
        self.run = run
        self.reports = {
            site: json.loads((run.workspace / "sites" / site / "report.json").read_text())
            for site in ("site-1", "site-2")
        }

    def global_model(self, completed_rounds: int) -> dict[str, torch.Tensor]:
        name = (
            "initial.safetensors"
            if completed_rounds == 0
            else f"round-{completed_rounds:03d}.safetensors"
        )
        return load_state_dict(self.run.workspace / "models" / name)

    def update(self, site: str, rnd: int) -> FLModel:
        return read_model_file(self.run.workspace / "sites" / site / f"round-{rnd:03d}.safetensors")


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> SimRun:
    tmp = tmp_path_factory.mktemp("lightning-sim")
    script = write_script(tmp / "app", SIM_CLIENT)
    recipe = FedAvgRecipe(
        name="lightning",
        min_clients=2,
        num_rounds=NUM_ROUNDS,
        model=initial_model(),
        train_script=str(script),
        key_metric="val_acc",
    )
    run = recipe.execute(
        SimEnv(num_clients=2, workspace=tmp / "ws", show_progress=False, keep_updates=True)
    )
    assert run.status == RunStatus.COMPLETED, run.error
    return SimRun(run)


SITES = pytest.mark.parametrize("site", ["site-1", "site-2"])


def test_each_site_uses_the_callback_of_its_own_lightning_package(sim: SimRun) -> None:
    expected = {"site-1": "pytorch_lightning", "site-2": "lightning.pytorch"}
    for site, package in expected.items():
        report = sim.reports[site]
        assert report["package"] == package
        first = report["callbacks"][0]  # patch() puts its callback first
        assert first[0] == "client_agent.lightning.FLCallback"
        assert f"{package}.callbacks.callback.Callback" in first
        other = ({"pytorch_lightning", "lightning.pytorch"} - {package}).pop()
        assert not any(name.startswith(other) for name in first)
        assert len(report["rounds"]) == NUM_ROUNDS


@SITES
def test_the_weights_at_the_start_of_fit_are_the_received_global_model(
    sim: SimRun, site: str
) -> None:
    report = sim.reports[site]
    # The script's own weights are not the global model, so loading it is what made them equal.
    assert not torch.equal(
        as_tensors(report["own_weights"])["fc.weight"], initial_model()["fc.weight"]
    )
    assert len(report["rounds"]) == NUM_ROUNDS
    for rnd, recorded in enumerate(report["rounds"]):
        assert_same_weights(as_tensors(recorded["weights_at_start"]), sim.global_model(rnd))


@SITES
def test_the_update_sent_is_the_trained_model_full_with_the_real_step_count(
    sim: SimRun, site: str
) -> None:
    rounds = sim.reports[site]["rounds"]
    assert len(rounds) == NUM_ROUNDS
    for rnd, recorded in enumerate(rounds):
        update = sim.update(site, rnd)
        assert update.params_type is ParamsType.FULL
        assert update.params is not None
        assert_same_weights(dict(update.params), as_tensors(recorded["weights_at_end"]))
        # Trained: not the global model it started from.
        assert not torch.equal(update.params["fc.weight"], sim.global_model(rnd)["fc.weight"])
        steps = recorded["end_step"] - recorded["start_step"]
        assert steps == EPOCHS * STEPS_PER_EPOCH
        assert update.meta["NUM_STEPS_CURRENT_ROUND"] == steps
        assert update.current_round == rnd


@SITES
def test_explicit_validate_metrics_reach_run_metrics_under_their_round(
    sim: SimRun, site: str
) -> None:
    report = sim.reports[site]
    assert len(report["validate"]) == NUM_ROUNDS
    for key in ("val_acc", "val_loss"):
        expected: list[tuple[int | None, object]] = [
            (rnd, pytest.approx(v[key])) for rnd, v in enumerate(report["validate"])
        ]
        assert sim.run.metrics.site(site, key) == expected
    for rnd, (validated, recorded) in enumerate(
        zip(report["validate"], report["rounds"], strict=True)
    ):
        # They score the received global model: not the in-fit validation of the trained one.
        assert validated["val_loss"] != pytest.approx(recorded["in_fit_val_loss"])
        assert sim.update(site, rnd).metrics == pytest.approx(validated)


def test_aggregated_validate_metrics_choose_the_best_model(sim: SimRun) -> None:
    rounds = [rnd for rnd, _ in sim.run.metrics.aggregated("val_acc")]
    assert rounds == list(range(NUM_ROUNDS))
    assert sim.run.best_round is not None


@SITES
def test_training_epoch_metrics_are_logged_with_their_round_and_step(
    sim: SimRun, site: str
) -> None:
    points = sim.run.metrics.logged("train_loss", site)
    assert [(p.round, p.step) for p in points] == [
        (rnd, (rnd * EPOCHS + epoch + 1) * STEPS_PER_EPOCH)
        for rnd in range(NUM_ROUNDS)
        for epoch in range(EPOCHS)
    ]


@SITES
def test_max_epochs_grows_by_one_round_each_round(sim: SimRun, site: str) -> None:
    assert [r["max_epochs"] for r in sim.reports[site]["rounds"]] == [2, 4, 6]


@SITES
def test_optimizer_and_scheduler_state_carry_over_between_rounds(sim: SimRun, site: str) -> None:
    rounds = sim.reports[site]["rounds"]
    per_round = EPOCHS * STEPS_PER_EPOCH
    assert [r["adam_step_at_start"] for r in rounds] == [0, per_round, 2 * per_round]
    assert [r["adam_step_at_end"] for r in rounds] == [per_round, 2 * per_round, 3 * per_round]
    assert [r["scheduler_epoch_at_start"] for r in rounds] == [0, EPOCHS, 2 * EPOCHS]


# --------------------------------------------------------------------------------------------
# One script over a real ScriptProcess: tasks SimEnv does not make, and failures
# --------------------------------------------------------------------------------------------

# argv: strict (1/0), restore_state (1/0). Records one entry per pass of the loop.
TASK_CLIENT = (
    COMMON
    + """
strict, restore = sys.argv[1] == "1", sys.argv[2] == "1"
pl = pytorch_lightning
torch.manual_seed(7)
Tiny, Data, Recorder = build(pl, seed=1)
model, dm, recorder = Tiny(), Data(), Recorder()
trainer = make_trainer(pl, recorder)
flare.patch(trainer, load_state_dict_strict=strict, restore_state=restore)
passes = []
while flare.is_running():
    step_before = trainer.global_step
    metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
    passes.append({"validate": metrics, "validate_weights": recorder.validate_weights})
    trainer.fit(model, datamodule=dm)
    passes[-1]["steps"] = trainer.global_step - step_before
with open("report.json", "w") as fh:
    json.dump({"passes": passes, "rounds": recorder.rounds}, fh)
"""
)

SITE = "site-1"
JOB = "lightning-20260101-000000-abcd"


def start_script(tmp: Path, *args: str) -> ScriptProcess:
    script = write_script(tmp / "app", TASK_CLIENT)
    proc = ScriptProcess(
        script=script,
        args=list(args),
        site_name=SITE,
        job_id=JOB,
        workdir=tmp / "work",
        log_path=tmp / "log.txt",
        connect_timeout=60,
    )
    proc.start()
    return proc


def task(tmp: Path, name: str, rnd: int, params: dict[str, torch.Tensor]) -> Task:
    model_path = write_model_file(tmp / f"global-{rnd}.safetensors", FLModel(params=params))
    return Task(
        task_id=f"{JOB}:{rnd}:{SITE}",
        task_name=name,
        model_path=str(model_path),
        result_path=str(tmp / f"result-{rnd}.safetensors"),
        current_round=rnd,
        total_rounds=2,
    )


def test_evaluate_train_and_submit_model_tasks_in_one_loop(tmp_path: Path) -> None:
    # Non-strict: the evaluate task's global model has a key the module lacks.
    evaluate_params = {**initial_model(), "extra.scale": torch.ones(2)}
    train_params = {k: v + 1 for k, v in initial_model().items()}
    proc = start_script(tmp_path, "0", "1")
    try:
        evaluated = read_model_file(
            proc.run_task(task(tmp_path, TASK_VALIDATE, 0, evaluate_params), timeout=60)
        )
        trained = read_model_file(
            proc.run_task(task(tmp_path, TASK_TRAIN, 1, train_params), timeout=60)
        )
        submitted = read_model_file(
            proc.run_task(task(tmp_path, TASK_SUBMIT_MODEL, 2, {}), timeout=60)
        )
    finally:
        exit_code = proc.stop(grace=30)
    log_text = (tmp_path / "log.txt").read_text()
    assert exit_code == 0, log_text
    report = json.loads((tmp_path / "work" / "report.json").read_text())
    first, second, third = report["passes"]

    # Evaluate: metrics of the received model, no params; the fit() after it trained nothing.
    assert evaluated.params == {}
    assert evaluated.metrics is not None
    assert evaluated.metrics == pytest.approx(first["validate"])
    assert set(evaluated.metrics) == {"val_acc", "val_loss"}
    assert_same_weights(as_tensors(first["validate_weights"]), initial_model())
    assert first["steps"] == 0
    assert "dropped key(s)" in log_text and "'extra.scale'" in log_text

    # The next pass trains on the train task's model and sends it with its step count.
    assert len(report["rounds"]) == 1
    assert_same_weights(as_tensors(report["rounds"][0]["weights_at_start"]), train_params)
    assert second["steps"] == EPOCHS * STEPS_PER_EPOCH
    assert trained.params_type is ParamsType.FULL
    trained_weights = as_tensors(report["rounds"][0]["weights_at_end"])
    assert_same_weights(dict(trained.params or {}), trained_weights)
    assert trained.meta["NUM_STEPS_CURRENT_ROUND"] == EPOCHS * STEPS_PER_EPOCH
    assert trained.metrics == pytest.approx(second["validate"])

    # Submit-model (no global model): validate() sends the local weights, unchanged since
    # training, with their metrics; the fit() after it trains nothing.
    assert_same_weights(dict(submitted.params or {}), trained_weights)
    assert submitted.metrics == pytest.approx(third["validate"])
    assert third["steps"] == 0


def test_strict_mode_fails_naming_the_unexpected_key(tmp_path: Path) -> None:
    params = {**initial_model(), "extra.scale": torch.ones(2)}
    proc = start_script(tmp_path, "1", "1")
    try:
        with pytest.raises(ScriptFailed) as info:
            proc.run_task(task(tmp_path, TASK_TRAIN, 0, params), timeout=60)
    finally:
        proc.stop(grace=5)
    message = str(info.value)
    assert "GlobalModelMismatch" in message
    assert "unexpected key 'extra.scale'" in message
    assert not (tmp_path / "result-0.safetensors").exists()


def test_a_shape_mismatch_fails_even_in_non_strict_mode(tmp_path: Path) -> None:
    params = {**initial_model(), "fc.bias": torch.zeros(5)}
    proc = start_script(tmp_path, "0", "1")
    try:
        with pytest.raises(ScriptFailed) as info:
            proc.run_task(task(tmp_path, TASK_TRAIN, 0, params), timeout=60)
    finally:
        proc.stop(grace=5)
    assert "'fc.bias' has shape [5] in the global model but [3] in the module" in str(info.value)


def test_without_restore_state_the_optimizer_starts_afresh_each_round(tmp_path: Path) -> None:
    proc = start_script(tmp_path, "1", "0")
    try:
        for rnd in range(2):
            proc.run_task(task(tmp_path, TASK_TRAIN, rnd, initial_model()), timeout=60)
    finally:
        proc.stop(grace=30)
    rounds = json.loads((tmp_path / "work" / "report.json").read_text())["rounds"]
    assert [r["adam_step_at_start"] for r in rounds] == [0, 0]
    assert [r["max_epochs"] for r in rounds] == [2, 4]


# --------------------------------------------------------------------------------------------
# The example
# --------------------------------------------------------------------------------------------


def test_hello_lightning_client_is_train_py_plus_at_most_six_changed_lines() -> None:
    example = ROOT / "examples" / "hello-lightning"
    train = (example / "train.py").read_text().splitlines()
    client = (example / "client.py").read_text().splitlines()
    # Code lines only, ignoring the module docstring (the first 4 lines).
    changed = [
        line
        for line in difflib.unified_diff(train[4:], client[4:], lineterm="", n=0)
        if line[:1] == "+" and not line.startswith("+++") and line[1:].strip()
    ]
    assert 0 < len(changed) <= 6, changed
    assert all(line.endswith("# FL") for line in changed), changed
    assert "+import client_agent.lightning as flare  # FL" in changed
    assert "+    flare.patch(trainer)  # FL" in changed


# --------------------------------------------------------------------------------------------
# Two processes (DDP on the CPU): rank 0 talks to the runtime, rank 1 gets it by broadcast
# --------------------------------------------------------------------------------------------

DDP_CLIENT = (
    COMMON
    + """
import client_agent.api

pl = pytorch_lightning
torch.manual_seed(7)
Tiny, Data, Recorder = build(pl, seed=1)
model, dm, recorder = Tiny(), Data(), Recorder()
trainer = make_trainer(pl, recorder, strategy="ddp", devices=2)
flare.patch(trainer)
running, received = [], []
while True:
    running.append(flare.is_running())
    if not running[-1]:
        break
    received.append(flare.receive().current_round)
    trainer.validate(model, datamodule=dm, verbose=False)
    trainer.fit(model, datamodule=dm)
with open(f"report-rank{trainer.global_rank}.json", "w") as fh:
    json.dump({"running": running, "received": received, "rounds": recorder.rounds,
               "connected": client_agent.api._client is not None}, fh)
"""
)


def test_with_two_processes_only_rank_0_talks_to_the_runtime(tmp_path: Path) -> None:
    script = write_script(tmp_path / "app", DDP_CLIENT)
    proc = ScriptProcess(
        script=script,
        args=[],
        site_name=SITE,
        job_id=JOB,
        workdir=tmp_path / "work",
        log_path=tmp_path / "log.txt",
        connect_timeout=60,
    )
    proc.start()
    global_models = [initial_model(), {k: v * 2 for k, v in initial_model().items()}]
    try:
        results = [
            read_model_file(proc.run_task(task(tmp_path, TASK_TRAIN, rnd, params), timeout=120))
            for rnd, params in enumerate(global_models)
        ]
    finally:
        exit_code = proc.stop(grace=60)
    log_text = (tmp_path / "log.txt").read_text()
    assert exit_code == 0, log_text
    reports = [
        json.loads((tmp_path / "work" / f"report-rank{rank}.json").read_text()) for rank in (0, 1)
    ]
    assert [r["connected"] for r in reports] == [True, False]
    for report in reports:
        # Both ranks saw both tasks and the end of the job, and trained from each global model.
        assert report["running"] == [True, True, False]
        assert report["received"] == [0, 1]
        assert [r["max_epochs"] for r in report["rounds"]] == [2, 4]
        for recorded, params in zip(report["rounds"], global_models, strict=True):
            assert_same_weights(as_tensors(recorded["weights_at_start"]), params)
    for result, recorded in zip(results, reports[0]["rounds"], strict=True):
        assert_same_weights(dict(result.params or {}), as_tensors(recorded["weights_at_end"]))
        # DDP keeps the ranks' weights equal: rank 1 trained the same model.
    for rank0, rank1 in zip(reports[0]["rounds"], reports[1]["rounds"], strict=True):
        assert_same_weights(
            as_tensors(rank0["weights_at_end"]), as_tensors(rank1["weights_at_end"])
        )
    # Each rank steps on its half of the data: 2 batches an epoch.
    assert results[0].meta["NUM_STEPS_CURRENT_ROUND"] == EPOCHS * STEPS_PER_EPOCH // 2


def test_hello_lightning_learns(tmp_path: Path) -> None:
    example = ROOT / "examples" / "hello-lightning"
    # Loaded under its own name: a plain ``import model`` would leave hello-lightning's model
    # in sys.modules["model"] for the other examples' tests.
    spec = importlib.util.spec_from_file_location("hello_lightning_model", example / "model.py")
    assert spec is not None and spec.loader is not None
    model_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_module)
    torch.manual_seed(0)
    recipe = FedAvgRecipe(
        name="hello-lightning",
        min_clients=3,
        num_rounds=5,
        model=model_module.LitNet(),
        train_script=str(example / "client.py"),
        train_args="--epochs 2",
    )
    run = recipe.execute(SimEnv(num_clients=3, workspace=tmp_path, show_progress=False))

    assert run.status == RunStatus.COMPLETED, run.error
    accuracy = [value for _, value in run.metrics.aggregated("accuracy")]
    assert len(accuracy) == 5
    assert accuracy[-1] > accuracy[0] + 0.5
    assert accuracy[-1] > 0.9
    assert run.metrics.logged("train_loss", "site-1")  # the epochs' self.log metrics arrive
