"""App archives (the client script's folder, zipped): checked before anything is extracted.

Used by the portal when a job is submitted and by the site agent before it runs a job's
script: a site does not take the portal's word that an archive is safe to unpack. Standard
library only, so the agent need not import torch or the portal's code to use it.

A zip's central directory is a claim, not a fact: every member is read through, counting
what it inflates to, and checked against its declared size and CRC-32. ``zipfile`` never
yields more than a member declares, so the byte cap (:data:`MAX_APP_BYTES` over the declared
sizes) also bounds what a zip bomb can make us inflate.
"""

from __future__ import annotations

import shutil
import stat
import unicodedata
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from common.validators import FieldError

MAX_APP_BYTES = 50 * 1024 * 1024
MAX_ARCHIVE_MEMBERS = 10_000
_CHUNK = 1 << 16


class BundleError(FieldError):
    """A bundle that cannot run: ``field`` names the file or field at fault (``app`` for the
    archive), ``reason`` says why."""


def _fold(name: str) -> str:
    """The name as a case-insensitive, Unicode-normalising file system (macOS, Windows) sees
    it: two members with the same fold would be one file there."""
    return unicodedata.normalize("NFC", name).casefold()


def _members(zf: zipfile.ZipFile, train_script: str) -> list[zipfile.ZipInfo]:
    """The file members, after the checks that read only the central directory."""
    infos = zf.infolist()
    if len(infos) > MAX_ARCHIVE_MEMBERS:
        raise BundleError("app", f"{len(infos)} members; at most {MAX_ARCHIVE_MEMBERS}")
    declared = 0
    files: list[zipfile.ZipInfo] = []
    file_keys: dict[str, str] = {}
    folder_keys: dict[str, str] = {}
    for info in infos:
        name = info.filename
        parts = PurePosixPath(name).parts
        if name.startswith(("/", "\\")) or (parts and ":" in parts[0]) or ".." in parts:
            raise BundleError("app", f"member {name!r} has an unsafe path")
        mode = info.external_attr >> 16
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise BundleError("app", f"member {name!r} is not a regular file (a link?)")
        if info.is_dir():
            folder_keys.setdefault(_fold(name.rstrip("/")), name)
            continue
        key = _fold(name)
        if key in file_keys:
            other = file_keys[key]
            if other == name:
                raise BundleError("app", f"member {name!r} appears twice")
            raise BundleError(
                "app",
                f"members {other!r} and {name!r} differ only in case or Unicode form; "
                "they would be one file on some systems",
            )
        file_keys[key] = name
        for parent in list(PurePosixPath(name).parents)[:-1]:
            folder_keys.setdefault(_fold(parent.as_posix()), parent.as_posix())
        declared += info.file_size
        if declared > MAX_APP_BYTES:
            raise BundleError("app", f"more than {MAX_APP_BYTES // 10**6} MB uncompressed")
        files.append(info)
    for key, name in file_keys.items():
        if key in folder_keys:
            raise BundleError(
                "app",
                f"member {name!r} is a file, and {folder_keys[key]!r} a folder, of the "
                "same name on some systems",
            )
    if train_script not in {info.filename for info in files}:
        raise BundleError("app", f"train_script {train_script!r} is not in the archive")
    return files


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, out: BinaryIO | None) -> int:
    """Inflate one member (into ``out``, if given), checking what it declares; its size."""
    size = 0
    try:
        with zf.open(info) as src:  # checks the CRC-32 when the member's data ends
            while chunk := src.read(_CHUNK):
                size += len(chunk)
                if size > info.file_size:
                    break
                if out is not None:
                    out.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError) as exc:
        # RuntimeError: encrypted; NotImplementedError: a compression zipfile cannot read.
        raise BundleError("app", f"member {info.filename!r} cannot be read: {exc}") from None
    if size != info.file_size:
        raise BundleError(
            "app",
            f"member {info.filename!r} declares {info.file_size} bytes but holds "
            f"{'more' if size > info.file_size else size}",
        )
    return size


def _open(archive: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise BundleError("app", f"not a zip archive ({exc})") from None


def check_app_archive(archive: Path, train_script: str) -> list[str]:
    """Check an uploaded app archive (zip) before anything is stored or extracted.

    Refused, with a :class:`BundleError` naming the member: absolute paths, ``..``, links and
    other non-regular files, more than :data:`MAX_ARCHIVE_MEMBERS` members, more than
    :data:`MAX_APP_BYTES` uncompressed, two names that would be one file on a case-insensitive
    or Unicode-normalising file system, a member whose data does not match its declared size
    or CRC-32 (or cannot be read: encrypted, an unknown compression), and an archive without
    ``train_script``. Returns the member names.
    """
    with _open(archive) as zf:
        files = _members(zf, train_script)
        for info in files:
            _read_member(zf, info, None)
    return [info.filename for info in files]


def extract_app(archive: Path, dest: Path, train_script: str) -> Path:
    """Check, then extract an app archive into ``dest`` (created), verifying every member as
    it is written; on any fault ``dest`` is removed and :class:`BundleError` raised."""
    with _open(archive) as zf:
        files = _members(zf, train_script)
        dest.mkdir(parents=True)
        try:
            for info in files:
                target = dest / info.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as out:
                    _read_member(zf, info, out)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
    return dest
