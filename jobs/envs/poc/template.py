"""The cached set-up: a migrated SQLite database holding a PoC's project and approved sites.

``migrate`` and ``poc_setup`` are three Django start-ups on the way to the first round, so
their result is kept in ``~/.cache/fedportal`` (mode 0700), with the secrets it was made with,
under a digest of the migrations, the Django version and the list of sites, and copied into
later workspaces. The copied enrolment tokens are unused: the sites still enrol on every start,
each agent with a new key.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from client_agent.site_dir import write_private

# Enrolment tokens live 72 h (FEDPORTAL_ENROLMENT_TOKEN_TTL_HOURS): a cached set-up whose
# tokens would expire soon is made again.
TEMPLATE_MAX_AGE_SECONDS = 24 * 3600
# What a set-up is: the database, what ``poc_setup`` printed, and the secrets both were made
# with (the CA key is stored encrypted with one of them).
FILES = ("db.sqlite3", "poc_setup.json", ".ca-key", ".secret-key")


def migrations_digest(project_root: Path) -> str:
    """A digest of every migration of the project and of the Django version that applies them.

    The version comes from the installed package's metadata: PocEnv starts the portal without
    importing Django itself.
    """
    digest = hashlib.sha256()
    for path in sorted(project_root.glob("*/migrations/*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(importlib.metadata.version("Django").encode())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedportal"


class SetupTemplate:
    """The cached set-up of one list of sites, at ``<cache>/poc-<migrations>-<sites>``."""

    def __init__(self, *, project_root: Path, clients: Sequence[str]) -> None:
        self.cache = cache_dir()
        sites_key = hashlib.sha256(",".join(clients).encode()).hexdigest()[:12]
        self.path = self.cache / f"poc-{migrations_digest(project_root)}-{sites_key}"

    def fresh(self) -> bool:
        """Made, and less than a day ago."""
        made = self.path / "made"
        return made.exists() and time.time() - made.stat().st_mtime < TEMPLATE_MAX_AGE_SECONDS

    def copy_to(self, workspace: Path) -> None:
        for name in FILES:
            copy_private(self.path / name, workspace / name)

    def keep_from(self, workspace: Path) -> None:
        """Cache the set-up just made in ``workspace``. Built aside and moved in whole, so a
        PocEnv starting meanwhile never copies half a set-up."""
        self.cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.cache.chmod(0o700)
        building = Path(tempfile.mkdtemp(prefix=".poc-", dir=self.cache))
        for name in FILES:
            copy_private(workspace / name, building / name)
        (building / "made").touch()
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(OSError):  # another PocEnv made it meanwhile: keep theirs
            os.replace(building, self.path)
        shutil.rmtree(building, ignore_errors=True)


def copy_private(source: Path, dest: Path) -> None:
    """Copy ``source`` to ``dest``, which is the owner's only (0600) from the moment it exists."""
    with open(source, "rb") as src:
        write_private(dest, src.read())
