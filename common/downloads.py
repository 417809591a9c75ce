"""The name a downloaded file is given."""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def download_filename(name: str, uid: object, suffix: str) -> str:
    """``<name>-<uid><suffix>`` with every run of characters other than letters, digits, '.',
    '_' and '-' in ``name`` made one '-': safe in a Content-Disposition header and on any file
    system ("job" when nothing of ``name`` is left)."""
    stem = _UNSAFE.sub("-", name).strip("-") or "job"
    return f"{stem}-{uid}{suffix}"
