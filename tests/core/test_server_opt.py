"""FedOpt's server optimizer: one step on tiny tensors against Reddi et al.'s formulas worked
by hand, FedAvgM and FedAvg as special cases, state that survives a store and restore bit for
bit, and every bad argument refused with the field named."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from common.validators import FieldError
from jobs.aggregation import fedavg
from jobs.aggregation.server_opt import (
    ALLOWED_OPTIMIZERS,
    FedAdagrad,
    FedAdam,
    FedYogi,
    ServerOptimizer,
)
from tests.core.updates import update

Tensors = dict[str, torch.Tensor]


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape and bits."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.equal(actual, expected), (actual, expected)


def f64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def stored(
    tensors: Mapping[str, torch.Tensor], data: Mapping[str, Any]
) -> tuple[Tensors, dict[str, Any]]:
    """The state as a driver stores and reads it back: safetensors bytes and JSON text."""
    return safetensors_load(safetensors_save(dict(tensors))), json.loads(
        json.dumps(data, allow_nan=False)
    )


def one_step(
    optimizer_args: dict[str, Any], global_params: Tensors, aggregate: Tensors
) -> tuple[Tensors, Tensors, dict[str, Any]]:
    return ServerOptimizer(optimizer_args).step(global_params, aggregate, {}, {})


# --------------------------------------------------------------------------------------------
# The paper's Algorithm 2, one step, by hand
# --------------------------------------------------------------------------------------------

X = f64(1.0, 2.0, 3.0)


def test_fedadam_step_is_the_papers_formula() -> None:
    # delta = aggregate - x = [2, -0.5, 5.5]; beta1 = 0.5, beta2 = 0.75, tau = 2, eta = 1.
    # m = (1 - beta1) delta                 = [1, -0.25, 2.75]
    # v = beta2 tau^2 + (1 - beta2) delta^2 = 3 + [1, 0.0625, 7.5625] = [4, 3.0625, 10.5625]
    # x + eta m / (sqrt(v) + tau)           = x + [1/4, -0.25/3.75, 2.75/5.25]
    args = {"path": "FedAdam", "args": {"lr": 1.0, "betas": [0.5, 0.75], "tau": 2.0}}

    params, tensors, _ = one_step(args, {"w": X}, {"w": f64(3.0, 1.5, 8.5)})

    torch.testing.assert_close(
        params["w"], f64(1.25, 2 - 0.25 / 3.75, 3 + 2.75 / 5.25), rtol=1e-15, atol=0
    )
    # Without v starting at tau^2 the second moment would be [1, 0.0625, 7.5625].
    assert_same(tensors["optimizer/w/second_moment"], f64(4.0, 3.0625, 10.5625))
    # m is kept in gradient terms (grad = global - aggregate = -delta).
    assert_same(tensors["optimizer/w/momentum"], f64(-1.0, 0.25, -2.75))


def test_fedyogi_step_is_the_papers_formula() -> None:
    # delta = [2, 3, -0.5]; beta1 = 0.5, beta2 = 0.75, tau = 2, so v starts at 4.
    # v = v - (1 - beta2) delta^2 sign(v - delta^2):
    #   delta^2 = 4:    sign(0) = 0   -> 4
    #   delta^2 = 9:    sign(-5) = -1 -> 4 + 2.25   = 6.25   (FedAdam would give 5.25)
    #   delta^2 = 0.25: sign(3.75) = 1 -> 4 - 0.0625 = 3.9375
    # m = 0.5 delta = [1, 1.5, -0.25]; x + m / (sqrt(v) + 2)
    args = {"path": "FedYogi", "args": {"lr": 1.0, "betas": [0.5, 0.75], "tau": 2.0}}

    params, tensors, _ = one_step(args, {"w": X}, {"w": f64(3.0, 5.0, 2.5)})

    expected = f64(1 + 1 / 4, 2 + 1.5 / 4.5, 3 - 0.25 / (math.sqrt(3.9375) + 2))
    torch.testing.assert_close(params["w"], expected, rtol=1e-15, atol=0)
    assert_same(tensors["optimizer/w/second_moment"], f64(4.0, 6.25, 3.9375))


def test_fedadagrad_step_is_the_papers_formula() -> None:
    # delta = [4, 0, -4]; beta1 = 0 (the default): m = delta; tau = 3, so v starts at 9.
    # v = 9 + delta^2 = [25, 9, 25]; x + m / (sqrt(v) + 3) = x + [4/8, 0/6, -4/8]
    args = {"path": "jobs.aggregation.server_opt.FedAdagrad", "args": {"lr": 1.0, "tau": 3.0}}

    params, tensors, _ = one_step(args, {"w": X}, {"w": f64(5.0, 2.0, -1.0)})

    assert_same(params["w"], f64(1.5, 2.0, 2.5))
    assert_same(tensors["optimizer/w/second_moment"], f64(25.0, 9.0, 25.0))


def test_fedadagrad_accumulates_where_fedadam_forgets() -> None:
    # Two rounds of the same delta = 4 from x = 0 (tau = 3, lr = 1, beta1 = 0):
    # round 1: v = 9 + 16 = 25, x = 0 + 4/(5 + 3) = 0.5
    # round 2: aggregate 4.5 (delta 4 again), v = 25 + 16 = 41, x = 0.5 + 4/(sqrt(41) + 3)
    optimizer = ServerOptimizer({"path": "FedAdagrad", "args": {"lr": 1.0, "tau": 3.0}})
    params, tensors, data = optimizer.step({"w": f64(0.0)}, {"w": f64(4.0)}, {}, {})
    assert_same(params["w"], f64(0.5))

    params, tensors, data = optimizer.step(params, {"w": f64(4.5)}, *stored(tensors, data))

    torch.testing.assert_close(params["w"], f64(0.5 + 4 / (math.sqrt(41) + 3)), rtol=1e-15, atol=0)
    assert_same(tensors["optimizer/w/second_moment"], f64(41.0))


def test_the_adaptive_optimizers_are_torch_optimizers() -> None:
    for cls in (FedAdam, FedYogi, FedAdagrad):
        assert issubclass(cls, torch.optim.Optimizer)
        assert f"jobs.aggregation.server_opt.{cls.__name__}" in ALLOWED_OPTIMIZERS
    with pytest.raises(FieldError) as refused:
        FedAdam([torch.zeros(1)], tau=0.0)
    assert refused.value.field == "tau"


# --------------------------------------------------------------------------------------------
# SGD: FedAvgM, and FedAvg itself
# --------------------------------------------------------------------------------------------


def test_sgd_with_momentum_is_fedavgm() -> None:
    # grad = x - aggregate; buf = 0.6 buf + grad (buf = grad in round 1); x -= lr buf, lr = 1.
    # round 1: grad = [1,2,3] - [2,2,1] = [-1, 0, 2];  buf = [-1, 0, 2];  x = [2, 2, 1]
    # round 2: grad = [2,2,1] - [3,1,1] = [-1, 1, 0];  buf = 0.6 [-1, 0, 2] + [-1, 1, 0]
    #          = [-1.6, 1, 1.2];  x = [2, 2, 1] - buf = [3.6, 1, -0.2]
    optimizer = ServerOptimizer({"path": "torch.optim.SGD", "args": {"lr": 1.0, "momentum": 0.6}})

    params, tensors, data = optimizer.step({"w": X}, {"w": f64(2.0, 2.0, 1.0)}, {}, {})
    assert_same(params["w"], f64(2.0, 2.0, 1.0))
    params, tensors, data = optimizer.step(
        params, {"w": f64(3.0, 1.0, 1.0)}, *stored(tensors, data)
    )

    torch.testing.assert_close(params["w"], f64(3.6, 1.0, -0.2), rtol=1e-15, atol=0)
    torch.testing.assert_close(
        tensors["optimizer/w/momentum_buffer"], f64(-1.6, 1.0, 1.2), rtol=1e-15, atol=0
    )
    assert data["rounds"] == 2


def test_sgd_with_lr_one_gives_fedavgs_aggregate_exactly() -> None:
    # A float32 weight, a bfloat16 one and an integer buffer, as a model's state_dict has them.
    # The aggregate stays within a factor of two of the global weights, as one round's mean
    # update does: then global - aggregate is exact in float32 and the step lands on the
    # aggregate's bits (an aggregate far from the global weight can be one rounding away).
    global_params = {
        "w": torch.tensor([0.3, -1.7, 2.5, 1e-3]),
        "b": torch.tensor([0.75, -0.1], dtype=torch.bfloat16),
        "n": torch.tensor(10),
    }
    site_a = update(
        "a",
        {
            "w": torch.tensor([0.41, -1.2, 2.9, 1.3e-3]),
            "b": torch.tensor([0.7, -0.15], dtype=torch.bfloat16),
            "n": torch.tensor(12),
        },
        weight=1,
    )
    site_b = update(
        "b",
        {
            "w": torch.tensor([0.37, -1.9, 3.3, 0.8e-3]),
            "b": torch.tensor([0.9, -0.11], dtype=torch.bfloat16),
            "n": torch.tensor(14),
        },
        weight=3,
    )
    aggregate = fedavg([site_a, site_b], global_params)

    params, _, _ = ServerOptimizer({"path": "SGD", "args": {"lr": 1.0}}).step(
        global_params, aggregate, {}, {}
    )

    for name in global_params:
        assert_same(params[name], aggregate[name])


def test_integer_buffers_take_the_aggregate() -> None:
    # Adam would move a weight by about lr whatever the update; a counter must not move so.
    params, tensors, data = one_step(
        {"path": "torch.optim.Adam", "args": {"lr": 0.5}},
        {"w": torch.tensor([1.0]), "bn.num_batches_tracked": torch.tensor(100)},
        {"w": torch.tensor([2.0]), "bn.num_batches_tracked": torch.tensor(130)},
    )

    assert_same(params["bn.num_batches_tracked"], torch.tensor(130))
    assert not any("num_batches_tracked" in key for key in tensors)
    assert data["param_names"] == ["w"]
    # Adam's first step is lr * sign(delta) (bias-corrected): 1 + 0.5
    assert_same(params["w"], torch.tensor([1.5]))


def test_named_buffers_take_the_aggregate_instead_of_a_step() -> None:
    # Adam's first step moves every coordinate by lr: a running variance of 0.01 heading for
    # 0.009 would become 0.01 - 0.5 < 0, and BatchNorm would take the square root of it.
    global_params = {"w": torch.tensor([1.0]), "bn.running_var": torch.tensor([0.01])}
    aggregate = {"w": torch.tensor([2.0]), "bn.running_var": torch.tensor([0.009])}
    optimizer = ServerOptimizer({"path": "torch.optim.Adam", "args": {"lr": 0.5}})

    stepped, _, _ = optimizer.step(global_params, aggregate, {}, {})
    averaged, tensors, data = optimizer.step(
        global_params, aggregate, {}, {}, buffers=["bn.running_var"]
    )

    assert stepped["bn.running_var"].item() < 0
    assert_same(averaged["bn.running_var"], torch.tensor([0.009]))
    assert_same(averaged["w"], torch.tensor([1.5]))
    assert data["param_names"] == ["w"]
    assert not any("running_var" in key for key in tensors)
    with pytest.raises(FieldError) as refused:
        optimizer.step(global_params, aggregate, {}, {}, buffers=["bn.running_mean"])
    assert refused.value.field == "buffers"


# --------------------------------------------------------------------------------------------
# State: stored and restored every round, the same bits as a live optimizer
# --------------------------------------------------------------------------------------------

GLOBAL = {
    "w": torch.tensor([[0.5, -1.0], [2.0, 0.25]]),
    "b": torch.tensor([0.1, -0.2], dtype=torch.bfloat16),
    "d": torch.tensor([1.0, 3.0], dtype=torch.float64),
    "n": torch.tensor(0),
}


def aggregates(rounds: int) -> list[Tensors]:
    """Round t's aggregate: every weight moved by a different, fixed amount (no RNG)."""
    result = []
    for t in range(1, rounds + 1):
        aggregate = {}
        for name, tensor in GLOBAL.items():
            if tensor.dtype.is_floating_point:
                ramp = torch.arange(tensor.numel(), dtype=torch.float64).reshape(tensor.shape)
                aggregate[name] = (tensor.double() + 0.37 * t * (ramp - 0.5) - 0.11 * t**2).to(
                    tensor.dtype
                )
            else:
                aggregate[name] = tensor + 10 * t
        result.append(aggregate)
    return result


def live_reference(optimizer: ServerOptimizer, rounds: list[Tensors]) -> dict[str, torch.Tensor]:
    """The same rounds on one torch optimizer (and scheduler) kept alive throughout."""
    names = ["w", "b", "d"]
    # Copies: the live optimizer steps them in place, and GLOBAL is shared by every case.
    work = {
        name: GLOBAL[name].to(torch.float64 if name == "d" else torch.float32, copy=True)
        for name in names
    }
    kwargs: dict[str, Any] = {
        key: tuple(value) if isinstance(value, list) else value
        for key, value in optimizer.optimizer_kwargs.items()
    }
    live = optimizer.optimizer_class([work[name] for name in names], **kwargs)
    scheduler = None
    if optimizer.scheduler_class is not None:
        scheduler = optimizer.scheduler_class(live, **(optimizer.scheduler_kwargs or {}))
    for aggregate in rounds:
        for name in names:
            work[name].grad = work[name] - aggregate[name].to(work[name].dtype)
        live.step()
        if scheduler is not None:
            scheduler.step()
        with torch.no_grad():  # the model the server sends out is in the model's dtypes
            for name in names:
                work[name].copy_(work[name].to(GLOBAL[name].dtype))
    return {name: work[name].to(GLOBAL[name].dtype) for name in names}


@pytest.mark.parametrize(
    ("optimizer_args", "lr_scheduler_args"),
    [
        ({"path": "torch.optim.SGD", "args": {"lr": 1.0, "momentum": 0.6}}, None),
        (
            {"path": "torch.optim.SGD", "args": {"lr": 1.0, "momentum": 0.9}},
            {"path": "torch.optim.lr_scheduler.StepLR", "args": {"step_size": 2, "gamma": 0.5}},
        ),
        ({"path": "torch.optim.Adam", "args": {"lr": 0.1}}, None),
        (
            {"path": "torch.optim.Adam", "args": {"lr": 0.1, "betas": [0.8, 0.9]}},
            {
                "path": "torch.optim.lr_scheduler.OneCycleLR",
                "args": {"max_lr": 1.0, "total_steps": 8},
            },
        ),
        ({"path": "torch.optim.Adagrad", "args": {"lr": 0.1}}, None),
        # NAdam keeps a float32 scalar next to the float64 tensor, which a plain
        # load_state_dict would widen.
        ({"path": "torch.optim.NAdam", "args": {"lr": 0.1}}, None),
        ({"path": "FedAdam", "args": {"lr": 0.1, "tau": 1e-3}}, None),
        ({"path": "FedYogi", "args": {"lr": 0.1}}, None),
        ({"path": "FedAdagrad", "args": {"lr": 0.1, "beta1": 0.9}}, None),
    ],
    ids=lambda value: value["path"] if isinstance(value, dict) else "",
)
def test_state_restored_every_round_gives_the_live_optimizers_bits(
    optimizer_args: dict[str, Any], lr_scheduler_args: dict[str, Any] | None
) -> None:
    optimizer = ServerOptimizer(optimizer_args, lr_scheduler_args)
    rounds = aggregates(5)

    params: Tensors = dict(GLOBAL)
    tensors: Tensors = {}
    data: dict[str, Any] = {}
    for aggregate in rounds:
        # A fresh ServerOptimizer each round: a new worker that read the job spec and state.
        params, tensors, data = ServerOptimizer(*optimizer.to_args()).step(
            params, aggregate, *stored(tensors, data)
        )

    reference = live_reference(optimizer, rounds)
    for name in ("w", "b", "d"):
        assert_same(params[name], reference[name])
        assert not torch.equal(params[name], rounds[-1][name])  # it did not just copy FedAvg
    assert_same(params["n"], rounds[-1]["n"])
    assert data["rounds"] == 5


def test_a_retried_round_gives_the_same_model_and_leaves_its_input_alone() -> None:
    # A worker killed mid-round: the next one steps again from the same stored state.
    optimizer = ServerOptimizer({"path": "torch.optim.Adam", "args": {"lr": 0.1}})
    first, second = aggregates(2)
    params, tensors, data = optimizer.step(GLOBAL, first, {}, {})
    kept = {name: tensor.clone() for name, tensor in tensors.items()}
    kept_data = json.loads(json.dumps(data))
    kept_params = {name: tensor.clone() for name, tensor in params.items()}

    once = optimizer.step(params, second, tensors, data)
    again = optimizer.step(params, second, tensors, data)

    for name in once[0]:
        assert_same(again[0][name], once[0][name])
    for name in once[1]:
        assert_same(again[1][name], once[1][name])
    assert again[2] == once[2]
    for name, tensor in kept.items():  # Adam's step counter and moments were copied, not stepped
        assert_same(tensors[name], tensor)
    assert data == kept_data
    for name, tensor in kept_params.items():  # the model it stepped from is not stepped in place
        assert_same(params[name], tensor)


@pytest.mark.parametrize(
    "lr_scheduler_args",
    [
        {"path": "torch.optim.lr_scheduler.StepLR", "args": {"step_size": 2, "gamma": 0.5}},
        # Its milestones are a Counter keyed by round, which JSON turns into strings.
        {"path": "torch.optim.lr_scheduler.MultiStepLR", "args": {"milestones": [2, 4]}},
    ],
    ids=["StepLR", "MultiStepLR"],
)
def test_the_scheduler_steps_once_a_round_and_its_state_survives(
    lr_scheduler_args: dict[str, Any],
) -> None:
    # SGD without momentum from 0 toward 1: the new weight is the round's lr.
    # Rounds 1-2 use lr 1, rounds 3-4 use 0.5 (halved after 2 rounds), round 5 uses 0.25.
    args = dict(lr_scheduler_args)
    args["args"] = {**args["args"], "gamma": 0.5}
    optimizer = ServerOptimizer({"path": "SGD", "args": {"lr": 1.0}}, args)
    tensors: Tensors = {}
    data: dict[str, Any] = {}
    lrs = []
    for _ in range(5):
        params, tensors, data = optimizer.step(
            {"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])}, *stored(tensors, data)
        )
        lrs.append(params["w"].item())

    assert lrs == [1.0, 1.0, 0.5, 0.5, 0.25]
    assert data["param_groups"][0]["lr"] == 0.25  # the lr round 6 will use
    assert data["scheduler_state"]["last_epoch"] == 5


def test_the_order_of_the_models_tensors_does_not_matter() -> None:
    # A model read back from a file may list its tensors in another order than last round's.
    optimizer = ServerOptimizer({"path": "FedYogi", "args": {"lr": 0.1}})
    first, second = aggregates(2)
    params, tensors, data = optimizer.step(GLOBAL, first, {}, {})
    reordered = {name: params[name] for name in reversed(list(params))}

    straight, _, _ = optimizer.step(params, second, tensors, data)
    shuffled, _, _ = optimizer.step(reordered, second, tensors, data)

    for name in straight:
        assert_same(shuffled[name], straight[name])


def test_state_of_another_optimizer_is_refused() -> None:
    _, tensors, data = one_step({"path": "SGD", "args": {"lr": 1.0}}, {"w": X}, {"w": X + 1})

    with pytest.raises(FieldError) as refused:
        ServerOptimizer({"path": "Adam", "args": {"lr": 1.0}}).step(
            {"w": X}, {"w": X + 1}, tensors, data
        )

    assert refused.value.field == "state_data"
    assert "torch.optim.SGD" in refused.value.reason


def test_a_lost_state_tensor_is_refused_rather_than_restarted() -> None:
    optimizer = ServerOptimizer({"path": "torch.optim.Adam", "args": {"lr": 0.1}})
    _, tensors, data = optimizer.step({"w": X}, {"w": X + 1}, {}, {})
    del tensors["optimizer/w/exp_avg_sq"]

    with pytest.raises(FieldError) as refused:
        optimizer.step({"w": X}, {"w": X + 1}, tensors, data)

    assert refused.value.field == "state_tensors"
    assert "optimizer/w/exp_avg_sq" in refused.value.reason


def test_an_aggregate_unlike_the_global_model_is_refused() -> None:
    optimizer = ServerOptimizer({"path": "SGD", "args": {"lr": 1.0}})
    with pytest.raises(FieldError) as refused:
        optimizer.step({"w": X}, {"w": X.float()}, {}, {})
    assert refused.value.field == "aggregate"
    assert "'w'" in refused.value.reason
    with pytest.raises(FieldError) as refused:
        optimizer.step({"w": X}, {"v": X}, {}, {})
    assert refused.value.field == "aggregate"


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def test_to_args_gives_canonical_paths_and_json() -> None:
    optimizer = ServerOptimizer(
        {
            "class_path": "FedAdam",
            "args": {"lr": 0.05, "betas": [0.9, 0.99]},
            "config_type": "dict",
        },
        {"path": "CosineAnnealingLR", "args": {"T_max": 10, "eta_min": 0.01}},
    )

    optimizer_args, scheduler_args = optimizer.to_args()

    assert optimizer_args == {
        "path": "jobs.aggregation.server_opt.FedAdam",
        "args": {"lr": 0.05, "betas": [0.9, 0.99]},
    }
    assert scheduler_args == {
        "path": "torch.optim.lr_scheduler.CosineAnnealingLR",
        "args": {"T_max": 10, "eta_min": 0.01},
    }
    assert json.loads(json.dumps([optimizer_args, scheduler_args])) == [
        optimizer_args,
        scheduler_args,
    ]
    assert ServerOptimizer.from_args(optimizer_args, scheduler_args).to_args() == (
        optimizer_args,
        scheduler_args,
    )
    assert ServerOptimizer({"path": "torch.optim.sgd.SGD"}).to_args() == (
        {"path": "torch.optim.SGD", "args": {}},
        None,
    )


SGD = {"path": "torch.optim.SGD", "args": {"lr": 1.0}}


@pytest.mark.parametrize(
    ("optimizer_args", "lr_scheduler_args", "field", "words"),
    [
        ({"path": "torch.optim.Nope"}, None, "optimizer_args", ["torch.optim.Nope", "FedYogi"]),
        ({"path": "os.system", "args": {}}, None, "optimizer_args", ["'os.system'"]),
        ({"path": "torch.nn.Linear"}, None, "optimizer_args", ["'torch.nn.Linear'"]),
        ({"path": "torch.optim.Optimizer"}, None, "optimizer_args", ["torch.optim.Optimizer"]),
        ({"path": "torch.optim.LBFGS"}, None, "optimizer_args", ["LBFGS", "closure"]),
        ({"path": ["SGD"]}, None, "optimizer_args", ["['SGD']"]),
        ({"args": {"lr": 1.0}}, None, "optimizer_args", ["path"]),
        ({"path": "SGD", "class_path": "Adam"}, None, "optimizer_args", ["class_path"]),
        ({"path": "SGD", "kwargs": {}}, None, "optimizer_args", ["kwargs"]),
        ("torch.optim.SGD", None, "optimizer_args", ["object"]),
        (
            {"path": "SGD", "args": {"lr": 1.0, "foo": 2}},
            None,
            "optimizer_args",
            ["'foo'", "momentum"],
        ),
        ({"path": "SGD", "args": {"lr": -0.5}}, None, "optimizer_args", ["args.lr", "-0.5"]),
        ({"path": "SGD", "args": {"lr": 0}}, None, "optimizer_args", ["args.lr"]),
        ({"path": "SGD", "args": {"lr": "0.1"}}, None, "optimizer_args", ["args.lr", "'0.1'"]),
        ({"path": "SGD", "args": {"lr": float("nan")}}, None, "optimizer_args", ["args.lr"]),
        ({"path": "SGD", "args": {"lr": 1, "momentum": 1.0}}, None, "optimizer_args", ["momentum"]),
        (
            {"path": "SGD", "args": {"lr": 1, "momentum": -0.1}},
            None,
            "optimizer_args",
            ["momentum"],
        ),
        ({"path": "SGD", "args": {"lr": 1, "nesterov": 1}}, None, "optimizer_args", ["nesterov"]),
        ({"path": "SGD", "args": {"params": []}}, None, "optimizer_args", ["args.params"]),
        ({"path": "Adam", "args": {"betas": [0.9]}}, None, "optimizer_args", ["betas"]),
        ({"path": "FedAdam", "args": {"tau": 0}}, None, "optimizer_args", ["tau"]),
        (
            {"path": "FedAdagrad", "args": {"betas": [0.9, 0.99]}},
            None,
            "optimizer_args",
            ["'betas'", "beta1"],
        ),
        # torch's own check, reached through the trial step on one element
        (
            {"path": "SGD", "args": {"lr": 1, "nesterov": True}},
            None,
            "optimizer_args",
            ["Nesterov"],
        ),
        (SGD, {"path": "torch.optim.lr_scheduler.Nope"}, "lr_scheduler_args", ["Nope", "StepLR"]),
        (SGD, {"path": "os.system"}, "lr_scheduler_args", ["'os.system'"]),
        (SGD, {"path": "torch.optim.SGD"}, "lr_scheduler_args", ["'torch.optim.SGD'"]),
        (SGD, {"path": "LambdaLR", "args": {}}, "lr_scheduler_args", ["LambdaLR", "function"]),
        (SGD, {"path": "ReduceLROnPlateau"}, "lr_scheduler_args", ["metric"]),
        (SGD, {"path": "StepLR", "args": {}}, "lr_scheduler_args", ["step_size"]),
        (SGD, {"path": "StepLR", "args": {"step_size": 0}}, "lr_scheduler_args", ["step_size"]),
        (
            SGD,
            {"path": "StepLR", "args": {"step_size": 2, "bar": 1}},
            "lr_scheduler_args",
            ["'bar'"],
        ),
        (
            SGD,
            {"path": "StepLR", "args": {"step_size": 2, "last_epoch": 3}},
            "lr_scheduler_args",
            ["last_epoch"],
        ),
        (
            SGD,
            {"path": "CosineAnnealingLR", "args": {"T_max": "{num_rounds}"}},
            "lr_scheduler_args",
            ["T_max"],
        ),
        (
            SGD,
            {"path": "OneCycleLR", "args": {"max_lr": 1.0}},
            "lr_scheduler_args",
            ["total_steps"],
        ),
    ],
)
def test_bad_arguments_are_refused_with_the_field_named(
    optimizer_args: Any, lr_scheduler_args: Any, field: str, words: list[str]
) -> None:
    with pytest.raises(FieldError) as refused:
        ServerOptimizer(optimizer_args, lr_scheduler_args)

    assert refused.value.field == field
    for word in words:
        assert word in refused.value.reason, (word, refused.value.reason)


def test_a_refused_path_is_never_imported() -> None:
    assert "tabnanny" not in sys.modules  # a harmless standard module nothing here imports

    with pytest.raises(FieldError) as refused:
        ServerOptimizer({"path": "tabnanny.check", "args": {}})

    assert "tabnanny" not in sys.modules
    assert "torch.optim.SGD" in refused.value.reason  # the reason lists what is allowed
