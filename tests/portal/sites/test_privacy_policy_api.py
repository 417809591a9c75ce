"""A site's agent reports the privacy policy it enforces: the portal checks it as the agent
checks its file, stores it, shows it on the site, audits a change, and never takes a policy,
or a spending history, that could not be enforced."""

from __future__ import annotations

from typing import Any

import pytest
from opacus.accountants import RDPAccountant

from client_agent.privacy.policy import PrivacyPolicy
from sites.models import AuditEvent
from sites.services.privacy import MAX_HISTORY_ENTRIES, MAX_SUBSAMPLED_ENTRIES
from tests.portal.api_world import ADMIN, AGENT_A, AGENT_B, MEMBER, OUTSIDER, World

pytestmark = pytest.mark.django_db

PATH = "/api/v1/agent/privacy-policy/"
REPORTED = "site.privacy_policy_reported"


def policy(sha: str = "a" * 64, **fields: Any) -> PrivacyPolicy:
    values: dict[str, Any] = {"clip_norm": 1.0, "noise_multiplier": 1.1, "max_epsilon": 8.0}
    return PrivacyPolicy(**{**values, **fields}, sha256=sha)


def report(world: World, agent: str, body: Any) -> Any:
    return world.call(agent, "POST", PATH, body)


def error(response: Any) -> tuple[int, str | None]:
    return response.status_code, response.json().get("field")


def opacus_epsilon(steps: list[tuple[float, float, int]], delta: float) -> float:
    """The accountant's ε, computed here step by step, apart from the portal's code."""
    accountant = RDPAccountant()
    for sigma, rate, count in steps:
        for _ in range(count):
            accountant.step(noise_multiplier=sigma, sample_rate=rate)
    return float(accountant.get_epsilon(delta=delta))


def test_the_agent_reports_its_policy_and_the_site_shows_it(sites_world: World) -> None:
    sent = policy()
    history = [[1.1, 1.0, 3], [2.0, 1.0, 2]]

    stored = report(sites_world, AGENT_A, {"policy": sent.to_json(), "project_history": history})

    assert stored.status_code == 200, stored.json()
    body = stored.json()
    assert body["policy"] == sent.to_json()
    assert body["project_history"] == history
    expected = opacus_epsilon([(1.1, 1.0, 3), (2.0, 1.0, 2)], sent.delta)
    assert body["project_epsilon"] == pytest.approx(expected, abs=1e-6)
    assert sites_world.call(AGENT_A, "GET", PATH).json() == body
    # The people's API shows it on the site, with the rules in words; another site's agent
    # sees its own (none reported).
    site = sites_world.call(
        MEMBER,
        "GET",
        f"/api/v1/projects/{sites_world.project.slug}/sites/{sites_world.site_a.site.pk}/",
    ).json()
    assert site["privacy_policy"] == sent.to_json()
    assert {"rule": "ε per job", "setting": "8"} in site["privacy_rules"]
    assert site["privacy_project_epsilon"] == pytest.approx(expected, abs=1e-6)
    assert sites_world.call(AGENT_B, "GET", PATH).json()["policy"] is None
    # People and anonymous callers cannot report a site's policy.
    for persona in (ADMIN, OUTSIDER, "anonymous"):
        assert report(sites_world, persona, {"policy": sent.to_json()}).status_code == 401


def test_the_report_of_an_agent_that_spent_nothing_is_taken(sites_world: World) -> None:
    # What client_agent.agent.Agent.policy_report sends for a site without a privacy.toml
    # (the default policy) or before any noisy round: no ε yet, null. It was refused (400).
    sent = PrivacyPolicy()

    stored = report(
        sites_world,
        AGENT_A,
        {"policy": sent.to_json(), "project_history": [], "project_epsilon": None},
    )

    assert stored.status_code == 200, stored.json()
    assert stored.json()["policy"] == sent.to_json()
    assert stored.json()["project_epsilon"] is None


def test_a_changed_policy_is_audited_once_per_change(sites_world: World) -> None:
    first, second = policy("a" * 64), policy("b" * 64, max_epsilon=4.0)

    for sent in (first, first, second, second):
        assert report(sites_world, AGENT_A, {"policy": sent.to_json()}).status_code == 200

    events = AuditEvent.objects.filter(action=REPORTED).order_by("created_at", "id")
    assert [e.details["sha256"] for e in events] == ["a" * 64, "b" * 64]
    assert events[1].details["previous_sha256"] == "a" * 64
    assert all(e.actor_site_id == sites_world.site_a.site.pk and e.actor is None for e in events)
    assert events[0].project_id == sites_world.project.pk


def test_a_policy_the_agent_could_not_enforce_is_refused_naming_the_field(
    sites_world: World,
) -> None:
    good = policy().to_json()
    bad_delta = {**good, "budget": {**good["budget"], "delta": 1.5}}
    negative_noise = {**good, "update": {**good["update"], "noise_multiplier": -1}}
    typo = {**good, "budget": {**good["budget"], "max_epsilonn": 3}}

    assert error(report(sites_world, AGENT_A, {"policy": bad_delta})) == (
        400,
        "policy.budget.delta",
    )
    assert error(report(sites_world, AGENT_A, {"policy": negative_noise})) == (
        400,
        "policy.update.noise_multiplier",
    )
    assert error(report(sites_world, AGENT_A, {"policy": typo})) == (
        400,
        "policy.budget.max_epsilonn",
    )
    assert error(report(sites_world, AGENT_A, {"policy": "strict"})) == (400, "policy")
    assert error(report(sites_world, AGENT_A, {})) == (400, "policy")
    sites_world.site_a.site.refresh_from_db()
    assert sites_world.site_a.site.privacy_policy is None
    assert not AuditEvent.objects.filter(action=REPORTED).exists()


@pytest.mark.parametrize(
    ("history", "field"),
    [
        ({"sigma": 1}, "project_history"),
        ([[1.0, 1.0]], "project_history[0]"),
        ([[1.0, 1.0, 1], [-1.0, 1.0, 1]], "project_history[1][0]"),
        ([[True, 1.0, 1]], "project_history[0][0]"),
        ([["1.0", 1.0, 1]], "project_history[0][0]"),
        ([[1.0, 0.0, 1]], "project_history[0][1]"),
        ([[1.0, 1.5, 1]], "project_history[0][1]"),
        ([[1.0, 1.0, 0]], "project_history[0][2]"),
        ([[1.0, 1.0, 2.5]], "project_history[0][2]"),
        ([[1.0, 1.0, 1]] * (MAX_HISTORY_ENTRIES + 1), "project_history"),
        # Each run at a sample rate below 1 costs the accountant real time.
        (
            [[1.0 + i % 2, 0.5, 1] for i in range(MAX_SUBSAMPLED_ENTRIES + 1)],
            "project_history",
        ),
    ],
)
def test_a_bad_spending_history_is_refused_naming_the_entry(
    sites_world: World, history: Any, field: str
) -> None:
    sent = {"policy": policy().to_json(), "project_history": history}

    assert error(report(sites_world, AGENT_A, sent)) == (400, field)
    sites_world.site_a.site.refresh_from_db()
    assert sites_world.site_a.site.privacy_policy is None


def test_a_policy_without_noise_has_no_finite_project_epsilon(sites_world: World) -> None:
    clip_only = policy(noise_multiplier=0.0, max_epsilon=None)

    body = report(
        sites_world, AGENT_A, {"policy": clip_only.to_json(), "project_history": [[0.0, 1.0, 2]]}
    ).json()

    # JSON has no infinity: an unbounded ε is null, and the history says why (no noise).
    assert body["project_epsilon"] is None
    assert body["project_history"] == [[0.0, 1.0, 2]]
