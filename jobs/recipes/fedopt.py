"""FedOpt, with NVFlare's ``FedOptRecipe`` arguments."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from jobs.recipes.fedavg import FedAvgRecipe
from jobs.recipes.nvflare_args import model_from_class_path
from jobs.workflows.fedopt import DEFAULT_OPTIMIZER_ARGS, FedOpt


class FedOptRecipe(FedAvgRecipe):
    """FedAvg's rounds with a server optimizer stepped on the round's aggregate (Reddi et al.
    2021).

    ``optimizer_args`` names a ``torch.optim`` optimizer and its arguments, NVFlare's way:
    ``{"path": "torch.optim.SGD", "args": {"lr": 1.0, "momentum": 0.6}}`` (the default:
    FedAvgM). The paper's adaptive optimizers are ``jobs.aggregation.server_opt.FedAdam``,
    ``FedYogi`` and ``FedAdagrad`` (``lr`` is the server's η, ``tau`` its τ).
    ``lr_scheduler_args`` (optional) names a ``torch.optim.lr_scheduler`` stepped once a round.
    ``aggregator`` picks the aggregate the optimizer steps toward, as for ``FedAvgRecipe``.

    As NVFlare's recipe does, ``"{num_rounds}"`` in the scheduler's arguments (``T_max`` of a
    cosine schedule) becomes ``num_rounds``, and the model's float buffers (BatchNorm's
    running statistics, when ``model`` is a ``torch.nn.Module``) are averaged, not stepped.

    Every ``FedAvgRecipe`` argument applies too (``initial_ckpt``, ``stop_cond``,
    ``exclude_vars``, …); NVFlare's ``device`` and ``source_model`` have no effect.
    """

    _workflow_class = FedOpt

    def __init__(
        self,
        name: str = "fedopt",
        min_clients: int | None = None,
        num_rounds: int = 2,
        model: Any = None,
        train_script: str | Path | None = None,
        train_args: str = "",
        optimizer_args: Mapping[str, Any] | None = None,
        lr_scheduler_args: Mapping[str, Any] | None = None,
        *,
        device: str | None = None,
        source_model: str = "model",
        **fedavg_args: Any,
    ) -> None:
        # device and source_model place NVFlare's server-side torch optimizer; here the
        # optimizer runs on the CPU over the global model itself, so they have no effect.
        if isinstance(model, Mapping) and "class_path" in model:
            model = model_from_class_path(model)
        super().__init__(
            name,
            min_clients,
            num_rounds,
            model,
            train_script,
            train_args,
            optimizer_args=dict(optimizer_args or DEFAULT_OPTIMIZER_ARGS),
            lr_scheduler_args=_with_num_rounds(lr_scheduler_args, num_rounds),
            buffers=_float_buffers(model),
            **fedavg_args,
        )


def _with_num_rounds(args: Mapping[str, Any] | None, num_rounds: int) -> Any:
    """``args`` with every ``"{num_rounds}"`` among its arguments replaced by the count."""
    if not isinstance(args, Mapping) or not isinstance(args.get("args"), Mapping):
        return args
    values = {
        key: num_rounds if value == "{num_rounds}" else value for key, value in args["args"].items()
    }
    return {**args, "args": values}


def _float_buffers(model: Any) -> list[str]:
    if not isinstance(model, torch.nn.Module):
        return []
    saved = model.state_dict().keys()  # non-persistent buffers never travel
    return sorted(
        name for name, b in model.named_buffers() if b.is_floating_point() and name in saved
    )
