"""What this site has spent: every release of a noised update, per job, in the site's folder.

``privacy-ledger.json`` (mode 0600, replaced atomically) lists, per job, each release: the
round, the noise multiplier and the sample rate it was made with. The agent records a release
*before* the update is uploaded, so a crash between the two over-counts (safe) and never
under-counts. The ledger is the site's own record: the portal shows what the agent reports
from it, and cannot change it. One site folder belongs to one project, so the whole ledger is
that project's spending here.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from client_agent.privacy.accounting import Step, epsilon, merged
from client_agent.privacy.policy import PrivacyPolicy, budget_reason
from client_agent.site_dir import write_private

LEDGER_FILE = "privacy-ledger.json"


class LedgerDamaged(ValueError):
    """The ledger cannot be read: the site's spending is unknown, so nothing may be released."""


@dataclass(frozen=True)
class Release:
    round: int
    noise_multiplier: float
    sample_rate: float
    at: str

    @property
    def step(self) -> Step:
        return (self.noise_multiplier, self.sample_rate, 1)


class PrivacyLedger:
    """The releases of one site folder; safe to use from the agent's round threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._jobs: dict[str, list[Release]] = {}
        if self.path.exists():
            self._jobs = _read(self.path)

    @classmethod
    def in_folder(cls, folder: str | Path) -> PrivacyLedger:
        return cls(Path(folder) / LEDGER_FILE)

    def job_history(self, job: str) -> list[Step]:
        with self._lock:
            return [r.step for r in self._jobs.get(job, [])]

    def project_history(self) -> list[Step]:
        with self._lock:
            return [r.step for releases in self._jobs.values() for r in releases]

    def releases(self, job: str) -> list[Release]:
        with self._lock:
            return list(self._jobs.get(job, []))

    def jobs(self) -> list[str]:
        with self._lock:
            return list(self._jobs)

    def refusal(self, job: str, policy: PrivacyPolicy) -> str | None:
        """Why the next round of ``job`` may not be released under ``policy``, or None."""
        if not policy.has_budget:
            return None
        job_spent, project_spent = self.job_history(job), self.project_history()
        if policy.rounds_within(job_spent, project_spent) == 0:
            return budget_reason(policy, job_spent, project_spent)
        return None

    def record(self, job: str, *, round: int, policy: PrivacyPolicy) -> dict[str, Any]:
        """Count one release of ``job``'s round ``round`` under ``policy`` (written before it
        returns); the report the released file carries (``PRIVACY_META_KEY``)."""
        release = Release(
            round=round,
            noise_multiplier=policy.noise_multiplier,
            sample_rate=policy.step()[1],
            at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        with self._lock:
            self._jobs.setdefault(job, []).append(release)
            data = {uid: [vars(r) for r in releases] for uid, releases in self._jobs.items()}
            write_private(self.path, (json.dumps({"jobs": data}, indent=1) + "\n").encode())
        return self.report(job, policy)

    def project_spend(self, policy: PrivacyPolicy) -> tuple[list[list[float]], float | None]:
        """The project's history here (Opacus's entries, consecutive equal ones merged) and
        its ε at ``policy``'s δ (None when the policy accounts nothing: no clipping)."""
        spent = self.project_history()
        history = [list(step) for step in merged(spent)]
        return history, epsilon(spent, policy.delta) if policy.changes_updates else None

    def report(self, job: str, policy: PrivacyPolicy) -> dict[str, Any]:
        """What this site has spent on ``job`` and on its project, at ``policy``'s δ."""
        job_spent = self.job_history(job)
        project_history, project_epsilon = self.project_spend(policy)
        return {
            "noise_multiplier": policy.noise_multiplier,
            "sample_rate": policy.step()[1],
            "clip_norm": policy.clip_norm,
            "clip_scope": policy.clip_scope,
            "delta": policy.delta,
            "releases": len(job_spent),
            # Opacus's history entries, consecutive equal ones merged: the portal recomputes
            # ε from them with the same accountant, and plans the next job with them.
            "history": [list(step) for step in merged(job_spent)],
            "project_history": project_history,
            "epsilon": epsilon(job_spent, policy.delta) if policy.changes_updates else None,
            "project_epsilon": project_epsilon,
            "max_epsilon": policy.max_epsilon,
            "max_project_epsilon": policy.max_project_epsilon,
            "policy_sha256": policy.sha256,
        }


def _read(path: Path) -> dict[str, list[Release]]:
    """The ledger's releases; a damaged ledger stops the agent rather than reset the spend."""
    try:
        data = json.loads(path.read_text())
        return {
            str(uid): [
                Release(
                    round=int(r["round"]),
                    noise_multiplier=float(r["noise_multiplier"]),
                    sample_rate=float(r["sample_rate"]),
                    at=str(r["at"]),
                )
                for r in releases
            ]
            for uid, releases in data["jobs"].items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LedgerDamaged(
            f"{path} is damaged ({type(exc).__name__}: {exc}); the site's privacy spending "
            "cannot be known. Restore it from a backup: deleting it would reset the budget"
        ) from None
