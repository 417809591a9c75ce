"""A site's privacy as its agent reports it: the policy it enforces and what it has spent.

The site's ``privacy.toml`` and its ledger are the truth, kept at the site; the portal stores
the copies its agent sends, to show them and to plan with them, and never changes them. Every
number in a copy is checked where it enters (:func:`privacy_history_checked`,
:func:`privacy_report_checked`), and every ε the portal stores is its own recomputation with
the accountant the agent uses (``client_agent.privacy.accounting``), from the history the
report carries: what a page shows is the accountant's value for that history, not a number
taken on trust.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.db import transaction
from django.utils import timezone

from client_agent.privacy import accounting
from client_agent.privacy.accounting import Step
from client_agent.privacy.policy import CLIP_SCOPES, PolicyError, PrivacyPolicy
from common.exceptions import ValidationFailed
from common.validators import check_finite_number, check_int, shown
from sites.models import AuditAction, Site
from sites.services.audit import audit_event_record

MAX_HISTORY_ENTRIES = 10_000
"""The most accountant history entries one report may carry. A ledger's history is merged
(equal consecutive entries are one), so a site changes its noise that often only in theory."""

MAX_EXCLUDED_NAMES = 100_000
"""The most tensor names a report may say were kept at the site (a model's tensor count)."""

MAX_SUBSAMPLED_ENTRIES = 8
"""The most history entries (after merging equal neighbours) with a sample rate below 1. The
accountant spends about 0.15 s on each such entry (1.0 is closed-form and cheap), and the
portal recomputes ε within a request; a site's own ledger releases at rate 1.0 only."""

AUDITED_EXCLUDED_NAMES = 20


def _invalid(field: str, reason: str) -> ValidationFailed:
    return ValidationFailed(f"{field}: {reason}", field=field)


def privacy_history_checked(value: Any, *, field: str) -> list[Step]:
    """An accountant history as Opacus takes it: ``[[σ, q, n], …]`` with σ ≥ 0 finite,
    0 < q ≤ 1 and n ≥ 1 an integer, at most :data:`MAX_HISTORY_ENTRIES` entries;
    :class:`ValidationFailed` naming the entry otherwise."""
    if not isinstance(value, list):
        raise _invalid(
            field, f"must be a list of [noise_multiplier, sample_rate, steps], got {shown(value)}"
        )
    if len(value) > MAX_HISTORY_ENTRIES:
        raise _invalid(field, f"has {len(value)} entries; at most {MAX_HISTORY_ENTRIES} are taken")
    steps: list[Step] = []
    for i, entry in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(entry, list) or len(entry) != 3:
            raise _invalid(
                where, f"must be [noise_multiplier, sample_rate, steps], got {shown(entry)}"
            )
        sigma = check_finite_number(f"{where}[0]", entry[0], error=_invalid)
        if sigma < 0:
            raise _invalid(f"{where}[0]", f"the noise multiplier must be ≥ 0, got {sigma:g}")
        rate = check_finite_number(f"{where}[1]", entry[1], error=_invalid)
        if not 0 < rate <= 1:
            raise _invalid(f"{where}[1]", f"the sample rate must be in (0, 1], got {rate:g}")
        count = check_int(f"{where}[2]", entry[2], low=1, high=10**9, error=_invalid)
        steps.append((sigma, rate, count))
    subsampled = sum(1 for _, rate, _ in accounting.merged(steps) if rate < 1)
    if subsampled > MAX_SUBSAMPLED_ENTRIES:
        raise _invalid(
            field,
            f"has {subsampled} runs of entries with a sample rate below 1; at most "
            f"{MAX_SUBSAMPLED_ENTRIES} are taken",
        )
    return steps


def privacy_epsilon(history: list[Step], delta: float) -> float | None:
    """ε at ``delta`` after ``history`` by the accountant; None when it is unbounded (a
    release without noise), which JSON cannot hold."""
    return accounting.as_json(accounting.epsilon(history, delta))


def _optional_number(data: Mapping[str, Any], key: str, *, positive: bool = False) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    number = check_finite_number(f"privacy.{key}", value, error=_invalid)
    if positive and not number > 0:
        raise _invalid(f"privacy.{key}", f"must be > 0, got {number:g}")
    return number


def privacy_report_checked(value: Any) -> dict[str, Any]:
    """A ledger report from a site's agent (``PrivacyLedger.report`` plus, with an upload,
    ``excluded``), checked, with ε and the project's ε recomputed from its histories.

    Only the known keys are kept. :class:`ValidationFailed` names the first bad field
    (``privacy.delta``, ``privacy.history[2][0]``…)."""
    if not isinstance(value, Mapping):
        raise _invalid("privacy", f"must be an object, got {shown(value)}")
    delta = check_finite_number("privacy.delta", value.get("delta"), error=_invalid)
    if not 0 < delta < 1:
        raise _invalid("privacy.delta", f"must be between 0 and 1 (exclusive), got {delta:g}")
    noise = check_finite_number(
        "privacy.noise_multiplier", value.get("noise_multiplier"), error=_invalid
    )
    if noise < 0:
        raise _invalid("privacy.noise_multiplier", f"must be ≥ 0, got {noise:g}")
    rate = check_finite_number("privacy.sample_rate", value.get("sample_rate", 1.0), error=_invalid)
    if not 0 < rate <= 1:
        raise _invalid("privacy.sample_rate", f"must be in (0, 1], got {rate:g}")
    clip_norm = _optional_number(value, "clip_norm", positive=True)
    clip_scope = value.get("clip_scope", "model")
    if clip_scope not in CLIP_SCOPES:
        raise _invalid(
            "privacy.clip_scope",
            f"must be one of {', '.join(CLIP_SCOPES)}, got {shown(clip_scope)}",
        )
    releases = check_int(
        "privacy.releases", value.get("releases"), low=0, high=10**9, error=_invalid
    )
    history = privacy_history_checked(value.get("history", []), field="privacy.history")
    project_history = privacy_history_checked(
        value.get("project_history", []), field="privacy.project_history"
    )
    if sum(n for _, _, n in history) != releases:
        raise _invalid(
            "privacy.releases",
            f"is {releases}, but the history counts {sum(n for _, _, n in history)} releases",
        )
    excluded = value.get("excluded", [])
    if (
        not isinstance(excluded, list)
        or len(excluded) > MAX_EXCLUDED_NAMES
        or not all(isinstance(n, str) and 0 < len(n) <= 1000 for n in excluded)
    ):
        raise _invalid(
            "privacy.excluded",
            f"must be a list of at most {MAX_EXCLUDED_NAMES} tensor names, got {shown(excluded)}",
        )
    sha = value.get("policy_sha256", "")
    if not isinstance(sha, str) or len(sha) > 64:
        raise _invalid("privacy.policy_sha256", f"must be a SHA-256 in hex, got {shown(sha)}")
    # Without clipping an update's sensitivity is unbounded: nothing to account, as the ledger
    # reports it (ε null).
    accounted = clip_norm is not None
    return {
        "noise_multiplier": noise,
        "sample_rate": rate,
        "clip_norm": clip_norm,
        "clip_scope": clip_scope,
        "delta": delta,
        "releases": releases,
        "history": [list(step) for step in history],
        "project_history": [list(step) for step in project_history],
        "epsilon": privacy_epsilon(history, delta) if accounted else None,
        "project_epsilon": privacy_epsilon(project_history, delta) if accounted else None,
        "max_epsilon": _optional_number(value, "max_epsilon", positive=True),
        "max_project_epsilon": _optional_number(value, "max_project_epsilon", positive=True),
        "policy_sha256": sha,
        "excluded": list(excluded),
    }


def site_privacy_spend_record(*, site: Site, report: Mapping[str, Any]) -> None:
    """Store the project's spending at ``site`` from a checked report (the ledger's latest
    word: it counts every job of the project there). Call it inside the caller's transaction."""
    Site.objects.filter(pk=site.pk).update(
        privacy_project_history=report["project_history"],
        privacy_project_epsilon=report["project_epsilon"],
    )
    site.privacy_project_history = report["project_history"]
    site.privacy_project_epsilon = report["project_epsilon"]


def site_privacy_policy_report(
    *,
    site: Site,
    policy: Any,
    project_history: Any,
    project_epsilon: Any = None,
    source_address: str | None = None,
) -> Site:
    """Store the privacy policy ``site``'s agent enforces, and the project's spending there.

    ``policy`` is ``PrivacyPolicy.to_json()``, checked as the agent checks its file
    (:class:`ValidationFailed` naming the field: ``budget.delta``…). The stored ε of the
    project is recomputed from ``project_history`` at the policy's δ; ``project_epsilon`` as
    sent is only checked (a number or null). A policy whose SHA-256 differs from the stored
    one is audited (``site.privacy_policy_reported``, the site's agent as the actor).
    """
    try:
        checked = PrivacyPolicy.from_json(policy)
    except PolicyError as exc:
        field = f"policy.{exc.field}" if exc.field else "policy"
        raise ValidationFailed(f"{field}: {exc.reason}", field=field) from None
    history = privacy_history_checked(project_history, field="project_history")
    if project_epsilon is not None:
        check_finite_number("project_epsilon", project_epsilon, error=_invalid)
    stored = checked.to_json()
    epsilon = privacy_epsilon(history, checked.delta) if checked.changes_updates else None
    with transaction.atomic():
        site = Site.objects.select_for_update().get(pk=site.pk)
        previous = site.privacy_policy
        site.privacy_policy = stored
        site.privacy_policy_reported_at = timezone.now()
        site.privacy_project_history = [list(step) for step in history]
        site.privacy_project_epsilon = epsilon
        site.save(
            update_fields=[
                "privacy_policy",
                "privacy_policy_reported_at",
                "privacy_project_history",
                "privacy_project_epsilon",
            ]
        )
        previous_sha = previous.get("sha256") if isinstance(previous, dict) else None
        if previous is None or previous_sha != checked.sha256:
            audit_event_record(
                action=AuditAction.SITE_PRIVACY_POLICY_REPORTED,
                target=site,
                project=site.project,
                actor_site=site,
                source_address=source_address,
                details={
                    "site": site.name,
                    "sha256": checked.sha256,
                    "previous_sha256": previous_sha,
                    "rules": [list(row) for row in checked.describe()],
                },
            )
    return site
