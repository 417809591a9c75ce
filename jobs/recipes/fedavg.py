"""FedAvg and FedProx, with NVFlare's ``FedAvgRecipe`` arguments (names and defaults)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.validators import FieldError
from jobs.recipes.base import Recipe
from jobs.recipes.nvflare_args import (
    DEFAULT_BEST_MODEL_FILENAME,
    DEFAULT_SAVE_FILENAME,
    check_server_expected_format,
    infer_key_metric_mode,
    initial_model,
    params_transfer_type_of,
    refuse_unsupported,
)
from jobs.workflows.fedavg import FedAvg, FedProx


def _required(name: str, value: Any) -> Any:
    # Defaults of None keep our positional order (name, min_clients, num_rounds, model,
    # train_script) while NVFlare's own defaults sit on name and num_rounds.
    if value is None:
        raise FieldError(name, "is required")
    return value


class FedAvgRecipe(Recipe):
    """FedAvg over ``num_rounds`` rounds, with NVFlare's ``FedAvgRecipe`` arguments.

    ``model`` is a ``torch.nn.Module``, a ``state_dict``, or NVFlare's class-path dict
    ``{"class_path": "pkg.mod.Net", "args": {...}}`` (imported in this process).
    ``initial_ckpt`` (a safetensors file or a ``torch.save``'d ``state_dict``) is loaded into
    ``model`` and checked against it, or, without ``model``, is the initial model itself.

    ``key_metric`` (default ``"accuracy"``) chooses the best model; ``key_metric_mode``
    ``"max"``/``"min"``, or ``None``: ``"max"``, as NVFlare without ``stop_cond`` (a loss needs
    ``key_metric_mode="min"``).

    ``params_transfer_type="DIFF"`` (or ``aggregator_data_kind="WEIGHT_DIFF"``) tells every
    train task, in ``meta["params_transfer_type"]``, to send the site's change rather than its
    weights. ``aggregator`` combines the round's updates: ``"mean"`` (FedAvg's weighted mean),
    ``"median"``, ``"trimmed_mean"`` (``aggregator_args={"trim_fraction": 0.2}``) or
    ``"krum"`` (``{"num_malicious": 1, "num_to_keep": 1}``).

    Not supported yet, refused with a ``FieldError`` naming them when given: ``stop_cond``,
    ``patience``, ``exclude_vars``, ``aggregation_weights``, ``per_site_config``,
    ``model_persistor``, ``model_locator``, and file names other than NVFlare's defaults.
    ``server_expected_format`` may be NUMPY (NVFlare's default) or PYTORCH: the same here.
    Accepted with no effect (the agent always runs the script as one subprocess per job):
    ``launch_external_process``, ``command``, ``launch_once``, ``launch_timeout``,
    ``shutdown_timeout``, ``server_memory_gc_rounds``, ``client_memory_gc_rounds``,
    ``cuda_empty_cache``, ``enable_tensor_disk_offload``.
    """

    _workflow_class: type[FedAvg] = FedAvg

    def __init__(
        self,
        name: str = "fedavg",
        min_clients: int | None = None,
        num_rounds: int = 2,
        model: Any = None,
        train_script: str | Path | None = None,
        train_args: str = "",
        *,
        initial_ckpt: str | Path | None = None,
        key_metric: str | None = "accuracy",
        key_metric_mode: str | None = None,
        aggregator: str = "mean",
        aggregator_args: Mapping[str, Any] | None = None,
        aggregator_data_kind: Any = "WEIGHTS",
        params_transfer_type: Any = "FULL",
        server_expected_format: Any = "numpy",
        save_filename: str | None = DEFAULT_SAVE_FILENAME,
        best_model_filename: str | None = DEFAULT_BEST_MODEL_FILENAME,
        stop_cond: str | None = None,
        patience: int | None = None,
        exclude_vars: str | None = None,
        aggregation_weights: Mapping[str, float] | None = None,
        per_site_config: Mapping[str, Any] | None = None,
        model_persistor: Any = None,
        model_locator: Any = None,
        launch_external_process: bool = False,
        command: str = "python3 -u",
        launch_once: bool = True,
        launch_timeout: float | None = None,
        shutdown_timeout: float = 0.0,
        server_memory_gc_rounds: int = 0,
        client_memory_gc_rounds: int = 0,
        cuda_empty_cache: bool = False,
        enable_tensor_disk_offload: bool = False,
        **workflow_args: Any,
    ) -> None:
        refuse_unsupported(
            stop_cond=stop_cond,
            patience=patience,
            exclude_vars=exclude_vars,
            aggregation_weights=aggregation_weights,
            per_site_config=per_site_config,
            model_persistor=model_persistor,
            model_locator=model_locator,
            save_filename=save_filename,
            best_model_filename=best_model_filename,
        )
        check_server_expected_format(server_expected_format)
        super().__init__(
            name=name,
            workflow=self._workflow_class(
                min_clients=_required("min_clients", min_clients),
                num_rounds=num_rounds,
                key_metric=key_metric,
                key_metric_mode=infer_key_metric_mode(key_metric, key_metric_mode),
                aggregator=aggregator,
                aggregator_args=dict(aggregator_args or {}),
                params_transfer_type=params_transfer_type_of(
                    params_transfer_type, aggregator_data_kind
                ),
                **workflow_args,
            ),
            model=initial_model(model, initial_ckpt),
            train_script=_required("train_script", train_script),
            train_args=train_args,
        )


class FedProxRecipe(FedAvgRecipe):
    """FedAvg with FedProx's proximal term at the sites (Li et al. 2020), with NVFlare's
    arguments (``FedAvgRecipe``'s, plus ``fedprox_mu``): each train task hands ``fedprox_mu``
    to the script in ``model.meta["fedprox_mu"]``, and the script adds
    ``client_agent.pt.PTFedProxLoss(mu)`` of its weights and the received global weights to
    its loss. ``fedprox_mu=0`` is FedAvg."""

    _workflow_class = FedProx

    def __init__(
        self,
        name: str = "fedprox",
        min_clients: int | None = None,
        num_rounds: int = 2,
        model: Any = None,
        train_script: str | Path | None = None,
        train_args: str = "",
        *,
        fedprox_mu: float = 0.01,
        **nvflare_args: Any,
    ) -> None:
        super().__init__(
            name,
            min_clients,
            num_rounds,
            model,
            train_script,
            train_args,
            fedprox_mu=fedprox_mu,
            **nvflare_args,
        )
