"""The site's folder (``client_agent.site_dir``): where it is, and who may read it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from client_agent import signing
from client_agent.site_dir import SiteDir
from tests.site_folders import identity

IDENTITY = identity("https://fl.example.org")


def test_a_relative_site_folder_is_made_absolute_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    folder = SiteDir("site")

    monkeypatch.chdir("/")
    assert folder.path == tmp_path / "site"
    assert folder.job_path("j").is_absolute() and folder.key_path.is_absolute()


def test_the_folder_and_every_file_of_an_enrolled_site_are_the_owners_only(
    tmp_path: Path,
) -> None:
    old = os.umask(0o022)
    try:
        folder = SiteDir(tmp_path / "sites" / "site-1")
        folder.save(IDENTITY, key=signing.generate_key(), cert_pem="cert", ca_pem="ca")
    finally:
        os.umask(old)

    assert stat.S_IMODE(folder.path.stat().st_mode) == 0o700
    for path in folder.path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert sorted(p.name for p in folder.path.iterdir()) == [
        "ca.crt",
        "site.crt",
        "site.json",
        "site.key",
    ]
    assert folder.identity() == IDENTITY
