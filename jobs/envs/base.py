"""What every env returns and shares: the run record, its metrics, terminal progress.

``Run`` is the handle ``recipe.execute(env)`` returns in every env; a run on a portal
(:class:`jobs.envs.portal.PortalRun`) fills the same fields from the portal's API.
"""

from __future__ import annotations

import os
import secrets
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from client_agent.privacy.policy import PrivacyPolicy
from client_agent.wire import load_state_dict
from common.rounds import round_for_people
from common.validators import is_int

if TYPE_CHECKING:
    from jobs.recipes import Recipe


class RunStatus(StrEnum):
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    ABORTED = "ABORTED"


NVFLARE_STATUS: dict[RunStatus, str] = {
    RunStatus.RUNNING: "RUNNING",
    RunStatus.COMPLETED: "FINISHED:COMPLETED",
    RunStatus.FAILED: "FINISHED:EXECUTION_EXCEPTION",
    RunStatus.ABORTED: "FINISHED:ABORTED",
}
"""``Run.get_status()``'s words: the job status strings NVFlare's admin API returns, so a
``job.py`` that compares them keeps working."""


class RunFailed(RuntimeError):
    """A run ended FAILED; ``run`` is its :class:`Run` (status, error, rounds, workspace).

    A RuntimeError, as NVFlare's SimEnv raises for a failed simulation, so ``python job.py``
    exits non-zero with the reason instead of printing it and exiting 0.
    """

    def __init__(self, run: Run) -> None:
        self.run = run
        super().__init__(
            f"job {run.job_id} failed: {run.error}. The sites' logs are in "
            f"{run.workspace / 'sites'} (<site>/log.txt)"
        )


@dataclass(frozen=True)
class MetricPoint:
    """One number: from a site's result (``source="result"``), the round's weighted mean
    (``site=None``, ``source="aggregate"``), or a ``flare.log`` call (``source="log"``)."""

    round: int | None
    site: str | None
    key: str
    value: float
    step: int | None = None
    source: str = "result"


@dataclass
class RoundRecord:
    round: int
    label: str = ""
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    site_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    protection: dict[str, Any] = field(default_factory=dict)
    """Under secure aggregation: its kind, phase, roster, the sites that shared and those
    summed (``survivors``), and its ``cost`` (``extra_bytes_per_site``, seconds); the same
    shape from ``SimEnv`` and from a portal's rounds API. Empty for a plain round."""


class Metrics:
    """A run's metrics: ``points`` holds them all; the helpers slice them."""

    def __init__(self, points: Iterable[MetricPoint] = ()) -> None:
        self.points: list[MetricPoint] = list(points)

    def aggregated(self, key: str) -> list[tuple[int, float]]:
        """``(round, value)`` of the round's weighted mean of ``key``."""
        return [
            (p.round or 0, p.value) for p in self.points if p.source == "aggregate" and p.key == key
        ]

    def site(self, site: str, key: str, source: str = "result") -> list[tuple[int | None, float]]:
        return [
            (p.round, p.value)
            for p in self.points
            if p.site == site and p.key == key and p.source == source
        ]

    def logged(self, key: str | None = None, site: str | None = None) -> list[MetricPoint]:
        """``flare.log`` points, optionally for one key and site."""
        return [
            p
            for p in self.points
            if p.source == "log"
            and (key is None or p.key == key)
            and (site is None or p.site == site)
        ]

    def by_round(self) -> dict[int, dict[str, dict[str, float]]]:
        """``{round: {"aggregate": {key: v}, site: {key: v}, …}}`` for result metrics."""
        out: dict[int, dict[str, dict[str, float]]] = {}
        for p in self.points:
            if p.source == "log" or p.round is None:
                continue
            out.setdefault(p.round, {}).setdefault(p.site or "aggregate", {})[p.key] = p.value
        return out

    def __len__(self) -> int:
        return len(self.points)

    def __repr__(self) -> str:
        return f"Metrics({len(self.points)} points)"


@dataclass
class Run:
    """The outcome of ``recipe.execute(env)``."""

    job_id: str
    status: RunStatus
    workspace: Path
    rounds: list[RoundRecord] = field(default_factory=list)
    metrics: Metrics = field(default_factory=Metrics)
    error: str | None = None
    best_round: int | None = None
    """How many rounds had completed when ``best_model`` was made (0: the initial model).

    A site's train metrics score the global model it received, so round ``r``'s aggregated
    key metric (``r`` from 0) scores the model after ``r`` completed rounds."""
    best_score: float | None = None
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    """Cross-site evaluation cells, ``{"model", "site", "metrics"}``, in the order made."""
    model_file_names: tuple[str | None, str | None] = (None, None)
    """NVFlare's ``save_filename`` and ``best_model_filename``: the final and the best global
    model are also written under these names in ``models/``, with ``torch.save`` as NVFlare's
    PyTorch recipes save them (None: not written)."""

    @property
    def cross_site_matrix(self) -> dict[str, dict[str, dict[str, float]]]:
        """Cross-site evaluation scores: ``matrix[model][site]`` is the metrics ``site``
        computed for ``model`` (``"global"``: the final global model; ``"site:<name>"``: that
        site's own model). Empty when the job ran no cross-site evaluation."""
        matrix: dict[str, dict[str, dict[str, float]]] = {}
        for cell in self.evaluations:
            matrix.setdefault(str(cell["model"]), {})[str(cell["site"])] = dict(cell["metrics"])
        return matrix

    @property
    def privacy(self) -> list[tuple[int, float, float]]:
        """``(round, epsilon, delta)`` per round of a job with server-side DP (``dp=`` on the
        recipe), rounds from 0 as in :attr:`metrics`: the site-level ε spent once that round
        closed, at δ; ``inf`` for a round with no noise. Empty for a job without DP."""
        from jobs.workflows.dp import DELTA_METRIC, EPSILON_METRIC

        spent = dict(self.metrics.aggregated(EPSILON_METRIC))
        return [
            (round_number, spent.get(round_number, float("inf")), delta)
            for round_number, delta in self.metrics.aggregated(DELTA_METRIC)
        ]

    @property
    def global_model(self) -> dict[str, torch.Tensor] | None:
        """The last global model (after the last completed round)."""
        path = self._model_path(len(self.rounds))
        return load_state_dict(path) if path.exists() else None

    @property
    def best_model(self) -> dict[str, torch.Tensor] | None:
        path = self.workspace / "models" / "best.safetensors"
        return load_state_dict(path) if path.exists() else None

    def write_named_model_files(self) -> None:
        """The final and best global models as ``models/<save_filename>`` and
        ``models/<best_model_filename>`` (a ``torch.save``d ``state_dict``, what NVFlare's
        PyTorch recipes write), from the run's own files."""
        save_filename, best_model_filename = self.model_file_names
        for name, weights in (
            (save_filename, self.global_model),
            (best_model_filename, self.best_model),
        ):
            if name and weights is not None:
                torch.save(weights, self.workspace / "models" / name)

    def _model_path(self, completed_rounds: int) -> Path:
        return self.workspace / "models" / model_file_name(completed_rounds)

    def wait(self) -> Run:
        """Runs from SimEnv are finished when returned; kept for the same code in every env."""
        return self

    # -- NVFlare's Run surface (``nvflare.recipe.run.Run``) ----------------------------------

    def get_job_id(self) -> str:
        return self.job_id

    def get_status(self) -> str | None:
        """The status in NVFlare's words (:data:`NVFLARE_STATUS`): ``"RUNNING"``,
        ``"FINISHED:COMPLETED"``, ``"FINISHED:ABORTED"`` or ``"FINISHED:EXECUTION_EXCEPTION"``.

        NVFlare's SimEnv answers ``None`` here; a simulation here knows how it ended, so it
        says so."""
        return NVFLARE_STATUS[self.status]

    def get_result(self, timeout: float = 0.0, clean_up: bool = True) -> str | None:
        """The run's workspace folder, as a string: the final and best global models are in its
        ``models/`` folder (``round-NNN.safetensors`` for the last round, ``best.safetensors``).

        A SimEnv run is finished when returned, so ``timeout`` has nothing to wait for, and
        nothing is cleaned up whatever ``clean_up`` says: the workspace is the result."""
        return str(self.workspace)

    def abort(self) -> None:
        """Nothing to stop: a SimEnv run is finished when ``recipe.execute`` returns it (NVFlare's
        SimEnv says the same and returns ``None``)."""
        return None


def model_file_name(completed_rounds: int) -> str:
    return (
        "initial.safetensors"
        if completed_rounds == 0
        else f"round-{completed_rounds:03d}.safetensors"
    )


class Env(Protocol):
    def run(self, recipe: Recipe) -> Run: ...


def check_count(name: str, value: object) -> int:
    """``value`` if it is an integer of at least 1 (``True`` is not one); else a ValueError that
    names the argument."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name}: must be an integer of at least 1, got {value!r}")
    return value


def check_workspace_alias(
    workspace: str | Path | None, workspace_root: str | Path | None
) -> str | Path | None:
    """The workspace folder given as ``workspace`` or as NVFlare's ``workspace_root``; both given
    is a ValueError naming them (they could disagree)."""
    if workspace is not None and workspace_root is not None:
        raise ValueError(
            "workspace, workspace_root: give one of them (workspace_root is NVFlare's name for "
            f"workspace), got {str(workspace)!r} and {str(workspace_root)!r}"
        )
    return workspace if workspace is not None else workspace_root


def site_names(num_clients: int | None, clients: Sequence[str] | None) -> list[str]:
    """The sites an env runs: ``clients`` when given, else ``site-1`` … ``site-<num_clients>``.

    ``clients`` must be a non-empty list of unique, non-empty names, and ``num_clients``, if
    given as well, its length; a ValueError names the argument at fault.
    """
    if clients is None:
        count = check_count("num_clients", num_clients)
        return [f"site-{i}" for i in range(1, count + 1)]
    names = list(clients)
    if (
        not names
        or not all(isinstance(name, str) and name for name in names)
        or len(set(names)) != len(names)
    ):
        raise ValueError("clients: must be a non-empty list of unique site names")
    if num_clients is not None and num_clients != len(names):
        raise ValueError(f"num_clients: {num_clients} but clients names {len(names)} sites")
    return names


def site_threads_env(concurrent_sites: int) -> dict[str, str]:
    """``OMP_NUM_THREADS`` for each of ``concurrent_sites`` site processes on this machine: its
    share of the cores, at least 1; nothing when the caller set it.

    The sites share the cores, so each script's torch gets its share: more threads than cores
    spin against each other (a PocEnv round took 5x longer).
    """
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // concurrent_sites))}


def new_job_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


class _Progress:
    """Terminal progress: one line per site state change on a terminal, one per round otherwise."""

    def __init__(self, enabled: bool, num_rounds: int, stream: Any = None) -> None:
        self.enabled = enabled
        self.num_rounds = num_rounds
        self.stream = stream or sys.stdout
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.lock = threading.Lock()
        self.states: dict[str, str] = {}
        self.round = 0

    def say(self, text: str) -> None:
        if self.enabled:
            with self.lock:
                end = "\n"
                if self.tty:
                    self.stream.write("\r\033[K")
                self.stream.write(text + end)
                self.stream.flush()

    def site(self, site: str, state: str) -> None:
        if not self.enabled:
            return
        with self.lock:
            self.states[site] = state
            if self.tty:
                sites = "  ".join(f"{s}: {st}" for s, st in sorted(self.states.items()))
                self.stream.write(
                    f"\r\033[Kround {round_for_people(self.round)}/{self.num_rounds}  {sites}"
                )
                self.stream.flush()


PolicyArg = PrivacyPolicy | str | os.PathLike[str]


def site_policies(
    given: PolicyArg | dict[str, PolicyArg] | None, sites: Sequence[str]
) -> dict[str, PrivacyPolicy]:
    """``privacy_policy`` as each named site's checked policy: one for every site, or a dict
    by site name (sites it leaves out have none). A path is read as a ``privacy.toml``; a bad
    one raises :class:`~client_agent.privacy.policy.PolicyError` with its line and field."""
    if given is None:
        return {}
    if isinstance(given, dict):
        unknown = sorted(set(given) - set(sites))
        if unknown:
            raise ValueError(
                f"privacy_policy: no site {', '.join(map(str, unknown))} in this env "
                f"(its sites: {', '.join(sites)})"
            )
        return {site: _policy(site, value) for site, value in given.items()}
    policy = _policy(None, given)
    return dict.fromkeys(sites, policy)


def _policy(site: str | None, value: Any) -> PrivacyPolicy:
    if isinstance(value, PrivacyPolicy):
        return value
    if isinstance(value, str | os.PathLike):
        return PrivacyPolicy.load(Path(value))
    where = f"privacy_policy[{site!r}]" if site is not None else "privacy_policy"
    raise ValueError(
        f"{where}: expected a PrivacyPolicy or the path of a privacy.toml, got {value!r}"
    )
