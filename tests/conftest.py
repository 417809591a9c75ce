"""Fixtures every test shares."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _fresh_throttles() -> Iterator[None]:
    """Each test starts with no request counted against any throttle (the cache holds them)."""
    from django.core.cache import cache

    cache.clear()
    yield
