"""Reading a job's app archive for people to review: the list of its files, and the text of a
small one. Read straight from the stored zip; nothing is extracted, imported or run."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass

from jobs.models import Job

# Larger files are listed but not shown: a reviewer reads scripts, not data or weights.
MAX_SHOWN_BYTES = 256 * 1024


@dataclass(frozen=True)
class AppFile:
    name: str
    size: int

    @property
    def showable(self) -> bool:
        return self.size <= MAX_SHOWN_BYTES


def app_files(job: Job) -> list[AppFile]:
    """The archive's files (no folders), by name."""
    with job.app_archive.storage.open(job.app_archive.name, "rb") as fh, zipfile.ZipFile(fh) as zf:
        return sorted(
            (AppFile(info.filename, info.file_size) for info in zf.infolist() if not info.is_dir()),
            key=lambda f: f.name,
        )


def app_file_text(job: Job, name: str) -> str | None:
    """The text of member ``name`` if it is a listed file, small, and UTF-8; None otherwise."""
    listed = {f.name: f for f in app_files(job)}
    found = listed.get(name)
    if found is None or not found.showable:
        return None
    with job.app_archive.storage.open(job.app_archive.name, "rb") as fh, zipfile.ZipFile(fh) as zf:
        data = zf.read(name)
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None
