"""PocEnv with the sites' privacy policies: each policy is written into its site's folder, and
the real agents enforce it against the real portal. A site out of budget declines the round
that would pass it and the job completes on the others; a site that keeps a tensor and its
output lines home sends neither (its wire log)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from client_agent.privacy import accounting
from client_agent.privacy.policy import BUDGET_EXHAUSTED, POLICY_FILE, PrivacyPolicy
from jobs.envs import PocEnv, RunStatus
from jobs.envs.poc.env import _redis_answers
from tests.e2e.test_poc_env import CANARY, SCRIPT, prod, recipe

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not _redis_answers("redis://127.0.0.1:6379/0"),
        reason="needs Redis at 127.0.0.1:6379 (make test and CI start one)",
    ),
]

SITES = ["site-1", "site-2", "site-3"]
HOME = PrivacyPolicy(
    clip_norm=1.0, noise_multiplier=0.8, exclude_tensors=("bias",), send_lines=False
)
TIGHT = PrivacyPolicy(clip_norm=1.0, noise_multiplier=1.1, max_epsilon=8.0)


def test_a_site_out_of_budget_declines_and_a_site_keeps_a_tensor_and_its_lines_home(
    tmp_path: Path,
) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "client.py").write_text(SCRIPT)
    (app / "private.txt").write_text(CANARY)
    fit = accounting.steps_within(8.0, 1.1, TIGHT.delta)
    assert fit < 3
    poc = PocEnv(
        clients=SITES,
        workspace=tmp_path / "poc",
        redis_db=3,
        round_timeout_seconds=30,
        show_progress=False,
        wire_log=True,
        privacy_policy={"site-1": HOME, "site-3": TIGHT},
    )
    with poc.start():
        assert PrivacyPolicy.in_folder(poc.site_dir("site-3")) == TIGHT
        assert not (poc.site_dir("site-2") / POLICY_FILE).exists()
        run = recipe(app, rounds=3, min_clients=2).execute(prod(poc))

    assert run.status == RunStatus.COMPLETED, run.error
    assert [r.round for r in run.rounds] == [0, 1, 2]
    for record in run.rounds[:fit]:
        assert "site-3" in record.accepted, record
    for record in run.rounds[fit:]:
        assert record.accepted == ["site-1", "site-2"]
        assert record.rejected["site-3"].startswith(BUDGET_EXHAUSTED), record
    assert run.global_model is not None

    sent = [json.loads(line) for line in (poc.site_dir("site-1") / "wire.jsonl").open()]
    updates = [e["safetensors"] for e in sent if "safetensors" in e]
    assert len(updates) == 3 and all(set(u) == {"weight"} for u in updates)
    socket_lines = [
        line
        for e in sent
        if e["channel"] == "ws" and "lines" in e.get("json", {})
        for line in e["json"]["lines"]
    ]
    assert socket_lines and all(line["stream"] == "agent" for line in socket_lines)
    assert not any("done" in json.dumps(e) for e in sent if e["channel"] == "ws")
    declined = [
        e["json"]
        for e in (json.loads(x) for x in (poc.site_dir("site-3") / "wire.jsonl").open())
        if e["method"] == "POST" and e["path"].endswith("/status/")
    ]
    assert len(declined) == 3 - fit
    assert all(d["privacy"]["releases"] == fit for d in declined)
    assert torch.isfinite(run.global_model["weight"]).all()
