"""A site folder as ``python -m client_agent enrol`` leaves it, made without a portal: for
tests of the agent's own behaviour, where nothing is sent (or sending fails at once)."""

from __future__ import annotations

from pathlib import Path

from client_agent import signing
from client_agent.site_dir import SiteDir, SiteIdentity


def identity(portal: str = "http://127.0.0.1:9") -> SiteIdentity:
    return SiteIdentity(
        portal=portal,
        site="site-1",
        project="p",
        project_name="P",
        organization="O",
        serial="1",
        fingerprint="ab" * 32,
        not_after="2030-01-01T00:00:00Z",
    )


def enrolled_folder(path: Path, portal: str = "http://127.0.0.1:9") -> SiteDir:
    folder = SiteDir(path)
    folder.save(identity(portal), key=signing.generate_key(), cert_pem="unused", ca_pem="unused")
    return folder
