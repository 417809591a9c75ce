"""App archives (the client script's folder, zipped): checked before anything is extracted.

Used by the portal when a job is submitted and by the site agent before it runs a job's
script: a site does not take the portal's word that an archive is safe to unpack. Standard
library only, so the agent need not import torch or the portal's code to use it.
"""

from __future__ import annotations

import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath

MAX_APP_BYTES = 50 * 1024 * 1024
MAX_ARCHIVE_MEMBERS = 10_000


class BundleError(ValueError):
    """A bundle that cannot run; the message names the file or field."""


def check_app_archive(archive: Path, train_script: str) -> list[str]:
    """Check an uploaded app archive (zip) before anything is stored or extracted.

    Refused, with a :class:`BundleError` naming the member: absolute paths, ``..``, links and
    other non-regular files, more than :data:`MAX_ARCHIVE_MEMBERS` members, more than
    :data:`MAX_APP_BYTES` uncompressed, and an archive without ``train_script``. Returns the
    member names.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BundleError(f"app: not a zip archive ({exc})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ARCHIVE_MEMBERS:
            raise BundleError(f"app: {len(infos)} members; at most {MAX_ARCHIVE_MEMBERS}")
        total = 0
        names: list[str] = []
        for info in infos:
            name = info.filename
            parts = PurePosixPath(name).parts
            if name.startswith(("/", "\\")) or (parts and ":" in parts[0]) or ".." in parts:
                raise BundleError(f"app: member {name!r} has an unsafe path")
            mode = info.external_attr >> 16
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise BundleError(f"app: member {name!r} is not a regular file (a link?)")
            if info.is_dir():
                continue
            total += info.file_size
            if total > MAX_APP_BYTES:
                raise BundleError(f"app: more than {MAX_APP_BYTES // 10**6} MB uncompressed")
            names.append(name)
    if train_script not in names:
        raise BundleError(f"app: train_script {train_script!r} is not in the archive")
    return names


def extract_app(archive: Path, dest: Path, train_script: str) -> Path:
    """Check, then extract an app archive into ``dest`` (created). Returns ``dest``."""
    names = check_app_archive(archive, train_script)
    dest.mkdir(parents=True)
    with zipfile.ZipFile(archive) as zf:
        for name in names:
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    return dest
