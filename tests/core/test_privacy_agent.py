"""The site's privacy policy as the agent applies it: the release of a round's result
(``client_agent.privacy.release``), the runner's rounds under a policy (declined, enforced,
sent again as the same bytes), what stays at the site, and the ``policy`` commands."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from client_agent import cli
from client_agent.agent import Agent, JobRunner
from client_agent.config import PRIVACY_META_KEY
from client_agent.fl_model import FLModel, ParamsType
from client_agent.portal import PortalUnreachable
from client_agent.privacy import accounting
from client_agent.privacy.enforce import PrivacyRefusal
from client_agent.privacy.ledger import PrivacyLedger
from client_agent.privacy.policy import BUDGET_EXHAUSTED, POLICY_FILE, PrivacyPolicy
from client_agent.privacy.release import (
    DECLINED_BY_POLICY,
    enforced_path,
    release_result,
    round_refusal,
)
from client_agent.runtime import ScriptFailed
from client_agent.site_dir import SiteDir
from client_agent.wire import load_state_dict, read_model_file, save_state_dict, write_model_file
from tests.core.test_agent_cli import Sent
from tests.core.test_agent_runner import TASK
from tests.site_folders import enrolled_folder

GLOBAL = {
    "conv.weight": torch.zeros(4, 3),
    "conv.bias": torch.zeros(4),
    "steps": torch.tensor(7, dtype=torch.int64),
}
STRICT = PrivacyPolicy(
    clip_norm=1.0,
    noise_multiplier=1.1,
    exclude_tensors=("*.bias",),
    max_epsilon=8.0,
    submitters=("alice",),
)


def write_result(path: Path, *, scale: float = 50.0, params: bool = True) -> Path:
    """A script's answer: an update far over any clip (every weight moved by ``scale``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model = FLModel(
        params={
            "conv.weight": torch.full((4, 3), scale),
            "conv.bias": torch.full((4,), scale),
            "steps": torch.tensor(8, dtype=torch.int64),
        }
        if params
        else None,
        params_type=ParamsType.FULL,
        metrics={"accuracy": 0.9},
    )
    return write_model_file(path, model)


def global_model(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_state_dict(path, GLOBAL)


# -- the policy file ---------------------------------------------------------------------------


def test_a_policy_written_as_toml_reads_back_as_the_same_policy(tmp_path: Path) -> None:
    policy = PrivacyPolicy(
        projects=("cardiology",),
        submitters=("alice", "bob"),
        clip_norm=0.5,
        clip_scope="layer",
        noise_multiplier=1.3,
        exclude_tensors=("head.*", '*"quoted"*'),
        max_update_bytes=10_000,
        delta=1e-6,
        max_epsilon=4.0,
        max_project_epsilon=12.5,
        send_lines=False,
    )
    (tmp_path / POLICY_FILE).write_text(policy.to_toml())

    assert PrivacyPolicy.in_folder(tmp_path) == policy
    assert PrivacyPolicy().to_toml() == ""


# -- one release -------------------------------------------------------------------------------


def test_an_unclipped_update_leaves_clipped_with_its_release_counted_first(tmp_path: Path) -> None:
    policy = PrivacyPolicy(clip_norm=1.0, noise_multiplier=0.0, exclude_tensors=("*.bias",))
    ledger = PrivacyLedger.in_folder(tmp_path)
    raw = write_result(tmp_path / "updates" / "round-002.safetensors")
    model = global_model(tmp_path / "models" / "round-002.safetensors")

    released = release_result(raw, model, policy=policy, ledger=ledger, job="u-1", round=2)

    assert released.path == enforced_path(raw) != raw and not raw.exists()
    sent = read_model_file(released.path)
    assert sent.params is not None and sorted(sent.params) == ["conv.weight", "steps"]
    delta = sent.params["conv.weight"] - GLOBAL["conv.weight"]
    assert float(torch.linalg.vector_norm(delta)) <= 1.0
    assert sent.params["steps"].item() == 7  # an integer tensor leaves unchanged
    assert sent.meta[PRIVACY_META_KEY]["excluded"] == ["conv.bias"]
    assert sent.meta[PRIVACY_META_KEY]["releases"] == 1
    assert [r.round for r in PrivacyLedger.in_folder(tmp_path).releases("u-1")] == [2]


def test_without_clipping_or_exclusions_the_scripts_file_leaves_as_it_is(tmp_path: Path) -> None:
    ledger = PrivacyLedger.in_folder(tmp_path)
    raw = write_result(tmp_path / "round-000.safetensors")
    before = raw.read_bytes()

    released = release_result(
        raw, tmp_path / "absent", policy=PrivacyPolicy(), ledger=ledger, job="u-1", round=0
    )

    assert released.path == raw and raw.read_bytes() == before
    assert released.enforcement is None and not ledger.path.exists()


def test_a_validate_answer_is_not_counted_as_a_release(tmp_path: Path) -> None:
    ledger = PrivacyLedger.in_folder(tmp_path)
    raw = write_result(tmp_path / "round-001.safetensors", params=False)
    model = global_model(tmp_path / "model.safetensors")

    released = release_result(raw, model, policy=STRICT, ledger=ledger, job="u-1", round=1)

    assert read_model_file(released.path).metrics == {"accuracy": 0.9}
    assert ledger.releases("u-1") == []


def test_an_update_over_the_size_limit_is_refused_naming_both_sizes(tmp_path: Path) -> None:
    policy = PrivacyPolicy(clip_norm=1.0, max_update_bytes=100)
    raw = write_result(tmp_path / "round-000.safetensors")
    model = global_model(tmp_path / "model.safetensors")

    with pytest.raises(PrivacyRefusal) as refused:
        release_result(
            raw, model, policy=policy, ledger=PrivacyLedger.in_folder(tmp_path), job="u", round=0
        )

    assert (
        "over the 100 bytes" in refused.value.reason and "max_update_bytes" in refused.value.reason
    )
    size = refused.value.reason.split(" bytes")[0].rsplit(" ", 1)[1]
    assert int(size.replace(",", "")) > 100
    assert not enforced_path(raw).exists()


def test_a_round_past_the_budget_is_declined_and_a_job_the_policy_refuses_too(
    tmp_path: Path,
) -> None:
    ledger = PrivacyLedger.in_folder(tmp_path)
    fit = accounting.steps_within(8.0, 1.1, STRICT.delta)
    for number in range(fit):
        assert round_refusal(STRICT, ledger, job="u-1", task_name="train") is None
        ledger.record("u-1", round=number, policy=STRICT)

    declined = round_refusal(STRICT, ledger, job="u-1", task_name="train")
    assert declined is not None and declined.startswith(BUDGET_EXHAUSTED)
    # Metrics alone are not a release the accountant counts.
    assert round_refusal(STRICT, ledger, job="u-1", task_name="validate") is None
    refused = round_refusal(
        STRICT, ledger, job="u-2", task_name="validate", project="p", submitter="mallory"
    )
    assert refused is not None and refused.startswith(DECLINED_BY_POLICY)
    assert "alice" in refused and "mallory" in refused


# -- the runner --------------------------------------------------------------------------------


def runner_with(tmp_path: Path, policy: PrivacyPolicy, **job: Any) -> JobRunner:
    folder = SiteDir(tmp_path / "site")
    if not folder.is_enrolled():
        folder = enrolled_folder(tmp_path / "site")
    if policy.to_toml():
        (folder.path / POLICY_FILE).write_text(policy.to_toml())
    agent = Agent(folder, python="/nonexistent/python", say=lambda _: None)
    listing = {
        "uid": "u-1",
        "name": "job",
        "num_rounds": 5,
        "spec_url": "/spec/",
        "bundle_url": "/bundle/",
        **job,
    }
    return JobRunner(agent, listing)


class Portal:
    """The calls a runner makes, answered from the test: updates (their bytes), statuses."""

    def __init__(self, runner: JobRunner, monkeypatch: pytest.MonkeyPatch) -> None:
        self.uploads: list[bytes] = []
        self.posted: list[tuple[str, dict[str, Any]]] = []
        self.trained: list[int] = []
        self.unreachable = 0
        monkeypatch.setattr(runner, "_prepare", lambda: None)

        async def fetch_model(task: dict[str, Any], number: int) -> Path:
            return global_model(runner.workspace / "models" / f"round-{number:03d}.safetensors")

        async def train(task: dict[str, Any], number: int, model_path: Path) -> Path:
            self.trained.append(number)
            return write_result(runner._result_path(number))

        async def no_points() -> None:
            return None

        async def no_wait(seconds: float) -> None:
            return None

        def round_update(url: str, path: Path) -> None:
            self.uploads.append(path.read_bytes())
            if self.unreachable:
                self.unreachable -= 1
                raise PortalUnreachable("connection refused")

        monkeypatch.setattr(runner, "_fetch_model", fetch_model)
        monkeypatch.setattr(runner, "_train", train)
        monkeypatch.setattr(runner, "_deliver_points", no_points)
        monkeypatch.setattr(asyncio, "sleep", no_wait)
        monkeypatch.setattr(runner.agent.client, "round_update", round_update)
        monkeypatch.setattr(
            runner.agent.client, "post", lambda path, body: self.posted.append((path, body))
        )


def test_a_retried_upload_sends_the_same_enforced_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = runner_with(tmp_path, STRICT, submitter="alice")
    portal = Portal(runner, monkeypatch)
    portal.unreachable = 2

    asyncio.run(runner._round(dict(TASK)))

    assert len(portal.uploads) == 3 and len(set(portal.uploads)) == 1
    assert portal.trained == [2] and runner.finished_round == 2
    assert len(runner.agent.ledger.releases("u-1")) == 1  # one release, one spend
    assert not any((runner.workspace / "updates").iterdir())  # raw and enforced both gone


def test_after_a_restart_mid_round_the_enforced_update_is_sent_not_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The agent enforced round 2's update, then stopped before the portal took it.
    first = runner_with(tmp_path, STRICT, submitter="alice")
    model = global_model(first.workspace / "models" / "round-002.safetensors")
    raw = write_result(first._result_path(2))
    made = release_result(
        raw, model, policy=first.agent.policy, ledger=first.agent.ledger, job="u-1", round=2
    )
    enforced = made.path.read_bytes()

    again = runner_with(tmp_path, STRICT, submitter="alice")
    portal = Portal(again, monkeypatch)
    asyncio.run(again._round(dict(TASK)))

    assert portal.uploads == [enforced] and portal.trained == []
    assert len(again.agent.ledger.releases("u-1")) == 1


def test_the_round_that_would_pass_the_budget_is_declined_without_running_the_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = runner_with(tmp_path, STRICT, submitter="alice")
    portal = Portal(runner, monkeypatch)
    fit = accounting.steps_within(8.0, 1.1, STRICT.delta)
    for number in range(fit):
        asyncio.run(runner._round({**TASK, "round": number}))
    assert portal.trained == list(range(fit)) and portal.posted == []

    asyncio.run(runner._round({**TASK, "round": fit}))

    assert portal.trained == list(range(fit)) and len(portal.uploads) == fit
    ((path, body),) = portal.posted
    assert path == TASK["status_url"] and body["state"] == "failed"
    assert body["reason"].startswith(f"{BUDGET_EXHAUSTED}: one more round")
    assert body["privacy"]["releases"] == fit and body["privacy"]["max_epsilon"] == 8.0
    assert body["privacy"]["epsilon"] <= 8.0
    assert runner.finished_round == fit


def test_a_job_the_policy_refuses_is_declined_each_round_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The listing does not say who submitted it: a policy naming its submitters refuses.
    runner = runner_with(tmp_path, STRICT)
    portal = Portal(runner, monkeypatch)

    asyncio.run(runner._round(dict(TASK)))

    ((_, body),) = portal.posted
    assert body["reason"].startswith(f"{DECLINED_BY_POLICY}: ") and "alice" in body["reason"]
    assert portal.trained == [] and portal.uploads == []


def test_output_lines_stay_home_and_a_failure_says_nothing_the_script_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = runner_with(tmp_path, PrivacyPolicy(send_lines=False))
    portal = Portal(runner, monkeypatch)
    runner.workspace.mkdir(parents=True, exist_ok=True)
    (runner.workspace / "log.txt").write_text("patient 4711: glucose 9.1\n")

    async def crash(task: dict[str, Any], number: int, model_path: Path) -> Path:
        raise ScriptFailed("site-1", "broke the protocol: 'patient 4711' is not a frame")

    monkeypatch.setattr(runner, "_train", crash)

    async def scenario() -> list[Any]:
        await runner._round(dict(TASK))
        runner.flush(final=True)
        return list(runner.agent.outbox.unsent)

    queued = asyncio.run(scenario())

    ((_, body),) = portal.posted
    assert body["reason"] == "client script broke the protocol"
    reports = [runner.agent.outbox.send(i) for i in queued]
    assert reports and not any("4711" in (r or "") for r in reports)
    assert any("round 3 failed" in (r or "") for r in reports)  # the agent's own line goes


# -- the commands ------------------------------------------------------------------------------


def test_a_bad_policy_stops_the_agent_at_start_with_its_line_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = enrolled_folder(tmp_path / "site", "http://127.0.0.1:9")
    (folder.path / POLICY_FILE).write_text("[update]\nclip_norm = 1.0\nnoise_multiplier = -1\n")
    sent = Sent()

    code = cli.main(["run", "--dir", str(folder.path)], wire=sent)

    assert code == cli.EXIT_BAD_POLICY and sent == []
    error = capsys.readouterr().err
    assert f"{folder.path / POLICY_FILE}:3: update.noise_multiplier: must be ≥ 0, got -1" in error


def test_a_damaged_ledger_stops_the_agent_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = enrolled_folder(tmp_path / "site", "http://127.0.0.1:9")
    (folder.path / "privacy-ledger.json").write_text("{not json")

    assert cli.main(["run", "--dir", str(folder.path)], wire=Sent()) == cli.EXIT_BAD_POLICY
    assert "privacy-ledger.json is damaged" in capsys.readouterr().err


def test_policy_check_prints_what_the_policy_implies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / POLICY_FILE).write_text(STRICT.to_toml())

    assert cli.main(["policy", "check", "--dir", str(tmp_path), "--rounds", "1", "3"]) == 0

    out = capsys.readouterr().out
    for rounds in (1, 3):
        expected = accounting.epsilon_after(1.1, rounds, STRICT.delta)
        assert f"N={rounds:<5} ε {expected:.4g}" in out
        sigma = accounting.noise_for_epsilon(8.0, rounds, STRICT.delta)
        assert f"N={rounds:<5} noise_multiplier ≥ {sigma:.4g}" in out
    fit = accounting.steps_within(8.0, 1.1, STRICT.delta)
    assert f"ε per job 8: a new job may run {fit} round(s)" in out


def test_policy_check_refuses_a_bad_file_and_show_prints_the_spending(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / POLICY_FILE).write_text("[budget]\ndelta = 1.5\n")
    assert cli.main(["policy", "check", "--dir", str(tmp_path)]) == cli.EXIT_BAD_POLICY
    assert "privacy.toml:2: budget.delta: must be between 0 and 1" in capsys.readouterr().err

    (tmp_path / POLICY_FILE).write_text(STRICT.to_toml())
    ledger = PrivacyLedger.in_folder(tmp_path)
    ledger.record("job-a", round=0, policy=STRICT)
    ledger.record("job-b", round=0, policy=STRICT)
    assert cli.main(["policy", "show", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    one = accounting.epsilon_after(1.1, 1, STRICT.delta)
    two = accounting.epsilon_after(1.1, 2, STRICT.delta)
    assert f"job job-a: 1 release(s), ε {one:.4g} of 8" in out
    assert f"project: 2 release(s), ε {two:.4g}" in out
    assert "Script output lines" in out and PrivacyPolicy.in_folder(tmp_path).sha256 in out
    assert not math.isclose(one, two)


def test_a_noisy_release_has_the_spread_the_policy_names(tmp_path: Path) -> None:
    # σ·C per coordinate, on a seeded run (the update itself is within the clip: no scaling).
    policy = PrivacyPolicy(clip_norm=2.0, noise_multiplier=1.5)
    big = {"w": torch.zeros(200_000)}
    model = save_state_dict(tmp_path / "model.safetensors", big)
    raw = write_model_file(
        tmp_path / "round-000.safetensors", FLModel(params={"w": torch.zeros(200_000)})
    )

    released = release_result(
        raw,
        model,
        policy=policy,
        ledger=PrivacyLedger.in_folder(tmp_path),
        job="u",
        round=0,
        seed=7,
    )

    noise = load_state_dict(released.path)["w"]
    assert float(noise.std()) == pytest.approx(3.0, rel=0.01)
