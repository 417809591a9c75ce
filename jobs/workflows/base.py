"""The workflow protocol: what every workflow offers its drivers (``SimEnv`` in-process, the
portal's Celery state machine), and the round-close policy both drivers share.

A round, as a driver runs it:

1. ``plan = workflow.plan(number, sites, state)``: a :class:`RoundPlan`, the tasks per site
   (train, validate or submit_model; which model each site gets: the global model or a named
   checkpoint) and how many acceptable results the round needs.
2. The driver hands each site its task, then checks each answer into a typed result
   (:mod:`jobs.workflows.results`): a :class:`~jobs.workflows.results.TrainResult`, an
   :class:`~jobs.workflows.results.EvalResult` or a
   :class:`~jobs.workflows.results.SubmittedModel`.
3. :func:`round_close_decision` (one pure function) says whether the round may close: the
   quorum, with the job's failure reason when it is not met.
4. ``outcome = workflow.close(number, plan, global_model, results, state)``: a
   :class:`RoundOutcome`: the next global model (or None: unchanged), the next
   :class:`ServerState`, the metric points to record, the checkpoints to keep and the
   evaluations made. The driver stores all of it with the round; :func:`best_score_after` says
   whether the model the round started from is the best one so far.

Nothing here imports torch at module level: the portal reads parameters and plans without it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from client_agent.runtime import TASK_SUBMIT_MODEL, TASK_TRAIN, TASK_VALIDATE
from common.rounds import round_for_people
from common.validators import FieldError, is_int, is_number

if TYPE_CHECKING:  # the portal reads workflows' parameters and plans without torch
    import torch

    from jobs.aggregation import TensorSource
    from jobs.workflows.results import TaskResult


# Bounds of every workflow's round and site counts: far beyond any federation, and inside the
# portal database's integer columns (a job's num_rounds and min_clients).
MAX_ROUNDS = 100_000
MAX_CLIENTS = 10_000

TASK_NAMES = (TASK_TRAIN, TASK_VALIDATE, TASK_SUBMIT_MODEL)
KEY_METRIC_MODES = ("max", "min")


class QuorumNotMet(RuntimeError):
    """Fewer sites answered a round acceptably than the workflow needs."""


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """What a task tells the site's script: its ``FLModel`` fields."""

    task_name: str
    current_round: int
    total_rounds: int
    start_round: int = 0
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelRef:
    """Which model a task sends: the current global model (``checkpoint`` None) or a named
    checkpoint a workflow kept (a site's submitted model, say ``"site:site-2"``)."""

    checkpoint: str | None = None

    @property
    def is_global(self) -> bool:
        return self.checkpoint is None

    def __str__(self) -> str:
        return "global" if self.checkpoint is None else self.checkpoint

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        return cls(None if text == "global" else text)


GLOBAL_MODEL = ModelRef()


def checkpoint_file_stem(name: str) -> str:
    """A checkpoint's name as a file name: ``"site:site-2"`` → ``"site--site-2"``. Names are
    made by workflows from site names (letters, digits, ``.``, ``_``, ``-``)."""
    return name.replace(":", "--")


@dataclass(frozen=True)
class PlannedTask:
    """One site's task in a round."""

    site: str
    spec: TaskSpec
    model: ModelRef = GLOBAL_MODEL

    @property
    def task_name(self) -> str:
        return self.spec.task_name


@dataclass(frozen=True)
class RoundPlan:
    """A round's tasks, one per planned site, and the acceptable results it needs.

    ``label`` names the round for people in logs and errors (``"round 3"``, ``"site-2's turn
    in round 1"``); ``min_results`` 0 means the round closes whatever its sites answer (a
    cyclic turn is skipped, not failed)."""

    tasks: tuple[PlannedTask, ...]
    min_results: int
    label: str

    def task_for(self, site: str) -> PlannedTask | None:
        for task in self.tasks:
            if task.site == site:
                return task
        return None

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(task.site for task in self.tasks)


def every_site(
    sites: Sequence[str],
    spec: TaskSpec,
    *,
    min_results: int,
    label: str,
    model: ModelRef = GLOBAL_MODEL,
) -> RoundPlan:
    """The plan that gives every site the same task (FedAvg's round, an evaluation round)."""
    return RoundPlan(
        tasks=tuple(PlannedTask(site, spec, model) for site in sites),
        min_results=min_results,
        label=label,
    )


# --------------------------------------------------------------------------------------------
# Server state and outcomes
# --------------------------------------------------------------------------------------------

SERVER_STATE_META_KEY = "fedportal_server_state"


@dataclass
class ServerState:
    """What a workflow keeps between rounds: tensors (optimizer moments, control variates) and
    JSON (a relay's order and position, evaluation scores). The driver stores it with every
    round, so a job resumed after a crash goes on from the last closed round's state."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """One safetensors file: the tensors, and the JSON in its metadata (atomic write)."""
        from client_agent.fl_model import FLModel
        from client_agent.wire import write_model_file

        # A round trip through JSON now: what cannot be stored fails here, not on resume.
        data = json.loads(json.dumps(self.data, allow_nan=False))
        return write_model_file(
            path, FLModel(params=dict(self.tensors), meta={SERVER_STATE_META_KEY: data})
        )

    @classmethod
    def load(cls, path: str | Path) -> ServerState:
        from client_agent.wire import read_model_file

        model = read_model_file(path)
        data = model.meta.get(SERVER_STATE_META_KEY) or {}
        return cls(tensors=dict(model.params or {}), data=dict(data))


@dataclass(frozen=True)
class Evaluation:
    """One cell of a cross-site evaluation: ``site``'s metrics of the model ``model``."""

    model: str
    site: str
    metrics: dict[str, float]


@dataclass
class RoundOutcome:
    """A closed round, as the driver stores it.

    ``global_params`` None: the global model did not change (an evaluation round, a skipped
    turn). ``metrics`` are the aggregate points recorded for the round; ``scores_start_model``
    says whether they score the model the round started from (a train round's metrics do, by
    NVFlare's convention), which makes that model a candidate for the best one.
    ``checkpoints`` are models to keep by name (``ModelRef(name)`` in later plans).
    """

    global_params: dict[str, torch.Tensor] | None
    state: ServerState
    metrics: dict[str, float]
    site_metrics: dict[str, dict[str, Any]]
    sites: tuple[str, ...]
    scores_start_model: bool = True
    checkpoints: dict[str, TensorSource] = field(default_factory=dict)
    evaluations: list[Evaluation] = field(default_factory=list)


def next_global_model(
    workflow: Workflow,
    outcome: RoundOutcome,
    start_params: Callable[[], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor] | None:
    """The weights of the global model file a round leaves, or None when the round left the
    model and what it sends with it as they were: the driver then reuses the file, no copy.
    ``start_params`` loads the model the round started from (only called when needed)."""
    if outcome.global_params is not None:
        return outcome.global_params
    if workflow.global_model_meta(outcome.state, {}):  # new meta for the same weights
        return start_params()
    return None


def write_global_model(
    path: Path, workflow: Workflow, state: ServerState, params: Mapping[str, torch.Tensor]
) -> Path:
    """A global model file as the sites get it: the weights, and the meta the workflow sends
    with them in ``state`` (SCAFFOLD's control variate). Atomic: a re-run overwrites whole."""
    from client_agent.fl_model import FLModel, ParamsType
    from client_agent.wire import write_model_file

    meta = workflow.global_model_meta(state, params)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = FLModel(params_type=ParamsType.FULL, params=dict(params), meta=meta)
    return write_model_file(path, model)


# --------------------------------------------------------------------------------------------
# The round-close policy: one pure function for every driver
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CloseDecision:
    """Whether a round closes: ``accepted`` sites' results are folded; ``failure`` is the job's
    failure reason when fewer than the plan's ``min_results`` were acceptable."""

    accepted: tuple[str, ...]
    not_accepted: dict[str, str]
    failure: str | None = None

    @property
    def closes(self) -> bool:
        return self.failure is None


def round_close_decision(plan: RoundPlan, answers: Mapping[str, str | None]) -> CloseDecision:
    """The round-close policy. ``answers`` maps each planned site to None (its result was
    accepted) or the reason it was not (rejected, failed, late, no answer).

    The failure names every site with no acceptable result and why, in name order:
    ``"round 2: 1 acceptable result(s), min_clients is 3; none from site-2 (…), site-3 (…)"``.
    """
    accepted = tuple(sorted(s for s in plan.sites if s in answers and answers[s] is None))
    not_accepted = {
        s: (answers.get(s) or "no answer") for s in sorted(plan.sites) if s not in accepted
    }
    if len(accepted) >= plan.min_results:
        return CloseDecision(accepted, not_accepted)
    reasons = ", ".join(f"{site} ({why})" for site, why in not_accepted.items())
    failure = (
        f"{plan.label}: {len(accepted)} acceptable result(s), min_clients is "
        f"{plan.min_results}; none from {reasons}"
    )
    return CloseDecision(accepted, not_accepted, failure)


def best_score_after(workflow: Workflow, outcome: RoundOutcome, best: float | None) -> float | None:
    """The new best score when the model the round started from beats ``best``; else None."""
    if not outcome.scores_start_model:
        return None
    score = workflow.score(outcome.metrics)
    if score is None or not workflow.is_better(score, best):
        return None
    return score


# --------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------


class Workflow(Protocol):
    name: ClassVar[str]
    PARAMETERS: ClassVar[dict[str, Any]]

    @property
    def min_clients(self) -> int: ...

    @property
    def num_rounds(self) -> int: ...

    def to_params(self) -> dict[str, Any]: ...

    def total_rounds(self, sites: Sequence[str]) -> int:
        """How many rounds the driver runs with these sites (a cyclic relay: one per turn)."""
        ...

    def total_rounds_given(self, sites: Sequence[str], state: ServerState) -> int:
        """How many rounds the job runs, as known once a round has left ``state``: fewer than
        ``total_rounds`` when the workflow stopped early. Drivers end the job when this many
        rounds have closed."""
        ...

    def initial_state(self, sites: Sequence[str]) -> ServerState: ...

    def plan(self, round_number: int, sites: Sequence[str], state: ServerState) -> RoundPlan: ...

    def close(
        self,
        round_number: int,
        plan: RoundPlan,
        global_model: Mapping[str, torch.Tensor] | TensorSource,
        results: Sequence[TaskResult],
        state: ServerState,
    ) -> RoundOutcome:
        """The round's outcome from its accepted results (at least ``plan.min_results``, in
        site-name order)."""
        ...

    def score(self, metrics: Mapping[str, Any]) -> float | None: ...

    def is_better(self, score: float, best: float | None) -> bool: ...

    def global_model_meta(
        self, state: ServerState, params: Mapping[str, torch.Tensor]
    ) -> dict[str, Any]:
        """``FLModel.meta`` for the global model file the sites get after a round that left
        ``state`` (SCAFFOLD's control variate ``c``); tensors go as a mapping of name to
        tensor. ``params`` are that global model's weights."""
        ...


# --------------------------------------------------------------------------------------------
# Shared by the workflows
# --------------------------------------------------------------------------------------------


def check_round_counts(min_clients: Any, num_rounds: Any) -> None:
    for field_name, value, highest in (
        ("min_clients", min_clients, MAX_CLIENTS),
        ("num_rounds", num_rounds, MAX_ROUNDS),
    ):
        if not is_int(value) or not 1 <= value <= highest:
            raise FieldError(field_name, f"must be an integer from 1 to {highest}, got {value!r}")


def check_key_metric(key_metric: Any, key_metric_mode: Any) -> None:
    if key_metric is not None and (not isinstance(key_metric, str) or not key_metric):
        raise FieldError("key_metric", f"must be a metric name or None, got {key_metric!r}")
    if key_metric_mode not in KEY_METRIC_MODES:
        raise FieldError("key_metric_mode", f"must be 'max' or 'min', got {key_metric_mode!r}")


def params_checked(workflow_name: str, schema: Mapping[str, Any], params: Any) -> dict[str, Any]:
    """``params`` as keyword arguments of a workflow, after the checks a schema can make
    (an object, known names, the required ones present); values are checked by the class."""
    if not isinstance(params, Mapping):
        raise FieldError("params", "must be an object")
    unknown = sorted(set(params) - set(schema["properties"]))
    if unknown:
        raise FieldError(unknown[0], f"not a parameter of the {workflow_name} workflow")
    for required in schema.get("required", ()):
        if required not in params:
            raise FieldError(required, f"required by the {workflow_name} workflow")
    return dict(params)


class WorkflowDefaults:
    """What most workflows share: ``score``/``is_better`` over ``key_metric`` and
    ``key_metric_mode`` (for dataclasses with both fields), and no meta in the global model."""

    key_metric: str | None
    key_metric_mode: str

    def score(self, metrics: Mapping[str, Any]) -> float | None:
        if self.key_metric is None:
            return None
        value = metrics.get(self.key_metric)
        if not is_number(value):
            return None
        return float(value) if math.isfinite(value) else None

    def is_better(self, score: float, best: float | None) -> bool:
        if best is None:
            return True
        return score > best if self.key_metric_mode == "max" else score < best

    def global_model_meta(
        self, state: ServerState, params: Mapping[str, torch.Tensor]
    ) -> dict[str, Any]:
        return {}

    def total_rounds_given(self, sites: Sequence[str], state: ServerState) -> int:
        """The rounds the job runs, as known after a round left ``state``: ``total_rounds``
        unless the workflow stopped early (FedAvg's ``stop_cond``)."""
        return self.total_rounds(sites)  # type: ignore[attr-defined, no-any-return]


KEY_METRIC_PARAMETERS: dict[str, Any] = {
    "key_metric": {"type": ["string", "null"], "description": "metric that selects the best model"},
    "key_metric_mode": {"enum": list(KEY_METRIC_MODES), "description": "max or min"},
}
ROUND_COUNT_PARAMETERS: dict[str, Any] = {
    "min_clients": {
        "type": "integer",
        "minimum": 1,
        "maximum": MAX_CLIENTS,
        "description": "sites a round needs",
    },
    "num_rounds": {
        "type": "integer",
        "minimum": 1,
        "maximum": MAX_ROUNDS,
        "description": "rounds to run",
    },
}


def round_label(round_number: int) -> str:
    return f"round {round_for_people(round_number)}"


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


def workflow_registry() -> dict[str, type[Any]]:
    """Every workflow a job can name, by name."""
    from jobs.workflows.cyclic import Cyclic
    from jobs.workflows.evaluation import CrossSiteEval, FedEval
    from jobs.workflows.fedavg import FedAvg, FedProx
    from jobs.workflows.fedopt import FedOpt
    from jobs.workflows.scaffold import Scaffold

    classes: list[type[Any]] = [
        FedAvg,
        FedProx,
        FedOpt,
        Scaffold,
        Cyclic,
        FedEval,
        CrossSiteEval,
    ]
    return {cls.name: cls for cls in classes}


def workflow_from_spec(name: str, params: Mapping[str, Any]) -> Workflow:
    """The workflow a job spec names, with its params; a :class:`FieldError` (a ``ValueError``)
    names the bad field."""
    registry = workflow_registry()
    if name not in registry:
        raise FieldError(
            "workflow", f"unknown workflow {name!r} (known: {', '.join(sorted(registry))})"
        )
    workflow: Workflow = registry[name].from_params(params)
    return workflow
