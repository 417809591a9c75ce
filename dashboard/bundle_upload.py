"""A job bundle uploaded as one zip, kept between the upload and the person's confirmation.

``recipe.export(dir)`` (``python job.py --export --export-dir dir``) writes a folder:
``job.json``, ``initial_model.safetensors``, ``app/`` and maybe ``server/``. A person zips it
(its contents, or the folder itself: both are read) and uploads that one file. The upload is
read once: its parts are checked (safe member names, sizes, ``job.json`` as a spec, the model as
safetensors, the app as an app archive) and staged under ``staged/<project>/<user>/<token>/``
in the portal's storage; the preview reads them from there, and submitting hands them to
``job_submit``, which checks everything again and has the last word. A staged bundle belongs to
the person and project that uploaded it (its path holds both), is removed once submitted or
discarded, and any older than :data:`STAGED_FOR` is removed at the next upload.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from django.conf import settings
from django.core.files import File
from django.core.files.storage import default_storage
from django.utils import timezone

from client_agent.wire import WireFormatError, read_header
from common.exceptions import ValidationFailed
from fedportal.bodylimits import submission_max_bytes
from jobs.bundle import (
    APP_DIR,
    MAX_ARCHIVE_MEMBERS,
    MODEL_FILE,
    SPEC_FILE,
    BundleError,
    check_app_archive,
    check_spec,
)

STAGED = "staged"
STAGED_FOR = dt.timedelta(days=1)
MAX_SPEC_BYTES = 1024 * 1024
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_CHUNK = 1 << 20


def _refuse(reason: str) -> ValidationFailed:
    return ValidationFailed(reason, field="bundle")


def _folder(project_id: int, user_id: int, token: str) -> str:
    return f"{STAGED}/{project_id}/{user_id}/{token}"


def _bundle_prefix(names: list[str]) -> str:
    """``""`` when job.json is at the zip's root, ``"<folder>/"`` when the zip holds the bundle's
    folder; a :class:`ValidationFailed` otherwise."""
    if SPEC_FILE in names:
        return ""
    holders = [n for n in names if PurePosixPath(n).name == SPEC_FILE and n.count("/") == 1]
    if len(holders) == 1:
        return holders[0].removesuffix(SPEC_FILE)
    raise _refuse(
        f"no {SPEC_FILE} at the zip's root or in one folder: zip the folder that "
        "`python job.py --export` (recipe.export) wrote"
    )


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, out: IO[bytes], limit: int) -> None:
    """Inflate one member into ``out``, refusing more than ``limit`` bytes however much the
    member declares."""
    size = 0
    try:
        with zf.open(info) as src:
            while chunk := src.read(_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise _refuse(f"{info.filename}: more than {limit:,} bytes")
                out.write(chunk)
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError) as exc:
        raise _refuse(f"{info.filename} cannot be read: {exc}") from None


def _check_names(infos: list[zipfile.ZipInfo]) -> None:
    if len(infos) > MAX_ARCHIVE_MEMBERS + 10:
        raise _refuse(f"{len(infos)} members; at most {MAX_ARCHIVE_MEMBERS} in the app")
    for info in infos:
        parts = PurePosixPath(info.filename).parts
        if info.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            raise _refuse(f"member {info.filename!r} has an unsafe path")


def _read_spec(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> dict[str, Any]:
    if info.file_size > MAX_SPEC_BYTES:
        raise _refuse(f"{SPEC_FILE}: larger than {MAX_SPEC_BYTES:,} bytes")
    with tempfile.SpooledTemporaryFile() as buffer:
        _copy_member(zf, info, buffer, MAX_SPEC_BYTES)
        buffer.seek(0)
        try:
            spec = json.loads(buffer.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _refuse(f"{SPEC_FILE}: not valid JSON ({exc})") from None
    try:
        check_spec(spec)
    except BundleError as exc:
        raise _refuse(f"{SPEC_FILE}: {exc.field}: {exc.reason}") from None
    if not isinstance(spec, dict):  # check_spec refused it already; for the type checker
        raise _refuse(f"{SPEC_FILE}: must be a JSON object")
    return spec


def _write_app(zf: zipfile.ZipFile, app: list[zipfile.ZipInfo], prefix: str, dest: Path) -> None:
    """The members under ``<prefix>app/`` zipped again at their app-relative names, bounded by
    the app archive limit."""
    limit = int(settings.FEDPORTAL_MAX_APP_ARCHIVE_BYTES)
    declared = sum(info.file_size for info in app)
    if declared > limit:
        raise _refuse(f"{APP_DIR}/: more than {limit:,} bytes uncompressed")
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as out:
        for info in app:
            name = info.filename.removeprefix(f"{prefix}{APP_DIR}/")
            with out.open(name, "w") as member:
                _copy_member(zf, info, member, info.file_size)


def _check_model(path: Path) -> None:
    try:
        tensors, _ = read_header(path)
    except WireFormatError as exc:
        raise _refuse(f"{MODEL_FILE}: {str(exc).split(': ', 1)[-1]}") from None
    if not tensors:
        raise _refuse(f"{MODEL_FILE}: holds no tensors")


def _prune(project_id: int, user_id: int) -> None:
    """Remove this person's staged bundles older than STAGED_FOR."""
    folder = f"{STAGED}/{project_id}/{user_id}"
    try:
        tokens, _ = default_storage.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return
    cutoff = timezone.now() - STAGED_FOR
    for token in tokens:
        spec = f"{folder}/{token}/{SPEC_FILE}"
        try:
            old = default_storage.get_modified_time(spec) < cutoff
        except (FileNotFoundError, OSError):
            old = True
        if old:
            discard(project_id=project_id, user_id=user_id, token=token)


def stage(upload: IO[bytes], *, project_id: int, user_id: int) -> str:
    """Read and check an uploaded bundle zip, keep its parts, and return the token naming
    them. Refused with :class:`ValidationFailed` (field ``bundle``) naming the part at fault;
    nothing is kept then."""
    _prune(project_id, user_id)
    with tempfile.TemporaryDirectory(prefix="fedportal-bundle-") as tmp_name:
        tmp = Path(tmp_name)
        archive = tmp / "bundle.zip"
        with archive.open("wb") as out:
            size = 0
            while chunk := upload.read(_CHUNK):
                size += len(chunk)
                if size > submission_max_bytes():
                    raise _refuse(f"larger than {submission_max_bytes():,} bytes")
                out.write(chunk)
        try:
            zf = zipfile.ZipFile(archive)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise _refuse(f"not a zip archive ({exc})") from None
        with zf:
            infos = [info for info in zf.infolist() if not info.is_dir()]
            _check_names(infos)
            prefix = _bundle_prefix([info.filename for info in infos])
            by_name = {info.filename: info for info in infos}
            spec = _read_spec(zf, by_name[prefix + SPEC_FILE])
            model_info = by_name.get(prefix + MODEL_FILE)
            if model_info is None:
                raise _refuse(f"no {MODEL_FILE} beside {SPEC_FILE}")
            model = tmp / MODEL_FILE
            with model.open("wb") as out:
                _copy_member(zf, model_info, out, int(settings.FEDPORTAL_MAX_MODEL_BYTES))
            _check_model(model)
            app = [i for i in infos if i.filename.startswith(f"{prefix}{APP_DIR}/")]
            if not app:
                raise _refuse(f"no {APP_DIR}/ folder beside {SPEC_FILE}")
            app_zip = tmp / "app.zip"
            _write_app(zf, app, prefix, app_zip)
        try:
            check_app_archive(app_zip, spec["train_script"])
        except BundleError as exc:
            raise _refuse(f"{APP_DIR}/: {exc.reason}") from None
        token = secrets.token_urlsafe(16)
        folder = _folder(project_id, user_id, token)
        for name, path in ((MODEL_FILE, model), ("app.zip", app_zip)):
            with path.open("rb") as fh:
                default_storage.save(f"{folder}/{name}", File(fh))
        (tmp / SPEC_FILE).write_text(json.dumps(spec))
        with (tmp / SPEC_FILE).open("rb") as fh:
            default_storage.save(f"{folder}/{SPEC_FILE}", File(fh))
    return token


@dataclass(frozen=True)
class StagedBundle:
    """A staged bundle's parts in storage, and what its preview shows."""

    token: str
    spec: dict[str, Any]
    model_name: str
    app_name: str

    def tensors(self) -> list[tuple[str, list[int], str]]:
        """Each tensor's name, shape and dtype, from the safetensors header only."""
        with default_storage.open(self.model_name, "rb") as fh, tempfile.TemporaryDirectory() as t:
            path = Path(t) / MODEL_FILE
            with path.open("wb") as out:
                shutil.copyfileobj(fh, out)
            header, _ = read_header(path)
        return [(name, list(info["shape"]), str(info["dtype"])) for name, info in header.items()]

    def app_files(self) -> list[tuple[str, int]]:
        with default_storage.open(self.app_name, "rb") as fh, zipfile.ZipFile(fh) as zf:
            return [(i.filename, i.file_size) for i in zf.infolist() if not i.is_dir()]


def staged(*, project_id: int, user_id: int, token: str) -> StagedBundle | None:
    """The bundle ``token`` this person staged in this project, or None (never another's)."""
    if not token or len(token) > 64 or not set(token) <= _TOKEN_CHARS:
        return None
    folder = _folder(project_id, user_id, token)
    spec_name = f"{folder}/{SPEC_FILE}"
    if not default_storage.exists(spec_name):
        return None
    with default_storage.open(spec_name, "rb") as fh:
        spec = json.loads(fh.read().decode("utf-8"))
    return StagedBundle(
        token=token, spec=spec, model_name=f"{folder}/{MODEL_FILE}", app_name=f"{folder}/app.zip"
    )


def discard(*, project_id: int, user_id: int, token: str) -> None:
    folder = _folder(project_id, user_id, token)
    for name in (SPEC_FILE, MODEL_FILE, "app.zip"):
        default_storage.delete(f"{folder}/{name}")
