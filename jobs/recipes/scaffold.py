"""SCAFFOLD, with NVFlare's ``ScaffoldRecipe`` arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.validators import FieldError
from jobs.recipes.fedavg import FedAvgRecipe
from jobs.workflows.scaffold import Scaffold


class ScaffoldRecipe(FedAvgRecipe):
    """SCAFFOLD (Karimireddy et al. 2020): FedAvg's rounds with control variates that correct
    each site's drift. The site script uses ``client_agent.pt.PTScaffoldHelper`` as NVFlare's
    SCAFFOLD scripts do: ``load_global_controls(model.meta[SCAFFOLD_CTRL_GLOBAL])`` before
    training, ``model_update`` after each optimizer step, ``terms_update`` at the end, and
    ``meta[SCAFFOLD_CTRL_DIFF] = get_delta_controls()`` in the result it sends.

    NVFlare's ``ScaffoldRecipe`` arguments, and every ``FedAvgRecipe`` argument but
    ``aggregator`` (the mean only)."""

    _workflow_class = Scaffold

    def __init__(
        self,
        name: str = "scaffold",
        min_clients: int | None = None,
        num_rounds: int = 2,
        model: Any = None,
        train_script: str | Path | None = None,
        train_args: str = "",
        **fedavg_args: Any,
    ) -> None:
        if fedavg_args.get("aggregator") not in (None, "mean"):
            # The control variates are a mean's: a robust aggregate would not match them.
            raise FieldError("aggregator", "SCAFFOLD aggregates with the mean only")
        super().__init__(
            name, min_clients, num_rounds, model, train_script, train_args, **fedavg_args
        )
