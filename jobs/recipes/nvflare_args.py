"""NVFlare's training-recipe arguments, read into ours: one home for what each means here.

Three kinds:

- **implemented**: ``initial_ckpt``, ``model`` as a class-path dict, ``key_metric_mode=None``
  (NVFlare's rule: ``jobs.workflows.training_options.key_metric_mode_for``),
  ``params_transfer_type`` / ``aggregator_data_kind`` (DIFF), ``stop_cond``, ``patience``,
  ``exclude_vars``, ``aggregation_weights``, ``per_site_config``, ``server_expected_format``
  (NUMPY or PYTORCH: the same here), ``save_filename`` and ``best_model_filename``;
- **not supported** (``model_persistor``, ``model_locator``: server-side code): a value raises
  a ``FieldError`` naming the argument, so that no job runs with an argument quietly ignored;
- **no effect** (how NVFlare launches and cleans up processes): accepted, never used. Sites
  always run the script as a subprocess of the agent, once per job.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common.validators import FieldError

# NVFlare's defaults for the PyTorch recipes' model file names.
DEFAULT_SAVE_FILENAME = "FL_global_model.pt"
DEFAULT_BEST_MODEL_FILENAME = "best_FL_global_model.pt"

# Arguments that change how NVFlare starts or tidies processes and memory; here the agent
# runs the script as one subprocess per job and nothing else depends on them.
NO_EFFECT_ARGUMENTS = (
    "launch_external_process",
    "command",
    "launch_once",
    "launch_timeout",
    "shutdown_timeout",
    "server_memory_gc_rounds",
    "client_memory_gc_rounds",
    "cuda_empty_cache",
    "enable_tensor_disk_offload",
)


def constant_name(value: Any) -> str:
    """``"DIFF"`` for ``TransferType.DIFF``, ``"DIFF"``, ``"diff"`` or an enum member."""
    raw = getattr(value, "value", value)
    return str(raw).upper()


def aggregator_name(aggregator: Any) -> str:
    """The aggregator's name: NVFlare's default ``None`` is the weighted mean. NVFlare's
    aggregator objects (``ModelAggregator`` subclasses) are server-side code, which this
    platform never runs: refused, naming the argument and what to give instead."""
    if aggregator is None:
        return "mean"
    if isinstance(aggregator, str):
        return aggregator
    raise FieldError(
        "aggregator",
        f"an aggregator object ({type(aggregator).__name__}) would be server-side code, which "
        "FedPortal does not run: give a name, 'mean', 'median', 'trimmed_mean' or 'krum' "
        "(with aggregator_args)",
    )


def params_transfer_type_of(params_transfer_type: Any, aggregator_data_kind: Any) -> str:
    """FULL or DIFF: DIFF when either NVFlare argument asks for the change, not the weights."""
    transfer = constant_name(params_transfer_type)
    if transfer not in ("FULL", "DIFF"):
        raise FieldError(
            "params_transfer_type", f"must be FULL or DIFF, got {params_transfer_type!r}"
        )
    kind = constant_name(aggregator_data_kind)
    if kind not in ("WEIGHTS", "WEIGHT_DIFF"):
        raise FieldError(
            "aggregator_data_kind", f"must be WEIGHTS or WEIGHT_DIFF, got {aggregator_data_kind!r}"
        )
    return "DIFF" if "DIFF" in (transfer, kind.removeprefix("WEIGHT_")) else "FULL"


def model_from_class_path(model: Mapping[str, Any]) -> torch.nn.Module:
    """``{"class_path": "pkg.mod.Net", "args": {...}}`` built in this process: the class is
    the user's own code on their machine, as NVFlare's recipes import it."""
    unknown = sorted(set(model) - {"class_path", "args"})
    if unknown:
        raise FieldError("model", f"a class-path dict holds 'class_path' and 'args', not {unknown}")
    class_path = model.get("class_path")
    args = model.get("args") or {}
    if not isinstance(class_path, str) or "." not in class_path:
        raise FieldError(
            "model", f"'class_path' must be 'package.module.Class', got {class_path!r}"
        )
    if not isinstance(args, Mapping):
        raise FieldError("model", f"'args' must be a dict, got {type(args).__name__}")
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise FieldError("model", f"cannot import {class_path!r}: {exc}") from None
    try:
        built = cls(**args)
    except TypeError as exc:
        raise FieldError("model", f"{class_path}(**args) failed: {exc}") from None
    if not isinstance(built, torch.nn.Module):
        raise FieldError(
            "model", f"{class_path} made a {type(built).__name__}, not a torch.nn.Module"
        )
    return built


def initial_model(model: Any, initial_ckpt: str | Path | None) -> Any:
    """The initial weights' source: ``model`` (a module, a state_dict or a class-path dict),
    with ``initial_ckpt`` loaded into it and checked against it; or ``initial_ckpt`` alone."""
    from jobs.recipes.evaluation import checkpoint_for, read_checkpoint

    if isinstance(model, Mapping) and "class_path" in model:
        model = model_from_class_path(model)
    if initial_ckpt is None:
        if model is None:
            raise FieldError("model", "give a model, an initial_ckpt, or both")
        return model
    if model is None:
        return read_checkpoint(initial_ckpt, field="initial_ckpt")
    return checkpoint_for(model, initial_ckpt, field="initial_ckpt")


def refuse_unsupported(**arguments: Any) -> None:
    """Raise for the first argument given a value this engine cannot honour."""
    for name, value in arguments.items():
        if value is not None:
            raise FieldError(name, f"is not supported: leave it unset (got {value!r})")


def model_file_name(field: str, name: Any) -> str | None:
    """A file name for ``models/`` (no folder part), or None."""
    if name is None:
        return None
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise FieldError(field, f"must be a file name without folders, got {name!r}")
    if name.endswith(".safetensors"):
        raise FieldError(field, f"{name!r} would stand beside our own model files: use .pt")
    return name


def check_server_expected_format(server_expected_format: Any) -> None:
    """NVFlare's PyTorch recipes exchange NUMPY (their default) or PYTORCH between server
    and client; the script gets torch tensors either way. Here tensors always travel as
    safetensors and the script gets torch tensors: both values are accepted and mean the
    same; anything else is refused naming the argument."""
    if constant_name(server_expected_format) not in ("NUMPY", "PYTORCH"):
        raise FieldError(
            "server_expected_format",
            "must be ExchangeFormat.NUMPY or ExchangeFormat.PYTORCH, "
            f"got {server_expected_format!r}",
        )
