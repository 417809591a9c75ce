"""The job bundle: what a recipe exports and what every env runs.

A bundle is a folder (or, for upload, the same folder archived)::

    job.json                    the spec: name, workflow, its params, the script and its args
    initial_model.safetensors   the initial global weights
    app/                        the client script's folder

``SimEnv`` exports the recipe and runs the exported bundle, so a job that runs in simulation
is byte for byte the job that is uploaded to a portal.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

# The archive checks live with the agent, which runs them too; re-exported for the portal.
from client_agent.app_archive import MAX_APP_BYTES as MAX_APP_BYTES
from client_agent.app_archive import MAX_ARCHIVE_MEMBERS as MAX_ARCHIVE_MEMBERS
from client_agent.app_archive import BundleError as BundleError
from client_agent.app_archive import check_app_archive as check_app_archive
from client_agent.app_archive import extract_app as extract_app
from client_agent.wire import WireFormatError, load_state_dict, read_header, save_state_dict
from common.validators import FieldError, has_control_characters
from jobs.workflows import Workflow, workflow_from_spec

if TYPE_CHECKING:
    import torch

BUNDLE_FORMAT = 1
SPEC_FILE = "job.json"
SERVER_DIR = "server"
MODEL_FILE = "initial_model.safetensors"
APP_DIR = "app"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

# Not part of a client app: caches, version control, environments, run output.
_SKIP_DIRS = {
    "__pycache__",
    ".git",
    ".venv",
    "venv",
    "workspace",
    "workspaces",
    ".ipynb_checkpoints",
}
_SKIP_SUFFIXES = (".pyc", ".pyo")


def _app_files(source: Path, exclude: set[Path]) -> list[Path]:
    """The files of a client app: no caches, hidden files, links, run output, or ``exclude``.

    ``exclude`` holds resolved folders such as the bundle being written and a SimEnv
    workspace: a workspace inside the script's folder must not be copied into itself.
    """
    files: list[Path] = []
    for folder, dirs, names in os.walk(source, followlinks=False):
        here = Path(folder)
        dirs[:] = [
            d
            for d in dirs
            if d not in _SKIP_DIRS and not d.startswith(".") and (here / d).resolve() not in exclude
        ]
        files.extend(
            here / n
            for n in names
            if not n.startswith(".")
            and not n.endswith(_SKIP_SUFFIXES)
            and not (here / n).is_symlink()
        )
    return files


def copy_app(source: Path, dest: Path, exclude: Iterable[Path] = ()) -> None:
    """Copy a client script's folder, without caches, hidden files, links or run output."""
    source = source.resolve()
    files = _app_files(source, {dest.resolve(), *(p.resolve() for p in exclude)})
    total = sum(f.stat().st_size for f in files)
    if total > MAX_APP_BYTES:
        raise BundleError(
            "train_script",
            f"its folder {source} holds {total / 1e6:.0f} MB; the app is limited "
            f"to {MAX_APP_BYTES / 1e6:.0f} MB (keep data and checkpoints outside it)",
        )
    dest.mkdir(parents=True)
    for file in files:
        target = dest / file.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, target)


@dataclass(frozen=True)
class JobBundle:
    """A checked bundle on disk."""

    root: Path
    name: str
    workflow: Workflow
    train_script: str
    train_args: str
    site_args: Mapping[str, str] = field(default_factory=dict)
    client_config: Mapping[str, Any] = field(default_factory=dict)
    experiment_tracking: tuple[Mapping[str, Any], ...] = ()

    @property
    def spec(self) -> dict[str, Any]:
        return build_spec(
            name=self.name,
            workflow=self.workflow,
            train_script=self.train_script,
            train_args=self.train_args,
            site_args=self.site_args,
            client_config=self.client_config,
            experiment_tracking=self.experiment_tracking,
        )

    def train_args_for(self, site: str) -> str:
        """The script's arguments at ``site``: its own (``per_site_config``) or the job's."""
        return self.site_args.get(site, self.train_args)

    @property
    def model_path(self) -> Path:
        return self.root / MODEL_FILE

    @property
    def app_dir(self) -> Path:
        return self.root / APP_DIR

    @property
    def script_path(self) -> Path:
        return self.app_dir / self.train_script

    def initial_params(self) -> dict[str, torch.Tensor]:
        return load_state_dict(self.model_path)

    @classmethod
    def load(cls, root: str | Path) -> JobBundle:
        """Read and check a bundle folder; :class:`BundleError` names what is wrong."""
        root = Path(root)
        spec_path = root / SPEC_FILE
        try:
            spec = json.loads(spec_path.read_text())
        except FileNotFoundError:
            raise BundleError(SPEC_FILE, f"missing from {root}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(SPEC_FILE, f"not JSON ({exc})") from None
        checked = check_spec(spec)
        if not (root / APP_DIR / checked.train_script).is_file():
            raise BundleError(
                "train_script", f"{checked.train_script!r} is not in the bundle's app folder"
            )
        try:
            tensors, _ = read_header(root / MODEL_FILE)
        except WireFormatError as exc:
            raise BundleError(MODEL_FILE, str(exc)) from None
        if not tensors:
            raise BundleError(MODEL_FILE, "holds no tensors")
        return cls(
            root=root,
            name=checked.name,
            workflow=checked.workflow,
            train_script=checked.train_script,
            train_args=checked.train_args,
            site_args=checked.site_args,
            client_config=checked.client_config,
            experiment_tracking=checked.experiment_tracking,
        )


@dataclass(frozen=True)
class CheckedSpec:
    name: str
    workflow: Workflow
    train_script: str
    train_args: str
    site_args: Mapping[str, str] = field(default_factory=dict)
    client_config: Mapping[str, Any] = field(default_factory=dict)
    experiment_tracking: tuple[Mapping[str, Any], ...] = ()
    experiment: str = ""
    tags: tuple[str, ...] = ()


# Bounds on the spec's optional parts: a spec is read by the portal from an upload.
MAX_SITE_ARGS = 1_000
MAX_TRACKERS = 10
MAX_CONFIG_JSON = 65_536
TRACKING_TYPES = ("tensorboard", "mlflow", "wandb")
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def check_train_args(args: Any, field_name: str = "train_args") -> str:
    if not isinstance(args, str):
        raise BundleError(field_name, "must be a string")
    try:
        shlex.split(args)
    except ValueError as exc:
        raise BundleError(field_name, f"{exc} in {args!r}") from None
    return args


def check_json_object(value: Any, field_name: str) -> dict[str, Any]:
    """A JSON object of at most :data:`MAX_CONFIG_JSON` bytes."""
    if not isinstance(value, Mapping):
        raise BundleError(field_name, f"must be a JSON object, got {type(value).__name__}")
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BundleError(field_name, f"must hold JSON values only ({exc})") from None
    if len(text) > MAX_CONFIG_JSON:
        raise BundleError(field_name, f"is larger than {MAX_CONFIG_JSON} bytes as JSON")
    return dict(json.loads(text))


def check_site_args(value: Any) -> dict[str, str]:
    """``{site: train_args}``: each site's own script arguments (``per_site_config``)."""
    if not isinstance(value, Mapping) or len(value) > MAX_SITE_ARGS:
        raise BundleError("site_args", f"must be an object of at most {MAX_SITE_ARGS} sites")
    for site in value:
        if not isinstance(site, str) or not SITE_NAME.match(site):
            raise BundleError("site_args", f"{site!r} is not a site name")
    return {site: check_train_args(args, f"site_args.{site}") for site, args in value.items()}


def check_experiment_tracking(value: Any) -> tuple[dict[str, Any], ...]:
    """The trackers ``add_experiment_tracking`` added: each ``{"tracking_type",
    "tracking_config", "client_side", "server_side", "clients"}``."""
    if not isinstance(value, list) or len(value) > MAX_TRACKERS:
        raise BundleError("experiment_tracking", f"must be a list of at most {MAX_TRACKERS}")
    checked = []
    for index, tracker in enumerate(value):
        where = f"experiment_tracking[{index}]"
        if not isinstance(tracker, Mapping):
            raise BundleError(where, "must be an object")
        unknown = sorted(
            set(tracker)
            - {"tracking_type", "tracking_config", "client_side", "server_side", "clients"}
        )
        if unknown:
            raise BundleError(where, f"unknown keys {unknown}")
        kind = tracker.get("tracking_type")
        if kind not in TRACKING_TYPES:
            raise BundleError(
                f"{where}.tracking_type", f"must be one of {list(TRACKING_TYPES)}, got {kind!r}"
            )
        sides = {}
        for side, default in (("client_side", False), ("server_side", True)):
            sides[side] = tracker.get(side, default)
            if not isinstance(sides[side], bool):
                raise BundleError(f"{where}.{side}", "must be true or false")
        clients = tracker.get("clients")
        if clients is not None and (
            not isinstance(clients, list)
            or not all(isinstance(c, str) and SITE_NAME.match(c) for c in clients)
        ):
            raise BundleError(f"{where}.clients", "must be a list of site names, or null")
        checked.append(
            {
                "tracking_type": kind,
                "tracking_config": check_json_object(
                    tracker.get("tracking_config") or {}, f"{where}.tracking_config"
                ),
                **sides,
                "clients": clients,
            }
        )
    return tuple(checked)


# A job's labels, to group runs as an MLflow experiment and its tags do. A tag holds no comma
# (forms take tags comma-separated) and the number of tags is bounded, which is what lets the
# portal filter by tag with one lookup per position on any database.
MAX_EXPERIMENT_CHARS = 100
MAX_TAGS = 20
MAX_TAG_CHARS = 50


def check_experiment(value: Any, field_name: str = "experiment") -> str:
    """The experiment's name, trimmed: at most 100 characters, no control characters; "" for
    none."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BundleError(field_name, f"must be a string, got {type(value).__name__}")
    value = value.strip()
    if len(value) > MAX_EXPERIMENT_CHARS:
        raise BundleError(
            field_name, f"is {len(value)} characters long; at most {MAX_EXPERIMENT_CHARS}"
        )
    if has_control_characters(value):
        raise BundleError(field_name, "must not contain control characters")
    return str(value)


def check_tags(value: Any, field_name: str = "tags") -> tuple[str, ...]:
    """At most 20 tags, each trimmed, 1 to 50 characters without commas or control
    characters; repeats are dropped, the order kept."""
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise BundleError(field_name, f"must be a list of strings, got {type(value).__name__}")
    tags: dict[str, None] = {}
    for item in value:
        if not isinstance(item, str):
            raise BundleError(field_name, f"must hold strings only, got {type(item).__name__}")
        tag = item.strip()
        if not tag or len(tag) > MAX_TAG_CHARS:
            raise BundleError(field_name, f"{tag[:60]!r}: a tag is 1 to {MAX_TAG_CHARS} characters")
        if "," in tag or has_control_characters(tag):
            raise BundleError(field_name, f"{tag!r}: a tag holds no comma or control character")
        tags[tag] = None
    if len(tags) > MAX_TAGS:
        raise BundleError(field_name, f"{len(tags)} tags; at most {MAX_TAGS} are allowed")
    return tuple(tags)


def check_spec(spec: Any) -> CheckedSpec:
    """Check a job spec (``job.json``); :class:`BundleError` names the field that is wrong."""
    if not isinstance(spec, dict):
        raise BundleError(SPEC_FILE, "must be a JSON object")
    if spec.get("format") != BUNDLE_FORMAT:
        raise BundleError("format", f"expected {BUNDLE_FORMAT}, got {spec.get('format')!r}")
    name = spec.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise BundleError("name", f"{name!r} is not a job name (letters, digits, . _ -)")
    try:
        workflow = workflow_from_spec(str(spec.get("workflow")), spec.get("params") or {})
    except FieldError as exc:
        raise BundleError(exc.field, exc.reason) from None
    except (TypeError, ValueError) as exc:  # a workflow that names no field: its params are wrong
        raise BundleError("params", str(exc)) from None
    script = spec.get("train_script")
    if not isinstance(script, str) or not script:
        raise BundleError("train_script", "missing")
    script_rel = PurePosixPath(script)
    if script_rel.is_absolute() or ".." in script_rel.parts or "\\" in script:
        raise BundleError("train_script", f"{script!r} must be a path inside the app folder")
    return CheckedSpec(
        name=name,
        workflow=workflow,
        train_script=script,
        train_args=check_train_args(spec.get("train_args", "")),
        site_args=check_site_args(spec.get("site_args") or {}),
        client_config=check_json_object(spec.get("client_config") or {}, "client_config"),
        experiment_tracking=check_experiment_tracking(spec.get("experiment_tracking") or []),
        experiment=check_experiment(spec.get("experiment")),
        tags=check_tags(spec.get("tags")),
    )


def build_spec(
    *,
    name: str,
    workflow: Workflow,
    train_script: str,
    train_args: str,
    site_args: Mapping[str, str] | None = None,
    client_config: Mapping[str, Any] | None = None,
    experiment_tracking: Iterable[Mapping[str, Any]] = (),
    experiment: str = "",
    tags: Iterable[str] = (),
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "name": name,
        "workflow": workflow.name,
        "params": workflow.to_params(),
        "train_script": train_script,
        "train_args": train_args,
    }
    # The optional parts stay out of a spec that has none: specs read the same as before.
    if site_args:
        spec["site_args"] = dict(site_args)
    if client_config:
        spec["client_config"] = dict(client_config)
    trackers = [dict(t) for t in experiment_tracking]
    if trackers:
        spec["experiment_tracking"] = trackers
    if experiment:
        spec["experiment"] = experiment
    if tags := list(tags):
        spec["tags"] = tags
    return spec


def write_bundle(
    dest: Path,
    *,
    spec: Mapping[str, Any],
    initial_params: Mapping[str, torch.Tensor],
    app_source: Path,
    exclude: Iterable[Path] = (),
    client_files: Iterable[Path] = (),
    server_files: Iterable[Path] = (),
) -> Path:
    """Write a bundle folder at ``dest``, which must not exist yet; see :func:`copy_app`.
    ``client_files`` (files or folders) go into the app folder beside the script;
    ``server_files`` into ``server/``, kept with the job and read by nothing."""
    if dest.exists():
        raise BundleError("export", f"{dest} already exists")
    dest.mkdir(parents=True)
    try:
        copy_app(app_source, dest / APP_DIR, exclude=[dest, *exclude])
        for folder, extra in ((dest / APP_DIR, client_files), (dest / SERVER_DIR, server_files)):
            for path in extra:
                folder.mkdir(exist_ok=True)
                if path.is_dir():
                    copy_app(path, folder / path.name, exclude=[dest, *exclude])
                else:
                    shutil.copy2(path, folder / path.name)
        save_state_dict(dest / MODEL_FILE, initial_params)
        (dest / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


# --------------------------------------------------------------------------------------------
# The app folder as an archive, for upload to a portal and download by a site
# --------------------------------------------------------------------------------------------


def pack_app(app_dir: Path, archive: Path) -> Path:
    """Zip a bundle's ``app/`` folder (as written by :func:`write_bundle`) for upload."""
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(app_dir.rglob("*")):
            if path.is_file() and not path.is_symlink():
                zf.write(path, path.relative_to(app_dir).as_posix())
    return archive


def app_folder_prefix(names: Iterable[str], train_script: str) -> str:
    """Where the app's files sit in an uploaded zip: ``""`` when ``train_script`` is at its root
    (the folder's contents were zipped, as :func:`pack_app` does), ``"<folder>/"`` when every
    member is inside one folder that holds it (the folder itself was zipped, as a file
    manager's "compress" does), else ``""`` (and the check then says the script is missing)."""
    names = [n for n in names if n]
    if train_script in names:
        return ""
    tops = {PurePosixPath(n).parts[0] for n in names if PurePosixPath(n).parts}
    if len(tops) != 1:
        return ""
    prefix = f"{tops.pop()}/"
    return prefix if prefix + train_script in names else ""


def unwrap_app_archive(archive: Path, train_script: str, dest: Path) -> Path:
    """``archive`` itself when the script is at its root; when the zip holds the app's folder
    instead, that folder's contents zipped again at ``dest``, after the whole archive passed
    :func:`check_app_archive` (so nothing unsafe or oversized is read). ``BundleError``
    (field ``app``) names what is wrong."""
    try:
        with zipfile.ZipFile(archive) as zf:
            prefix = app_folder_prefix(zf.namelist(), train_script)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise BundleError("app", f"not a zip archive ({exc})") from None
    if not prefix:
        return archive
    check_app_archive(archive, prefix + train_script)
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            if info.is_dir() or not info.filename.startswith(prefix):
                continue
            with src.open(info) as member:
                out.writestr(info.filename.removeprefix(prefix), member.read())
    return dest
