"""``bench/dashboard_pages.py`` at a tiny size: its seed makes every page it times answer 200,
and every dashboard route is either timed or named an action, so the bench cannot rot."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("eager_celery", "media")]


def _bench() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("dashboard_pages")
    finally:
        sys.path.remove(str(BENCH))


def test_every_dashboard_route_is_timed_or_named_an_action() -> None:
    bench = _bench()
    assert bench.unmeasured_routes() == []
    assert bench.stale_cases() == []
    assert "home" in bench.dashboard_routes()


def test_every_timed_page_answers_on_the_seeded_project(tmp_path: Path) -> None:
    bench = _bench()
    seeded = bench.seed(tmp_path, jobs=12, sites=6, rounds=3, compare_runs=2, compare_rounds=4)

    timings = bench.walk(seeded, runs=1)

    assert len(timings) == sum(len(cases(seeded)) for cases in bench.PAGES.values())
    assert {t.label: t.status for t in timings if t.status != 200} == {}
    assert all(t.queries > 0 for t in timings if t.label != "sign-in page (anonymous)")
