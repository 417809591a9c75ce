"""What every recipe is: a workflow, a model and a client script, checked up front."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from common.validators import FieldError
from jobs.bundle import (
    BundleError,
    build_spec,
    check_experiment,
    check_json_object,
    check_tags,
    check_train_args,
    write_bundle,
)
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


# NVFlare's per-site launch settings: accepted in per_site_config, no effect here (the agent
# always runs the script as one subprocess per job).
NO_EFFECT_SITE_KEYS = (
    "command",
    "launch_external_process",
    "launch_once",
    "launch_timeout",
    "shutdown_timeout",
    "server_expected_format",
    "memory_gc_rounds",
    "cuda_empty_cache",
)
DEFAULT_EXPORT_DIR = "./fl_job"


def export_arguments(argv: Sequence[str]) -> tuple[bool, str]:
    """``(--export given, --export-dir or ./fl_job)`` from a job script's command line,
    without touching its other arguments (NVFlare's ``execute`` peeks the same way)."""
    export, export_dir = False, DEFAULT_EXPORT_DIR
    for index, arg in enumerate(argv):
        if arg == "--export":
            export = True
        elif arg == "--export-dir" and index + 1 < len(argv):
            export_dir = argv[index + 1]
        elif arg.startswith("--export-dir="):
            export_dir = arg.split("=", 1)[1]
    return export, export_dir


def refuse_per_client(method: str, clients: Iterable[str] | None) -> None:
    if clients is not None:
        raise FieldError(
            "clients",
            f"{method}() applies to every site here; give each site its own arguments with "
            "set_per_site_config",
        )


def existing_path(field: str, path: str | Path) -> Path:
    if not isinstance(path, str | Path):
        raise TypeError(f"{field} must be a str, got {type(path).__name__}")
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        raise FieldError(field, f"{path!s} does not exist ({resolved})")
    return resolved


def set_per_site_config(recipe: Recipe, config: Mapping[str, Mapping[str, Any]]) -> None:
    """NVFlare's ``nvflare.recipe.utils.set_per_site_config``: ``recipe.set_per_site_config``."""
    recipe.set_per_site_config(config)


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
        # Filled by set_per_site_config / add_client_config / add_experiment_tracking /
        # add_client_file / add_server_file.
        self.site_args: dict[str, str] = {}
        self.client_config: dict[str, Any] = {}
        self.experiment_tracking: list[dict[str, Any]] = []
        self.experiment = ""  # set_labels
        self.tags: tuple[str, ...] = ()
        self.client_files: list[Path] = []
        self.server_files: list[Path] = []
        # NVFlare's save_filename and best_model_filename (the PyTorch recipes set them).
        self.model_file_names: tuple[str | None, str | None] = (None, None)

    @property
    def min_clients(self) -> int:
        return self.workflow.min_clients

    def spec(self) -> dict[str, Any]:
        return build_spec(
            name=self.name,
            workflow=self.workflow,
            train_script=self.train_script.name,
            train_args=self.train_args,
            site_args=self.site_args,
            client_config=self.client_config,
            experiment_tracking=self.experiment_tracking,
            experiment=self.experiment,
            tags=self.tags,
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
            client_files=self.client_files,
            server_files=self.server_files,
        )

    def run(self, env: Env, **_exec_params: Any) -> Run:
        """Run the job in ``env`` (``SimEnv``, ``PocEnv``, ``ProdEnv``) and return its ``Run``.
        NVFlare's ``server_exec_params`` / ``client_exec_params`` are accepted and unused."""
        return env.run(self)

    def execute(self, env: Env, **exec_params: Any) -> Run:
        """Run the job in ``env`` and return its ``Run``; or, when the command line of
        ``python job.py`` has ``--export`` (and ``--export-dir DIR``, default ``./fl_job``),
        write the job bundle there and exit 0, as NVFlare's ``execute`` does. Other command
        line arguments are left to the job's own parser."""
        export, export_dir = export_arguments(sys.argv[1:])
        if export:
            self.export(job_dir=export_dir)
            print(f"Job exported to: {export_dir}")
            # The portal's dashboard takes the bundle as one zip (Submit a job → Upload).
            print(f"To upload it in the dashboard: python -m zipfile -c job.zip {export_dir}/")
            raise SystemExit(0)
        return self.run(env, **exec_params)

    # -- NVFlare's job customisation --------------------------------------------------------

    def set_per_site_config(self, config: Mapping[str, Mapping[str, Any]]) -> None:
        """Each named site's own settings: ``{"site-1": {"train_args": "--lr 0.1"}}``. A site
        not named runs with the recipe's ``train_args``. NVFlare's launch settings
        (``command``, ``launch_external_process``, …) are accepted with no effect; any other
        key is refused naming it. Once per recipe, as in NVFlare."""
        if self.site_args:
            raise RuntimeError("per-site config has already been applied to this recipe")
        if not isinstance(config, Mapping) or not config:
            raise FieldError("per_site_config", "must be a non-empty dict of site name to dict")
        if len(config) < self.min_clients:
            raise FieldError(
                "per_site_config",
                f"defines {len(config)} site(s), but min_clients={self.min_clients} needs "
                f"at least {self.min_clients}",
            )
        site_args: dict[str, str] = {}
        for site, site_config in config.items():
            if not isinstance(site, str) or not site:
                raise FieldError("per_site_config", f"{site!r} is not a site name")
            if not isinstance(site_config, Mapping):
                raise FieldError(
                    "per_site_config", f"{site}: must be a dict, got {type(site_config).__name__}"
                )
            unknown = sorted(set(site_config) - {"train_args", *NO_EFFECT_SITE_KEYS})
            if unknown:
                raise FieldError(
                    "per_site_config",
                    f"{site}: unknown keys {unknown}; train_args is the one that has an effect",
                )
            args = site_config.get("train_args", self.train_args)
            try:
                site_args[site] = check_train_args(args)
            except BundleError as exc:
                raise FieldError("per_site_config", f"{site}: train_args {exc.reason}") from None
        self.site_args = site_args

    def add_client_config(
        self, config: Mapping[str, Any], clients: Iterable[str] | None = None
    ) -> None:
        """Values every site's script reads with ``flare.get_config()`` (NVFlare puts them in
        ``config_fed_client.json``). JSON values only; never put secrets here."""
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        refuse_per_client("add_client_config", clients)
        merged = {**self.client_config, **config}
        self.client_config = check_json_object(merged, "client_config")

    def set_labels(self, *, experiment: str = "", tags: Iterable[str] = ()) -> None:
        """The experiment this run belongs to and its tags (as in MLflow), to group and
        compare runs on the portal; they can be changed there afterwards."""
        self.experiment = check_experiment(experiment)  # a BundleError is a FieldError
        self.tags = check_tags(list(tags))

    def add_client_file(self, file_path: str | Path, clients: Iterable[str] | None = None) -> None:
        """A file or folder shipped with the script to every site (into the app folder,
        beside the script)."""
        refuse_per_client("add_client_file", clients)
        self.client_files.append(existing_path("file_path", file_path))

    def enable_log_streaming(self, *file_names: str) -> None:
        """NVFlare streams the named client log files to the server when asked. Here every
        site's agent always streams what the script prints to the job's log on the portal
        (and SimEnv keeps it in ``sites/<site>/log.txt``), as far as the site's own policy
        lets it: there is nothing to switch on. The names are checked; no other file is
        read."""
        for name in file_names:
            if not isinstance(name, str) or not name or "/" in name:
                raise FieldError("file_names", f"{name!r} is not a log file's base name")

    def add_server_file(self, file_path: str | Path) -> None:
        """A file or folder kept in the job bundle's ``server/`` folder. No code runs on the
        server here (workflows are built in), so nothing reads it: it travels with the job
        for the record, as NVFlare's server custom folder would."""
        self.server_files.append(existing_path("file_path", file_path))
