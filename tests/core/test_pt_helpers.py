"""client_agent.pt: SCAFFOLD's site half and the FedProx loss, with NVFlare's names.

Expected values are worked out by hand in each test, on a model whose loss ``sum(w²) / 2`` has
gradient ``w``, so one SGD step at learning rate 0.1 multiplies the weights by 0.9.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from client_agent.pt import (
    AlgorithmConstants,
    PTFedProxLoss,
    PTScaffoldHelper,
    get_lr_values,
)

LR = 0.1


class Tiny(nn.Module):
    """Two trainable weights, one frozen parameter and a buffer, in float64 so that the hand
    arithmetic below holds to 1e-12."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
        self.frozen = nn.Parameter(torch.tensor([3.0], dtype=torch.float64), requires_grad=False)
        self.register_buffer("seen", torch.tensor([7.0], dtype=torch.float64))


def sgd_step(model: Tiny, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    loss = (model.w**2).sum() / 2  # gradient: w
    loss.backward()
    optimizer.step()


def close(actual: object, expected: list[float]) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12
    )


def a_round_ready(c_global: list[float], c_local: list[float]) -> tuple[Tiny, PTScaffoldHelper]:
    """A helper whose server control is ``c_global`` and whose site control is ``c_local``."""
    model = Tiny()
    helper = PTScaffoldHelper()
    helper.init(model)
    assert helper.c_local is not None
    helper.c_local.load_state_dict(
        {"w": torch.tensor(c_local, dtype=torch.float64), "frozen": torch.zeros(1)}
    )
    helper.load_global_controls({"w": np.array(c_global)})
    return model, helper


# --------------------------------------------------------------------------------------------
# SCAFFOLD
# --------------------------------------------------------------------------------------------


def test_names_and_constants_are_nvflares() -> None:
    assert AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL == "scaffold_c_global"
    assert AlgorithmConstants.SCAFFOLD_CTRL_DIFF == "scaffold_c_diff"
    assert AlgorithmConstants.SCAFFOLD_CTRL_AGGREGATOR_ID == "scaffold_ctrl_aggregator"
    assert AlgorithmConstants.FEDPROX_MU == "fedprox_mu"
    model = Tiny()
    optimizer = torch.optim.SGD(
        [{"params": [model.w], "lr": 0.25}, {"params": [model.frozen], "lr": 0.5}]
    )
    assert get_lr_values(optimizer) == [0.25, 0.5]


def test_init_starts_from_zero_controls_for_every_parameter() -> None:
    model = Tiny()
    helper = PTScaffoldHelper()
    helper.init(model)

    c_global, c_local = helper.get_params()

    assert set(c_global) == set(c_local) == {"w", "frozen"}  # parameters, not buffers
    close(c_global["w"], [0.0, 0.0])
    close(c_local["w"], [0.0, 0.0])
    assert helper.device == torch.device("cpu")


def test_model_update_subtracts_lr_times_the_correction_after_the_optimizer_step() -> None:
    # c = [0.5, -1.0], c_i = [0.25, 0.25], so c - c_i = [0.25, -1.25].
    model, helper = a_round_ready(c_global=[0.5, -1.0], c_local=[0.25, 0.25])
    c_global_para, c_local_para = helper.get_params()
    optimizer = torch.optim.SGD([model.w], lr=LR)

    sgd_step(model, optimizer)  # [1, 2] * 0.9 = [0.9, 1.8]
    close(model.w.detach(), [0.9, 1.8])
    helper.model_update(model, get_lr_values(optimizer)[0], c_global_para, c_local_para)

    # [0.9, 1.8] - 0.1 * [0.25, -1.25] = [0.875, 1.925]
    close(model.w.detach(), [0.875, 1.925])
    close(model.frozen.detach(), [3.0])  # not trainable: no correction
    close(model.seen, [7.0])
    assert helper.cnt == 1


def test_terms_update_sets_the_local_control_by_option_two() -> None:
    model, helper = a_round_ready(c_global=[0.5, -1.0], c_local=[0.25, 0.25])
    received = Tiny()  # x = [1, 2]
    c_global_para, c_local_para = helper.get_params()
    optimizer = torch.optim.SGD([model.w], lr=LR)
    for _ in range(2):  # K = 2
        sgd_step(model, optimizer)
        helper.model_update(model, LR, c_global_para, c_local_para)
    # step 1: [0.9, 1.8]      - 0.1 * [0.25, -1.25] = [0.875, 1.925]
    # step 2: [0.7875, 1.7325] - 0.1 * [0.25, -1.25] = [0.7625, 1.8575]
    close(model.w.detach(), [0.7625, 1.8575])

    helper.terms_update(model, LR, c_global_para, c_local_para, received)

    # c_i+ = c_i - c + (x - y_i) / (K * lr)
    #      = [0.25, 0.25] - [0.5, -1.0] + [0.2375, 0.1425] / 0.2
    #      = [-0.25, 1.25] + [1.1875, 0.7125] = [0.9375, 1.9625]
    assert helper.c_local is not None
    close(helper.c_local.state_dict()["w"], [0.9375, 1.9625])
    delta = helper.get_delta_controls()
    assert set(delta) == {"w"}  # trainable parameters only
    assert isinstance(delta["w"], np.ndarray)
    close(delta["w"], [0.9375 - 0.25, 1.9625 - 0.25])
    # The next round starts from c_i+.
    _, c_local_next = helper.get_params()
    close(c_local_next["w"], [0.9375, 1.9625])
    assert helper.cnt == 0


def test_terms_update_takes_the_received_weights_as_a_state_dict() -> None:
    model, helper = a_round_ready(c_global=[0.0, 0.0], c_local=[0.0, 0.0])
    c_global_para, c_local_para = helper.get_params()
    with torch.no_grad():
        model.w.copy_(torch.tensor([0.5, 1.0], dtype=torch.float64))
    helper.model_update(model, LR, c_global_para, c_local_para)  # correction 0: no change

    helper.terms_update(
        model, LR, c_global_para, c_local_para, {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}
    )

    # (x - y) / (K * lr) = [0.5, 1.0] / 0.1
    close(helper.get_delta_controls()["w"], [5.0, 10.0])


def test_get_params_zeroes_the_local_control_of_a_newly_trainable_parameter() -> None:
    model, helper = a_round_ready(c_global=[0.0, 0.0], c_local=[0.0, 0.0])
    assert helper.c_local is not None
    helper.get_params()
    helper.c_local.load_state_dict(
        {"w": torch.tensor([1.0, 1.0], dtype=torch.float64), "frozen": torch.tensor([9.0])}
    )
    model.frozen.requires_grad_(True)

    _, c_local = helper.get_params()

    close(c_local["frozen"], [0.0])  # learned while frozen: stale
    close(c_local["w"], [1.0, 1.0])


def test_the_helper_refuses_calls_out_of_order() -> None:
    model = Tiny()
    helper = PTScaffoldHelper()
    with pytest.raises(RuntimeError, match=r"get_params\(\) called before init"):
        helper.get_params()
    helper.init(model)
    with pytest.raises(RuntimeError, match=r"before get_params"):
        helper.model_update(model, LR, {}, {})
    c_global_para, c_local_para = helper.get_params()
    with pytest.raises(RuntimeError, match=r"at least one model_update"):
        helper.terms_update(model, LR, c_global_para, c_local_para, Tiny())
    with pytest.raises(ValueError, match=r"call terms_update"):
        helper.get_delta_controls()
    model.frozen.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"now trainable: \['frozen'\]"):
        helper.model_update(model, LR, c_global_para, c_local_para)


def test_bad_arguments_are_refused_naming_them() -> None:
    model, helper = a_round_ready(c_global=[0.0, 0.0], c_local=[0.0, 0.0])
    c_global_para, c_local_para = helper.get_params()
    helper.model_update(model, LR, c_global_para, c_local_para)
    with pytest.raises(ValueError, match=r"terms_update: curr_lr: must be positive, got 0.0"):
        helper.terms_update(model, 0.0, c_global_para, c_local_para, Tiny())
    with pytest.raises(ValueError, match=r"model_update: curr_lr: must be a finite number"):
        helper.model_update(model, float("nan"), c_global_para, c_local_para)
    helper.get_params()  # a new round: the correction is made again from the arguments
    with pytest.raises(ValueError, match=r"c_global_para has no control for 'w'"):
        helper.model_update(model, LR, {}, c_local_para)
    with pytest.raises(ValueError, match=r"weights\['w'\] has shape \[3\], the parameter \[2\]"):
        helper.load_global_controls({"w": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"name none of the model's parameters"):
        helper.load_global_controls({"fc.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"non-empty mapping"):
        helper.load_global_controls({})
    with pytest.raises(TypeError, match=r"init\(model\): model must be a torch.nn.Module"):
        PTScaffoldHelper().init({"w": torch.zeros(2)})  # type: ignore[arg-type]


def test_load_global_controls_fills_missing_parameters_with_zero() -> None:
    model = Tiny()
    helper = PTScaffoldHelper()
    helper.init(model)

    helper.load_global_controls({"w": [0.5, 1.5], "not.in.model": torch.ones(4)})

    c_global, _ = helper.get_params()
    close(c_global["w"], [0.5, 1.5])
    assert c_global["w"].dtype == torch.float64  # the parameter's dtype
    assert torch.equal(c_global["frozen"], torch.zeros(1, dtype=torch.float64))
    assert "not.in.model" not in c_global


# --------------------------------------------------------------------------------------------
# FedProx
# --------------------------------------------------------------------------------------------


class Pair(nn.Module):
    def __init__(self, w: list[float], b: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(b, dtype=torch.float64))


def test_fedprox_loss_is_half_mu_times_the_squared_distance() -> None:
    local = Pair(w=[1.0, 2.0], b=[0.5])
    received = Pair(w=[0.0, 4.0], b=[0.5])  # requires grad, yet must not be trained

    loss = PTFedProxLoss(mu=0.5)(local, received)

    # mu / 2 * (1² + (-2)² + 0²) = 0.25 * 5
    assert loss.item() == pytest.approx(1.25, abs=1e-12)
    loss.backward()
    assert local.w.grad is not None and local.b.grad is not None
    close(local.w.grad, [0.5 * 1.0, 0.5 * -2.0])  # mu * (w - w_global)
    close(local.b.grad, [0.0])
    assert received.w.grad is None and received.b.grad is None


def test_fedprox_loss_with_mu_zero_is_zero_and_negative_mu_is_refused() -> None:
    assert PTFedProxLoss(mu=0.0)(Pair([1.0], [1.0]), Pair([3.0], [0.0])).item() == 0.0
    assert PTFedProxLoss().mu == 0.01  # NVFlare's default
    with pytest.raises(ValueError, match=r"PTFedProxLoss: mu: must be at least 0, got -0.1"):
        PTFedProxLoss(mu=-0.1)


def test_fedprox_loss_refuses_models_with_different_parameters() -> None:
    other = nn.Linear(2, 1)
    with pytest.raises(ValueError, match=r"only in input: \['b', 'w'\].*only in target"):
        PTFedProxLoss(mu=1.0)(Pair([1.0], [1.0]), other)
    with pytest.raises(ValueError, match=r"parameter 'w' has shape \[2\] in input and \[1\]"):
        PTFedProxLoss(mu=1.0)(Pair([1.0, 2.0], [1.0]), Pair([1.0], [1.0]))
