"""``bench/privacy_accuracy.py --quick``: every setting runs, each site's ledger stays within
the target the noise was sized for, and the table has a row per setting, so the bench
cannot rot."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

from client_agent.privacy.accounting import noise_for_epsilon

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _bench() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("privacy_accuracy")
    finally:
        sys.path.remove(str(BENCH))


def test_quick_mode_runs_every_setting_within_its_budget(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench = _bench()

    results = bench.main(["--quick"])

    assert [(r.workload, r.dp, r.target) for r in results] == [
        ("hello-pt", "none", None),
        ("hello-pt", "site-enforced", math.inf),
        ("hello-pt", "site-enforced", 8.0),
        ("non-IID digits", "none", None),
        ("non-IID digits", "site-enforced", math.inf),
        ("non-IID digits", "site-enforced", 8.0),
        (
            "hello-pt (hello-dp)",
            "record-level, in the script; SGD lr 0.05, momentum 0.9 (hello-pt's)",
            8.0,
        ),
    ]
    for result in results:
        assert 0 <= result.accuracy <= 1
    enforced = [r for r in results if r.dp == "site-enforced"]
    for result in enforced:
        assert result.clip_norm is not None and result.clip_norm > 0
        if math.isinf(result.target):
            assert result.noise_multiplier == 0 and result.spent == math.inf
        else:
            # One round: the noise that keeps one release within ε = 8, and the ledger's
            # count of that release is within it.
            assert result.noise_multiplier == noise_for_epsilon(8.0, 1, bench.DELTA)
            assert 0 < result.spent <= 8.0
    record = results[-1]
    assert record.spent is not None and 0 < record.spent <= 8.0 + 1e-6
    assert record.noise_multiplier is not None and record.noise_multiplier > 0
    out = capsys.readouterr().out
    header = "| workload | DP | target ε | ε spent | σ | C | final accuracy | s |"
    assert header in out
    table = out[out.index(header) :].splitlines()
    assert len(table) == 2 + len(results)
    assert sum("| site-enforced |" in line for line in table) == len(enforced)
