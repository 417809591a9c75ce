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
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

# The archive checks live with the agent, which runs them too; re-exported for the portal.
from client_agent.app_archive import MAX_APP_BYTES as MAX_APP_BYTES
from client_agent.app_archive import MAX_ARCHIVE_MEMBERS as MAX_ARCHIVE_MEMBERS
from client_agent.app_archive import BundleError as BundleError
from client_agent.app_archive import check_app_archive as check_app_archive
from client_agent.app_archive import extract_app as extract_app
from client_agent.wire import WireFormatError, load_state_dict, read_header, save_state_dict
from common.validators import FieldError
from jobs.workflows import Workflow, workflow_from_spec

if TYPE_CHECKING:
    import torch

BUNDLE_FORMAT = 1
SPEC_FILE = "job.json"
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

    @property
    def spec(self) -> dict[str, Any]:
        return build_spec(
            name=self.name,
            workflow=self.workflow,
            train_script=self.train_script,
            train_args=self.train_args,
        )

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
        )


@dataclass(frozen=True)
class CheckedSpec:
    name: str
    workflow: Workflow
    train_script: str
    train_args: str


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
    args = spec.get("train_args", "")
    if not isinstance(args, str):
        raise BundleError("train_args", "must be a string")
    try:
        shlex.split(args)
    except ValueError as exc:
        raise BundleError("train_args", str(exc)) from None
    return CheckedSpec(name=name, workflow=workflow, train_script=script, train_args=args)


def build_spec(
    *, name: str, workflow: Workflow, train_script: str, train_args: str
) -> dict[str, Any]:
    return {
        "format": BUNDLE_FORMAT,
        "name": name,
        "workflow": workflow.name,
        "params": workflow.to_params(),
        "train_script": train_script,
        "train_args": train_args,
    }


def write_bundle(
    dest: Path,
    *,
    spec: Mapping[str, Any],
    initial_params: Mapping[str, torch.Tensor],
    app_source: Path,
    exclude: Iterable[Path] = (),
) -> Path:
    """Write a bundle folder at ``dest``, which must not exist yet; see :func:`copy_app`."""
    if dest.exists():
        raise BundleError("export", f"{dest} already exists")
    dest.mkdir(parents=True)
    try:
        copy_app(app_source, dest / APP_DIR, exclude=[dest, *exclude])
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
