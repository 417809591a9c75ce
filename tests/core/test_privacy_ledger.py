"""The site's record of what it has spent (``client_agent.privacy.ledger``): written before a
release leaves, private to the site's user, kept across restarts, and the reason a round is
declined once the next one would pass a budget."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from client_agent.privacy import accounting
from client_agent.privacy.ledger import LEDGER_FILE, LedgerDamaged, PrivacyLedger
from client_agent.privacy.policy import BUDGET_EXHAUSTED, PrivacyPolicy

POLICY = PrivacyPolicy(clip_norm=1.0, noise_multiplier=1.1, max_epsilon=8.0)
DELTA = POLICY.delta


def test_record_writes_the_release_before_it_returns(tmp_path: Path) -> None:
    ledger = PrivacyLedger.in_folder(tmp_path)

    ledger.record("job-1", round=0, policy=POLICY)

    data = json.loads((tmp_path / LEDGER_FILE).read_text())
    [release] = data["jobs"]["job-1"]
    assert (release["round"], release["noise_multiplier"], release["sample_rate"]) == (0, 1.1, 1.0)
    assert release["at"]
    ledger.record("job-1", round=1, policy=POLICY)
    data = json.loads((tmp_path / LEDGER_FILE).read_text())
    assert [r["round"] for r in data["jobs"]["job-1"]] == [0, 1]


def test_the_ledger_is_readable_by_the_site_s_user_only(tmp_path: Path) -> None:
    PrivacyLedger.in_folder(tmp_path).record("job-1", round=0, policy=POLICY)

    assert stat.S_IMODE((tmp_path / LEDGER_FILE).stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [LEDGER_FILE]  # no temporary file left


def test_the_spending_survives_a_restart(tmp_path: Path) -> None:
    first = PrivacyLedger.in_folder(tmp_path)
    first.record("job-1", round=0, policy=POLICY)
    first.record("job-2", round=0, policy=POLICY)

    again = PrivacyLedger.in_folder(tmp_path)

    assert again.jobs() == ["job-1", "job-2"]
    assert again.job_history("job-1") == [(1.1, 1.0, 1)]
    assert again.releases("job-2")[0].round == 0
    assert again.report("job-1", POLICY) == first.report("job-1", POLICY)


def test_the_report_is_the_accountant_s_epsilon_of_the_job_and_the_project(
    tmp_path: Path,
) -> None:
    ledger = PrivacyLedger.in_folder(tmp_path)
    ledger.record("job-1", round=0, policy=POLICY)
    ledger.record("other", round=0, policy=POLICY)

    report = ledger.record("job-1", round=1, policy=POLICY)

    assert report == {
        "noise_multiplier": 1.1,
        "sample_rate": 1.0,
        "clip_norm": 1.0,
        "clip_scope": "model",
        "delta": DELTA,
        "releases": 2,
        "history": [[1.1, 1.0, 2]],
        "project_history": [[1.1, 1.0, 3]],
        "epsilon": accounting.epsilon_after(1.1, 2, DELTA),
        "project_epsilon": accounting.epsilon_after(1.1, 3, DELTA),
        "max_epsilon": 8.0,
        "max_project_epsilon": None,
        "policy_sha256": "",
    }
    json.dumps(report)  # travels in the result file's meta


def test_the_round_that_would_pass_the_job_budget_is_refused(tmp_path: Path) -> None:
    ledger = PrivacyLedger.in_folder(tmp_path)
    fits = accounting.steps_within(8.0, 1.1, DELTA)
    assert fits >= 1

    for round_ in range(fits):
        assert ledger.refusal("job-1", POLICY) is None
        ledger.record("job-1", round=round_, policy=POLICY)
    reason = ledger.refusal("job-1", POLICY)

    assert reason is not None and reason.startswith(BUDGET_EXHAUSTED)
    assert "this job's ε" in reason and "over the site's 8" in reason
    assert ledger.report("job-1", POLICY)["epsilon"] <= 8.0
    # another job of the project has its own budget
    assert ledger.refusal("job-2", POLICY) is None


def test_the_project_budget_counts_every_job_of_the_site(tmp_path: Path) -> None:
    policy = PrivacyPolicy(
        clip_norm=1.0, noise_multiplier=3.0, max_epsilon=8.0, max_project_epsilon=6.0
    )
    project_fits = accounting.steps_within(6.0, 3.0, DELTA)
    job_fits = accounting.steps_within(8.0, 3.0, DELTA)
    assert 2 <= project_fits < job_fits
    ledger = PrivacyLedger.in_folder(tmp_path)

    for round_ in range(project_fits):
        job = "job-1" if round_ % 2 == 0 else "job-2"
        assert ledger.refusal(job, policy) is None
        ledger.record(job, round=round_, policy=policy)

    reason = ledger.refusal("job-3", policy)
    assert reason is not None and "the project's ε" in reason
    report = ledger.report("job-3", policy)
    assert report["releases"] == 0 and report["epsilon"] == 0.0
    assert report["project_history"] == [[3.0, 1.0, project_fits]]
    assert report["project_epsilon"] == accounting.epsilon_after(3.0, project_fits, DELTA)


def test_a_policy_without_a_budget_never_refuses(tmp_path: Path) -> None:
    policy = PrivacyPolicy(clip_norm=1.0, noise_multiplier=0.5)
    ledger = PrivacyLedger.in_folder(tmp_path)
    for round_ in range(5):
        ledger.record("job-1", round=round_, policy=policy)

    assert ledger.refusal("job-1", policy) is None


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        '{"jobs": {"job-1": [{"round": 0}]}}',
        '{"jobs": {"job-1": [{"round": "x", "noise_multiplier": 1, "sample_rate": 1, "at": ""}]}}',
        "[]",
        "",
    ],
)
def test_a_damaged_ledger_stops_the_agent_and_says_not_to_delete_it(
    tmp_path: Path, content: str
) -> None:
    (tmp_path / LEDGER_FILE).write_text(content)

    with pytest.raises(LedgerDamaged) as info:
        PrivacyLedger.in_folder(tmp_path)

    message = str(info.value)
    assert str(tmp_path / LEDGER_FILE) in message
    assert "deleting it would reset the budget" in message
    assert (tmp_path / LEDGER_FILE).read_text() == content  # left as it was
