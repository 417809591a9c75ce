"""NumPy jobs, with NVFlare's ``NumpyFedAvgRecipe`` arguments: the script exchanges numpy
arrays and never imports torch.

The model is a list or an array (one array, under ``NPConstants.NUMPY_KEY``, as NVFlare's
NumPy persistor stores it: float32), or a dict of arrays. ``initial_ckpt`` is a ``.npy``
file (read without pickle) or a safetensors file. Each task hands the script
``model.params`` as numpy arrays (``exchange_format="numpy"`` in the task's meta); what it
sends may be numpy arrays or tensors. The server side is FedAvg's: every ``FedAvgRecipe``
argument applies.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

import client_agent
from client_agent.fl_model import NPConstants
from common.validators import FieldError, check_int
from jobs.recipes.base import Recipe
from jobs.recipes.fedavg import FedAvgRecipe
from jobs.workflows.evaluation import CrossSiteEval, ServerModels


def numpy_params(model: Any, field: str = "model") -> dict[str, torch.Tensor]:
    """``model`` (a list, an array, or a dict of them) as tensors named as the script will see
    them: a lone array is ``params[NPConstants.NUMPY_KEY]``, float32 as in NVFlare."""
    if isinstance(model, Mapping):
        if not model:
            raise FieldError(field, "is an empty dict")
        out = {}
        for name, value in model.items():
            if not isinstance(name, str):
                raise FieldError(field, f"array names must be strings, got {name!r}")
            out[name] = _tensor(field, value, dtype=None)
        return out
    return {NPConstants.NUMPY_KEY: _tensor(field, model, dtype=np.float32)}


def _tensor(field: str, value: Any, dtype: Any) -> torch.Tensor:
    try:
        array = np.array(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise FieldError(field, f"is not a numeric array: {exc}") from None
    if array.dtype == object or not np.issubdtype(array.dtype, np.number):
        raise FieldError(field, f"is not a numeric array (dtype {array.dtype})")
    if array.ndim == 0 or array.size == 0:
        raise FieldError(field, f"must be a non-empty array, got shape {list(array.shape)}")
    return torch.from_numpy(np.ascontiguousarray(array))


def numpy_checkpoint(initial_ckpt: str | Path) -> dict[str, torch.Tensor]:
    """An ``.npy`` file (never unpickled) or a safetensors file, as params."""
    path = Path(initial_ckpt).expanduser()
    if not path.is_file():
        raise FieldError("initial_ckpt", f"{initial_ckpt!s} does not exist")
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise FieldError("initial_ckpt", f"cannot read {path} as .npy: {exc}") from None
        return numpy_params(array, "initial_ckpt")
    from jobs.recipes.evaluation import read_checkpoint

    return read_checkpoint(path, field="initial_ckpt")


class NumpyFedAvgRecipe(FedAvgRecipe):
    """FedAvg for scripts that exchange numpy arrays (NVFlare's ``NumpyFedAvgRecipe``).

    ``initial_model`` is NVFlare 2.7's name for ``model`` (``model`` wins when both are given).
    """

    def __init__(
        self,
        name: str = "fedavg",
        min_clients: int | None = None,
        num_rounds: int = 2,
        model: Any = None,
        train_script: str | Path | None = None,
        train_args: str = "",
        *,
        initial_model: Any = None,
        initial_ckpt: str | Path | None = None,
        **fedavg_args: Any,
    ) -> None:
        model = model if model is not None else initial_model
        if model is None and initial_ckpt is None:
            raise FieldError("model", "give a model (a list or array), an initial_ckpt, or both")
        # NVFlare's NumPy recipe saves no .pt files: its model is not torch's.
        fedavg_args.setdefault("save_filename", None)
        fedavg_args.setdefault("best_model_filename", None)
        params = None if model is None else numpy_params(model)
        if initial_ckpt is not None:
            loaded = numpy_checkpoint(initial_ckpt)
            if params is not None and {k: (v.dtype, v.shape) for k, v in loaded.items()} != {
                k: (v.dtype, v.shape) for k, v in params.items()
            }:
                raise FieldError("initial_ckpt", "does not fit model: other arrays or shapes")
            params = loaded
        super().__init__(
            name,
            min_clients,
            num_rounds,
            params,
            train_script,
            train_args,
            exchange_format="numpy",
            **fedavg_args,
        )


# NVFlare's demonstration validator, shipped with the agent: the app of a NumPy cross-site
# evaluation given no eval_script.
BUILTIN_VALIDATOR = (
    Path(client_agent.__file__).resolve().parent
    / "builtin_apps"
    / "np_validator"
    / "np_validator.py"
)


class NumpyCrossSiteEvalRecipe(Recipe):
    """Cross-site evaluation of the server's NumPy models, with no training (NVFlare's
    ``NumpyCrossSiteEvalRecipe``): every site scores each model; with an ``eval_script``,
    each site also submits its own model (its ``flare.is_submit_model()`` branch) and every
    site scores those too. ``run.cross_site_matrix[model][site]`` holds the scores.

    The models: ``initial_ckpt`` (one ``.npy`` file, the model ``"server"``), or
    ``model_name={"name": "file.npy", …}`` in ``model_dir`` (default ``{"server":
    "server.npy"}`` in ``models``; a relative folder is read from the current directory when
    the recipe is made — the files are packed into the job, the server reads no path later).
    Without ``eval_script`` a built-in demonstration validator scores ``sum(x / max(x))``.
    ``submit_model_timeout``, ``validation_timeout`` are checked; the env's round timeout
    applies. The launch settings have no effect.
    """

    def __init__(
        self,
        name: str = "numpy_cross_site_eval",
        min_clients: int = 2,
        eval_script: str | Path | None = None,
        eval_args: str = "",
        launch_external_process: bool = False,
        command: str = "python3 -u",
        initial_ckpt: str | Path | None = None,
        model_dir: str | Path | None = None,
        model_name: Mapping[str, str] | None = None,
        submit_model_timeout: int = 600,
        validation_timeout: int = 6000,
        client_memory_gc_rounds: int = 0,
        cuda_empty_cache: bool = False,
    ) -> None:
        check_int("submit_model_timeout", submit_model_timeout, low=1)
        check_int("validation_timeout", validation_timeout, low=1)
        models = server_models(initial_ckpt, model_dir, model_name)
        packed = {
            f"{model}/{tensor}": value
            for model, params in models.items()
            for tensor, value in params.items()
        }
        super().__init__(
            name=name,
            workflow=CrossSiteEval(
                ServerModels(
                    min_clients=min_clients, models=tuple(models), exchange_format="numpy"
                ),
                site_models=eval_script is not None,
            ),
            model=packed,
            train_script=BUILTIN_VALIDATOR if eval_script is None else eval_script,
            train_args=eval_args,
        )


def server_models(
    initial_ckpt: str | Path | None,
    model_dir: str | Path | None,
    model_name: Mapping[str, str] | None,
) -> dict[str, dict[str, torch.Tensor]]:
    """The server's models by name, read now (see :class:`NumpyCrossSiteEvalRecipe`)."""
    if initial_ckpt is not None:
        return {"server": numpy_checkpoint(initial_ckpt)}
    names = {"server": "server.npy"} if model_name is None else model_name
    if not isinstance(names, Mapping) or not names:
        raise FieldError("model_name", f"must map model names to file names, got {names!r}")
    folder = Path("models" if model_dir is None else model_dir).expanduser()
    models = {}
    for model, file_name in names.items():
        if not isinstance(model, str) or not model or "/" in model:
            raise FieldError("model_name", f"{model!r} is not a model name")
        if not isinstance(file_name, str) or not file_name:
            raise FieldError("model_name", f"{model}: {file_name!r} is not a file name")
        path = folder / file_name
        if not path.is_file():
            raise FieldError("model_dir", f"{model}: {path} does not exist")
        models[model] = numpy_checkpoint(path)
    return models
