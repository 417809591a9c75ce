"""Recipes check their arguments when made and export a job bundle that ``JobBundle`` loads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from client_agent.wire import load_state_dict
from common.validators import FieldError
from jobs.bundle import BundleError, JobBundle
from jobs.envs import SimEnv
from jobs.recipes import FedAvgRecipe
from jobs.workflows import FedAvg


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)
        self.bn = torch.nn.BatchNorm1d(2)


@pytest.fixture
def app(tmp_path: Path) -> Path:
    """A client script's folder, with the clutter a real one collects."""
    folder = tmp_path / "my-app"
    files = {
        "client.py": "import client_agent.api as flare\n",
        "helper.py": "X = 1\n",
        "data/labels.txt": "cat\ndog\n",
        "pkg/__init__.py": "",
        "pkg/model.py": "Y = 2\n",
        # not part of the app:
        "__pycache__/client.cpython-311.pyc": "junk",
        "pkg/__pycache__/model.cpython-311.pyc": "junk",
        "stray.pyc": "junk",
        ".env": "SECRET=1\n",
        "pkg/.DS_Store": "junk",
        ".git/config": "[core]\n",
        ".idea/workspace.xml": "<project/>\n",
        "workspace/site-1/log.txt": "old run\n",
        "pkg/workspace/out.txt": "old run\n",
    }
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder


def recipe(app: Path, **overrides: Any) -> FedAvgRecipe:
    torch.manual_seed(0)
    args: dict[str, Any] = {
        "name": "hello-pt",
        "min_clients": 2,
        "num_rounds": 3,
        "model": Net(),
        "train_script": app / "client.py",
        "train_args": "--epochs 1",
    }
    args.update(overrides)
    return FedAvgRecipe(**args)


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------------------------
# FedAvgRecipe arguments
# --------------------------------------------------------------------------------------------


def test_a_good_recipe_holds_its_workflow_and_a_copy_of_the_weights(app: Path) -> None:
    model = Net()
    made = recipe(app, model=model)
    with torch.no_grad():
        model.fc.weight.add_(1.0)  # later training must not change the recipe's weights

    assert made.workflow == FedAvg(min_clients=2, num_rounds=3)
    assert made.min_clients == 2
    assert not torch.equal(made.initial_params["fc.weight"], model.fc.weight)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"train_script": "/nonexistent-fedportal-app/client.py"}, "train_script"),
        ({"model": [torch.zeros(1)]}, "model"),
        ({"model": {}}, "model"),
        ({"model": {"w": [1.0, 2.0]}}, "model"),
        ({"model": "resnet18"}, "model"),
        ({"min_clients": 0}, "min_clients"),
        ({"min_clients": True}, "min_clients"),
        ({"min_clients": 2.0}, "min_clients"),
        ({"num_rounds": 0}, "num_rounds"),
        ({"num_rounds": False}, "num_rounds"),
        ({"num_rounds": -1}, "num_rounds"),
        ({"name": "hello world"}, "name"),
        ({"name": ""}, "name"),
        ({"name": "../escape"}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"key_metric_mode": "highest"}, "key_metric_mode"),
        ({"train_args": ["--epochs", "1"]}, "train_args"),
        # The exported bundle would not load (JobBundle.load shlex-splits train_args).
        ({"train_args": "--name 'unclosed"}, "train_args"),
    ],
)
def test_a_bad_argument_raises_value_error_naming_it(
    app: Path, overrides: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValueError) as info:
        recipe(app, **overrides)

    assert str(info.value).startswith(f"{field}:"), str(info.value)
    assert isinstance(info.value, FieldError) and info.value.field == field


def test_a_train_script_that_is_a_folder_is_refused(app: Path) -> None:
    with pytest.raises(ValueError, match="^train_script:"):
        recipe(app, train_script=app / "data")


def test_sim_env_refuses_a_recipe_needing_more_sites_before_starting_anything(
    app: Path, tmp_path: Path
) -> None:
    workspace = tmp_path / "sim-workspace"
    made = recipe(app, min_clients=3)

    with pytest.raises(ValueError) as info:
        made.execute(SimEnv(num_clients=2, workspace=workspace, show_progress=False))

    assert str(info.value).startswith("min_clients:")
    assert "num_clients=2" in str(info.value)
    assert not workspace.exists()


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def test_export_writes_the_spec_the_initial_model_and_the_app(app: Path, tmp_path: Path) -> None:
    model = Net()
    made = recipe(app, model=model, key_metric="loss", key_metric_mode="min")

    root = made.export(tmp_path / "bundle")

    assert root == tmp_path / "bundle"
    assert sorted(p.name for p in root.iterdir()) == [
        "app",
        "initial_model.safetensors",
        "job.json",
    ]
    assert json.loads((root / "job.json").read_text()) == {
        "format": 1,
        "name": "hello-pt",
        "workflow": "fedavg",
        "params": {
            "min_clients": 2,
            "num_rounds": 3,
            "key_metric": "loss",
            "key_metric_mode": "min",
            "aggregator": "mean",
            "aggregator_args": {},
        },
        "train_script": "client.py",
        "train_args": "--epochs 1",
    }
    weights = load_state_dict(root / "initial_model.safetensors")
    state = model.state_dict()
    assert set(weights) == set(state)
    for name, tensor in state.items():
        assert weights[name].dtype == tensor.dtype, name
        assert torch.equal(weights[name], tensor), name
    assert files_under(root / "app") == {
        "client.py",
        "helper.py",
        "data/labels.txt",
        "pkg/__init__.py",
        "pkg/model.py",
    }
    assert (root / "app" / "data" / "labels.txt").read_text() == "cat\ndog\n"


def test_an_exported_bundle_loads_back_as_the_same_job(app: Path, tmp_path: Path) -> None:
    made = recipe(app)

    bundle = JobBundle.load(made.export(tmp_path / "bundle"))

    assert bundle.name == "hello-pt"
    assert bundle.workflow == made.workflow
    assert bundle.train_script == "client.py"
    assert bundle.train_args == "--epochs 1"
    assert bundle.script_path == tmp_path / "bundle" / "app" / "client.py"
    assert bundle.spec == made.spec()
    assert set(bundle.initial_params()) == set(made.initial_params)
    for name, tensor in bundle.initial_params().items():
        assert torch.equal(tensor, made.initial_params[name]), name


def test_export_refuses_an_existing_folder(app: Path, tmp_path: Path) -> None:
    (tmp_path / "bundle").mkdir()

    with pytest.raises(BundleError, match="already exists"):
        recipe(app).export(tmp_path / "bundle")


def test_export_into_the_script_folder_does_not_copy_the_bundle_into_itself(
    app: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # job.py usually sits next to client.py and is run from there: recipe.export("bundle").
    monkeypatch.chdir(app)

    try:
        root = recipe(app).export("bundle")
    except BundleError as exc:  # refusing, clearly, would also be right
        assert "bundle" in str(exc)
        return

    assert files_under(root / "app") == {
        "client.py",
        "helper.py",
        "data/labels.txt",
        "pkg/__init__.py",
        "pkg/model.py",
    }


def test_export_into_a_subfolder_of_the_app_keeps_that_subfolders_own_files(app: Path) -> None:
    root = recipe(app).export(app / "pkg" / "bundle")

    # Only the bundle is left out, not the folder that happens to hold it.
    assert files_under(root / "app") == {
        "client.py",
        "helper.py",
        "data/labels.txt",
        "pkg/__init__.py",
        "pkg/model.py",
    }


# --------------------------------------------------------------------------------------------
# JobBundle.load refusals
# --------------------------------------------------------------------------------------------


@pytest.fixture
def bundle_root(app: Path, tmp_path: Path) -> Path:
    root = recipe(app).export(tmp_path / "bundle")
    JobBundle.load(root)  # the starting point is good; each test breaks one thing
    return root


_DELETE = object()


def edit_spec(root: Path, **changes: Any) -> None:
    spec = json.loads((root / "job.json").read_text())
    for key, value in changes.items():
        if value is _DELETE:
            del spec[key]
        else:
            spec[key] = value
    (root / "job.json").write_text(json.dumps(spec))


def assert_refused(root: Path, *words: str) -> BundleError:
    with pytest.raises(BundleError) as info:
        JobBundle.load(root)
    for word in words:
        assert word in str(info.value), str(info.value)
    return info.value


def test_load_refuses_a_bundle_without_job_json(bundle_root: Path) -> None:
    (bundle_root / "job.json").unlink()

    assert_refused(bundle_root, "job.json", "missing")


@pytest.mark.parametrize("text", ["{not json", "", "\udcff"])
def test_load_refuses_job_json_that_is_not_json(bundle_root: Path, text: str) -> None:
    (bundle_root / "job.json").write_bytes(text.encode("utf-8", "surrogateescape"))

    assert_refused(bundle_root, "job.json", "not JSON")


def test_load_refuses_job_json_that_is_not_an_object(bundle_root: Path) -> None:
    (bundle_root / "job.json").write_text("[1, 2]")

    assert_refused(bundle_root, "job.json", "object")


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"workflow": "fedsgd"}, ["workflow:", "'fedsgd'"]),
        ({"workflow": _DELETE}, ["workflow:"]),
        ({"params": {"min_clients": 0, "num_rounds": 1}}, ["min_clients:"]),
        ({"params": {"min_clients": 1}}, ["num_rounds:"]),
        ({"params": {"min_clients": 1, "num_rounds": 1, "epochs": 2}}, ["epochs:"]),
        (
            {"params": {"min_clients": 1, "num_rounds": 1, "key_metric_mode": "x"}},
            ["key_metric_mode:"],
        ),
        ({"params": [1, 2]}, ["params:"]),
        ({"format": 2}, ["format:"]),
        ({"format": _DELETE}, ["format:"]),
        ({"name": "no spaces allowed"}, ["name:"]),
        ({"name": 7}, ["name:"]),
        ({"train_script": "../client.py"}, ["train_script:", "'../client.py'"]),
        # These two name files that exist, so only the '..' check can refuse them.
        ({"train_script": "../job.json"}, ["train_script:", "'../job.json'"]),
        ({"train_script": "data/../../job.json"}, ["train_script:"]),
        ({"train_script": "/etc/passwd"}, ["train_script:", "'/etc/passwd'"]),
        ({"train_script": "missing.py"}, ["train_script:", "'missing.py'"]),
        ({"train_script": "data"}, ["train_script:"]),
        ({"train_script": ""}, ["train_script:"]),
        ({"train_script": 5}, ["train_script:"]),
        ({"train_args": ["--epochs", "1"]}, ["train_args:"]),
        ({"train_args": "--name 'unclosed"}, ["train_args:"]),
    ],
)
def test_load_refuses_a_bad_spec_naming_the_field(
    bundle_root: Path, changes: dict[str, Any], words: list[str]
) -> None:
    edit_spec(bundle_root, **changes)

    refused = assert_refused(bundle_root, *words)
    # The field is data, not a prefix of the message to split off.
    assert refused.field == words[0].removesuffix(":")
    assert str(refused) == f"{refused.field}: {refused.reason}"


@pytest.mark.parametrize(
    "content",
    [b"", b"\x80\x04\x95garbage pickle", b"PK\x03\x04 a zip, as torch.save writes"],
    ids=["empty", "pickle", "zip"],
)
def test_load_refuses_a_corrupt_initial_model(bundle_root: Path, content: bytes) -> None:
    (bundle_root / "initial_model.safetensors").write_bytes(content)

    assert_refused(bundle_root, "initial_model.safetensors")


def test_load_refuses_a_truncated_initial_model(bundle_root: Path) -> None:
    path = bundle_root / "initial_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4])

    assert_refused(bundle_root, "initial_model.safetensors")


def test_load_refuses_a_missing_initial_model(bundle_root: Path) -> None:
    os.remove(bundle_root / "initial_model.safetensors")

    assert_refused(bundle_root, "initial_model.safetensors")


def test_load_refuses_an_initial_model_without_tensors(bundle_root: Path) -> None:
    from client_agent.wire import save_state_dict

    save_state_dict(bundle_root / "initial_model.safetensors", {})

    assert_refused(bundle_root, "initial_model.safetensors", "no tensors")
