"""SimEnv with the sites' privacy policies: each simulated site releases its result as its
agent would (the same functions), so clipping, excluded tensors and the budget show in the
run's models and round records."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client_agent.config import PRIVACY_META_KEY
from client_agent.privacy import accounting
from client_agent.privacy.ledger import PrivacyLedger
from client_agent.privacy.policy import BUDGET_EXHAUSTED, PolicyError, PrivacyPolicy
from client_agent.wire import read_model_file
from jobs.envs import RunStatus, SimEnv
from jobs.recipes import FedAvgRecipe
from tests.core.test_simenv import initial_model, write_client


def run_private(
    tmp_path: Path,
    privacy_policy: object,
    *,
    num_rounds: int,
    min_clients: int = 3,
    keep_updates: bool = False,
):
    script = write_client(tmp_path / "app", num_rounds)
    recipe = FedAvgRecipe(
        name="private",
        min_clients=min_clients,
        num_rounds=num_rounds,
        model=initial_model(),
        train_script=str(script),
    )
    env = SimEnv(
        num_clients=3,
        workspace=tmp_path / "ws",
        show_progress=False,
        keep_updates=keep_updates,
        privacy_policy=privacy_policy,  # type: ignore[arg-type]
    )
    return recipe.execute(env)


def test_unclipped_updates_are_clipped_and_excluded_tensors_stay_at_the_sites(
    tmp_path: Path,
) -> None:
    # Each site moves every float weight by its number (1, 2, 3): far over the clip. Clipped
    # to norm 0.5 over w's 3 elements, each site's Δw is 0.5/√3 per element whatever its
    # number; b never leaves, so the global b does not move.
    policy = PrivacyPolicy(clip_norm=0.5, exclude_tensors=("b",))
    run = run_private(tmp_path, policy, num_rounds=1, keep_updates=True)

    assert run.status == RunStatus.COMPLETED, run.error
    step = 0.5 / 3**0.5
    final = run.global_model
    assert final is not None
    assert torch.allclose(final["w"], torch.tensor([0.0, 1.0, -2.5]) + step, atol=1e-5)
    assert torch.equal(final["b"], initial_model()["b"])
    for site in ("site-1", "site-2", "site-3"):
        folder = run.workspace / "sites" / site
        sent = read_model_file(folder / "round-000.enforced.safetensors")
        assert sent.params is not None and "b" not in sent.params
        delta = sent.params["w"] - initial_model()["w"]
        assert float(torch.linalg.vector_norm(delta)) <= 0.5
        assert sent.meta[PRIVACY_META_KEY]["excluded"] == ["b"]
        assert not (folder / "round-000.safetensors").exists()  # the raw update is gone


def test_a_site_out_of_budget_is_declined_and_the_job_completes_on_the_others(
    tmp_path: Path,
) -> None:
    tight = PrivacyPolicy(clip_norm=1.0, noise_multiplier=1.1, max_epsilon=8.0)
    fit = accounting.steps_within(8.0, 1.1, tight.delta)
    assert fit < 3  # the budget runs out within the job's rounds

    run = run_private(tmp_path, {"site-3": tight}, num_rounds=3, min_clients=2)

    assert run.status == RunStatus.COMPLETED, run.error
    for record in run.rounds[:fit]:
        assert record.accepted == ["site-1", "site-2", "site-3"]
    for record in run.rounds[fit:]:
        assert record.accepted == ["site-1", "site-2"]
        assert record.rejected["site-3"].startswith(f"{BUDGET_EXHAUSTED}: one more round")
    ledger = PrivacyLedger.in_folder(run.workspace / "sites" / "site-3")
    assert len(ledger.releases(run.job_id)) == fit
    spent = accounting.epsilon(ledger.job_history(run.job_id), tight.delta)
    assert spent <= 8.0
    assert not (run.workspace / "sites" / "site-1" / "privacy-ledger.json").exists()


def test_bad_privacy_policy_arguments_name_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="privacy_policy: no site site-9 in this env"):
        SimEnv(num_clients=2, privacy_policy={"site-9": PrivacyPolicy()}, show_progress=False)
    with pytest.raises(ValueError, match=r"privacy_policy\['site-1'\]: expected a PrivacyPolicy"):
        SimEnv(num_clients=2, privacy_policy={"site-1": 3}, show_progress=False)  # type: ignore[dict-item]
    bad = tmp_path / "privacy.toml"
    bad.write_text("[budget]\nmax_epsilon = 0\n")
    with pytest.raises(PolicyError, match=r"privacy.toml:2: budget.max_epsilon: must be > 0"):
        SimEnv(num_clients=2, privacy_policy=bad, show_progress=False)
