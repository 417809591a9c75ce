"""What the dashboard shows of a site's privacy policy and its privacy budget: the policy as the
site's agent reported it, ε spent of what the site allows (a budget bar), what a job waiting
for a decision is expected to spend there, and a job's server-side (ε, δ).

The numbers come from the site (``Site.privacy_*``, the ledger reports stored on
``JobSite.privacy``) and from ``jobs.selectors``; this module only puts them in words. The
portal shows the policy and never changes it: only the site admin does, in the site's
``privacy.toml``.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from client_agent.privacy.policy import JobAssessment, PrivacyPolicy
from common.rounds import round_for_people
from jobs import selectors
from jobs.models import JobSite, Round
from jobs.selectors import JobPrivacySpend
from sites import selectors as site_selectors
from sites.models import Site

EPSILON_METRIC = "privacy/epsilon"
DELTA_METRIC = "privacy/delta"
SHA_SHOWN = 12


def epsilon_text(value: float | None) -> str:
    """ε as people read it: one decimal from 1 up, two significant digits below, ∞ for a
    release without noise."""
    if value is None:
        return "—"
    if math.isinf(value):
        return "∞"
    return f"{value:.1f}" if value >= 1 else f"{value:.2g}"


def _number(value: Any) -> float | None:
    """A number from stored JSON (a round's metrics), None for anything else."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


@dataclass(frozen=True)
class Budget:
    """ε spent of what is allowed. ``spent`` None: nothing is accounted (updates leave without
    noise); ``allowed`` None: the site sets no cap."""

    spent: float | None
    allowed: float | None

    @property
    def text(self) -> str:
        if self.spent is None:
            return "no ε accounted"
        if self.allowed is None:
            return f"ε {epsilon_text(self.spent)} (no cap)"
        return f"ε {epsilon_text(self.spent)} of {epsilon_text(self.allowed)}"

    @property
    def has_bar(self) -> bool:
        return self.spent is not None and self.allowed is not None and not math.isinf(self.spent)

    @property
    def value(self) -> str:
        """The ``<meter>``'s value, exact (the text rounds it)."""
        return repr(self.spent) if self.spent is not None else "0"

    @property
    def high(self) -> str:
        """Where the meter turns to "nearly spent": 80 % of the cap."""
        return repr(0.8 * self.allowed) if self.allowed is not None else "0"

    @property
    def maximum(self) -> str:
        return repr(self.allowed) if self.allowed is not None else "0"

    @property
    def over(self) -> bool:
        return self.spent is not None and self.allowed is not None and self.spent > self.allowed


@dataclass(frozen=True)
class SitePrivacyPolicy:
    """The privacy policy a site's agent reported (``policy`` None: none), in words."""

    policy: PrivacyPolicy | None
    reported_at: dt.datetime | None

    @property
    def rows(self) -> list[tuple[str, str]]:
        return self.policy.describe() if self.policy is not None else []

    @property
    def sha256(self) -> str:
        return self.policy.sha256 if self.policy is not None else ""

    @property
    def sha256_short(self) -> str:
        return self.sha256[:SHA_SHOWN]


def site_privacy_policy(site: Site) -> SitePrivacyPolicy:
    return SitePrivacyPolicy(
        policy=site_selectors.site_privacy_policy(site),
        reported_at=site.privacy_policy_reported_at,
    )


@dataclass(frozen=True)
class JobSpend:
    """What one job spent at one site: its ε of the site's per-job cap, and how many of its
    tensors the site kept."""

    link: JobSite
    budget: Budget
    releases: int
    excluded: int


def job_spend(spend: JobPrivacySpend) -> JobSpend:
    """The site's latest ledger report for the job (``jobs.selectors.privacy_spend_of``) in
    words. Clipping without noise is no differential privacy: its ε is unbounded."""
    epsilon = spend.epsilon
    if epsilon is None and spend.noise_multiplier == 0 and spend.link.privacy.get("clip_norm"):
        epsilon = math.inf
    return JobSpend(
        link=spend.link,
        budget=Budget(spent=epsilon, allowed=spend.max_epsilon),
        releases=spend.releases,
        excluded=len(spend.excluded),
    )


def link_spend(link: JobSite) -> JobSpend | None:
    """:func:`job_spend` of ``link``, None when its site reported no spend for the job."""
    spend = selectors.privacy_spend_of(link)
    return job_spend(spend) if spend is not None else None


@dataclass(frozen=True)
class SiteBudget:
    """A site's privacy budget page section: each job that spent there, and the project's
    total against the site's per-project cap."""

    jobs: list[JobSpend]
    project: Budget | None


def project_budget(site: Site) -> Budget | None:
    """What the project's jobs together spent at ``site``, of the site's per-project cap;
    None when there is neither a spend nor a cap."""
    policy = site_selectors.site_privacy_policy(site)
    spent = site.privacy_project_epsilon
    cap = policy.max_project_epsilon if policy is not None else None
    if spent is None and cap is not None:
        spent = 0.0  # a cap needs noise, so nothing reported yet is nothing spent yet
    return None if spent is None and cap is None else Budget(spent=spent, allowed=cap)


def site_budget(site: Site) -> SiteBudget:
    jobs = [job_spend(spend) for spend in selectors.site_privacy_spend(site)]
    return SiteBudget(jobs=jobs, project=project_budget(site))


@dataclass(frozen=True)
class Expectation:
    """What a job waiting for a decision would spend at a site, in sentences. ``reported``
    False: the site's agent never reported a policy, so nothing can be said."""

    reported: bool
    refused: str = ""
    spend: str = ""
    partial: str = ""
    short: str = ""
    """One line for the approvals table."""


def expectation(assessment: JobAssessment | None, policy: PrivacyPolicy | None) -> Expectation:
    """``assessment`` (``jobs.selectors.job_privacy_expectation``) in the words of the approval
    pages; ``policy`` is the site's reported policy, for its cap."""
    if assessment is None or policy is None:
        return Expectation(reported=False, short="no privacy policy reported")
    cap = policy.max_epsilon
    if assessment.refused:
        return Expectation(
            reported=True,
            refused=assessment.refused,
            short=f"refused by the site's privacy policy: {assessment.refused}",
        )
    if assessment.expected_epsilon is None:
        return Expectation(
            reported=True,
            spend="The site's policy neither clips nor noises updates: this job's updates "
            "leave without differential privacy, and no ε is accounted.",
            short="no ε accounted",
        )
    if math.isinf(assessment.expected_epsilon):
        return Expectation(
            reported=True,
            spend="The site's policy clips updates but adds no noise: this job's ε there is "
            "unbounded (∞).",
            short="ε ∞ (no noise)",
        )
    expected = epsilon_text(assessment.expected_epsilon)
    of_cap = f"of your {epsilon_text(cap)}" if cap is not None else "(the site sets no cap)"
    partial = ""
    if assessment.partial and assessment.rounds_within is not None:
        partial = (
            f"Only {assessment.rounds_within} of {assessment.rounds} rounds fit this site's "
            "budget; later rounds will be declined."
        )
    short = f"ε ≈ {expected}" + (f" of {epsilon_text(cap)}" if cap is not None else "")
    if partial:
        short += f"; {assessment.rounds_within} of {assessment.rounds} rounds fit"
    return Expectation(
        reported=True,
        spend=f"This job will spend about ε = {expected} {of_cap}.",
        partial=partial,
        short=short,
    )


def link_expectation(link: JobSite) -> Expectation:
    """What ``link``'s job would spend at its site, by the site's reported policy."""
    return expectation(
        selectors.job_privacy_expectation(link), site_selectors.site_privacy_policy(link.site)
    )


def link_expectations(links: Iterable[JobSite]) -> dict[int, Expectation]:
    """:func:`link_expectation` of each link, by the link's id. The accountant takes tens of
    milliseconds a job, and what it says depends only on the site and the job's project,
    submitter and rounds: a page of decisions asks it once for each such combination."""
    seen: dict[tuple[int, int, int | None, int], Expectation] = {}
    found: dict[int, Expectation] = {}
    for link in links:
        job = link.job
        key = (link.site_id, job.project_id, job.submitted_by_id, job.num_rounds)
        if key not in seen:
            seen[key] = link_expectation(link)
        found[link.pk] = seen[key]
    return found


@dataclass(frozen=True)
class ServerPrivacy:
    """A job's server-side differential privacy after its latest round that reported it."""

    round: int
    epsilon: float
    delta: float | None

    @property
    def text(self) -> str:
        delta = f"{self.delta:g}" if self.delta is not None else "—"
        return (
            f"Server-side DP: (ε, δ) after round {self.round} = "
            f"({epsilon_text(self.epsilon)}, {delta})"
        )


def server_privacy(rounds: Iterable[Round]) -> ServerPrivacy | None:
    """The (ε, δ) the aggregator's accountant recorded with the latest round, None when the
    job has no server-side DP."""
    latest = None
    for rnd in rounds:
        epsilon = _number((rnd.metrics or {}).get(EPSILON_METRIC))
        if epsilon is not None:
            delta = _number(rnd.metrics.get(DELTA_METRIC))
            latest = ServerPrivacy(round=round_for_people(rnd.number), epsilon=epsilon, delta=delta)
    return latest


# --------------------------------------------------------------------------------------------
# Secure aggregation: which protection a job uses, and what it costs
# --------------------------------------------------------------------------------------------

PROTECTION_NAMES = {
    "masking": "secure aggregation by masking (SecAgg+)",
    "he": "homomorphic encryption (CKKS)",
}
# Bytes a site sends per parameter: a float32 update, a masked one (a 64-bit ring element),
# an encrypted one (a CKKS ciphertext of 4096 values is about 331 KB at FedPortal's
# parameters: client_agent.he; measured in bench/secure_aggregation.py).
PLAIN_BYTES_PER_PARAM = 4
PROTECTED_BYTES_PER_PARAM = {"masking": 8, "he": 331_000 / 4096}


@dataclass(frozen=True)
class ProtectionSummary:
    """A protected job in words: what the portal sees and what a round costs a site."""

    kind: str
    parameters: int | None

    @property
    def name(self) -> str:
        return PROTECTION_NAMES.get(self.kind, self.kind)

    @property
    def extra_bytes_per_round(self) -> int | None:
        """Bytes a site sends per round beyond a plain float32 update (the update itself;
        the keys and shares add a few kilobytes)."""
        if self.parameters is None:
            return None
        extra = PROTECTED_BYTES_PER_PARAM[self.kind] - PLAIN_BYTES_PER_PARAM
        return round(self.parameters * extra)

    @property
    def text(self) -> str:
        return (
            f"This job uses {self.name}: the portal and its workers see only the sum of the "
            "sites' updates, never one site's update"
        )


def protection_of_job(job: Any) -> ProtectionSummary | None:
    """The job's protection (from its workflow parameters), None for a plain job; the model's
    parameter count from the initial model's header (no tensors read)."""
    kind = (job.params or {}).get("secure_aggregation")
    if not kind:
        return None
    return ProtectionSummary(kind=str(kind), parameters=selectors.initial_parameter_count(job))


@dataclass(frozen=True)
class RoundProtection:
    """One protected round's record: its phase, the sites left, and what it cost."""

    phase: str
    sites: int
    survivors: int | None
    extra_bytes_per_site: int | None
    unmask_seconds: float | None


def round_protection(rnd: Round) -> RoundProtection | None:
    protection = rnd.protection or {}
    if not protection:
        return None
    cost = protection.get("cost") or {}
    roster = (protection.get("roster") or {}).get("sites") or ()
    survivors = protection.get("survivors")
    return RoundProtection(
        phase=str(protection.get("phase", "")),
        sites=len(roster),
        survivors=len(survivors) if isinstance(survivors, list) else None,
        extra_bytes_per_site=cost.get("extra_bytes_per_site"),
        unmask_seconds=cost.get("unmask_seconds"),
    )
