"""FedAvg, with NVFlare's ``FedAvgRecipe`` arguments."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jobs.recipes.base import Recipe
from jobs.workflows.fedavg import FedAvg, FedProx


class FedAvgRecipe(Recipe):
    """FedAvg over ``num_rounds`` rounds, with NVFlare's ``FedAvgRecipe`` arguments.

    ``key_metric`` (default ``"accuracy"``) chooses the best model, higher is better unless
    ``key_metric_mode="min"`` (say, for a loss).

    ``aggregator`` combines the round's updates: ``"mean"`` (the weighted mean, FedAvg's),
    or a robust one: ``"median"`` (coordinate-wise), ``"trimmed_mean"`` (``aggregator_args=
    {"trim_fraction": 0.2}``) or ``"krum"`` (``{"num_malicious": 1, "num_to_keep": 1}``;
    Multi-Krum keeps more). Sites may send FULL weights or DIFF (their change).
    """

    def __init__(
        self,
        name: str,
        min_clients: int,
        num_rounds: int,
        model: Any,
        train_script: str | Path,
        train_args: str = "",
        key_metric: str | None = "accuracy",
        key_metric_mode: str = "max",
        aggregator: str = "mean",
        aggregator_args: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            name=name,
            workflow=FedAvg(
                min_clients=min_clients,
                num_rounds=num_rounds,
                key_metric=key_metric,
                key_metric_mode=key_metric_mode,
                aggregator=aggregator,
                aggregator_args=dict(aggregator_args or {}),
            ),
            model=model,
            train_script=train_script,
            train_args=train_args,
        )


class FedProxRecipe(Recipe):
    """FedAvg with FedProx's proximal term at the sites (Li et al. 2020), with NVFlare's
    arguments: each train task hands ``fedprox_mu`` to the script in
    ``model.meta["fedprox_mu"]``, and the script adds ``client_agent.pt.PTFedProxLoss(mu)`` of
    its weights and the received global weights to its loss. ``fedprox_mu=0`` is FedAvg."""

    def __init__(
        self,
        name: str,
        min_clients: int,
        num_rounds: int,
        model: Any,
        train_script: str | Path,
        train_args: str = "",
        fedprox_mu: float = 0.01,
        key_metric: str | None = "accuracy",
        key_metric_mode: str = "max",
        aggregator: str = "mean",
        aggregator_args: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            name=name,
            workflow=FedProx(
                min_clients=min_clients,
                num_rounds=num_rounds,
                key_metric=key_metric,
                key_metric_mode=key_metric_mode,
                aggregator=aggregator,
                aggregator_args=dict(aggregator_args or {}),
                fedprox_mu=fedprox_mu,
            ),
            model=model,
            train_script=train_script,
            train_args=train_args,
        )
