"""A site's privacy policy: ``privacy.toml`` in the site's folder, written by the site admin.

The agent reads it at start and enforces it on everything that leaves the site; the portal
receives a copy (:meth:`PrivacyPolicy.to_json`) to show it and to warn before a job is
accepted, and never changes it; a job cannot override it. A site without the file runs as
before: every job of its project, no clipping, no noise, output lines leave.

An example, every field optional::

    [jobs]                      # whose jobs may send results from here
    projects = ["cardiology"]   # project slugs; absent: this site's project, whichever
    submitters = ["alice"]      # portal usernames; absent: anyone who may submit

    [update]                    # applied by the agent to every update, after the script
    clip_norm = 1.0             # L2 norm of (local − global) after clipping
    clip_scope = "model"        # "model": one norm over all tensors; "layer": each tensor
                                # clipped to clip_norm / sqrt(number of tensors)
    noise_multiplier = 1.1      # Gaussian noise of std noise_multiplier × clip_norm
    exclude_tensors = ["*.bias", "head.*"]   # glob patterns: these never leave
    max_update_bytes = 200_000_000

    [budget]
    delta = 1e-5
    max_epsilon = 8.0           # what one job may spend here
    max_project_epsilon = 20.0  # what all of the project's jobs together may spend here

    [output]
    send_lines = false          # the script's output lines stay at the site; metrics
                                # (flare.log points, an update's metrics) still leave, and
                                # the agent's own lines ("round 3 failed: …") too

A file that does not parse, names a field that does not exist, or holds an impossible value
(negative noise, δ ≥ 1, ε ≤ 0, noise without clipping, a budget with no noise to pay for it)
raises :class:`PolicyError` naming the line and the field: the agent does not start.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from client_agent.privacy import accounting
from client_agent.privacy.accounting import DEFAULT_DELTA, Step
from common.validators import is_int, is_number

POLICY_FILE = "privacy.toml"
CLIP_SCOPES = ("model", "layer")
SITE_SAMPLE_RATE = 1.0
"""A site's data is in every update it sends: no amplification by sampling is claimed."""

BUDGET_EXHAUSTED = "privacy budget exhausted"
"""The start of the reason a site gives when it declines a round or a job for its budget."""


class PolicyError(ValueError):
    """A policy that cannot be enforced; ``str()`` names the file, line and field."""

    def __init__(self, field: str, reason: str, *, path: str = "", line: int | None = None):
        self.field = field
        self.reason = reason
        self.path = path
        self.line = line
        where = f"{path}:{line}: " if path and line else (f"{path}: " if path else "")
        super().__init__(f"{where}{field}: {reason}" if field else f"{where}{reason}")


# The fields of each table and what each holds; anything else is a typo, and a typo in a
# privacy setting must not silently turn the protection off.
_TABLES: dict[str, tuple[str, ...]] = {
    "jobs": ("projects", "submitters"),
    "update": (
        "clip_norm",
        "clip_scope",
        "noise_multiplier",
        "exclude_tensors",
        "max_update_bytes",
    ),
    "budget": ("delta", "max_epsilon", "max_project_epsilon"),
    "output": ("send_lines",),
}


@dataclass(frozen=True)
class PrivacyPolicy:
    """A checked policy. The default instance is what a site without a policy file gets."""

    projects: tuple[str, ...] | None = None
    submitters: tuple[str, ...] | None = None
    clip_norm: float | None = None
    clip_scope: str = "model"
    noise_multiplier: float = 0.0
    exclude_tensors: tuple[str, ...] = ()
    max_update_bytes: int | None = None
    delta: float = DEFAULT_DELTA
    max_epsilon: float | None = None
    max_project_epsilon: float | None = None
    send_lines: bool = True
    sha256: str = field(default="", compare=False)
    path: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        _check(self)

    # -- reading ----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> PrivacyPolicy:
        """The policy in ``path``; :class:`PolicyError` with the line and field if it is bad."""
        path = Path(path)
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
            data = tomllib.loads(text)
        except UnicodeDecodeError as exc:
            raise PolicyError("", f"not UTF-8 text ({exc.reason})", path=str(path)) from None
        except tomllib.TOMLDecodeError as exc:
            found = re.search(r"line (\d+)", str(exc))
            raise PolicyError(
                "",
                f"not valid TOML: {exc}",
                path=str(path),
                line=int(found.group(1)) if found else None,
            ) from None
        try:
            return cls._from_tables(data, sha256=hashlib.sha256(raw).hexdigest(), path=str(path))
        except PolicyError as exc:
            raise PolicyError(
                exc.field, exc.reason, path=str(path), line=_line_of(text, exc.field)
            ) from None

    @classmethod
    def in_folder(cls, folder: str | Path) -> PrivacyPolicy:
        """The policy of a site folder: its ``privacy.toml``, or the default when it has none."""
        path = Path(folder) / POLICY_FILE
        return cls.load(path) if path.exists() else cls()

    @classmethod
    def from_json(cls, data: Any) -> PrivacyPolicy:
        """A policy as :meth:`to_json` wrote it (the portal's copy), checked the same way."""
        if not isinstance(data, Mapping):
            raise PolicyError("", f"a policy is a JSON object, got {type(data).__name__}")
        tables = {k: v for k, v in data.items() if k != "sha256"}
        sha = data.get("sha256", "")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}|", sha):
            raise PolicyError("sha256", "must be 64 lowercase hex digits")
        # JSON has no "absent": to_json writes null for a field not set.
        cleaned = {
            table: {k: v for k, v in fields.items() if v is not None}
            if isinstance(fields, Mapping)
            else fields
            for table, fields in tables.items()
        }
        return cls._from_tables(cleaned, sha256=sha, path="")

    @classmethod
    def _from_tables(cls, data: Mapping[str, Any], *, sha256: str, path: str) -> PrivacyPolicy:
        values: dict[str, Any] = {}
        for table, fields in data.items():
            if table not in _TABLES:
                raise PolicyError(table, f"no such table; the tables are {', '.join(_TABLES)}")
            if not isinstance(fields, Mapping):
                raise PolicyError(table, "must be a table ([" + table + "])")
            for name, value in fields.items():
                if name not in _TABLES[table]:
                    raise PolicyError(
                        f"{table}.{name}",
                        f"no such field; [{table}] has {', '.join(_TABLES[table])}",
                    )
                values[name] = _parsed(f"{table}.{name}", name, value)
        return cls(**values, sha256=sha256, path=path)

    def to_json(self) -> dict[str, Any]:
        """The policy as the portal stores and shows it: every field, null where not set."""
        return {
            "jobs": {
                "projects": list(self.projects) if self.projects is not None else None,
                "submitters": list(self.submitters) if self.submitters is not None else None,
            },
            "update": {
                "clip_norm": self.clip_norm,
                "clip_scope": self.clip_scope,
                "noise_multiplier": self.noise_multiplier,
                "exclude_tensors": list(self.exclude_tensors),
                "max_update_bytes": self.max_update_bytes,
            },
            "budget": {
                "delta": self.delta,
                "max_epsilon": self.max_epsilon,
                "max_project_epsilon": self.max_project_epsilon,
            },
            "output": {"send_lines": self.send_lines},
            "sha256": self.sha256,
        }

    def to_toml(self) -> str:
        """The policy as a ``privacy.toml`` that :meth:`load` reads back as an equal policy
        (PocEnv writes it into each site's folder). Fields at their default are left out."""
        tables: dict[str, dict[str, Any]] = {
            "jobs": {"projects": self.projects, "submitters": self.submitters},
            "update": {
                "clip_norm": self.clip_norm,
                "clip_scope": self.clip_scope if self.clip_scope != "model" else None,
                "noise_multiplier": self.noise_multiplier or None,
                "exclude_tensors": self.exclude_tensors or None,
                "max_update_bytes": self.max_update_bytes,
            },
            "budget": {
                "delta": self.delta if self.delta != DEFAULT_DELTA else None,
                "max_epsilon": self.max_epsilon,
                "max_project_epsilon": self.max_project_epsilon,
            },
            "output": {"send_lines": None if self.send_lines else False},
        }
        lines: list[str] = []
        for table, fields in tables.items():
            written = [f"{name} = {_toml_value(v)}" for name, v in fields.items() if v is not None]
            if written:
                lines += [*([""] if lines else []), f"[{table}]", *written]
        return "\n".join(lines) + "\n" if lines else ""

    # -- what it rules ----------------------------------------------------------------------

    @property
    def changes_updates(self) -> bool:
        """Whether updates are clipped or noised here (excluding tensors aside)."""
        return self.clip_norm is not None

    @property
    def rewrites_updates(self) -> bool:
        """Whether the agent rewrites what a script sends: clipping, noise or excluded
        tensors. Without any, an update leaves as the script wrote it, at no cost."""
        return self.changes_updates or bool(self.exclude_tensors)

    @property
    def adds_noise(self) -> bool:
        return self.noise_multiplier > 0

    @property
    def has_budget(self) -> bool:
        return self.max_epsilon is not None or self.max_project_epsilon is not None

    def excluded(self, names: Iterable[str]) -> set[str]:
        """The tensor names that must not leave (glob patterns, case-sensitive)."""
        return {n for n in names if any(fnmatchcase(n, p) for p in self.exclude_tensors)}

    def refuses_job(self, *, project: str, submitter: str | None) -> str | None:
        """Why this site's policy refuses a job of ``project`` by ``submitter``, or None."""
        if self.projects is not None and project not in self.projects:
            return f"the site's privacy policy allows jobs of {_listed(self.projects)} only"
        if self.submitters is not None and submitter not in self.submitters:
            return (
                f"the site's privacy policy allows jobs submitted by {_listed(self.submitters)} "
                f"only, not {submitter or 'an unknown submitter'}"
            )
        return None

    def step(self, count: int = 1) -> Step:
        """One round's release here, as the accountant counts it."""
        return (self.noise_multiplier, SITE_SAMPLE_RATE, count)

    def epsilon_after(self, rounds: int, spent: Sequence[Step] = ()) -> float:
        """ε at this policy's δ after ``spent`` and ``rounds`` more rounds under this policy."""
        if not self.changes_updates:
            return math.inf if rounds or spent else 0.0
        return accounting.epsilon([*spent, self.step(rounds)], self.delta)

    def rounds_within(
        self, job_spent: Sequence[Step] = (), project_spent: Sequence[Step] = ()
    ) -> int | None:
        """How many more rounds of one job fit the budgets; None when there is no budget."""
        if not self.has_budget:
            return None
        if not self.adds_noise:
            return 0
        counts = []
        for cap, spent in (
            (self.max_epsilon, job_spent),
            (self.max_project_epsilon, project_spent),
        ):
            if cap is not None:
                counts.append(
                    accounting.steps_within(
                        cap,
                        self.noise_multiplier,
                        self.delta,
                        sample_rate=SITE_SAMPLE_RATE,
                        spent=spent,
                    )
                )
        return min(counts)

    def describe(self) -> list[tuple[str, str]]:
        """Each rule in words, for ``policy show`` and the portal's site page."""
        rows = [
            ("Jobs", _jobs_rule(self)),
            ("Clipping", _clip_rule(self)),
            (
                "Noise",
                f"Gaussian, std {self.noise_multiplier:g} × clip norm"
                if self.adds_noise
                else "none",
            ),
            ("δ", f"{self.delta:g}"),
            ("ε per job", f"{self.max_epsilon:g}" if self.max_epsilon is not None else "no cap"),
            (
                "ε per project",
                f"{self.max_project_epsilon:g}"
                if self.max_project_epsilon is not None
                else "no cap",
            ),
            (
                "Tensors kept here",
                ", ".join(self.exclude_tensors) if self.exclude_tensors else "none",
            ),
            (
                "Largest update",
                f"{self.max_update_bytes:,} bytes" if self.max_update_bytes else "no limit",
            ),
            ("Script output lines", "leave the site" if self.send_lines else "stay at the site"),
        ]
        return rows


@dataclass(frozen=True)
class JobAssessment:
    """What a job would cost here, and whether the site takes it at all."""

    refused: str | None
    """Why the site declines it (None: it may run)."""
    rounds: int
    """The job's rounds."""
    rounds_within: int | None
    """The rounds the budgets leave room for (None: no budget)."""
    expected_epsilon: float | None
    """ε this job spends here if it runs the rounds that fit (None: no accounting)."""

    @property
    def partial(self) -> bool:
        return self.rounds_within is not None and 0 < self.rounds_within < self.rounds


def assess_job(
    policy: PrivacyPolicy,
    *,
    project: str,
    submitter: str | None,
    rounds: int,
    job_spent: Sequence[Step] = (),
    project_spent: Sequence[Step] = (),
) -> JobAssessment:
    """Whether ``policy`` lets a job of ``rounds`` rounds run here, and what it would spend.

    A job is refused at acceptance when the policy does not allow its project or submitter,
    or when not even one round fits the budgets: it could never send anything. A job that fits
    only partly runs until the budget is spent; the rounds after that are declined.
    """
    refused = policy.refuses_job(project=project, submitter=submitter)
    within = policy.rounds_within(job_spent, project_spent)
    if refused is None and within == 0:
        refused = budget_reason(policy, job_spent, project_spent)
    runs = rounds if within is None else min(rounds, within)
    expected = policy.epsilon_after(runs, job_spent) if policy.changes_updates else None
    return JobAssessment(refused, rounds, within, expected)


def budget_reason(
    policy: PrivacyPolicy, job_spent: Sequence[Step], project_spent: Sequence[Step]
) -> str:
    """The reason a site declines a round because the next one would pass a budget."""
    if not policy.adds_noise:
        return f"{BUDGET_EXHAUSTED}: the site caps ε but adds no noise, so no round fits"
    job_next = policy.epsilon_after(1, job_spent)
    if policy.max_epsilon is not None and job_next > policy.max_epsilon:
        return (
            f"{BUDGET_EXHAUSTED}: one more round would bring this job's ε here to "
            f"{job_next:.3g}, over the site's {policy.max_epsilon:g}"
        )
    project_next = policy.epsilon_after(1, project_spent)
    return (
        f"{BUDGET_EXHAUSTED}: one more round would bring the project's ε here to "
        f"{project_next:.3g}, over the site's {policy.max_project_epsilon:g}"
    )


# -- checks ------------------------------------------------------------------------------


def _parsed(where: str, name: str, value: Any) -> Any:
    """One field's value in the dataclass's type; PolicyError naming ``where`` otherwise."""
    if name in ("projects", "submitters", "exclude_tensors"):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise PolicyError(where, f"must be a list of non-empty strings, got {value!r}")
        return tuple(value)
    if name == "clip_scope":
        if value not in CLIP_SCOPES:
            raise PolicyError(where, f"must be one of {', '.join(CLIP_SCOPES)}, got {value!r}")
        return value
    if name == "send_lines":
        if not isinstance(value, bool):
            raise PolicyError(where, f"must be true or false, got {value!r}")
        return value
    if name == "max_update_bytes":
        if not is_int(value) or value <= 0:
            raise PolicyError(where, f"must be a positive whole number of bytes, got {value!r}")
        return int(value)
    if not is_number(value) or not math.isfinite(value):
        raise PolicyError(where, f"must be a finite number, got {value!r}")
    return float(value)


def _check(policy: PrivacyPolicy) -> None:
    """The values together: each in its range, and no combination that cannot be enforced."""
    if policy.clip_norm is not None and not policy.clip_norm > 0:
        raise PolicyError("update.clip_norm", f"must be > 0, got {policy.clip_norm:g}")
    if policy.noise_multiplier < 0:
        raise PolicyError(
            "update.noise_multiplier", f"must be ≥ 0, got {policy.noise_multiplier:g}"
        )
    if policy.adds_noise and policy.clip_norm is None:
        raise PolicyError(
            "update.noise_multiplier",
            "noise needs update.clip_norm: without clipping an update has no bounded "
            "sensitivity, and no amount of noise bounds what it reveals",
        )
    if not 0 < policy.delta < 1:
        raise PolicyError(
            "budget.delta", f"must be between 0 and 1 (exclusive), got {policy.delta:g}"
        )
    for name in ("max_epsilon", "max_project_epsilon"):
        cap = getattr(policy, name)
        if cap is not None and not cap > 0:
            raise PolicyError(f"budget.{name}", f"must be > 0, got {cap:g}")
    if policy.has_budget and not policy.adds_noise:
        field_name = "max_epsilon" if policy.max_epsilon is not None else "max_project_epsilon"
        raise PolicyError(
            f"budget.{field_name}",
            "a budget needs update.noise_multiplier > 0: without noise a single round "
            "spends an unbounded ε, so every job would be declined",
        )


def _line_of(text: str, dotted: str) -> int | None:
    """The line of ``table.field`` (or of ``[table]``) in the file's text."""
    table, _, name = dotted.partition(".")
    current = None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        header = re.fullmatch(r"\[\s*([A-Za-z0-9_-]+)\s*\]\s*(#.*)?", stripped)
        if header:
            current = header.group(1)
            if current == table and not name:
                return number
            continue
        if current == table and name and re.match(rf"{re.escape(name)}\s*=", stripped):
            return number
    return None


def _toml_value(value: Any) -> str:
    """One value in TOML: JSON's strings and numbers are TOML's too."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value)


def _listed(items: Sequence[str]) -> str:
    return ", ".join(items) if items else "nobody"


def _jobs_rule(policy: PrivacyPolicy) -> str:
    projects = "any project" if policy.projects is None else f"projects {_listed(policy.projects)}"
    people = (
        "any submitter"
        if policy.submitters is None
        else f"submitted by {_listed(policy.submitters)}"
    )
    return f"{projects}, {people}"


def _clip_rule(policy: PrivacyPolicy) -> str:
    if policy.clip_norm is None:
        return "none"
    if policy.clip_scope == "layer":
        return (
            f"each tensor to L2 norm {policy.clip_norm:g} / √(tensors) "
            f"(update total ≤ {policy.clip_norm:g})"
        )
    return f"whole update to L2 norm {policy.clip_norm:g}"
