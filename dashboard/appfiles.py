"""Reading a job's app archive for people to review: the list of its files, and the text of a
small one. Read straight from the stored zip; nothing is extracted, imported or run.

Archives are checked member by member when a job is submitted, but a stored file can still be
damaged (or predate a check): every read failure becomes :class:`AppArchiveUnreadable`, which
the pages show as a message instead of failing.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from jobs.models import Job

# Larger files are listed but not shown: a reviewer reads scripts, not data or weights.
MAX_SHOWN_BYTES = 256 * 1024
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, ValueError)


class AppArchiveUnreadable(Exception):
    """The stored app archive cannot be read; the message says why."""


@dataclass(frozen=True)
class AppFile:
    name: str
    size: int

    @property
    def showable(self) -> bool:
        return self.size <= MAX_SHOWN_BYTES


@contextmanager
def _archive(job: Job) -> Iterator[zipfile.ZipFile]:
    name = job.app_archive.name
    if name is None:  # only an unsaved job's; the column is required
        raise AppArchiveUnreadable("The job has no app archive.")
    try:
        with (
            job.app_archive.storage.open(name, "rb") as fh,
            zipfile.ZipFile(fh) as zf,
        ):
            yield zf
    except (*_READ_ERRORS, NotImplementedError) as exc:
        raise AppArchiveUnreadable(f"The app archive cannot be read: {exc}") from exc


def app_files(job: Job) -> list[AppFile]:
    """The archive's files (no folders), by name."""
    with _archive(job) as zf:
        return sorted(
            (AppFile(info.filename, info.file_size) for info in zf.infolist() if not info.is_dir()),
            key=lambda f: f.name,
        )


def app_listing(job: Job) -> tuple[list[AppFile], str]:
    """The archive's files, or none and why they cannot be listed."""
    try:
        return app_files(job), ""
    except AppArchiveUnreadable as exc:
        return [], str(exc)


def app_file_text(job: Job, name: str) -> str | None:
    """The text of member ``name`` if it is a listed file, small, and UTF-8; None otherwise."""
    listed = {f.name: f for f in app_files(job)}
    found = listed.get(name)
    if found is None or not found.showable:
        return None
    with _archive(job) as zf:
        data = zf.read(name)  # at most its declared size; a CRC that lies raises
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None
