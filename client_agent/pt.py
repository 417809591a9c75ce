"""PyTorch helpers for client scripts: the site half of SCAFFOLD and the FedProx loss.

Names, arguments and meanings are NVFlare's, so that an NVFlare client script using them runs
after changing its import lines only:

=============================================  =============================================
NVFlare                                        FedPortal
=============================================  =============================================
``import nvflare.client as flare``             ``import client_agent.api as flare``
``nvflare.app_common.abstract.fl_model``       ``client_agent.fl_model`` (``FLModel``,
                                               ``ParamsType``, ``FLMetaKey``)
``nvflare.app_common.app_constant``            ``client_agent.fl_model`` or
(``AlgorithmConstants``)                       ``client_agent.pt``
``nvflare.app_opt.pt.scaffold``                ``client_agent.pt`` (``PTScaffoldHelper``,
                                               ``get_lr_values``)
``nvflare.app_opt.pt.fedproxloss``             ``client_agent.pt`` (``PTFedProxLoss``)
``nvflare.app_opt.pt``                         ``client_agent.pt``
=============================================  =============================================

SCAFFOLD (Karimireddy et al. 2020, control variates option II), as a script drives it each
round::

    helper.load_global_controls(input_model.meta[AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL])
    c_global_para, c_local_para = helper.get_params()
    for each batch:
        loss.backward(); optimizer.step()
        helper.model_update(model, get_lr_values(optimizer)[0], c_global_para, c_local_para)
    helper.terms_update(model, curr_lr, c_global_para, c_local_para, global_model)
    meta[AlgorithmConstants.SCAFFOLD_CTRL_DIFF] = helper.get_delta_controls()

``model_update`` corrects each step by ``-lr * (c - c_i)`` (the server's control ``c`` minus
the site's ``c_i``), so the site's K steps drift less towards its own data; ``terms_update``
then sets ``c_i+ = c_i - c + (x - y_i) / (K * lr)``, with ``x`` the global weights received and
``y_i`` the trained ones, and keeps ``c_i+ - c_i`` for the server. Controls cover the trainable
parameters only; buffers (BatchNorm statistics) travel in the model update as usual.

Unlike the Client API (``client_agent.api``), this module imports torch: it is for PyTorch
scripts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from client_agent.fl_model import AlgorithmConstants as AlgorithmConstants
from client_agent.fl_model import FLModel
from common.validators import FieldError, check_finite_number, is_number

__all__ = [
    "AlgorithmConstants",
    "PTFedProxLoss",
    "PTScaffoldHelper",
    "get_fedprox_mu",
    "get_lr_values",
]


def get_fedprox_mu(model: FLModel) -> float:
    """The FedProx weight mu a train task carries (``meta["fedprox_mu"]``, set by
    ``FedProxRecipe``), as NVFlare's ``fedprox_utils.get_fedprox_mu``: a ``ValueError``
    naming the key when it is missing, or not a finite number above 0."""
    meta = model.meta or {}
    key = AlgorithmConstants.FEDPROX_MU
    if key not in meta:
        raise ValueError(f"a FedProx client needs a positive {key!r} in every train task's meta")
    mu = meta[key]
    if not is_number(mu) or not math.isfinite(mu) or mu <= 0:
        raise ValueError(f"{key!r} in the task's meta must be a finite number above 0, got {mu!r}")
    return float(mu)


def get_lr_values(optimizer: torch.optim.Optimizer) -> list[float]:
    """The learning rate of each of ``optimizer``'s parameter groups, as it is now (after a
    scheduler's step)."""
    return [float(group["lr"]) for group in optimizer.param_groups]


def _zeros_like_on_cpu(parameters: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: torch.zeros_like(p.detach(), device="cpu") for name, p in parameters.items()}


def _learning_rate(caller: str, curr_lr: Any, *, positive: bool) -> float:
    field = f"PTScaffoldHelper.{caller}: curr_lr"
    lr = check_finite_number(field, curr_lr)
    if lr < 0 or (positive and lr == 0):
        # terms_update divides by K * lr; a zero learning rate leaves nothing to learn from.
        raise FieldError(field, f"must be {'positive' if positive else 'at least 0'}, got {lr}")
    return lr


class ControlVariates:
    """One set of SCAFFOLD control variates, parameter name to tensor, kept on the CPU.

    ``state_dict()`` and ``load_state_dict()`` as on the model whose copy NVFlare first kept
    them in, so scripts that read ``helper.c_local.state_dict()`` keep working.
    """

    def __init__(self, values: Mapping[str, torch.Tensor]) -> None:
        self._values = dict(values)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A new dict of the controls (the tensors themselves are not copied)."""
        return dict(self._values)

    def load_state_dict(self, values: Mapping[str, torch.Tensor]) -> None:
        self._values = dict(values)


class PTScaffoldHelper:
    """The site's half of SCAFFOLD: its control variate ``c_i`` and the server's ``c``.

    Call ``init(model)`` once, then each round ``load_global_controls``, ``get_params``,
    ``model_update`` after every optimizer step, ``terms_update`` after the last, and
    ``get_delta_controls`` for what to send (see the module's docstring). The helper keeps a
    reference to the model given to ``init``. ``cnt`` counts this round's ``model_update`` calls
    (K); ``c_global`` and ``c_local`` hold the controls; ``c_delta_para`` the last
    ``c_i+ - c_i``.

    Changing which parameters require grad is allowed between rounds (a parameter that becomes
    trainable starts from a zero local control), not within one.
    """

    def __init__(self) -> None:
        self.cnt = 0
        self.c_global: ControlVariates | None = None
        self.c_local: ControlVariates | None = None
        self.c_delta_para: dict[str, np.ndarray[Any, Any]] | None = None
        self.device: torch.device | None = None
        self._model: nn.Module | None = None
        # The trainable parameters when get_params opened the round, and in the round before.
        self._round_trainable: frozenset[str] | None = None
        self._previous_trainable: frozenset[str] | None = None
        # c - c_i per parameter, on the parameter's device and dtype, made once per round: the
        # same correction applies at every step.
        self._correction: dict[str, torch.Tensor] = {}

    def init(self, model: nn.Module) -> None:
        """Start from zero controls for every parameter of ``model`` (after moving it to its
        device)."""
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"PTScaffoldHelper.init(model): model must be a torch.nn.Module, "
                f"got {type(model).__name__}"
            )
        parameters = dict(model.named_parameters())
        if not parameters:
            raise ValueError("PTScaffoldHelper.init(model): the model has no parameters")
        self._model = model
        self.c_global = ControlVariates(_zeros_like_on_cpu(parameters))
        self.c_local = ControlVariates(_zeros_like_on_cpu(parameters))
        self.device = next(iter(parameters.values())).device
        self.cnt = 0
        self.c_delta_para = None
        self._correction = {}
        self._round_trainable = self._previous_trainable = None

    def _initialised(self, caller: str) -> tuple[nn.Module, ControlVariates, ControlVariates]:
        if self._model is None or self.c_global is None or self.c_local is None:
            raise RuntimeError(f"PTScaffoldHelper.{caller}() called before init(model)")
        return self._model, self.c_global, self.c_local

    @staticmethod
    def _trainable(model: nn.Module) -> frozenset[str]:
        return frozenset(name for name, p in model.named_parameters() if p.requires_grad)

    def get_params(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Open a round: ``(c_global_para, c_local_para)``, the controls to pass to this round's
        ``model_update`` and ``terms_update`` calls. Resets the step count."""
        model, c_global, c_local = self._initialised("get_params")
        trainable = self._trainable(model)
        if self._previous_trainable is not None:
            newly_trainable = trainable - self._previous_trainable
            if newly_trainable:
                # Its local control dates from before it was frozen, or was never learned.
                parameters = dict(model.named_parameters())
                local = c_local.state_dict()
                local.update(_zeros_like_on_cpu({n: parameters[n] for n in newly_trainable}))
                c_local.load_state_dict(local)
        self._previous_trainable = self._round_trainable = trainable
        self.cnt = 0
        self.c_delta_para = None
        self._correction = {}
        return c_global.state_dict(), c_local.state_dict()

    def _check_round(self, model: nn.Module, caller: str) -> None:
        self._initialised(caller)
        if self._round_trainable is None:
            raise RuntimeError(
                f"PTScaffoldHelper.{caller}() called before get_params(), which opens each round"
            )
        trainable = self._trainable(model)
        if trainable != self._round_trainable:
            added = sorted(trainable - self._round_trainable)[:5]
            removed = sorted(self._round_trainable - trainable)[:5]
            raise RuntimeError(
                f"PTScaffoldHelper.{caller}(): which parameters require grad changed during the "
                f"round (now trainable: {added}; now frozen: {removed}); change it between "
                "rounds, before get_params()"
            )

    def _correction_of(
        self,
        name: str,
        parameter: torch.Tensor,
        c_global_para: Mapping[str, Any],
        c_local_para: Mapping[str, Any],
    ) -> torch.Tensor:
        """``c - c_i`` for one parameter, on its device and in its dtype."""
        correction = self._correction.get(name)
        if (
            correction is not None
            and correction.device == parameter.device
            and correction.dtype == parameter.dtype
        ):
            return correction
        terms = []
        for argument, controls in (
            ("c_global_para", c_global_para),
            ("c_local_para", c_local_para),
        ):
            if name not in controls:
                raise ValueError(f"PTScaffoldHelper: {argument} has no control for {name!r}")
            control = torch.as_tensor(
                controls[name], dtype=parameter.dtype, device=parameter.device
            )
            if control.shape != parameter.shape:
                raise ValueError(
                    f"PTScaffoldHelper: {argument}[{name!r}] has shape {list(control.shape)}, "
                    f"the parameter {list(parameter.shape)}"
                )
            terms.append(control)
        correction = terms[0] - terms[1]
        self._correction[name] = correction
        return correction

    def model_update(
        self,
        model: nn.Module,
        curr_lr: float,
        c_global_para: Mapping[str, Any],
        c_local_para: Mapping[str, Any],
    ) -> None:
        """Correct the optimizer's step just taken: ``y -= curr_lr * (c - c_i)`` for every
        trainable parameter. Call it after each ``optimizer.step()``, with the learning rate of
        that step. ``c - c_i`` is made from the controls given at the round's first call and
        reused until ``terms_update`` (pass the pair ``get_params`` returned, every time)."""
        lr = _learning_rate("model_update", curr_lr, positive=False)
        self._check_round(model, "model_update")
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if parameter.requires_grad:
                    correction = self._correction_of(name, parameter, c_global_para, c_local_para)
                    parameter.add_(correction, alpha=-lr)
        self.cnt += 1

    def terms_update(
        self,
        model: nn.Module,
        curr_lr: float,
        c_global_para: Mapping[str, Any],
        c_local_para: Mapping[str, Any],
        model_global: nn.Module | Mapping[str, torch.Tensor],
    ) -> None:
        """Close the round: ``c_i+ = c_i - c + (x - y_i) / (K * curr_lr)`` for every trainable
        parameter, with ``x`` from ``model_global`` (the weights received; a module or a
        ``state_dict``), ``y_i`` from ``model`` and K = ``cnt``. Keeps ``c_i+`` as the local
        control and ``c_i+ - c_i`` for :meth:`get_delta_controls`."""
        lr = _learning_rate("terms_update", curr_lr, positive=True)
        self._check_round(model, "terms_update")
        _, _, c_local = self._initialised("terms_update")
        if self.cnt <= 0:
            raise RuntimeError(
                "PTScaffoldHelper.terms_update() needs at least one model_update() call this "
                "round (K, the number of local steps, is 0)"
            )
        if isinstance(model_global, nn.Module):
            global_weights: Mapping[str, torch.Tensor] = model_global.state_dict()
        elif isinstance(model_global, Mapping):
            global_weights = model_global
        else:
            raise TypeError(
                "PTScaffoldHelper.terms_update: model_global must be a torch.nn.Module or a "
                f"state_dict, got {type(model_global).__name__}"
            )
        new_local = c_local.state_dict()
        delta: dict[str, np.ndarray[Any, Any]] = {}
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if not parameter.requires_grad:
                    continue
                if name not in global_weights:
                    raise ValueError(f"PTScaffoldHelper.terms_update: model_global has no {name!r}")
                received = torch.as_tensor(global_weights[name]).to(parameter)
                correction = self._correction_of(name, parameter, c_global_para, c_local_para)
                control = (received - parameter) / (self.cnt * lr) - correction
                new_local[name] = control.detach().cpu()
                old = torch.as_tensor(c_local_para[name], dtype=control.dtype, device="cpu")
                change = new_local[name] - old
                if change.dtype == torch.bfloat16:  # numpy has no bfloat16
                    change = change.float()
                delta[name] = change.numpy()
        c_local.load_state_dict(new_local)
        self.c_delta_para = delta
        self._correction = {}

    def load_global_controls(self, weights: Mapping[str, Any]) -> None:
        """Take the server's control ``c`` (``meta[SCAFFOLD_CTRL_GLOBAL]``: name to tensor or
        array). A parameter it does not name gets zero; names the model lacks are ignored, but
        at least one must match."""
        model, c_global, _ = self._initialised("load_global_controls")
        if not isinstance(weights, Mapping) or not weights:
            raise ValueError(
                "PTScaffoldHelper.load_global_controls: weights must be a non-empty mapping of "
                f"parameter name to tensor, got {weights!r:.60}"
            )
        controls: dict[str, torch.Tensor] = {}
        matched = 0
        for name, parameter in model.named_parameters():
            if name not in weights:
                controls[name] = torch.zeros_like(parameter.detach(), device="cpu")
                continue
            try:
                value = torch.as_tensor(weights[name])
            except (TypeError, ValueError, RuntimeError) as exc:
                raise ValueError(
                    f"PTScaffoldHelper.load_global_controls: weights[{name!r}] is not a tensor: "
                    f"{exc}"
                ) from None
            if value.shape != parameter.shape:
                raise ValueError(
                    f"PTScaffoldHelper.load_global_controls: weights[{name!r}] has shape "
                    f"{list(value.shape)}, the parameter {list(parameter.shape)}"
                )
            controls[name] = value.detach().to(dtype=parameter.dtype, device="cpu")
            matched += 1
        if not matched:
            raise ValueError(
                "PTScaffoldHelper.load_global_controls: weights name none of the model's "
                f"parameters (the model has {sorted(controls)[:5]}, weights "
                f"{sorted(map(str, weights))[:5]})"
            )
        c_global.load_state_dict(controls)
        self._correction = {}

    def get_delta_controls(self) -> dict[str, np.ndarray[Any, Any]]:
        """``c_i+ - c_i`` of the last ``terms_update``, per trainable parameter, as numpy arrays
        (what the site sends in ``meta[SCAFFOLD_CTRL_DIFF]``)."""
        if self.c_delta_para is None:
            raise ValueError(
                "PTScaffoldHelper.get_delta_controls(): no control change yet; call "
                "terms_update() at the end of the round first"
            )
        return self.c_delta_para


class PTFedProxLoss(nn.Module):
    """FedProx's proximal term (Li et al. 2020): ``mu / 2 * sum ||w - w_global||^2`` over the
    parameters, added to the task loss to keep local training near the global model.

    ``forward(input, target)`` takes the local model first and the global model received at
    the start of the round second, matching their parameters by name. The global weights are
    detached: the gradient is ``mu * (w - w_global)`` for the local model and nothing for the
    global one, whether or not its parameters require grad.
    """

    def __init__(self, mu: float = 0.01) -> None:
        super().__init__()
        mu = check_finite_number("PTFedProxLoss: mu", mu)
        if mu < 0:
            raise FieldError("PTFedProxLoss: mu", f"must be at least 0, got {mu}")
        self.mu = mu

    def forward(self, input: nn.Module, target: nn.Module) -> torch.Tensor:
        local = dict(input.named_parameters())
        received = dict(target.named_parameters())
        if local.keys() != received.keys():
            only_local = sorted(local.keys() - received.keys())[:5]
            only_global = sorted(received.keys() - local.keys())[:5]
            raise ValueError(
                "PTFedProxLoss: the local model (input) and the global model (target) must have "
                f"the same parameters; only in input: {only_local}, only in target: {only_global}"
            )
        total: torch.Tensor | None = None
        for name, weight in local.items():
            reference = received[name].detach()
            if reference.shape != weight.shape:
                raise ValueError(
                    f"PTFedProxLoss: parameter {name!r} has shape {list(weight.shape)} in input "
                    f"and {list(reference.shape)} in target"
                )
            term = torch.sum((weight - reference) ** 2)
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return (self.mu / 2) * total
