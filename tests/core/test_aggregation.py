"""Aggregation and the FedAvg workflow: tiny tensors, results computed by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from client_agent.fl_model import FLMetaKey, FLModel
from client_agent.wire import write_model_file
from jobs.aggregation import (
    FileTensorSource,
    SiteUpdate,
    UpdateRejected,
    check_update,
    fedavg,
    validation,
    weighted_metrics,
)
from jobs.aggregation.sources import TensorSpec
from jobs.workflows import FedAvg, RoundOutcome, ServerState, TrainResult, round_close_decision
from tests.core.updates import DIFF, FULL, update


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape and bits."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.equal(actual, expected), (actual, expected)


# --------------------------------------------------------------------------------------------
# fedavg
# --------------------------------------------------------------------------------------------


def test_full_updates_give_the_weighted_mean() -> None:
    glob = {"w": torch.zeros(2, 2)}
    a = update("a", {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}, weight=1)
    b = update("b", {"w": torch.tensor([[5.0, 6.0], [7.0, 8.0]])}, weight=3)

    result = fedavg([a, b], glob)

    # (1*1 + 3*5)/4 = 4, (2 + 18)/4 = 5, (3 + 21)/4 = 6, (4 + 24)/4 = 7; a plain mean gives 3..6
    assert set(result) == {"w"}
    assert_same(result["w"], torch.tensor([[4.0, 5.0], [6.0, 7.0]]))


def test_weights_come_from_num_steps_in_meta() -> None:
    glob = {"w": torch.zeros(2)}
    a = SiteUpdate.from_model(
        "a", FLModel(params={"w": torch.tensor([1.0, 2.0])}, meta={"NUM_STEPS_CURRENT_ROUND": 1})
    )
    b = SiteUpdate.from_model(
        "b", FLModel(params={"w": torch.tensor([5.0, 6.0])}, meta={"NUM_STEPS_CURRENT_ROUND": 3})
    )

    assert (a.weight, b.weight) == (1.0, 3.0)
    assert_same(fedavg([a, b], glob)["w"], torch.tensor([4.0, 5.0]))


def test_diff_updates_are_added_to_the_global_model() -> None:
    glob = {"w": torch.tensor([10.0, 20.0])}
    a = update("a", {"w": torch.tensor([1.0, -2.0])}, weight=1, params_type=DIFF)
    b = update("b", {"w": torch.tensor([3.0, 2.0])}, weight=3, params_type=DIFF)

    # global + (1*[1, -2] + 3*[3, 2]) / 4 = [10 + 2.5, 20 + 1]
    assert_same(fedavg([a, b], glob)["w"], torch.tensor([12.5, 21.0]))


def test_full_and_diff_updates_mix_in_one_round() -> None:
    glob = {"w": torch.tensor([10.0, 20.0])}
    full = update("a", {"w": torch.tensor([2.0, 4.0])}, weight=1, params_type=FULL)
    diff = update("b", {"w": torch.tensor([4.0, -4.0])}, weight=3, params_type=DIFF)

    # b's weights are [14, 16]: (1*2 + 3*14)/4 = 11, (1*4 + 3*16)/4 = 13
    assert_same(fedavg([full, diff], glob)["w"], torch.tensor([11.0, 13.0]))


def test_missing_num_steps_counts_as_weight_one() -> None:
    glob = {"w": torch.zeros(2)}
    no_meta = SiteUpdate.from_model("a", FLModel(params={"w": torch.tensor([0.0, 4.0])}))
    weighted = SiteUpdate.from_model(
        "b",
        FLModel(
            params={"w": torch.tensor([4.0, 8.0])}, meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: 3}
        ),
    )

    assert no_meta.weight == 1.0
    # (1*0 + 3*4)/4 = 3, (1*4 + 3*8)/4 = 7
    assert_same(fedavg([no_meta, weighted], glob)["w"], torch.tensor([3.0, 7.0]))


def test_missing_num_steps_in_a_model_file_counts_as_weight_one(tmp_path: Path) -> None:
    path = write_model_file(tmp_path / "u.safetensors", FLModel(params={"w": torch.zeros(1)}))

    assert SiteUpdate.from_file("a", path).weight == 1.0


def test_integer_buffers_are_averaged_and_keep_their_dtype() -> None:
    glob = {"num_batches_tracked": torch.tensor(0, dtype=torch.int64)}
    a = update("a", {"num_batches_tracked": torch.tensor(10, dtype=torch.int64)})
    b = update("b", {"num_batches_tracked": torch.tensor(20, dtype=torch.int64)})

    result = fedavg([a, b], glob)["num_batches_tracked"]

    assert_same(result, torch.tensor(15, dtype=torch.int64))


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        # (1*10 + 2*20)/3 = 16.67 → 17 (truncation would give 16)
        ((1.0, 2.0), 17),
        # (2*10 + 1*20)/3 = 13.33 → 13 (rounding up would give 14)
        ((2.0, 1.0), 13),
    ],
)
def test_integer_buffers_are_rounded_to_the_nearest_integer(
    weights: tuple[float, float], expected: int
) -> None:
    glob = {"n": torch.tensor([0], dtype=torch.int64)}
    a = update("a", {"n": torch.tensor([10], dtype=torch.int64)}, weight=weights[0])
    b = update("b", {"n": torch.tensor([20], dtype=torch.int64)}, weight=weights[1])

    assert_same(fedavg([a, b], glob)["n"], torch.tensor([expected], dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_float_tensors_keep_their_dtype(dtype: torch.dtype) -> None:
    glob = {"w": torch.zeros(2, dtype=dtype)}
    a = update("a", {"w": torch.tensor([1.0, 2.0], dtype=dtype)}, weight=1)
    b = update("b", {"w": torch.tensor([3.0, 4.0], dtype=dtype)}, weight=3)

    # (1 + 9)/4 = 2.5, (2 + 12)/4 = 3.5: exact in every float dtype
    assert_same(fedavg([a, b], glob)["w"], torch.tensor([2.5, 3.5], dtype=dtype))


def _random_round(numel: int) -> tuple[dict[str, torch.Tensor], list[SiteUpdate]]:
    """Three sites, FULL and DIFF, unequal weights, values that round differently per order."""
    gen = torch.Generator().manual_seed(1234)
    glob = {
        "w": torch.randn(numel, generator=gen),
        "h": torch.randn(numel, generator=gen).to(torch.bfloat16),
        "n": torch.arange(numel, dtype=torch.int64),
    }
    updates = []
    for site, weight, params_type in (("a", 1.0, FULL), ("b", 2.5, DIFF), ("c", 3.0, FULL)):
        params = {
            "w": torch.randn(numel, generator=gen),
            "h": torch.randn(numel, generator=gen).to(torch.bfloat16),
            "n": torch.randint(0, 100, (numel,), generator=gen),
        }
        updates.append(update(site, params, weight=weight, params_type=params_type))
    return glob, updates


def test_chunking_does_not_change_the_result() -> None:
    glob, updates = _random_round(10)

    whole = fedavg(updates, glob)
    chunked = fedavg(updates, glob, chunk_elements=3)  # 3 + 3 + 3 + 1

    assert set(whole) == set(chunked) == {"w", "h", "n"}
    for name in whole:
        assert_same(chunked[name], whole[name])
    # And the common result is the weighted mean, not merely the same mistake twice.
    a, b, c = (u.source.read("w", 0, 10, None) for u in updates)
    expected = (1.0 * a + 2.5 * (glob["w"] + b) + 3.0 * c) / 6.5
    torch.testing.assert_close(whole["w"], expected)


def test_file_sources_larger_than_a_chunk_give_the_memory_result(tmp_path: Path) -> None:
    glob, updates = _random_round(10)
    glob_path = write_model_file(tmp_path / "global.safetensors", FLModel(params=glob))
    file_updates = []
    for u in updates:
        params = {name: u.source.read(name, 0, 10, None).clone() for name in glob}
        path = write_model_file(
            tmp_path / f"{u.site}.safetensors",
            FLModel(
                params=params,
                params_type=u.params_type,
                meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: u.weight},
            ),
        )
        file_updates.append(SiteUpdate.from_file(u.site, path))
    global_source = FileTensorSource(glob_path)
    try:
        from_files = fedavg(file_updates, global_source, chunk_elements=3)
    finally:
        global_source.close()
        for u in file_updates:
            u.source.close()

    from_memory = fedavg(updates, glob, chunk_elements=3)

    assert [(u.weight, u.params_type) for u in file_updates] == [
        (1.0, FULL),
        (2.5, DIFF),
        (3.0, FULL),
    ]
    assert set(from_files) == set(from_memory)
    for name in from_memory:
        assert_same(from_files[name], from_memory[name])


def test_fedavg_without_updates_raises_value_error() -> None:
    with pytest.raises(ValueError, match="at least one update"):
        fedavg([], {"w": torch.zeros(1)})


def test_fedavg_with_zero_total_weight_raises_value_error() -> None:
    updates = [update("a", {"w": torch.ones(1)}, weight=0), update("b", {"w": torch.ones(1)}, 0)]

    with pytest.raises(ValueError, match="positive"):
        fedavg(updates, {"w": torch.zeros(1)})


# --------------------------------------------------------------------------------------------
# weighted_metrics
# --------------------------------------------------------------------------------------------


def test_weighted_metrics_weight_each_site_like_its_params() -> None:
    a = update("a", {}, weight=1, metrics={"accuracy": 0.5, "loss": 2.0})
    b = update("b", {}, weight=3, metrics={"accuracy": 0.75, "loss": 1.0})

    # accuracy (0.5 + 3*0.75)/4 = 0.6875; loss (2 + 3)/4 = 1.25; a plain mean gives 0.625, 1.5
    assert weighted_metrics([a, b]) == {"accuracy": 0.6875, "loss": 1.25}


def test_weighted_metrics_ignore_non_numbers_and_average_over_sites_that_sent_the_key() -> None:
    a = update(
        "a",
        {},
        weight=1,
        metrics={"accuracy": 0.5, "note": "fast", "done": True, "hist": [1, 2], "none": None},
    )
    b = update("b", {}, weight=3, metrics={"accuracy": 0.75, "loss": 2.0, "nan": math.nan})

    # loss only from b, so its mean is b's value, not 3*2/4
    assert weighted_metrics([a, b]) == {"accuracy": 0.6875, "loss": 2.0}


# --------------------------------------------------------------------------------------------
# check_update
# --------------------------------------------------------------------------------------------

GLOBAL_SPECS = {
    "fc.weight": (torch.float32, (2, 3)),
    "fc.bias": (torch.float32, (2,)),
    "bn.num_batches_tracked": (torch.int64, ()),
}


def good_params() -> dict[str, torch.Tensor]:
    return {
        "fc.weight": torch.ones(2, 3),
        "fc.bias": torch.zeros(2),
        "bn.num_batches_tracked": torch.tensor(5),
    }


def with_param(name: str, value: torch.Tensor | None) -> dict[str, torch.Tensor]:
    params = good_params()
    if value is None:
        del params[name]
    else:
        params[name] = value
    return params


def test_check_update_accepts_a_matching_update() -> None:
    check_update(GLOBAL_SPECS, update("site-1", good_params(), weight=12))


def _bad_value(index: int, value: float) -> torch.Tensor:
    tensor = torch.ones(2, 3)
    tensor.view(-1)[index] = value
    return tensor


@pytest.mark.parametrize(
    ("params", "words"),
    [
        pytest.param(with_param("fc.bias", None), ["missing", "'fc.bias'"], id="missing"),
        pytest.param(
            {**good_params(), "fc.extra": torch.zeros(1)}, ["unexpected", "'fc.extra'"], id="extra"
        ),
        pytest.param(
            with_param("fc.weight", torch.ones(3, 2)),
            ["'fc.weight'", "[3, 2]", "[2, 3]"],
            id="shape",
        ),
        pytest.param(
            with_param("fc.bias", torch.zeros(2, dtype=torch.float64)),
            ["'fc.bias'", "float64", "float32"],
            id="dtype",
        ),
        pytest.param(
            with_param("bn.num_batches_tracked", torch.tensor(5, dtype=torch.int32)),
            ["'bn.num_batches_tracked'", "int32", "int64"],
            id="int-dtype",
        ),
        pytest.param(
            with_param("fc.weight", _bad_value(4, math.nan)), ["'fc.weight'", "NaN"], id="nan"
        ),
        pytest.param(
            with_param("fc.weight", _bad_value(0, math.inf)), ["'fc.weight'", "Inf"], id="inf"
        ),
        pytest.param(
            with_param("fc.weight", _bad_value(5, -math.inf)), ["'fc.weight'", "Inf"], id="-inf"
        ),
    ],
)
def test_check_update_rejects_a_mismatched_or_non_finite_update(
    params: dict[str, torch.Tensor], words: list[str]
) -> None:
    with pytest.raises(UpdateRejected) as info:
        check_update(GLOBAL_SPECS, update("site-2", params))

    assert info.value.site == "site-2"
    for word in words:
        assert word in info.value.reason
    assert "site-2" in str(info.value)


@pytest.mark.parametrize("weight", [0, 0.0, -1.0, math.nan, math.inf, "3", None, True])
def test_check_update_rejects_a_weight_that_is_not_a_positive_number(weight: object) -> None:
    with pytest.raises(UpdateRejected) as info:
        check_update(GLOBAL_SPECS, update("site-3", good_params(), weight=weight))  # type: ignore[arg-type]

    assert "NUM_STEPS_CURRENT_ROUND" in info.value.reason


@pytest.mark.parametrize(
    "weight", [1e308, 2.0**53 + 2, 10**400], ids=["1e308", "2**53+2", "10**400"]
)
def test_check_update_rejects_a_weight_too_large_to_count(weight: object) -> None:
    # 1e308 from one site made every aggregate metric infinite, which no database stores.
    with pytest.raises(UpdateRejected) as info:
        check_update(GLOBAL_SPECS, update("site-3", good_params(), weight=weight))  # type: ignore[arg-type]

    assert "NUM_STEPS_CURRENT_ROUND" in info.value.reason
    assert "2**53" in info.value.reason


def test_check_update_takes_the_largest_weight_and_makes_it_a_float() -> None:
    checked = update("site-3", good_params(), weight=2**53, metrics={"n": 3})
    check_update(GLOBAL_SPECS, checked)

    assert (checked.weight, checked.metrics) == (float(2**53), {"n": 3.0})
    assert type(checked.weight) is float and type(checked.metrics["n"]) is float


@pytest.mark.parametrize(
    ("metrics", "named"),
    [
        ({"loss": math.inf}, "metrics['loss']"),
        ({"loss": math.nan}, "metrics['loss']"),
        ({"loss": 10**400}, "metrics['loss']"),
        ({"loss": "low"}, "metrics['loss']"),
        ({"loss": True}, "metrics['loss']"),
        ({"loss": {"train": 1.0}}, "metrics['loss']"),
        ({"": 1.0}, "metric names"),
        ({"x" * 201: 1.0}, "metric names"),
        ({f"m{i}": 1.0 for i in range(1001)}, "at most 1000"),
        ([1.0, 2.0], "metrics"),
    ],
    ids=[
        "inf",
        "nan",
        "int past float64",
        "a string",
        "a bool",
        "nested",
        "empty name",
        "long name",
        "too many",
        "not an object",
    ],
)
def test_check_update_rejects_metrics_that_are_not_finite_numbers(
    metrics: object, named: str
) -> None:
    sent = update("site-5", good_params())
    sent.metrics = metrics  # type: ignore[assignment]  # as read from a site's file
    with pytest.raises(UpdateRejected) as info:
        check_update(GLOBAL_SPECS, sent)

    assert named in info.value.reason


def test_weighted_metrics_of_extreme_values_stay_finite() -> None:
    # The largest weights and values a site may send: a convex combination, never an overflow.
    a = update("a", {}, weight=2.0**53, metrics={"perplexity": 1.5e308, "acc": 1.0})
    b = update("b", {}, weight=2.0**53, metrics={"perplexity": 1.5e308, "acc": 0.0})
    c = update("c", {}, weight=1.0, metrics={"perplexity": -1.5e308})

    means = weighted_metrics([a, b, c])

    assert all(math.isfinite(v) for v in means.values()), means
    assert means["acc"] == 0.5
    assert 1.4e308 < means["perplexity"] <= 1.5e308


def test_check_update_rejects_a_string_weight_read_from_a_model_file(tmp_path: Path) -> None:
    path = write_model_file(
        tmp_path / "u.safetensors",
        FLModel(params=good_params(), meta={"NUM_STEPS_CURRENT_ROUND": "many"}),
    )
    source_update = SiteUpdate.from_file("site-4", path)
    try:
        with pytest.raises(UpdateRejected) as info:
            check_update(GLOBAL_SPECS, source_update)
    finally:
        source_update.source.close()

    assert "NUM_STEPS_CURRENT_ROUND" in info.value.reason
    assert "'many'" in info.value.reason


def test_check_update_finds_nan_past_the_first_chunk_of_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(validation, "CHUNK_ELEMENTS", 4)  # fc.weight's 6 values: 4 + 2
    path = write_model_file(
        tmp_path / "u.safetensors",
        FLModel(params=with_param("fc.weight", _bad_value(5, math.nan))),
    )
    source_update = SiteUpdate.from_file("site-5", path)
    try:
        with pytest.raises(UpdateRejected, match="'fc.weight' holds NaN"):
            check_update(GLOBAL_SPECS, source_update)
    finally:
        source_update.source.close()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_check_update_finds_nan_in_half_precision_tensors(dtype: torch.dtype) -> None:
    specs: dict[str, TensorSpec] = {"w": (dtype, (3,))}

    with pytest.raises(UpdateRejected, match="'w' holds NaN"):
        check_update(specs, update("a", {"w": torch.tensor([1.0, math.nan, 2.0], dtype=dtype)}))
    check_update(specs, update("a", {"w": torch.tensor([1.0, 0.5, 2.0], dtype=dtype)}))


# --------------------------------------------------------------------------------------------
# The FedAvg workflow
# --------------------------------------------------------------------------------------------


def _order_sensitive_updates() -> dict[str, SiteUpdate]:
    # 1e8 and -1e8 cancel only when folded next to each other: float32 sums depend on order.
    return {
        "a": update("a", {"w": torch.tensor([1e8])}),
        "b": update("b", {"w": torch.tensor([-1e8])}),
        "c": update("c", {"w": torch.tensor([1.0])}),
    }


def test_fedavg_workflow_aggregates_in_site_order_whatever_the_arrival_order() -> None:
    workflow = FedAvg(min_clients=3, num_rounds=1)
    glob = {"w": torch.zeros(1)}
    u = _order_sensitive_updates()
    # The data really is order-sensitive, so the test below can fail.
    assert not torch.equal(
        fedavg([u["c"], u["a"], u["b"]], glob)["w"], fedavg([u["b"], u["c"], u["a"]], glob)["w"]
    )

    first = _fedavg_close(workflow, glob, [u["c"], u["a"], u["b"]])
    second = _fedavg_close(workflow, glob, [u["b"], u["c"], u["a"]])

    assert first.sites == second.sites == ("a", "b", "c")
    assert first.global_params is not None and second.global_params is not None
    assert_same(first.global_params["w"], second.global_params["w"])
    assert_same(first.global_params["w"], fedavg([u["a"], u["b"], u["c"]], glob)["w"])


def test_fedavg_workflow_outcome_carries_weighted_and_per_site_metrics() -> None:
    workflow = FedAvg(min_clients=2, num_rounds=3)
    glob = {"w": torch.zeros(1)}
    b = update("site-b", {"w": torch.tensor([5.0])}, weight=3, metrics={"accuracy": 0.75})
    a = update("site-a", {"w": torch.tensor([1.0])}, weight=1, metrics={"accuracy": 0.5})

    outcome = _fedavg_close(workflow, glob, [b, a])

    assert outcome.global_params is not None
    assert_same(outcome.global_params["w"], torch.tensor([4.0]))
    assert outcome.metrics == {"accuracy": 0.6875}
    assert outcome.site_metrics == {"site-a": {"accuracy": 0.5}, "site-b": {"accuracy": 0.75}}


def _fedavg_close(
    workflow: FedAvg, glob: dict[str, torch.Tensor], updates: list[SiteUpdate]
) -> RoundOutcome:
    plan = workflow.plan(0, [u.site for u in updates], ServerState())
    results = [TrainResult(u.site, u) for u in updates]
    return workflow.close(0, plan, glob, results, ServerState())


def test_the_round_close_policy_fails_the_round_below_min_clients_naming_each_site() -> None:
    workflow = FedAvg(min_clients=3, num_rounds=2)
    plan = workflow.plan(1, ["a", "b", "c", "d"], ServerState())

    decision = round_close_decision(
        plan, {"a": None, "b": "tensor 'w' holds NaN values", "c": None, "d": "no update"}
    )

    assert not decision.closes and decision.accepted == ("a", "c")
    assert decision.failure == (
        "round 2: 2 acceptable result(s), min_clients is 3; none from "
        "b (tensor 'w' holds NaN values), d (no update)"
    )
    enough = round_close_decision(plan, {"a": None, "b": "late", "c": None, "d": None})
    assert enough.closes and enough.accepted == ("a", "c", "d")
    assert enough.not_accepted == {"b": "late"}


def test_fedavg_workflow_round_task_is_a_train_task_for_that_round() -> None:
    task = FedAvg(min_clients=1, num_rounds=4).round_task(2)

    assert (task.task_name, task.current_round, task.total_rounds) == ("train", 2, 4)


def test_score_in_max_mode_prefers_higher_values() -> None:
    workflow = FedAvg(min_clients=1, num_rounds=1, key_metric="accuracy", key_metric_mode="max")

    assert workflow.score({"accuracy": 0.8, "loss": 0.1}) == 0.8
    assert workflow.is_better(0.8, None)
    assert workflow.is_better(0.9, 0.8)
    assert not workflow.is_better(0.7, 0.8)
    assert not workflow.is_better(0.8, 0.8)


def test_score_in_min_mode_prefers_lower_values() -> None:
    workflow = FedAvg(min_clients=1, num_rounds=1, key_metric="loss", key_metric_mode="min")

    assert workflow.score({"accuracy": 0.8, "loss": 0.25}) == 0.25
    assert workflow.is_better(0.25, None)
    assert workflow.is_better(0.1, 0.25)
    assert not workflow.is_better(0.3, 0.25)
    assert not workflow.is_better(0.25, 0.25)


@pytest.mark.parametrize(
    "metrics", [{}, {"accuracy": "high"}, {"accuracy": True}, {"accuracy": math.nan}, {"acc": 1.0}]
)
def test_score_is_none_without_a_finite_key_metric(metrics: dict[str, object]) -> None:
    assert FedAvg(min_clients=1, num_rounds=1, key_metric="accuracy").score(metrics) is None


def test_score_is_none_without_a_key_metric() -> None:
    assert FedAvg(min_clients=1, num_rounds=1, key_metric=None).score({"accuracy": 1.0}) is None


def test_from_params_round_trips_to_params() -> None:
    workflow = FedAvg(min_clients=2, num_rounds=5, key_metric="loss", key_metric_mode="min")

    assert FedAvg.from_params(workflow.to_params()) == workflow


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"min_clients": 1, "num_rounds": 1, "epochs": 3}, "epochs"),
        ({"num_rounds": 1}, "min_clients"),
        ({"min_clients": 1}, "num_rounds"),
        ({"min_clients": 0, "num_rounds": 1}, "min_clients"),
        ({"min_clients": 1, "num_rounds": "2"}, "num_rounds"),
        ({"min_clients": True, "num_rounds": 1}, "min_clients"),
        ({"min_clients": 1, "num_rounds": 1, "key_metric_mode": "avg"}, "key_metric_mode"),
        ({"min_clients": 1, "num_rounds": 1, "key_metric": ""}, "key_metric"),
        ([("min_clients", 1)], "params"),
    ],
)
def test_from_params_rejects_bad_params_naming_the_field(params: object, field: str) -> None:
    with pytest.raises(ValueError) as info:
        FedAvg.from_params(params)  # type: ignore[arg-type]

    assert str(info.value).startswith(f"{field}:"), str(info.value)
