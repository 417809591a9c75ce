"""Fixtures every test shares."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pytest_django.fixtures import Settings


@pytest.fixture(autouse=True)
def _fresh_throttles() -> Iterator[None]:
    """Each test starts with no request counted against any throttle, and with nothing else
    the cache holds (verified certificates, nonces, heartbeat writes)."""
    from django.core.cache import cache

    cache.clear()
    yield


@pytest.fixture
def eager_celery() -> Iterator[None]:
    """Celery tasks run inline, in the test's process and transaction: a job moves on as far
    as it can at once (what a worker would do, step by step)."""
    from fedportal.celery import app

    app.conf.task_always_eager = True
    yield
    app.conf.task_always_eager = False


@pytest.fixture
def media(settings: Settings, tmp_path: Path) -> Path:
    """File storage (models, bundles, updates) in the test's own folder."""
    settings.MEDIA_ROOT = tmp_path / "media"
    return Path(settings.MEDIA_ROOT)
