"""SimEnv under secure aggregation: the same scripted job as plain FedAvg, masked or encrypted,
gives the same model within the stated bound; a site that fails after sharing is recovered."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client_agent.secagg.session import MASKING
from common.validators import FieldError
from jobs.envs import RunFailed, RunStatus, SimEnv
from jobs.recipes import FedAvgRecipe, FedAvgRecipeWithHE, FedOptRecipe
from jobs.workflows.secure import error_bound
from tests.core.test_simenv import initial_model, write_client


def run(tmp_path: Path, recipe_cls: type, *, mode: str = "ok", clients: int = 4, **options):
    script = write_client(tmp_path / "app", 2)
    recipe = recipe_cls(
        name="secure",
        min_clients=3,
        num_rounds=2,
        model=initial_model(),
        train_script=str(script),
        train_args=mode,
        **options,
    )
    env = SimEnv(
        clients=[f"site-{i}" for i in range(1, clients + 1)],
        workspace=tmp_path / "ws",
        show_progress=False,
    )
    return recipe.execute(env)


@pytest.mark.parametrize(
    ("recipe_cls", "options", "atol"),
    [
        (FedAvgRecipe, {"secure_aggregation": True}, error_bound(4, 4.0)),
        (FedOptRecipe, {"secure_aggregation": "masking"}, error_bound(4, 4.0) * 4),
        (FedAvgRecipeWithHE, {}, 1e-5),
    ],
    ids=["masking", "fedopt-masking", "he"],
)
def test_a_protected_run_ends_where_plain_fedavg_does(
    tmp_path: Path, recipe_cls: type, options: dict, atol: float
) -> None:
    plain_cls = FedOptRecipe if recipe_cls is FedOptRecipe else FedAvgRecipe
    plain = run(tmp_path / "plain", plain_cls)
    protected = run(tmp_path / "protected", recipe_cls, **options)

    assert protected.status == RunStatus.COMPLETED, protected.error
    assert plain.global_model is not None and protected.global_model is not None
    for name, tensor in plain.global_model.items():
        got = protected.global_model[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert torch.allclose(got.double(), tensor.double(), atol=atol, rtol=0), name
    # Metrics stay per site and in the clear; the sum is all the server had of the params.
    last = protected.rounds[-1]
    assert last.accepted == ["site-1", "site-2", "site-3", "site-4"]
    assert last.metrics == plain.rounds[-1].metrics
    kind = "he" if recipe_cls is FedAvgRecipeWithHE else MASKING
    assert last.protection["kind"] == kind
    assert last.protection["survivors"] == last.protection["roster"] == last.accepted
    assert last.protection["cost"]["extra_bytes_per_site"] > 0


def test_a_site_that_fails_after_sharing_is_recovered_and_the_sum_is_exact(
    tmp_path: Path,
) -> None:
    # site-3 sends NaN: rejected at its own checks, after the keys and shares; the survivors
    # reveal its mask key's shares and the round closes on the other three.
    plain = run(tmp_path / "plain", FedAvgRecipe, clients=3)
    masked = run(tmp_path / "masked", FedAvgRecipe, mode="nan", secure_aggregation=True)

    assert masked.status == RunStatus.COMPLETED, masked.error
    first = masked.rounds[0]
    assert first.accepted == ["site-1", "site-2", "site-4"]
    assert "site-3" in first.rejected
    assert first.protection["roster"] == ["site-1", "site-2", "site-3", "site-4"]
    assert first.protection["survivors"] == ["site-1", "site-2", "site-4"]
    # Sites 1, 2 and 4 add 7/3 a round, sites 1-3 add 2: compare with the known model.
    assert masked.global_model is not None and plain.global_model is not None
    expected = initial_model()["w"] + 2 * (1 + 2 + 4) / 3
    assert torch.allclose(masked.global_model["w"], expected, atol=error_bound(3, 3.0))


def test_too_few_survivors_fail_the_run_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(RunFailed, match=r"2 acceptable result\(s\), min_clients is 3"):
        run(tmp_path, FedAvgRecipe, mode="nan", clients=3, secure_aggregation=True)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"min_clients": 1, "secure_aggregation": True}, "needs min_clients ≥ 2"),
        ({"aggregator": "median", "secure_aggregation": True}, "robust aggregate"),
        (
            {"aggregation_weights": {"site-1": 2.0}, "secure_aggregation": True},
            "aggregation_weights",
        ),
        ({"dp": {"noise_multiplier": 1.0}, "secure_aggregation": True}, "privacy.toml"),
        ({"secure_aggregation": "paillier"}, "must be 'masking', 'he' or null"),
    ],
)
def test_options_that_need_one_sites_update_are_refused_by_name(
    tmp_path: Path, options: dict, message: str
) -> None:
    script = write_client(tmp_path / "app", 1)
    arguments = {"min_clients": 3, **options}
    with pytest.raises(FieldError, match=message) as caught:
        FedAvgRecipe(
            name="x", num_rounds=1, model=initial_model(), train_script=str(script), **arguments
        )
    assert caught.value.field in ("secure_aggregation", "dp")


def test_he_recipe_refuses_partial_encryption_by_name(tmp_path: Path) -> None:
    script = write_client(tmp_path / "app", 1)
    with pytest.raises(FieldError, match="every layer is encrypted") as caught:
        FedAvgRecipeWithHE(
            min_clients=3, model=initial_model(), train_script=str(script), encrypt_layers="conv"
        )
    assert caught.value.field == "encrypt_layers"


def test_nvflares_he_job_runs_with_our_imports(tmp_path: Path) -> None:
    # The recipe call of NVFlare's cifar10 HE job (examples/advanced/cifar10, job.py): two
    # sites, DIFF updates, NumPy exchange, an external process. Only the imports differ.
    from client_agent.config import DataKind, ExchangeFormat, TransferType

    script = write_client(tmp_path / "app", 2)
    recipe = FedAvgRecipeWithHE(
        name="cifar10_sag_pt_he",
        model=initial_model(),
        min_clients=2,
        num_rounds=2,
        train_script=str(script),
        aggregator_data_kind=DataKind.WEIGHT_DIFF,
        launch_external_process=True,
        server_expected_format=ExchangeFormat.NUMPY,
        params_transfer_type=TransferType.DIFF,
    )
    run = recipe.execute(SimEnv(num_clients=2, workspace=tmp_path / "ws", show_progress=False))

    assert run.status == RunStatus.COMPLETED, run.error
    assert run.rounds[-1].protection["kind"] == "he"
    # Sites 1 and 2 add 1.5 on average to every float weight each round.
    assert run.global_model is not None
    assert torch.allclose(run.global_model["w"], initial_model()["w"] + 3.0, atol=1e-5)
