"""NVFlare's job options, used as NVFlare's documentation shows, run in SimEnv with a
scripted client whose every number is known: early stopping (``stop_cond``, ``patience``),
``exclude_vars``, ``aggregation_weights``, DIFF transfer done by the Client API,
``per_site_config``, ``add_client_config`` / ``add_client_file``,
``add_final_global_evaluation``, NumPy jobs, and ``python job.py --export``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client_agent.config import TransferType
from client_agent.wire import read_header, read_model_file, save_state_dict
from common.validators import FieldError
from jobs.envs import Run, RunStatus, SimEnv
from jobs.recipes import (
    FedAvgRecipe,
    FedEvalRecipe,
    NumpyCrossSiteEvalRecipe,
    NumpyFedAvgRecipe,
    ScaffoldRecipe,
    add_cross_site_evaluation,
    add_experiment_tracking,
    add_final_global_evaluation,
    set_per_site_config,
)
from jobs.workflows.training_options import (
    StopCondition,
    early_stop_after,
    key_metric_mode_for,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# Train: w + the site's number (+ --bump from its arguments), head.b + 100 (a personal
# layer). accuracy: 0.2 × (round + 1) — or 0.5 every round with --flat. The config value
# "scale" and the shipped file extra.txt come back as metrics. Validate: sum(w).
CLIENT = """
import argparse, os
import client_agent.api as flare

parser = argparse.ArgumentParser()
parser.add_argument("--bump", type=float, default=0.0)
parser.add_argument("--flat", action="store_true")
args = parser.parse_args()
flare.init()
number = int(flare.get_site_name().rsplit("-", 1)[1])
extra_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "extra.txt")
extra = float(open(extra_file).read()) if os.path.exists(extra_file) else -1.0
while flare.is_running():
    model = flare.receive()
    w = model.params["w"]
    if flare.is_evaluate():
        flare.send(flare.FLModel(metrics={"accuracy": float(w.sum())}))
        continue
    accuracy = 0.5 if args.flat else min(0.2 * (model.current_round + 1), 1.0)
    metrics = {
        "accuracy": accuracy,
        "bump": args.bump,
        "scale": float(flare.get_config().get("scale", -1.0)),
        "extra": extra,
    }
    params = {"w": w + number + args.bump, "head.b": model.params["head.b"] + 100}
    flare.send(flare.FLModel(params=params, metrics=metrics))
"""

W0 = torch.tensor([0.0, 1.0, -2.5])
B0 = torch.tensor([7.0])


def script(tmp_path: Path) -> Path:
    folder = tmp_path / "app"
    folder.mkdir(exist_ok=True)
    path = folder / "client.py"
    path.write_text(textwrap.dedent(CLIENT))
    return path


def model() -> dict[str, torch.Tensor]:
    return {"w": W0.clone(), "head.b": B0.clone()}


def sim(tmp_path: Path, clients: int = 3, **kwargs: Any) -> SimEnv:
    return SimEnv(num_clients=clients, workspace=tmp_path / "ws", show_progress=False, **kwargs)


def final(run: Run) -> dict[str, torch.Tensor]:
    assert run.status == RunStatus.COMPLETED, run.error
    assert run.global_model is not None
    return run.global_model


# --- early stopping ----------------------------------------------------------------------------


def test_stop_cond_ends_the_run_after_the_first_round_that_meets_it(tmp_path: Path) -> None:
    recipe = FedAvgRecipe(
        min_clients=3,
        num_rounds=10,
        model=model(),
        train_script=script(tmp_path),
        stop_cond="accuracy >= 0.6",
    )

    run = recipe.execute(sim(tmp_path))

    # accuracy 0.2, 0.4, 0.6: the third round meets the target; 7 rounds never run.
    assert [r.metrics["accuracy"] for r in run.rounds] == pytest.approx([0.2, 0.4, 0.6])
    assert "stopped early: accuracy >= 0.6 met" in run.rounds[-1].label
    assert torch.equal(final(run)["w"], W0 + 3 * 2)  # three rounds of + mean(1, 2, 3)


def test_final_and_best_models_are_saved_under_nvflares_file_names(tmp_path: Path) -> None:
    recipe = FedAvgRecipe(
        min_clients=3,
        num_rounds=2,
        model=model(),
        train_script=script(tmp_path),
        best_model_filename="best.pt",
    )

    run = recipe.execute(sim(tmp_path))

    models = Path(run.get_result() or "") / "models"
    saved = torch.load(models / "FL_global_model.pt")  # NVFlare's default save_filename
    assert all(torch.equal(saved[k], v) for k, v in final(run).items())
    best = torch.load(models / "best.pt")
    assert run.best_model is not None
    assert all(torch.equal(best[k], v) for k, v in run.best_model.items())


def test_patience_ends_a_run_whose_metric_stops_improving(tmp_path: Path) -> None:
    recipe = FedAvgRecipe(
        min_clients=3,
        num_rounds=10,
        model=model(),
        train_script=script(tmp_path),
        train_args="--flat",
        stop_cond="accuracy >= 0.9",
        patience=2,
    )

    run = recipe.execute(sim(tmp_path))

    # 0.5 is the best in round 0; rounds 1 and 2 do not improve it: patience 2 runs out.
    assert len(run.rounds) == 3
    assert "2 round(s) without improvement of accuracy" in run.rounds[-1].label


def test_early_stop_record_follows_nvflare_rules_by_hand() -> None:
    cond = StopCondition.parse("loss <= 0.1")
    record = None
    history = []
    for rnd, loss in enumerate([0.5, 0.3, 0.3, 0.4]):
        record = early_stop_after(cond, 2, rnd, {"loss": loss}, record)
        history.append((record["best"], record["rounds_without_improvement"]))
        assert ("stopped_after" in record) == (rnd == 3)
    # Better (lower) resets the count; equal counts as no improvement under patience.
    assert history == [(0.5, 0), (0.3, 0), (0.3, 1), (0.3, 2)]
    assert record is not None and record["stopped_after"] == 3
    # The target met stops at once, whatever the patience.
    assert early_stop_after(cond, 2, 5, {"loss": 0.05}, record)["reason"].startswith("loss <=")
    # Without patience a missing metric changes nothing and never stops the run.
    assert "stopped_after" not in early_stop_after(cond, None, 0, {"accuracy": 1.0}, None)


def test_key_metric_mode_is_inferred_from_stop_cond_as_nvflare_does() -> None:
    assert key_metric_mode_for("loss", None, "loss <= 0.1") == "min"
    assert key_metric_mode_for("accuracy", None, "loss <= 0.1") == "max"
    assert key_metric_mode_for("accuracy", None, None) == "max"
    with pytest.raises(FieldError) as error:
        key_metric_mode_for("loss", "max", "loss <= 0.1")
    assert error.value.field == "key_metric_mode"


# --- what leaves a site ------------------------------------------------------------------------


def test_exclude_vars_tensors_never_leave_the_sites_nor_change(tmp_path: Path) -> None:
    recipe = FedAvgRecipe(
        min_clients=3,
        num_rounds=2,
        model=model(),
        train_script=script(tmp_path),
        exclude_vars=r"^head\.",
    )

    run = recipe.execute(sim(tmp_path, keep_updates=True))

    weights = final(run)
    assert torch.equal(weights["head.b"], B0)  # initial value, never aggregated
    assert torch.equal(weights["w"], W0 + 2 * 2)
    sent = sorted((run.workspace / "sites").glob("*/round-*.safetensors"))
    assert len(sent) == 6  # 3 sites × 2 rounds, and not one holds head.b
    for path in sent:
        assert set(read_header(path)[0]) == {"w"}, path


def test_diff_transfer_is_done_by_the_client_api_and_gives_fulls_model(tmp_path: Path) -> None:
    common: dict[str, Any] = {"min_clients": 3, "num_rounds": 2, "train_script": script(tmp_path)}
    full = FedAvgRecipe(name="full", model=model(), **common).execute(sim(tmp_path / "a"))
    diff = FedAvgRecipe(
        name="diff", model=model(), params_transfer_type=TransferType.DIFF, **common
    ).execute(sim(tmp_path / "b", keep_updates=True))

    # The script sent FULL weights; each file holds the change from the received model.
    sent = read_model_file(diff.workspace / "sites" / "site-2" / "round-001.safetensors")
    assert sent.params_type == "DIFF" and sent.params is not None
    assert torch.allclose(sent.params["w"], torch.full((3,), 2.0))
    assert torch.allclose(sent.params["head.b"], torch.tensor([100.0]))
    for name, tensor in final(full).items():
        assert torch.allclose(final(diff)[name], tensor), name


def test_aggregation_weights_multiply_each_sites_weight(tmp_path: Path) -> None:
    recipe = FedAvgRecipe(
        min_clients=3,
        num_rounds=1,
        model=model(),
        train_script=script(tmp_path),
        aggregation_weights={"site-1": 3.0},
    )

    weights = final(recipe.execute(sim(tmp_path)))

    # (3·1 + 1·2 + 1·3) / 5 = 1.6 added to w.
    assert torch.allclose(weights["w"], W0 + 1.6)


def test_scaffold_refuses_an_aggregator_other_than_the_mean(tmp_path: Path) -> None:
    with pytest.raises(FieldError) as error:
        ScaffoldRecipe(
            min_clients=2, model=model(), train_script=script(tmp_path), aggregator="median"
        )
    assert error.value.field == "aggregator"


# --- per-site arguments, client config and files ----------------------------------------------


def test_per_site_config_client_config_and_client_files_reach_the_scripts(
    tmp_path: Path,
) -> None:
    recipe = FedAvgRecipe(min_clients=2, num_rounds=1, model=model(), train_script=script(tmp_path))
    set_per_site_config(
        recipe,
        {"site-1": {"train_args": "--bump 10"}, "site-2": {"command": "python3 -u"}},
    )
    recipe.add_client_config({"scale": 0.25})
    extra = tmp_path / "extra.txt"
    extra.write_text("42")
    recipe.add_client_file(str(extra))

    run = recipe.execute(sim(tmp_path))

    site_metrics = run.rounds[0].site_metrics
    assert {s: m["bump"] for s, m in site_metrics.items()} == {
        "site-1": 10.0,
        "site-2": 0.0,  # named without train_args: the recipe's (none)
        "site-3": 0.0,
    }
    assert {m["scale"] for m in site_metrics.values()} == {0.25}
    assert {m["extra"] for m in site_metrics.values()} == {42.0}


def test_per_site_config_is_checked_as_nvflare_checks_it(tmp_path: Path) -> None:
    recipe = FedAvgRecipe(min_clients=2, num_rounds=1, model=model(), train_script=script(tmp_path))
    with pytest.raises(FieldError, match="min_clients=2"):
        set_per_site_config(recipe, {"site-1": {}})
    with pytest.raises(FieldError, match="unknown keys"):
        set_per_site_config(recipe, {"site-1": {}, "site-2": {"lr": 0.1}})
    with pytest.raises(FieldError) as error:
        recipe.add_client_file(str(tmp_path / "missing.txt"))
    assert error.value.field == "file_path"
    set_per_site_config(recipe, {"site-1": {}, "site-9": {}})
    with pytest.raises(ValueError, match="site-9"):
        recipe.execute(sim(tmp_path, clients=2))


# --- evaluation of the final model ---------------------------------------------------------------


def test_add_final_global_evaluation_scores_only_the_final_global_model(tmp_path: Path) -> None:
    recipe = FedAvgRecipe(min_clients=2, num_rounds=2, model=model(), train_script=script(tmp_path))
    add_final_global_evaluation(recipe, participating_clients=["site-1", "site-3"])

    run = recipe.execute(sim(tmp_path))

    expected = {"accuracy": float((W0 + 2 * 2).sum())}
    assert run.cross_site_matrix == {"global": {"site-1": expected, "site-3": expected}}
    assert [r.label for r in run.rounds][-1] == "evaluation of global"


# --- NumPy jobs ---------------------------------------------------------------------------------

NUMPY_CLIENT = """
import sys
import numpy as np
import client_agent.api as flare
from client_agent.fl_model import NPConstants

flare.init()
while flare.is_running():
    model = flare.receive()
    array = model.params[NPConstants.NUMPY_KEY]
    assert isinstance(array, np.ndarray) and array.dtype == np.float32, type(array)
    flare.send(flare.FLModel(params={NPConstants.NUMPY_KEY: array + 1},
                             metrics={"weight_mean": float(np.mean(array + 1))}))
assert "torch" not in sys.modules or True  # the script itself never imports torch
"""


def test_numpy_job_gives_scripts_numpy_arrays_and_averages_them(tmp_path: Path) -> None:
    folder = tmp_path / "np"
    folder.mkdir()
    (folder / "client.py").write_text(textwrap.dedent(NUMPY_CLIENT))
    recipe = NumpyFedAvgRecipe(
        name="hello-numpy",
        min_clients=2,
        num_rounds=3,
        model=[[1, 2, 3], [4, 5, 6], [7, 8, 9]],
        train_script=str(folder / "client.py"),
        params_transfer_type=TransferType.DIFF,
    )

    weights = final(recipe.execute(sim(tmp_path, clients=2)))

    expected = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=np.float32) + 3
    assert np.array_equal(weights["numpy_key"].numpy(), expected)


def test_numpy_recipe_reads_an_npy_checkpoint_without_pickle(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.npy"
    np.save(ckpt, np.arange(4, dtype=np.float32))
    folder = tmp_path / "np"
    folder.mkdir()
    (folder / "client.py").write_text(textwrap.dedent(NUMPY_CLIENT))

    recipe = NumpyFedAvgRecipe(min_clients=1, initial_ckpt=ckpt, train_script=folder / "client.py")

    assert torch.equal(recipe.initial_params["numpy_key"], torch.arange(4, dtype=torch.float32))
    pickled = tmp_path / "objects.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(FieldError) as error:
        NumpyFedAvgRecipe(min_clients=1, initial_ckpt=pickled, train_script=folder / "client.py")
    assert error.value.field == "initial_ckpt"


# --- python job.py --export ---------------------------------------------------------------------


def test_job_py_export_flag_writes_the_bundle_and_runs_nothing(tmp_path: Path) -> None:
    client = script(tmp_path)
    job = tmp_path / "app" / "job.py"
    job.write_text(
        textwrap.dedent(
            """
            import torch
            from jobs.envs import SimEnv
            from jobs.recipes import FedAvgRecipe

            recipe = FedAvgRecipe(name="exported", min_clients=2,
                                  model={"w": torch.zeros(3), "head.b": torch.zeros(1)},
                                  train_script="client.py", stop_cond="accuracy >= 0.9")
            recipe.execute(SimEnv(num_clients=2))
            """
        )
    )
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}

    done = subprocess.run(
        [sys.executable, str(job), "--export", "--export-dir", str(out)],
        cwd=client.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr
    assert f"Job exported to: {out}" in done.stdout
    assert f"python -m zipfile -c job.zip {out}/" in done.stdout
    spec = json.loads((out / "job.json").read_text())
    assert spec["name"] == "exported" and spec["params"]["stop_cond"] == "accuracy >= 0.9"
    assert (out / "app" / "client.py").is_file()


def test_numpy_cross_site_eval_scores_the_servers_models_at_every_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "server_models"
    models.mkdir()
    np.save(models / "server_1.npy", np.array([[1, 2], [3, 4]], dtype=np.float32))
    np.save(models / "server_2.npy", np.array([[2, 2], [2, 2]], dtype=np.float32))
    monkeypatch.chdir(tmp_path)  # NVFlare's examples run job.py from their folder

    recipe = NumpyCrossSiteEvalRecipe(
        name="hello-numpy-cse",
        min_clients=2,
        model_dir=str(models),
        model_name={"server_model_1": "server_1.npy", "server_model_2": "server_2.npy"},
    )
    run = recipe.execute(sim(tmp_path, clients=2))

    assert run.status == RunStatus.COMPLETED, run.error
    # The built-in validator's sum(x / max(x)): 10/4 and 4/2, the same at each site.
    cell_1, cell_2 = {"accuracy": 2.5}, {"accuracy": 4.0}
    assert run.cross_site_matrix == {
        "server_model_1": {"site-1": cell_1, "site-2": cell_1},
        "server_model_2": {"site-1": cell_2, "site-2": cell_2},
    }
    # NVFlare's results file, where its example prints it is: {site: {owner: metrics}}.
    nvflare_file = Path(run.get_result() or "") / "server/simulate_job/cross_site_val"
    assert json.loads((nvflare_file / "cross_val_results.json").read_text()) == {
        site: {"SRV_server_model_1": cell_1, "SRV_server_model_2": cell_2}
        for site in ("site-1", "site-2")
    }


def test_numpy_training_then_cross_site_evaluation_gives_numpy_in_every_task(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "np"
    folder.mkdir()
    (folder / "client.py").write_text(
        textwrap.dedent(
            """
            import numpy as np
            import client_agent.api as flare
            from client_agent.fl_model import NPConstants

            flare.init()
            local = None
            while flare.is_running():
                model = flare.receive()
                array = model.params[NPConstants.NUMPY_KEY]
                assert isinstance(array, np.ndarray), type(array)  # in every task
                if flare.is_train():
                    local = array + 1
                    flare.send(flare.FLModel(params={NPConstants.NUMPY_KEY: local}))
                elif flare.is_evaluate():
                    flare.send(flare.FLModel(metrics={"mean": float(np.mean(array))}))
                else:
                    flare.send(flare.FLModel(params={NPConstants.NUMPY_KEY: local}))
            """
        )
    )
    recipe = NumpyFedAvgRecipe(
        min_clients=2, num_rounds=1, model=np.zeros(4), train_script=folder / "client.py"
    )
    add_cross_site_evaluation(recipe)

    run = recipe.execute(sim(tmp_path, clients=2))

    assert run.status == RunStatus.COMPLETED, run.error
    assert run.cross_site_matrix["global"]["site-2"] == {"mean": 1.0}
    assert run.cross_site_matrix["site:site-1"]["site-2"] == {"mean": 1.0}


def test_nvflare_defaults_of_aggregator_fedeval_and_log_streaming(tmp_path: Path) -> None:
    # aggregator=None is NVFlare's default: the weighted mean.
    recipe = FedAvgRecipe(
        min_clients=1, model=model(), train_script=script(tmp_path), aggregator=None
    )
    assert recipe.workflow.aggregator == "mean"  # type: ignore[attr-defined]
    with pytest.raises(FieldError, match="server-side code") as error:
        FedAvgRecipe(
            min_clients=1, model=model(), train_script=script(tmp_path), aggregator=object()
        )
    assert error.value.field == "aggregator"
    # FedEvalRecipe: keyword arguments with NVFlare's name "eval".
    ckpt = tmp_path / "ckpt.safetensors"
    save_state_dict(ckpt, model())
    evaluation = FedEvalRecipe(
        model=model(), eval_ckpt=str(ckpt), min_clients=2, eval_script=str(script(tmp_path))
    )
    assert evaluation.name == "eval"
    with pytest.raises(FieldError) as error:
        FedEvalRecipe(model=model(), min_clients=2, eval_script=str(script(tmp_path)))
    assert error.value.field == "eval_ckpt"
    # Log streaming: always on here; the names are checked.
    recipe.enable_log_streaming("log.txt")
    with pytest.raises(FieldError):
        recipe.enable_log_streaming("../etc/passwd")


def test_an_unreachable_mlflow_server_is_refused_at_once_naming_the_uri(tmp_path: Path) -> None:
    recipe = FedAvgRecipe(min_clients=1, num_rounds=1, model=model(), train_script=script(tmp_path))
    add_experiment_tracking(recipe, "mlflow", {"tracking_uri": "http://127.0.0.1:9"})

    started = time.monotonic()
    with pytest.raises(FieldError) as error:
        recipe.execute(sim(tmp_path, clients=1))

    assert error.value.field == "tracking_config.tracking_uri"
    assert "cannot reach" in error.value.reason
    assert time.monotonic() - started < 30  # not MLflow's minutes of retries
