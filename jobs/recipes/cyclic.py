"""Cyclic weight transfer, with NVFlare's ``CyclicRecipe`` arguments."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from jobs.recipes.base import Recipe
from jobs.workflows.cyclic import MAX_SEED, Cyclic


class CyclicRecipe(Recipe):
    """The sites train one after another, each from the previous site's model, for
    ``num_rounds`` passes over all the sites (``min_clients`` of them at least).

    ``order="fixed"`` relays in site-name order; ``order="random"`` shuffles the sites for
    every pass, from ``seed`` (drawn now when not given, and stored in the job, so the job's
    order is the same wherever it runs). A site that fails or times out is skipped: the next
    site gets the model it would have started from.
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
        key_metric_mode: str = "max",
    ) -> None:
        super().__init__(
            name=name,
            workflow=Cyclic(
                min_clients=min_clients,
                num_rounds=num_rounds,
                order=order,
                seed=secrets.randbelow(MAX_SEED) if seed is None else seed,
                key_metric=key_metric,
                key_metric_mode=key_metric_mode,
            ),
            model=model,
            train_script=train_script,
            train_args=train_args,
        )
