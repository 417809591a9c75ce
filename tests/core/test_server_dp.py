"""Server-side DP-FedAvg: the clipped, equal-weight, noised mean; its accounting against
Opacus's own accountant; adaptive clipping; the recipe option run in SimEnv; bad settings."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from opacus.accountants import RDPAccountant

from common.validators import FieldError
from jobs.aggregation import fedavg
from jobs.envs import RunStatus, SimEnv
from jobs.recipes import FedAvgRecipe, FedOptRecipe, ScaffoldRecipe, ServerDP
from jobs.workflows import RoundOutcome, ServerState, TrainResult
from jobs.workflows.dp import CLIP_NORM_METRIC, DELTA_METRIC, DP_STATE_KEY, EPSILON_METRIC
from jobs.workflows.fedavg import FedAvg, FedProx
from jobs.workflows.fedopt import FedOpt
from tests.core.updates import DIFF, update

SITES = ["site-1", "site-2", "site-3"]


def close_round(
    workflow: FedAvg,
    glob: dict[str, torch.Tensor],
    params: dict[str, dict[str, torch.Tensor]],
    *,
    round_number: int = 0,
    state: ServerState | None = None,
    weights: dict[str, float] | None = None,
    planned: list[str] | None = None,
) -> RoundOutcome:
    state = state or ServerState()
    results = [
        TrainResult(site, update(site, p, weight=(weights or {}).get(site, 1.0)))
        for site, p in params.items()
    ]
    plan = workflow.plan(round_number, planned or sorted(params), state)
    return workflow.close(round_number, plan, glob, results, state)


def dp_fedavg_workflow(**dp: Any) -> FedAvg:
    return FedAvg(min_clients=1, num_rounds=5, key_metric=None, dp=ServerDP(seed=7, **dp))


def test_without_noise_and_a_large_clip_it_is_equal_weight_fedavg() -> None:
    glob = {"w": torch.tensor([0.5, -1.0, 2.0]), "b": torch.tensor([0.25])}
    params = {
        site: {"w": glob["w"] + n * torch.tensor([1.0, -0.5, 0.25]), "b": glob["b"] * n}
        for n, site in enumerate(SITES, start=1)
    }
    workflow = dp_fedavg_workflow(noise_multiplier=0.0, clip_norm=1e6)

    outcome = close_round(workflow, glob, params, weights={"site-1": 5.0, "site-2": 1.0})

    plain = fedavg([update(s, p) for s, p in params.items()], glob)
    assert outcome.global_params is not None
    for name in glob:
        assert torch.allclose(outcome.global_params[name], plain[name], atol=1e-6)
    # No noise: nothing private to claim, so no ε is recorded, only δ and the clip.
    assert EPSILON_METRIC not in outcome.metrics
    assert outcome.metrics[DELTA_METRIC] == 1e-5
    assert outcome.metrics[CLIP_NORM_METRIC] == 1e6


def test_a_huge_update_moves_the_model_by_at_most_clip_over_sites() -> None:
    glob = {"w": torch.zeros(1000, dtype=torch.float64)}
    huge = torch.full((1000,), 1e4, dtype=torch.float64)
    params = {"site-1": {"w": huge}, "site-2": {"w": glob["w"].clone()}}
    workflow = dp_fedavg_workflow(noise_multiplier=0.0, clip_norm=2.0)

    outcome = close_round(workflow, glob, params)

    assert outcome.global_params is not None
    moved = float(torch.linalg.vector_norm(outcome.global_params["w"] - glob["w"]))
    assert moved == pytest.approx(2.0 / 2, rel=1e-9)


def test_diff_updates_are_clipped_as_the_change_they_are() -> None:
    glob = {"w": torch.tensor([10.0, 10.0])}
    params = {"site-1": {"w": torch.tensor([3.0, 4.0])}}  # a change of norm 5
    workflow = dp_fedavg_workflow(noise_multiplier=0.0, clip_norm=1.0)
    results = [TrainResult("site-1", update("site-1", params["site-1"], params_type=DIFF))]
    plan = workflow.plan(0, ["site-1"], ServerState())

    outcome = workflow.close(0, plan, glob, results, ServerState())

    assert outcome.global_params is not None
    assert torch.allclose(outcome.global_params["w"], torch.tensor([10.6, 10.8]))


def test_the_denominator_is_the_planned_sites_not_those_that_answered() -> None:
    glob = {"w": torch.zeros(4)}
    params = {"site-1": {"w": torch.full((4,), 0.25)}}  # norm 0.5, under the clip
    workflow = dp_fedavg_workflow(noise_multiplier=0.0, clip_norm=1.0)

    outcome = close_round(workflow, glob, params, planned=SITES + ["site-4"])

    assert outcome.global_params is not None
    assert torch.allclose(outcome.global_params["w"], torch.full((4,), 0.25 / 4))


def test_the_noise_on_the_aggregate_has_std_sigma_c_over_n() -> None:
    glob = {"w": torch.zeros(200_000)}
    params = {site: {"w": glob["w"].clone()} for site in SITES}  # no change: only the noise
    sigma, clip = 1.5, 0.8
    workflow = dp_fedavg_workflow(noise_multiplier=sigma, clip_norm=clip)

    outcome = close_round(workflow, glob, params)

    assert outcome.global_params is not None
    noise = outcome.global_params["w"].to(torch.float64)
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.01 * sigma * clip / 3)
    assert float(noise.std()) == pytest.approx(sigma * clip / 3, rel=0.02)


def test_the_noise_is_new_every_round_and_unseeded_runs_differ() -> None:
    glob = {"w": torch.zeros(1000)}
    params = {"site-1": {"w": glob["w"].clone()}}
    seeded = dp_fedavg_workflow(noise_multiplier=1.0)
    first = close_round(seeded, glob, params, round_number=0).global_params
    second = close_round(seeded, glob, params, round_number=1).global_params
    assert first is not None and second is not None
    assert not torch.equal(first["w"], second["w"])

    unseeded = FedAvg(min_clients=1, num_rounds=2, key_metric=None, dp=ServerDP(noise_multiplier=1))
    a = close_round(unseeded, glob, params).global_params
    b = close_round(unseeded, glob, params).global_params
    assert a is not None and b is not None
    assert not torch.equal(a["w"], b["w"])


@pytest.mark.parametrize(("sigma", "delta"), [(1.0, 1e-5), (0.7, 1e-3), (3.0, 1e-6)])
def test_epsilon_per_round_is_opacus_rdp_accountant(sigma: float, delta: float) -> None:
    glob = {"w": torch.zeros(3)}
    params = {site: {"w": torch.ones(3)} for site in SITES}
    workflow = FedAvg(
        min_clients=3,
        num_rounds=4,
        key_metric=None,
        dp=ServerDP(noise_multiplier=sigma, delta=delta),
    )
    state = ServerState()
    accountant = RDPAccountant()
    for rnd in range(4):
        outcome = close_round(workflow, glob, params, round_number=rnd, state=state)
        state = outcome.state
        accountant.step(noise_multiplier=sigma, sample_rate=1.0)
        expected = accountant.get_epsilon(delta=delta)
        assert outcome.metrics[EPSILON_METRIC] == pytest.approx(expected, abs=1e-6)
        assert outcome.metrics[DELTA_METRIC] == delta


def test_adaptive_clipping_shrinks_the_clip_when_every_update_is_small(tmp_path: Path) -> None:
    glob = {"w": torch.zeros(10)}
    params = {site: {"w": torch.full((10,), 0.01)} for site in SITES}
    workflow = FedAvg(
        min_clients=3,
        num_rounds=5,
        key_metric=None,
        dp=ServerDP(
            noise_multiplier=0.5, clip_norm=1.0, adaptive=True, clipped_count_stddev=0.5, seed=3
        ),
    )
    state = ServerState()
    clips = []
    for rnd in range(5):
        outcome = close_round(workflow, glob, params, round_number=rnd, state=state)
        clips.append(outcome.metrics[CLIP_NORM_METRIC])
        # What a resumed driver reads: the clip norm is carried in the stored server state.
        state = ServerState.load(outcome.state.save(tmp_path / f"state-{rnd}.safetensors"))
    assert clips[0] == 1.0
    assert clips[-1] < clips[0] * math.exp(-0.2 * 0.5 * 2)  # well below where it started
    assert state.data[DP_STATE_KEY]["clip_norm"] < clips[-1]


def test_adaptive_clipping_raises_the_update_noise_and_accounts_at_sigma() -> None:
    dp = ServerDP(noise_multiplier=1.0, adaptive=True, clipped_count_stddev=2.0)
    assert dp.update_noise_multiplier(5) == pytest.approx((1.0 - 1 / 16) ** -0.5)
    accountant = RDPAccountant()
    accountant.step(noise_multiplier=1.0, sample_rate=1.0)
    assert dp.epsilon_after(1) == pytest.approx(accountant.get_epsilon(delta=1e-5), abs=1e-6)


def client_app(tmp_path: Path) -> Path:
    (tmp_path / "app").mkdir()
    script = tmp_path / "app" / "client.py"
    script.write_text(
        textwrap.dedent(
            """
            import client_agent.api as flare

            flare.init()
            number = int(flare.get_site_name().rsplit("-", 1)[1])
            while flare.is_running():
                model = flare.receive()
                flare.send(flare.FLModel(
                    params={k: v + number for k, v in model.params.items()},
                    metrics={"loss": 1.0 / number},
                ))
            """
        )
    )
    return script


def test_a_simenv_run_with_dp_reports_increasing_epsilon_every_round(tmp_path: Path) -> None:
    recipe = FedAvgRecipe(
        "dp-fedavg",
        3,
        3,
        {"w": torch.zeros(4)},
        client_app(tmp_path),
        key_metric="loss",
        key_metric_mode="min",
        dp=ServerDP(noise_multiplier=1.0, clip_norm=0.5),
    )

    run = recipe.execute(SimEnv(num_clients=3, workspace=tmp_path / "ws", show_progress=False))

    assert run.status == RunStatus.COMPLETED, run.error
    assert [r for r, _, _ in run.privacy] == [0, 1, 2]
    spent = [eps for _, eps, _ in run.privacy]
    assert spent == sorted(spent) and spent[0] < spent[-1]
    assert all(delta == 1e-5 for _, _, delta in run.privacy)
    assert spent[-1] == pytest.approx(ServerDP(noise_multiplier=1.0).epsilon_after(3), abs=1e-9)
    assert run.best_round is not None  # the key metric still picks the best model


def test_a_run_without_dp_has_no_privacy_entries(tmp_path: Path) -> None:
    recipe = FedAvgRecipe("plain", 2, 1, {"w": torch.zeros(2)}, client_app(tmp_path))
    run = recipe.execute(SimEnv(num_clients=2, workspace=tmp_path / "ws", show_progress=False))
    assert run.status == RunStatus.COMPLETED, run.error
    assert run.privacy == []


def test_dp_travels_in_the_workflow_params_and_back() -> None:
    workflow = FedProx(
        min_clients=2, num_rounds=3, dp=ServerDP(noise_multiplier=0.5, clip_norm=2.0)
    )
    params = workflow.to_params()
    assert params["dp"]["noise_multiplier"] == 0.5
    assert FedProx.from_params(params) == workflow
    assert "dp" not in FedAvg(min_clients=2, num_rounds=3).to_params()


def test_fedopt_steps_on_the_noised_mean() -> None:
    workflow = FedOpt(
        min_clients=1,
        num_rounds=1,
        key_metric=None,
        optimizer_args={"path": "torch.optim.SGD", "args": {"lr": 1.0}},
        dp=ServerDP(noise_multiplier=0.0, clip_norm=1.0),
    )
    glob = {"w": torch.zeros(2, dtype=torch.float64)}
    outcome = close_round(workflow, glob, {"site-1": {"w": torch.tensor([6.0, 8.0]).double()}})
    assert outcome.global_params is not None
    assert torch.allclose(outcome.global_params["w"], torch.tensor([0.6, 0.8]).double())


@pytest.mark.parametrize(
    ("dp", "field"),
    [
        ({"noise_multiplier": -1}, "dp.noise_multiplier"),
        ({"clip_norm": 0}, "dp.clip_norm"),
        ({"delta": 1.0}, "dp.delta"),
        ({"delta": 0}, "dp.delta"),
        ({"target_quantile": 1.0}, "dp.target_quantile"),
        ({"clip_learning_rate": 0}, "dp.clip_learning_rate"),
        ({"clipped_count_stddev": -0.1}, "dp.clipped_count_stddev"),
        ({"adaptive": "yes"}, "dp.adaptive"),
        ({"noise_multipler": 1.0}, "dp.noise_multipler"),
        ({"noise_multiplier": float("nan")}, "dp.noise_multiplier"),
        # adaptive with the default count noise of 3/20: 1.0 ≥ 2 × 0.15
        ({"adaptive": True, "noise_multiplier": 1.0}, "dp.clipped_count_stddev"),
    ],
)
def test_bad_dp_settings_name_the_field(dp: dict, field: str) -> None:
    with pytest.raises(FieldError) as caught:
        FedAvg.from_params({"min_clients": 3, "num_rounds": 2, "dp": dp})
    assert caught.value.field == field


def test_dp_refuses_what_its_sensitivity_does_not_cover(tmp_path: Path) -> None:
    script = client_app(tmp_path)
    model = {"w": torch.zeros(2)}
    cases = [
        (lambda: FedAvgRecipe("x", 3, 1, model, script, aggregator="median", dp={}), "median"),
        (
            lambda: FedAvgRecipe(
                "x",
                5,
                1,
                model,
                script,
                aggregator="krum",
                aggregator_args={"num_malicious": 1},
                dp=ServerDP(),
            ),
            "krum",
        ),
        (
            lambda: FedAvgRecipe(
                "x", 2, 1, model, script, aggregation_weights={"site-1": 2.0}, dp={}
            ),
            "aggregation_weights",
        ),
        (lambda: ScaffoldRecipe("x", 2, 1, model, script, dp={}), "scaffold"),
        (
            lambda: FedOptRecipe(
                "x", 2, 1, model, script, dp={"adaptive": True, "clipped_count_stddev": 1.0}
            ),
            "FedOpt",
        ),
        (lambda: FedAvgRecipe("x", 2, 1, model, script, dp=0.5), "ServerDP"),  # type: ignore[arg-type]
    ]
    for make, word in cases:
        with pytest.raises(FieldError) as caught:
            make()
        assert caught.value.field.startswith("dp"), caught.value
        assert word in str(caught.value)


def test_excluded_tensors_keep_their_values_and_the_rest_is_clipped_alone() -> None:
    glob = {"head.w": torch.zeros(2), "body.w": torch.zeros(2)}
    params = {"site-1": {"head.w": torch.tensor([30.0, 40.0]), "body.w": torch.tensor([3.0, 4.0])}}
    workflow = FedAvg(
        min_clients=1,
        num_rounds=1,
        key_metric=None,
        exclude_vars="^head\\.",
        dp=ServerDP(noise_multiplier=0.0, clip_norm=1.0),
    )

    outcome = close_round(workflow, glob, params)

    assert outcome.global_params is not None
    assert torch.equal(outcome.global_params["head.w"], torch.zeros(2))
    # The norm is the shared tensors' (5), not the excluded head's.
    assert torch.allclose(outcome.global_params["body.w"], torch.tensor([0.6, 0.8]))
