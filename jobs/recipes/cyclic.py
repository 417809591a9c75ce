"""Cyclic weight transfer, with NVFlare's ``CyclicRecipe`` arguments."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.validators import FieldError
from jobs.recipes.base import Recipe
from jobs.recipes.nvflare_args import (
    check_server_expected_format,
    constant_name,
    initial_model,
    params_transfer_type_of,
    refuse_unsupported,
)
from jobs.workflows.cyclic import MAX_SEED, Cyclic
from jobs.workflows.training_options import key_metric_mode_for


class CyclicRecipe(Recipe):
    """The sites train one after another, each from the previous site's model, for
    ``num_rounds`` passes over all the sites (``min_clients`` of them at least).

    ``order="fixed"`` relays in site-name order; ``order="random"`` shuffles the sites for
    every pass, from ``seed`` (drawn now when not given, and stored in the job, so the job's
    order is the same wherever it runs). A site that fails or times out is skipped: the next
    site gets the model it would have started from.

    NVFlare's ``CyclicRecipe`` arguments: ``initial_ckpt`` and ``model`` as for
    ``FedAvgRecipe``; ``params_transfer_type`` FULL only; ``server_config_overrides`` /
    ``client_config_overrides`` refused; the launch and memory settings
    (``launch_external_process``, ``command``, ``*_memory_gc_rounds``, ``cuda_empty_cache``,
    ``task_assignment_timeout``, ``shutdown_timeout``) accepted with no effect.
    """

    def __init__(
        self,
        name: str = "cyclic",
        model: Any = None,
        num_rounds: int = 2,
        train_script: str | Path = "",
        train_args: str = "",
        min_clients: int = 2,
        order: str = "fixed",
        seed: int | None = None,
        key_metric: str | None = "accuracy",
        key_metric_mode: str | None = None,
        *,
        initial_ckpt: str | Path | None = None,
        framework: Any = "pytorch",
        server_expected_format: Any = "numpy",
        params_transfer_type: Any = "FULL",
        server_config_overrides: Mapping[str, Any] | None = None,
        client_config_overrides: Mapping[str, Any] | None = None,
        launch_external_process: bool = False,
        command: str = "python3 -u",
        server_memory_gc_rounds: int = 1,
        client_memory_gc_rounds: int = 0,
        cuda_empty_cache: bool = False,
        task_assignment_timeout: int = 10,
        shutdown_timeout: float = 0.0,
    ) -> None:
        # framework: PyTorch (and NumPy params, which travel the same way); NVFlare's
        # TensorFlow recipes are not ported.
        if constant_name(framework) not in ("PYTORCH", "NUMPY", "RAW"):
            raise FieldError("framework", f"must be FrameworkType.PYTORCH, got {framework!r}")
        check_server_expected_format(server_expected_format)
        if params_transfer_type_of(params_transfer_type, "WEIGHTS") != "FULL":
            raise FieldError(
                "params_transfer_type", "a relay hands each site the whole model: FULL only"
            )
        refuse_unsupported(
            server_config_overrides=server_config_overrides,
            client_config_overrides=client_config_overrides,
        )
        super().__init__(
            name=name,
            workflow=Cyclic(
                min_clients=min_clients,
                num_rounds=num_rounds,
                order=order,
                seed=secrets.randbelow(MAX_SEED) if seed is None else seed,
                key_metric=key_metric,
                key_metric_mode=key_metric_mode_for(key_metric, key_metric_mode, None),
            ),
            model=initial_model(model, initial_ckpt),
            train_script=train_script,
            train_args=train_args,
        )
