"""``bench/privacy_cost.py --quick``: every clip scope and step is timed on an enforcement
that did its work (the clip-only release is within the clip), so the bench cannot rot."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

from client_agent.privacy.policy import CLIP_SCOPES

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _bench() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("privacy_cost")
    finally:
        sys.path.remove(str(BENCH))


def test_quick_mode_times_every_scope_and_step(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _bench()

    rows = bench.main(["--quick"])

    steps = [
        "privatize: clipping",
        "privatize: clipping + noise",
        "enforce_file: in all",
        "enforce_file: reading + writing",
    ]
    assert [(r.scope, r.step) for r in rows] == [(s, step) for s in CLIP_SCOPES for step in steps]
    for row in rows:
        assert len(row.seconds) == 2
        assert all(s >= 0 for s in row.seconds)
    clipped = {r.scope: r.released_norm for r in rows if r.step == "privatize: clipping"}
    # the whole update is scaled onto the clip; per layer, no tensor passes C/√L
    assert clipped["model"] == pytest.approx(1.0, rel=1e-4)
    assert clipped["model"] <= 1.0
    assert 0 < clipped["layer"] <= 1.0
    out = capsys.readouterr().out
    assert "| clip scope | step |" in out
    assert "242,201 parameters" in out


def test_a_run_count_below_one_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _bench().main(["--runs", "0"])

    assert "--runs must be at least 1" in capsys.readouterr().err
