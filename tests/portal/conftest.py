"""Fixtures the portal's test modules share: the two worlds they run in (``api_world``'s for
the sites API, ``jobs_api_world``'s for jobs), each under its own name."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.portal import api_world as sw
from tests.portal import jobs_api_world as jw


@pytest.fixture
def sites_world() -> sw.World:
    """The sites API world (``api_world.build_world``): projects P and Q, their organisations,
    people with API tokens, and sites in each state."""
    return sw.build_world()


@pytest.fixture
def jobs_world(tmp_path: Path, media: Path, eager_celery: None) -> jw.World:
    """The jobs world (``jobs_api_world.build_world``: a project, its people and sites, a
    submitted job), with files under the test's folder and Celery tasks run inline."""
    return jw.build_world(tmp_path)
