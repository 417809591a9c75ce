"""Fixtures the portal's test modules share."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.portal import jobs_api_world as jw


@pytest.fixture
def world(tmp_path: Path, media: Path, eager_celery: None) -> jw.World:
    """The jobs world (``jobs_api_world.build_world``: a project, its people and sites, a
    submitted job), with files under the test's folder and Celery tasks run inline. A module
    with a world of its own (``api_world``) declares its own ``world`` fixture."""
    return jw.build_world(tmp_path)
