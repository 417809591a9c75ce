"""``add_experiment_tracking``: NVFlare's ``nvflare.recipe.utils.add_experiment_tracking``.

    add_experiment_tracking(recipe, "tensorboard")
    add_experiment_tracking(recipe, "mlflow", {"kw_args": {"experiment_name": "hello"}},
                            client_side=True)

It adds a tracker to the recipe's spec; the env that runs the job writes what the sites log
there (:mod:`jobs.tracking`: where, and how each data type is written). Every argument is
checked at once, so a mistake fails in ``job.py`` rather than when the job runs.
"""

from __future__ import annotations

import copy
from typing import Any

from jobs.bundle import SITE_NAME
from jobs.recipes.base import Recipe
from jobs.tracking import check_tracking_config


def add_experiment_tracking(
    recipe: Recipe,
    tracking_type: str,
    tracking_config: dict[str, Any] | None = None,
    client_side: bool = False,
    server_side: bool = True,
    clients: list[str] | None = None,
) -> None:
    """Track the job's logged records with TensorBoard (``"tensorboard"``) or MLflow
    (``"mlflow"``); ``"wandb"`` needs the wandb package and offline mode, and is refused here.

    Args:
        recipe: the recipe to add the tracker to.
        tracking_type: ``"tensorboard"``, ``"mlflow"`` or ``"wandb"``.
        tracking_config: TensorBoard: ``tb_folder``. MLflow: NVFlare's ``MLflowReceiver``
            arguments, ``tracking_uri`` (default: a file store in the workspace),
            ``kw_args`` (``experiment_name``, ``run_name``, ``experiment_tags``, ``run_tags``),
            ``artifact_location``, ``buffer_flush_time``. It is stored in the job's spec: put
            no credentials in it (MLflow reads those from the environment).
        client_side: each site also keeps its own records with it.
        server_side: the server writes every site's records and the rounds' aggregates.
        clients: the sites that track on their side (all when None); only with
            ``client_side=True``. Call once per site to give sites different configs.
    """
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a Recipe, got {type(recipe).__name__}")
    for name, flag in (("client_side", client_side), ("server_side", server_side)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if tracking_config is not None and not isinstance(tracking_config, dict):
        raise TypeError(f"tracking_config must be a dict, got {type(tracking_config).__name__}")
    # ValueError naming the field: unknown type, W&B without its package, a bad config key.
    check_tracking_config(tracking_type, tracking_config)
    if not server_side and not client_side:
        raise ValueError("server_side, client_side: at least one of them must be True")
    if clients is not None:
        if not client_side:
            raise ValueError("clients is only used for client-side tracking; set client_side=True")
        if not isinstance(clients, list) or not all(isinstance(c, str) for c in clients):
            raise TypeError(f"clients must be a list of site names, got {clients!r}")
        if not clients:
            raise ValueError("clients must not be empty; omit it to track on every site")
        bad = [c for c in clients if not SITE_NAME.match(c)]
        if bad:
            raise ValueError(f"clients: {bad!r} are not site names")
    recipe.experiment_tracking.append(
        {
            "tracking_type": tracking_type,
            # A copy: the caller's dict may change after this call; the spec must not.
            "tracking_config": copy.deepcopy(tracking_config or {}),
            "client_side": client_side,
            "server_side": server_side,
            "clients": list(clients) if clients is not None else None,
        }
    )
