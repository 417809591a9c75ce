"""Evaluation recipes: ``FedEvalRecipe`` (one checkpoint scored at every site) and
``add_cross_site_evaluation`` (after training, every site scores every site's model and the
final global model), with NVFlare's names and arguments."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common.validators import FieldError, check_int
from jobs.recipes.base import Recipe, initial_params_of
from jobs.recipes.nvflare_args import check_server_expected_format, model_from_class_path
from jobs.workflows.evaluation import CrossSiteEval, FedEval


def read_checkpoint(ckpt: str | Path, *, field: str) -> dict[str, torch.Tensor]:
    """The ``state_dict`` in ``ckpt``: a safetensors file, or one saved with ``torch.save``
    (alone or under ``"model"``). ``field`` is the argument that errors name."""
    from client_agent.wire import WireFormatError, load_state_dict

    path = Path(ckpt).expanduser()
    if not path.is_file():
        raise FieldError(field, f"{ckpt!s} does not exist ({path.resolve()})")
    try:
        if path.suffix == ".safetensors":
            weights = load_state_dict(path)
        else:
            # The user's own file on this machine, never one received from the network;
            # weights_only refuses anything but tensors and plain containers.
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            weights = loaded.get("model", loaded) if isinstance(loaded, dict) else loaded
    except (WireFormatError, OSError, RuntimeError, ValueError) as exc:
        raise FieldError(field, f"{path.name} cannot be read: {exc}") from None
    if (
        not isinstance(weights, dict)
        or not weights
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items())
    ):
        raise FieldError(field, f"{path.name} holds no state_dict (name → tensor)")
    return {k: v.detach().cpu().clone() for k, v in weights.items()}


def checkpoint_for(
    model: Any, eval_ckpt: str | Path, *, field: str = "eval_ckpt"
) -> dict[str, torch.Tensor]:
    """The weights in ``eval_ckpt`` (a safetensors file, or a PyTorch ``state_dict`` saved
    with ``torch.save``), checked against ``model``: the same tensor names, shapes and dtypes.
    ``field`` is the argument that errors name (``initial_ckpt`` for the training recipes).
    """
    expected = initial_params_of(model)
    path = Path(eval_ckpt).expanduser()
    weights = read_checkpoint(eval_ckpt, field=field)
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise FieldError(
            field,
            f"{path.name} does not fit the model: missing {missing[:5]}, unexpected {extra[:5]}",
        )
    for name, tensor in expected.items():
        got = weights[name]
        if got.shape != tensor.shape or got.dtype != tensor.dtype:
            raise FieldError(
                field,
                f"{path.name} does not fit the model: {name!r} is {got.dtype} "
                f"{list(got.shape)}, the model's is {tensor.dtype} {list(tensor.shape)}",
            )
    return {name: weights[name].detach().cpu().clone() for name in expected}


class FedEvalRecipe(Recipe):
    """Every site evaluates one checkpoint (``eval_ckpt``) of ``model`` with ``eval_script``
    (its ``flare.is_evaluate()`` branch); ``run.cross_site_matrix["global"]`` holds each
    site's metrics and ``run.metrics.aggregated(key)`` their mean."""

    def __init__(
        self,
        name: str = "eval",
        model: Any = None,
        eval_ckpt: str | Path | None = None,
        min_clients: int | None = None,
        eval_script: str | Path | None = None,
        eval_args: str = "",
        key_metric: str | None = "accuracy",
        key_metric_mode: str = "max",
        *,
        server_expected_format: Any = "numpy",
        validation_timeout: int = 6000,
        per_site_config: Mapping[str, Any] | None = None,
        launch_external_process: bool = False,
        command: str = "python3 -u",
        client_memory_gc_rounds: int = 0,
        cuda_empty_cache: bool = False,
    ) -> None:
        # NVFlare's keyword defaults; model, eval_ckpt, min_clients and eval_script are
        # required there too. The launch settings have no effect (one script process a job).
        for field_name, value in (
            ("model", model),
            ("eval_ckpt", eval_ckpt),
            ("min_clients", min_clients),
            ("eval_script", eval_script),
        ):
            if value is None:
                raise FieldError(field_name, "is required")
        assert eval_ckpt is not None and min_clients is not None and eval_script is not None
        check_server_expected_format(server_expected_format)
        check_int("validation_timeout", validation_timeout, low=1)
        if isinstance(model, Mapping) and "class_path" in model:
            model = model_from_class_path(model)
        super().__init__(
            name=name,
            workflow=FedEval(
                min_clients=min_clients, key_metric=key_metric, key_metric_mode=key_metric_mode
            ),
            model=checkpoint_for(model, eval_ckpt),
            train_script=eval_script,
            train_args=eval_args,
        )
        if per_site_config is not None:
            self.set_per_site_config(per_site_config)


def add_cross_site_evaluation(
    recipe: Recipe, submit_model_timeout: int = 600, validation_timeout: int = 6000
) -> Recipe:
    """After the recipe's training, every site submits its own model and every site evaluates
    each of them and the final global model; ``run.cross_site_matrix[model][site]`` holds the
    scores (``model``: ``"global"`` or ``"site:<name>"``). Changes ``recipe`` and returns it.

    The client script answers ``flare.is_submit_model()`` with its local model and
    ``flare.is_evaluate()`` with metrics only, as NVFlare's cross-site evaluation expects.

    ``submit_model_timeout`` and ``validation_timeout`` are NVFlare's arguments, checked and
    accepted so its job scripts run; here every round, evaluation rounds included, has the
    env's round timeout (``PocEnv``/``ProdEnv``'s ``round_timeout_seconds``, SimEnv's
    ``task_timeout``).
    """
    for field, value in (
        ("submit_model_timeout", submit_model_timeout),
        ("validation_timeout", validation_timeout),
    ):
        check_int(field, value, low=1)
    if not isinstance(recipe, Recipe):
        raise FieldError("recipe", f"must be a recipe, got {type(recipe).__name__}")
    if isinstance(recipe.workflow, CrossSiteEval):
        raise FieldError("recipe", "already ends with cross-site evaluation")
    recipe.workflow = CrossSiteEval(recipe.workflow)
    return recipe


def add_final_global_evaluation(
    recipe: Recipe,
    participating_clients: list[str] | None = None,
    validation_timeout: int = 6000,
) -> Recipe:
    """After the recipe's training, the final global model is evaluated at the sites
    (``participating_clients``, or every site); no site submits its own model. The scores are
    ``run.cross_site_matrix["global"][site]``. NVFlare's ``add_final_global_evaluation``;
    ``validation_timeout`` is checked and, as for cross-site evaluation, the env's round
    timeout applies. Changes ``recipe`` and returns it."""
    check_int("validation_timeout", validation_timeout, low=1)
    if participating_clients is not None:
        if not isinstance(participating_clients, list) or not all(
            isinstance(c, str) and c for c in participating_clients
        ):
            raise FieldError(
                "participating_clients",
                f"must be a list of site names, got {participating_clients!r}",
            )
        if not participating_clients:
            raise FieldError(
                "participating_clients", "must not be empty: None evaluates at every site"
            )
    if not isinstance(recipe, Recipe):
        raise FieldError("recipe", f"must be a recipe, got {type(recipe).__name__}")
    if isinstance(recipe.workflow, CrossSiteEval):
        raise FieldError("recipe", "already ends with an evaluation of its models")
    recipe.workflow = CrossSiteEval(
        recipe.workflow,
        site_models=False,
        clients=None if participating_clients is None else tuple(participating_clients),
    )
    return recipe
