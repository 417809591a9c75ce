"""``bench/secure_aggregation.py --quick``: every protection and site count gets a row beside
plain FedAvg, both sides of every round count the same kinds of steps (a site's work to send
its update, the server's from the files to the next global model's file), every round that
was measured whole summed to plain's result within its bound, and the files went through a
temporary folder that is gone afterwards."""

from __future__ import annotations

import importlib
import math
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _bench() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("secure_aggregation")
    finally:
        sys.path.remove(str(BENCH))


def test_quick_mode_compares_every_protection_with_plain_fedavg_like_for_like(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    rows = _bench().main(["--quick"])

    by_key = {(r.model, r.sites, r.protection, r.how): r for r in rows}
    for model in ("2k", "9k"):
        for sites in (3, 5):
            kinds = {p for (m, s, p, _) in by_key if (m, s) == (model, sites)}
            assert kinds == {"plain FedAvg", "masking", "he"}, (model, sites)
    dropped = [r for r in rows if "dropped" in r.how]
    assert [(r.model, r.sites) for r in dropped] == [("2k", 5)]
    modelled = [r for r in rows if r.how.startswith("modelled")]
    assert [(r.model, r.sites, r.protection) for r in modelled] == [("9k", 5, "masking")]
    extrapolated = [r for r in rows if r.how.startswith("extrapolated")]
    assert [(r.model, r.sites) for r in extrapolated] == [("9k", 3), ("9k", 5)]

    # Like for like: a plain site writes its update file, a protected one makes its vector,
    # runs the phases and writes its protected file; the server checks the files and writes
    # the next global model on both sides, folding the files or closing from their sum.
    plain = [r for r in rows if r.protection == "plain FedAvg"]
    protected = [r for r in rows if r.protection != "plain FedAvg"]
    assert all(set(r.site_steps) == {"write"} for r in plain)
    assert all(set(r.server_steps) == {"check", "FedAvg", "write"} for r in plain)
    assert all(
        set(r.site_steps) >= {"keys", "shares", "vector", "protect", "write"} for r in protected
    )
    # HE stores the encrypted sum for the site that decrypts it; masking sums the uploads
    # and removes the masks in one pass, at the finish.
    assert all(
        set(r.server_steps) == {"keys and shares", "check", "sum", "finish", "close", "write"}
        for r in protected
        if r.protection == "he"
    )
    assert all(
        set(r.server_steps) == {"keys and shares", "check", "finish", "close", "write"}
        for r in protected
        if r.protection == "masking"
    )
    # a masking site draws its masks while its script trains: timed, off the round's path
    assert all(r.while_training_s > 0 for r in protected if r.protection == "masking")
    assert all(r.while_training_s == 0 for r in plain)
    # the site asked to finish does so (masking: each survivor reveals; HE: one decrypts)
    assert all("finish" in r.site_steps for r in protected if r.protection == "masking")
    assert all(r.site_s > 0 and r.server_s > 0 for r in rows)
    assert all(r.round_s == r.site_s + r.server_s for r in rows)
    # several rounds where asked: the best one's time, the median beside it
    repeated = [r for r in rows if "best of 2" in r.how]
    assert {(r.model, r.protection) for r in repeated} >= {
        ("2k", "plain FedAvg"),
        ("2k", "masking"),
    }
    assert all(r.median_s is not None and r.median_s >= r.round_s for r in repeated)

    # every round run whole (and HE's slice round) summed within its bound of plain's sum
    checked = [r for r in protected if r not in modelled]
    assert checked and all(r.deviation is not None and r.deviation <= 1.0 for r in checked)
    # plain's written global model is the exact mean to float32 rounding
    for r in plain:
        rounding = float(r.how.split("float32 vs exact: ")[1].rstrip(")"))
        assert rounding < 1e-6, r.how
    # the upload per parameter: float32 for plain, a ring element for masking (each a
    # safetensors file with its header), far more for HE
    assert all(4.0 < r.upload_bytes / r.params < 4.5 for r in plain)
    assert all(8.0 <= r.upload_bytes / r.params < 8.5 for r in rows if r.protection == "masking")
    assert all(r.upload_bytes / r.params > 50 for r in rows if r.protection == "he")

    out = capsys.readouterr().out
    assert (
        "| model | sites | protection | how | slowest site s | server s | site s while training "
        "| round s |" in out
    )
    assert "load average before:" in out and "load average after:" in out
    assert "2,040 float32 parameters" in out
    assert "target: masking at 2k × 5 sites within 2× plain FedAvg's round" in out
    assert ": MET, " in out or ": NOT MET, " in out
    assert "where the time goes" in out and "what dominates" in out
    assert "recovery: with 1 site dropped" in out
    # the rounds' files lay in a temporary folder, removed with them
    assert list(tmp_path.iterdir()) == []


def test_the_hello_pt_model_has_62006_parameters() -> None:
    bench = _bench()

    assert sum(math.prod(shape) for shape in bench.HELLO_PT_SHAPES.values()) == 62_006
