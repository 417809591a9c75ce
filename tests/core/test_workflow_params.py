"""Every workflow's parameters: a spec round trip, checks without torch, and bad input refused
before anything starts with an error that names the argument."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from common.validators import FieldError
from jobs.recipes import CyclicRecipe, FedAvgRecipe, FedProxRecipe
from jobs.workflows import workflow_from_spec, workflow_registry

ROOT = Path(__file__).resolve().parents[2]

SPECS: dict[str, dict[str, Any]] = {
    "fedavg": {
        "min_clients": 5,
        "num_rounds": 2,
        "aggregator": "krum",
        "aggregator_args": {"num_malicious": 1, "num_to_keep": 2},
    },
    "fedprox": {"min_clients": 2, "num_rounds": 3, "fedprox_mu": 0.1},
    "fedopt": {"min_clients": 2, "num_rounds": 3},
    "scaffold": {"min_clients": 2, "num_rounds": 3},
    "cyclic": {"min_clients": 2, "num_rounds": 2, "order": "random", "seed": 3},
    "fedeval": {"min_clients": 2},
    "cross_site_eval": {
        "train_workflow": "fedavg",
        "train_params": {"min_clients": 2, "num_rounds": 1},
    },
}


def test_every_registered_workflow_has_a_spec_here() -> None:
    assert sorted(workflow_registry()) == sorted(SPECS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_a_workflows_params_round_trip_through_its_spec(name: str) -> None:
    workflow = workflow_from_spec(name, SPECS[name])
    again = workflow_from_spec(name, workflow.to_params())

    assert again == workflow
    assert again.to_params() == workflow.to_params()
    sites = ["site-1", "site-2", "site-3", "site-4", "site-5"]
    assert workflow.total_rounds(sites) >= 1
    plan = workflow.plan(0, sites, workflow.initial_state(sites))
    assert plan.tasks and plan.label


def test_the_portal_checks_params_without_importing_torch() -> None:
    # The portal's web process checks a submitted job's params; FedOpt's optimizer is the one
    # check that needs torch (it builds the optimizer to try its arguments).
    code = textwrap.dedent(
        f"""
        import sys
        from jobs.workflows import workflow_from_spec
        specs = {SPECS!r}
        for name, params in specs.items():
            if name != "fedopt":
                workflow_from_spec(name, params)
        assert "torch" not in sys.modules, "torch was imported"
        """
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def script(tmp_path: Path) -> Path:
    path = tmp_path / "client.py"
    path.write_text("print('never run')\n")
    return path


@pytest.mark.parametrize(
    ("make", "field", "says"),
    [
        (
            lambda s: FedAvgRecipe("j", 3, 1, {"w": torch.zeros(1)}, s, aggregator="mode"),
            "aggregator",
            "unknown aggregator 'mode'",
        ),
        (
            lambda s: FedAvgRecipe(
                "j",
                3,
                1,
                {"w": torch.zeros(1)},
                s,
                aggregator="trimmed_mean",
                aggregator_args={"trim_fraction": 0.5},
            ),
            "trim_fraction",
            "below 0.5 to leave an update",
        ),
        (
            lambda s: FedAvgRecipe("j", 3, 1, {"w": torch.zeros(1)}, s, aggregator="trimmed_mean"),
            "trim_fraction",
            "required by the 'trimmed_mean' aggregator",
        ),
        (
            lambda s: FedAvgRecipe(
                "j",
                4,
                1,
                {"w": torch.zeros(1)},
                s,
                aggregator="krum",
                aggregator_args={"num_malicious": 1},
            ),
            "num_malicious",
            "1 is too many for min_clients=4",
        ),
        (
            lambda s: FedAvgRecipe(
                "j",
                5,
                1,
                {"w": torch.zeros(1)},
                s,
                aggregator="krum",
                aggregator_args={"num_malicious": 1, "num_to_keep": 5},
            ),
            "num_to_keep",
            "more than min_clients - num_malicious = 4",
        ),
        (
            lambda s: FedAvgRecipe(
                "j",
                3,
                1,
                {"w": torch.zeros(1)},
                s,
                aggregator="median",
                aggregator_args={"trim_fraction": 0.1},
            ),
            "trim_fraction",
            "not an argument of the 'median' aggregator",
        ),
        (
            lambda s: FedProxRecipe("j", 2, 1, {"w": torch.zeros(1)}, s, fedprox_mu=-1),
            "fedprox_mu",
            "at least 0",
        ),
        (
            lambda s: CyclicRecipe("j", {"w": torch.zeros(1)}, 2, s, order="alphabetical"),
            "order",
            "'fixed' or 'random'",
        ),
    ],
)
def test_bad_workflow_arguments_are_refused_naming_the_argument(
    tmp_path: Path, make: Any, field: str, says: str
) -> None:
    with pytest.raises(FieldError) as caught:
        make(script(tmp_path))

    assert caught.value.field == field
    assert says in str(caught.value)


def test_cross_site_evaluation_follows_every_training_workflow_and_nothing_else() -> None:
    from jobs.workflows.evaluation import TRAINING_WORKFLOWS, CrossSiteEval, FedEval

    evaluation = {CrossSiteEval.name, FedEval.name}
    assert sorted(TRAINING_WORKFLOWS) == sorted(set(workflow_registry()) - evaluation)
    for name in sorted(evaluation):
        with pytest.raises(FieldError, match="not a training workflow") as caught:
            workflow_from_spec(
                "cross_site_eval", {"train_workflow": name, "train_params": {"min_clients": 1}}
            )
        assert caught.value.field == "train_workflow"
