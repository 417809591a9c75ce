"""Evaluation workflows: federated evaluation of one model (NVFlare's ``FedEvalRecipe``), and
cross-site evaluation after any training workflow (NVFlare's ``add_cross_site_evaluation``).

Cross-site evaluation, as :class:`CrossSiteEval` runs it after the training workflow's rounds:

1. one round of ``submit_model`` tasks: each site sends its own local model, kept as the
   checkpoint ``"site:<name>"``;
2. one round per model (the final global model first, then each site's, in name order): every
   site evaluates it (a ``validate`` task) and sends its metrics.

The scores form the matrix models × sites (``Run.cross_site_matrix``). A model a site did
not submit gets an evaluation round with no tasks, so the round count never depends on what
the sites answered. Evaluation rounds never change the global model and their metrics never
pick the best model (they do not score a model the training made in that round).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from client_agent.runtime import TASK_SUBMIT_MODEL, TASK_VALIDATE
from common.validators import FieldError
from jobs.workflows.base import (
    GLOBAL_MODEL,
    KEY_METRIC_PARAMETERS,
    ROUND_COUNT_PARAMETERS,
    Evaluation,
    ModelRef,
    RoundOutcome,
    RoundPlan,
    ServerState,
    TaskSpec,
    Workflow,
    WorkflowDefaults,
    check_key_metric,
    check_round_counts,
    every_site,
    params_checked,
    workflow_from_spec,
)
from jobs.workflows.results import EvalResult, SubmittedModel

if TYPE_CHECKING:
    import torch

    from jobs.aggregation import TensorSource
    from jobs.workflows.results import TaskResult

SITE_MODEL_PREFIX = "site:"
# The workflows cross-site evaluation can follow (a test checks this against the registry).
TRAINING_WORKFLOWS = ("cyclic", "fedavg", "fedopt", "fedprox", "scaffold")
# The meta key that marks the tasks of the cross-site rounds (the script sees it too): which
# phase a round belongs to is read from its plan, so closing needs no count of the sites.
PHASE = "cross_site_phase"
SUBMIT = "submit_model"
EVALUATE = "evaluate"


def mean_metrics(results: Sequence[EvalResult]) -> dict[str, float]:
    """Each metric's plain mean over the sites that sent it (an evaluation has no weights)."""
    values: dict[str, list[float]] = {}
    for result in results:
        for key, value in result.metrics.items():
            values.setdefault(key, []).append(float(value))
    return {key: math.fsum(v) / len(v) for key, v in values.items()}


def evaluation_outcome(
    model: str, results: Sequence[TaskResult], state: ServerState
) -> RoundOutcome:
    """A round in which every site scored ``model``: its cells of the matrix, their means."""
    scored = [r for r in results if isinstance(r, EvalResult)]
    return RoundOutcome(
        global_params=None,
        state=state,
        metrics=mean_metrics(scored),
        site_metrics={r.site: dict(r.metrics) for r in scored},
        sites=tuple(r.site for r in scored),
        scores_start_model=False,
        evaluations=[Evaluation(model, r.site, dict(r.metrics)) for r in scored],
    )


@dataclass(frozen=True)
class FedEval(WorkflowDefaults):
    """Every site evaluates the job's model (the checkpoint the recipe was given) once."""

    min_clients: int
    key_metric: str | None = "accuracy"
    key_metric_mode: str = "max"

    name: ClassVar[str] = "fedeval"
    PARAMETERS: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["min_clients"],
        "additionalProperties": False,
        "properties": {
            "min_clients": ROUND_COUNT_PARAMETERS["min_clients"],
            **KEY_METRIC_PARAMETERS,
        },
    }

    @property
    def num_rounds(self) -> int:
        return 1

    def __post_init__(self) -> None:
        check_round_counts(self.min_clients, 1)
        check_key_metric(self.key_metric, self.key_metric_mode)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> FedEval:
        return cls(**params_checked(cls.name, cls.PARAMETERS, params))

    def to_params(self) -> dict[str, Any]:
        return {
            "min_clients": self.min_clients,
            "key_metric": self.key_metric,
            "key_metric_mode": self.key_metric_mode,
        }

    def total_rounds(self, sites: Sequence[str]) -> int:
        return 1

    def initial_state(self, sites: Sequence[str]) -> ServerState:
        return ServerState()

    def plan(self, round_number: int, sites: Sequence[str], state: ServerState) -> RoundPlan:
        spec = TaskSpec(task_name=TASK_VALIDATE, current_round=0, total_rounds=1)
        return every_site(sites, spec, min_results=self.min_clients, label="evaluation")

    def close(
        self,
        round_number: int,
        plan: RoundPlan,
        global_model: Mapping[str, torch.Tensor] | TensorSource,
        results: Sequence[TaskResult],
        state: ServerState,
    ) -> RoundOutcome:
        return evaluation_outcome("global", results, state)


@dataclass(frozen=True)
class CrossSiteEval:
    """A training workflow, then cross-site evaluation of its final global model and of every
    site's own model (see the module's docstring)."""

    train: Workflow

    name: ClassVar[str] = "cross_site_eval"
    PARAMETERS: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["train_workflow", "train_params"],
        "additionalProperties": False,
        "properties": {
            "train_workflow": {
                "enum": list(TRAINING_WORKFLOWS),
                "description": "the training workflow",
            },
            "train_params": {"type": "object", "description": "its parameters"},
        },
    }

    def __post_init__(self) -> None:
        if isinstance(self.train, CrossSiteEval):
            raise FieldError("train_workflow", "already ends with cross-site evaluation")

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> CrossSiteEval:
        checked = params_checked(cls.name, cls.PARAMETERS, params)
        name = checked["train_workflow"]
        if name not in TRAINING_WORKFLOWS:
            raise FieldError(
                "train_workflow",
                f"{name!r} is not a training workflow (one of: {', '.join(TRAINING_WORKFLOWS)})",
            )
        return cls(workflow_from_spec(name, checked["train_params"]))

    def to_params(self) -> dict[str, Any]:
        return {"train_workflow": self.train.name, "train_params": self.train.to_params()}

    @property
    def min_clients(self) -> int:
        return self.train.min_clients

    @property
    def num_rounds(self) -> int:
        return self.train.num_rounds

    @property
    def key_metric(self) -> str | None:
        return getattr(self.train, "key_metric", None)

    def score(self, metrics: Mapping[str, Any]) -> float | None:
        return self.train.score(metrics)

    def is_better(self, score: float, best: float | None) -> bool:
        return self.train.is_better(score, best)

    def global_model_meta(
        self, state: ServerState, params: Mapping[str, torch.Tensor]
    ) -> dict[str, Any]:
        # Cross-site rounds' states are the evaluation's own ("submitted"), never the
        # training's, and their tasks need no meta.
        if "submitted" in state.data:
            return {}
        return self.train.global_model_meta(state, params)

    def total_rounds(self, sites: Sequence[str]) -> int:
        # Training, the submit round, then one round per model: the global one and each site's.
        return self.train.total_rounds(sites) + 1 + 1 + len(sites)

    def models(self, sites: Sequence[str]) -> list[str]:
        """The models evaluated, in order: the final global model, then each site's."""
        return ["global", *(SITE_MODEL_PREFIX + site for site in sorted(sites))]

    def initial_state(self, sites: Sequence[str]) -> ServerState:
        return self.train.initial_state(sites)

    def plan(self, round_number: int, sites: Sequence[str], state: ServerState) -> RoundPlan:
        trained = self.train.total_rounds(sites)
        if round_number < trained:
            return self.train.plan(round_number, sites, state)
        if round_number == trained:
            spec = TaskSpec(
                task_name=TASK_SUBMIT_MODEL,
                current_round=0,
                total_rounds=1,
                meta={PHASE: SUBMIT},
            )
            return every_site(
                sites,
                spec,
                min_results=self.min_clients,
                label="cross-site evaluation: the sites' models",
            )
        model = self.models(sites)[round_number - trained - 1]
        label = f"cross-site evaluation of {model}"
        if model != "global" and model not in state.data.get("submitted", ()):
            return RoundPlan(tasks=(), min_results=0, label=f"{label}: not submitted")
        spec = TaskSpec(
            task_name=TASK_VALIDATE,
            current_round=0,
            total_rounds=1,
            meta={PHASE: EVALUATE, "model": model},
        )
        ref = GLOBAL_MODEL if model == "global" else ModelRef(model)
        return every_site(sites, spec, min_results=self.min_clients, label=label, model=ref)

    def close(
        self,
        round_number: int,
        plan: RoundPlan,
        global_model: Mapping[str, torch.Tensor] | TensorSource,
        results: Sequence[TaskResult],
        state: ServerState,
    ) -> RoundOutcome:
        if not plan.tasks:  # a model no site submitted: nothing to score
            return evaluation_outcome("", (), state)
        phase = plan.tasks[0].spec.meta.get(PHASE)
        if phase == SUBMIT:
            submitted = [r for r in results if isinstance(r, SubmittedModel)]
            return RoundOutcome(
                global_params=None,
                state=ServerState(
                    tensors={},
                    data={"submitted": [SITE_MODEL_PREFIX + r.site for r in submitted]},
                ),
                metrics={},
                site_metrics={r.site: dict(r.metrics) for r in submitted},
                sites=tuple(r.site for r in submitted),
                scores_start_model=False,
                checkpoints={SITE_MODEL_PREFIX + r.site: r.update.source for r in submitted},
            )
        if phase == EVALUATE:
            return evaluation_outcome(str(plan.tasks[0].spec.meta["model"]), results, state)
        return self.train.close(round_number, plan, global_model, results, state)
