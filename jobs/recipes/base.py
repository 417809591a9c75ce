"""What every recipe is: a workflow, a model and a client script, checked up front."""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from common.validators import FieldError
from jobs.bundle import build_spec, write_bundle
from jobs.workflows import Workflow

if TYPE_CHECKING:
    from jobs.envs import Env, Run


def initial_params_of(model: Any) -> dict[str, torch.Tensor]:
    if isinstance(model, torch.nn.Module):
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if (
        isinstance(model, Mapping)
        and model
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items())
    ):
        return {k: v.detach().cpu().clone() for k, v in model.items()}
    raise FieldError(
        "model",
        "must be a torch.nn.Module or a non-empty state_dict (str → torch.Tensor), "
        f"got {type(model).__name__}",
    )


class Recipe:
    """A workflow, a model and a client script: everything a job needs, checked up front."""

    def __init__(
        self,
        *,
        name: str,
        workflow: Workflow,
        model: Any,
        train_script: str | Path,
        train_args: str = "",
    ) -> None:
        from jobs.bundle import NAME_PATTERN

        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise FieldError(
                "name",
                f"{name!r} must start with a letter or digit and hold only letters, "
                "digits, '.', '_' and '-' (at most 100)",
            )
        script = Path(train_script).expanduser().resolve()
        if not script.is_file():
            raise FieldError("train_script", f"{train_script!s} does not exist ({script})")
        if not isinstance(train_args, str):
            raise FieldError("train_args", f"must be a string, got {type(train_args).__name__}")
        try:
            shlex.split(train_args)
        except ValueError as exc:
            raise FieldError("train_args", f"{exc} in {train_args!r}") from None
        self.name = name
        self.workflow = workflow
        self.initial_params = initial_params_of(model)
        self.train_script = script
        self.train_args = train_args

    @property
    def min_clients(self) -> int:
        return self.workflow.min_clients

    def spec(self) -> dict[str, Any]:
        return build_spec(
            name=self.name,
            workflow=self.workflow,
            train_script=self.train_script.name,
            train_args=self.train_args,
        )

    def export(
        self,
        path: str | Path | None = None,
        *,
        job_dir: str | Path | None = None,
        exclude: Iterable[str | Path] = (),
    ) -> Path:
        """Write the job bundle to the folder ``path`` (created; must not exist);
        ``job_dir`` is NVFlare's name for it.

        The app is the script's folder; ``path`` itself and the folders in ``exclude`` (SimEnv
        passes its workspace) are left out of it when they lie inside that folder.
        """
        if path is not None and job_dir is not None:
            raise FieldError("job_dir", "give path or job_dir, not both")
        target = path if path is not None else job_dir
        if target is None:
            raise FieldError("job_dir", "is required: the folder to write the job bundle to")
        return write_bundle(
            Path(target),
            spec=self.spec(),
            initial_params=self.initial_params,
            app_source=self.train_script.parent,
            exclude=[Path(p) for p in exclude],
        )

    def execute(self, env: Env) -> Run:
        """Run the job in ``env`` (``SimEnv``, ``PocEnv``, ``ProdEnv``) and return its ``Run``."""
        return env.run(self)
