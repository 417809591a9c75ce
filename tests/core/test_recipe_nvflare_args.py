"""``FedAvgRecipe`` takes NVFlare's keyword arguments: implemented, refused, or no effect."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from common.validators import FieldError
from jobs.bundle import JobBundle
from jobs.recipes import FedAvgRecipe, FedProxRecipe
from jobs.workflows import FedAvg

W0 = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "app" / "client.py"
    path.parent.mkdir()
    path.write_text("import client_agent.api as flare\n")
    return path


def train_metas(recipe: FedAvgRecipe) -> list[dict[str, Any]]:
    plan = recipe.workflow.plan(1, ["site-1", "site-2"], recipe.workflow.initial_state([]))
    return [dict(task.spec.meta) for task in plan.tasks]


def test_nvflare_defaults_for_name_and_num_rounds(script: Path) -> None:
    recipe = FedAvgRecipe(min_clients=2, model=W0, train_script=script)
    assert recipe.name == "fedavg"
    assert recipe.workflow.total_rounds(["site-1", "site-2"]) == 2


def test_min_clients_and_train_script_are_still_required(script: Path) -> None:
    with pytest.raises(FieldError) as missing_clients:
        FedAvgRecipe(model=W0, train_script=script)
    assert missing_clients.value.field == "min_clients"
    with pytest.raises(FieldError) as missing_script:
        FedAvgRecipe(min_clients=1, model=W0)
    assert missing_script.value.field == "train_script"


def test_model_as_class_path_dict_is_built_with_its_args(script: Path) -> None:
    recipe = FedAvgRecipe(
        min_clients=1,
        model={"class_path": "torch.nn.Linear", "args": {"in_features": 3, "out_features": 2}},
        train_script=script,
    )
    shapes = {name: list(t.shape) for name, t in recipe.initial_params.items()}
    assert shapes == {"weight": [2, 3], "bias": [2]}


@pytest.mark.parametrize(
    ("model", "says"),
    [
        ({"class_path": "torch.nn.NoSuchLayer"}, "cannot import"),
        ({"class_path": "torch.nn.Linear", "args": {"wrong": 1}}, "failed"),
        ({"class_path": "collections.OrderedDict"}, "not a torch.nn.Module"),
        ({"class_path": "torch.nn.Linear", "arg": {}}, "'class_path' and 'args'"),
    ],
)
def test_bad_class_path_dict_names_model(script: Path, model: dict[str, Any], says: str) -> None:
    with pytest.raises(FieldError) as error:
        FedAvgRecipe(min_clients=1, model=model, train_script=script)
    assert error.value.field == "model"
    assert says in error.value.reason


def test_initial_ckpt_is_loaded_into_model(script: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "start.pt"
    torch.save({"w": torch.tensor([7.0, 8.0]), "b": torch.tensor([9.0])}, ckpt)
    recipe = FedAvgRecipe(min_clients=1, model=W0, initial_ckpt=ckpt, train_script=script)
    assert recipe.initial_params["w"].tolist() == [7.0, 8.0]
    assert recipe.initial_params["b"].tolist() == [9.0]


def test_initial_ckpt_alone_is_the_initial_model(script: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "start.safetensors"
    save_file({"w": torch.tensor([3.0, 4.0])}, str(ckpt))
    recipe = FedAvgRecipe(min_clients=1, initial_ckpt=ckpt, train_script=script)
    assert {k: v.tolist() for k, v in recipe.initial_params.items()} == {"w": [3.0, 4.0]}


def test_initial_ckpt_that_does_not_fit_the_model_names_initial_ckpt(
    script: Path, tmp_path: Path
) -> None:
    ckpt = tmp_path / "other.pt"
    torch.save({"w": torch.zeros(5)}, ckpt)
    with pytest.raises(FieldError) as error:
        FedAvgRecipe(min_clients=1, model=W0, initial_ckpt=ckpt, train_script=script)
    assert error.value.field == "initial_ckpt"


def test_neither_model_nor_initial_ckpt_names_model(script: Path) -> None:
    with pytest.raises(FieldError) as error:
        FedAvgRecipe(min_clients=1, train_script=script)
    assert error.value.field == "model"


@pytest.mark.parametrize(
    ("key_metric", "key_metric_mode", "expected"),
    [
        ("accuracy", None, "max"),
        ("val_loss", None, "max"),  # NVFlare's rule: max unless stop_cond says otherwise
        ("loss", "min", "min"),
        ("loss", "max", "max"),
    ],
)
def test_key_metric_mode_none_is_max_as_in_nvflare(
    script: Path, key_metric: str, key_metric_mode: str | None, expected: str
) -> None:
    recipe = FedAvgRecipe(
        min_clients=1,
        model=W0,
        train_script=script,
        key_metric=key_metric,
        key_metric_mode=key_metric_mode,
    )
    assert isinstance(recipe.workflow, FedAvg)
    assert recipe.workflow.key_metric_mode == expected


class TransferType:  # NVFlare's constants are plain class attributes holding strings
    FULL = "FULL"
    DIFF = "DIFF"


def test_params_transfer_type_diff_reaches_every_train_task(script: Path) -> None:
    recipe = FedAvgRecipe(
        min_clients=2, model=W0, train_script=script, params_transfer_type=TransferType.DIFF
    )
    assert train_metas(recipe) == [{"params_transfer_type": "DIFF"}] * 2
    # and it survives the job spec the portal and SimEnv read back
    params = recipe.spec()["params"]
    assert params["params_transfer_type"] == "DIFF"
    assert FedAvg.from_params(params).params_transfer_type == "DIFF"


def test_aggregator_data_kind_weight_diff_means_diff(script: Path) -> None:
    recipe = FedAvgRecipe(
        min_clients=1, model=W0, train_script=script, aggregator_data_kind="WEIGHT_DIFF"
    )
    assert train_metas(recipe) == [{"params_transfer_type": "DIFF"}] * 2


def test_full_transfer_leaves_meta_and_spec_as_before(script: Path) -> None:
    recipe = FedAvgRecipe(min_clients=1, model=W0, train_script=script)
    assert train_metas(recipe) == [{}, {}]
    assert "params_transfer_type" not in recipe.spec()["params"]


def test_fedprox_diff_meta_carries_both_keys(script: Path) -> None:
    recipe = FedProxRecipe(
        min_clients=1, model=W0, train_script=script, fedprox_mu=0.5, params_transfer_type="DIFF"
    )
    assert train_metas(recipe)[0] == {"params_transfer_type": "DIFF", "fedprox_mu": 0.5}


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("params_transfer_type", "HALF"),
        ("aggregator_data_kind", "WEIGHT_SUM"),
    ],
)
def test_bad_transfer_constants_name_their_argument(
    script: Path, argument: str, value: Any
) -> None:
    with pytest.raises(FieldError) as error:
        FedAvgRecipe(min_clients=1, model=W0, train_script=script, **{argument: value})
    assert error.value.field == argument


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("patience", 3),  # without stop_cond it would never stop anything
        ("stop_cond", "accuracy >= high"),
        ("stop_cond", "accuracy ~ 0.9"),
        ("exclude_vars", "bn.(*"),
        ("aggregation_weights", {"site-1": -2.0}),
        ("per_site_config", {"site-1": {"learning_rate": 0.1}}),
        ("model_persistor", object()),
        ("model_locator", object()),
        ("save_filename", "models/final.pt"),
        ("best_model_filename", "best.safetensors"),
        ("server_expected_format", "tensorflow"),
    ],
)
def test_arguments_not_supported_or_wrong_are_refused_by_name(
    script: Path, argument: str, value: Any
) -> None:
    with pytest.raises(FieldError) as error:
        FedAvgRecipe(min_clients=1, model=W0, train_script=script, **{argument: value})
    assert error.value.field == argument


def test_default_file_names_and_pytorch_format_are_accepted(script: Path) -> None:
    recipe = FedAvgRecipe(
        min_clients=1,
        model=W0,
        train_script=script,
        save_filename="FL_global_model.pt",
        best_model_filename="best_FL_global_model.pt",
        server_expected_format="pytorch",
    )
    assert recipe.name == "fedavg"
    # NVFlare's default for its PyTorch recipes, NUMPY, means the same here.
    FedAvgRecipe(min_clients=1, model=W0, train_script=script, server_expected_format="numpy")


def test_no_effect_arguments_are_accepted_and_change_nothing(script: Path) -> None:
    plain = FedAvgRecipe(min_clients=1, model=W0, train_script=script)
    with_launch_args = FedAvgRecipe(
        min_clients=1,
        model=W0,
        train_script=script,
        launch_external_process=True,
        command="python3 -u",
        launch_once=False,
        launch_timeout=30.0,
        shutdown_timeout=5.0,
        server_memory_gc_rounds=1,
        client_memory_gc_rounds=1,
        cuda_empty_cache=True,
        enable_tensor_disk_offload=True,
    )
    assert with_launch_args.spec() == plain.spec()


def test_unknown_argument_is_still_a_type_error(script: Path) -> None:
    with pytest.raises(TypeError, match="num_round"):
        FedAvgRecipe(min_clients=1, model=W0, train_script=script, num_round=3)


def test_export_takes_nvflares_job_dir(script: Path, tmp_path: Path) -> None:
    recipe = FedAvgRecipe(min_clients=1, model=W0, train_script=script)
    bundle = JobBundle.load(recipe.export(job_dir=tmp_path / "job"))
    assert bundle.spec["name"] == "fedavg"


def test_export_refuses_both_path_and_job_dir(script: Path, tmp_path: Path) -> None:
    recipe = FedAvgRecipe(min_clients=1, model=W0, train_script=script)
    with pytest.raises(FieldError) as error:
        recipe.export(tmp_path / "a", job_dir=tmp_path / "b")
    assert error.value.field == "job_dir"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
