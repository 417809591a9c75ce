"""What a site does with a round's result before anything of it leaves: one sequence, run by
the agent (``JobRunner``) and by SimEnv's simulated sites alike.

Before the script works on a round, :func:`round_refusal` says whether the site declines it:
the policy refuses the job as a whole (its project or submitter), or the next release would
pass a budget. After the script answered, :func:`release_result`:

1. records the release in the site's ledger (a result with params under clipping), *before*
   the file that may leave exists: a crash between the two over-counts, never under-counts;
2. applies the policy (:func:`~client_agent.privacy.enforce.enforce_file`) into the file that
   may leave, ``round-NNN.enforced.safetensors`` beside the script's, and deletes the
   script's raw file: from then on only the enforced file exists, and a retry or a restart
   sends those bytes again rather than drawing a second noisy view of one update (which would
   spend twice);
3. checks the file's size against ``max_update_bytes``.

A policy that neither clips nor excludes tensors leaves the script's file as it is (no
rewrite, no cost): only the size is checked. A result the policy does not let leave raises
:class:`~client_agent.privacy.enforce.PrivacyRefusal` with the reason the round fails with;
one refused after its release was recorded stays counted (the safe side).

What this protects, and what not: the guarantee is *site-level* (ε, δ)-DP of the sequence of
updates a site releases, against anyone who sees them (the portal, its workers, an operator
with its storage, other sites through the global model), assuming the agent and the site's
machine are trusted and ``C`` and ``σ`` are as the policy says. It does not cover metrics,
which leave as the script logs them (keep them coarse, or out of the script), nor the number
and timing of rounds, nor a script that writes data elsewhere on its own (the agent controls
what *it* sends; a hostile script on an open network is a different threat). Record-level
privacy inside one site's data is DP-SGD's business, in the script (Opacus).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client_agent.privacy import accounting
from client_agent.privacy.enforce import Enforcement, PrivacyRefusal, enforce_file
from client_agent.privacy.ledger import PrivacyLedger
from client_agent.privacy.policy import POLICY_FILE, PrivacyPolicy
from client_agent.runtime import TASK_VALIDATE
from client_agent.wire import read_model_header

ENFORCED_SUFFIX = ".enforced.safetensors"
DECLINED_BY_POLICY = "declined by the site's privacy policy"
"""The start of the reason a site gives for a job its policy does not allow at all."""


@dataclass(frozen=True)
class Released:
    """The file that may leave, and what enforcement did to make it."""

    path: Path
    enforcement: Enforcement | None
    """None: the policy does not rewrite updates, and ``path`` is the script's own file."""
    report: dict[str, Any] | None
    """The ledger's report the file carries (None: nothing of it is accounted)."""


def enforced_path(result_path: str | Path) -> Path:
    """Where the enforced copy of a script's result file goes (beside it)."""
    path = Path(result_path)
    return path.with_name(path.name.removesuffix(".safetensors") + ENFORCED_SUFFIX)


def round_refusal(
    policy: PrivacyPolicy,
    ledger: PrivacyLedger,
    *,
    job: str,
    task_name: str,
    project: str | None = None,
    submitter: str | None = None,
) -> str | None:
    """Why this site declines ``job``'s next task (its script is not given it), or None.

    ``project`` None (a simulation has no project or submitter) skips the job rule. A validate
    task releases metrics only, which the accountant does not count: a spent budget does not
    decline it, a job the policy refuses does."""
    if project is not None:
        refused = policy.refuses_job(project=project, submitter=submitter)
        if refused:
            return f"{DECLINED_BY_POLICY}: {refused}"
    if task_name == TASK_VALIDATE:
        return None
    return ledger.refusal(job, policy)


def release_result(
    result_path: str | Path,
    model_path: str | Path,
    *,
    policy: PrivacyPolicy,
    ledger: PrivacyLedger,
    job: str,
    round: int,
    seed: int | None = None,
) -> Released:
    """The file of ``job``'s round ``round`` that may leave this site (see the module's
    docstring); ``model_path`` is the model the site received for the round. ``seed`` makes
    the noise repeatable, for tests only."""
    result_path = Path(result_path)
    if not policy.rewrites_updates:
        _check_size(result_path, policy)
        return Released(result_path, None, None)
    out_path = enforced_path(result_path)
    has_params = bool(read_model_header(result_path).params)
    report: dict[str, Any] | None = None
    if has_params and policy.changes_updates:
        refusal = ledger.refusal(job, policy)
        if refusal:
            raise PrivacyRefusal(refusal)
        report = ledger.record(job, round=round, policy=policy)
    elif has_params:
        report = ledger.report(job, policy)
    if report is not None:
        report = json_report(report)  # the wire's JSON is strict: no Infinity
    enforcement = enforce_file(
        result_path, model_path, out_path, policy=policy, report=report, seed=seed
    )
    result_path.unlink()
    try:
        _check_size(out_path, policy)
    except PrivacyRefusal:
        out_path.unlink()
        raise
    return Released(out_path, enforcement, report)


def _check_size(path: Path, policy: PrivacyPolicy) -> None:
    if policy.max_update_bytes is None:
        return
    size = path.stat().st_size
    if size > policy.max_update_bytes:
        raise PrivacyRefusal(
            f"the update is {size:,} bytes, over the {policy.max_update_bytes:,} bytes the "
            "site's privacy policy lets leave (update.max_update_bytes)"
        )


def json_report(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` for the wire: an unbounded ε (a release without noise) as null, since the
    wire's JSON has no infinity (the history it carries still says there was no noise)."""
    return {
        key: accounting.as_json(value) if isinstance(value, float) else value
        for key, value in report.items()
    }


def policy_summary(policy: PrivacyPolicy) -> str:
    """The policy in one line, for the agent's start."""
    if not policy.path:
        return f"no privacy policy ({POLICY_FILE}): updates leave as the script sends them"
    rules = "; ".join(f"{rule}: {setting}" for rule, setting in policy.describe())
    return f"privacy policy {policy.path} (sha256 {policy.sha256[:12]}): {rules}"
