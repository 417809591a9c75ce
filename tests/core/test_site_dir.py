"""The site's folder (``client_agent.site_dir``): where it is, and who may read it."""

from __future__ import annotations

from pathlib import Path

import pytest

from client_agent.site_dir import SiteDir


def test_a_relative_site_folder_is_made_absolute_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    folder = SiteDir("site")

    monkeypatch.chdir("/")
    assert folder.path == tmp_path / "site"
    assert folder.job_path("j").is_absolute() and folder.key_path.is_absolute()
