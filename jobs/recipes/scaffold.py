"""SCAFFOLD, with NVFlare's ``ScaffoldRecipe`` arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs.recipes.base import Recipe
from jobs.workflows.scaffold import Scaffold


class ScaffoldRecipe(Recipe):
    """SCAFFOLD (Karimireddy et al. 2020): FedAvg's rounds with control variates that correct
    each site's drift. The site script uses ``client_agent.pt.PTScaffoldHelper`` as NVFlare's
    SCAFFOLD scripts do: ``load_global_controls(model.meta[SCAFFOLD_CTRL_GLOBAL])`` before
    training, ``model_update`` after each optimizer step, ``terms_update`` at the end, and
    ``meta[SCAFFOLD_CTRL_DIFF] = get_delta_controls()`` in the result it sends."""

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
    ) -> None:
        super().__init__(
            name=name,
            workflow=Scaffold(
                min_clients=min_clients,
                num_rounds=num_rounds,
                key_metric=key_metric,
                key_metric_mode=key_metric_mode,
            ),
            model=model,
            train_script=train_script,
            train_args=train_args,
        )
