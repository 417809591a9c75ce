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

from client_agent.config import EXCHANGE_FORMAT_META_KEY
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
from jobs.workflows.training_options import EARLY_STOP_STATE_KEY

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


# The inner workflow of a cross-site evaluation of server models, with no training.
SERVER_MODELS = "server_models"


@dataclass(frozen=True)
class ServerModels(WorkflowDefaults):
    """No training: the job's initial model file holds several models, each under
    ``"<model>/"``; one round with no tasks keeps each as a checkpoint of its name, for
    :class:`CrossSiteEval` to evaluate (NVFlare's ``NumpyCrossSiteEvalRecipe`` with
    ``model_dir`` and ``model_name``). Only cross-site evaluation runs it."""

    min_clients: int
    models: tuple[str, ...]
    exchange_format: str = "pytorch"
    key_metric: str | None = "accuracy"
    key_metric_mode: str = "max"

    name: ClassVar[str] = SERVER_MODELS
    PARAMETERS: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["min_clients", "models"],
        "additionalProperties": False,
        "properties": {
            "min_clients": ROUND_COUNT_PARAMETERS["min_clients"],
            "models": {
                "type": "array",
                "items": {"type": "string"},
                "description": "the server's models, by name",
            },
            "exchange_format": {"enum": ["pytorch", "numpy"]},
            **KEY_METRIC_PARAMETERS,
        },
    }

    def __post_init__(self) -> None:
        check_round_counts(self.min_clients, 1)
        if (
            isinstance(self.models, str)
            or not self.models
            or not all(isinstance(m, str) and m and "/" not in m for m in self.models)
        ):
            raise FieldError("models", f"must be a list of model names, got {self.models!r}")
        if len(set(self.models)) != len(self.models) or any(
            m == "global" or m.startswith(SITE_MODEL_PREFIX) for m in self.models
        ):
            raise FieldError("models", "names must be unique, not 'global' nor 'site:…'")
        object.__setattr__(self, "models", tuple(self.models))
        if self.exchange_format not in ("pytorch", "numpy"):
            raise FieldError(
                "exchange_format", f"must be pytorch or numpy, got {self.exchange_format!r}"
            )
        check_key_metric(self.key_metric, self.key_metric_mode)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> ServerModels:
        return cls(**params_checked(cls.name, cls.PARAMETERS, params))

    def to_params(self) -> dict[str, Any]:
        return {
            "min_clients": self.min_clients,
            "models": list(self.models),
            "exchange_format": self.exchange_format,
            "key_metric": self.key_metric,
            "key_metric_mode": self.key_metric_mode,
        }

    @property
    def num_rounds(self) -> int:
        return 1

    def total_rounds(self, sites: Sequence[str]) -> int:
        return 1

    def initial_state(self, sites: Sequence[str]) -> ServerState:
        return ServerState()

    def plan(self, round_number: int, sites: Sequence[str], state: ServerState) -> RoundPlan:
        return RoundPlan(tasks=(), min_results=0, label="the server's models")

    def close(
        self,
        round_number: int,
        plan: RoundPlan,
        global_model: Mapping[str, torch.Tensor] | TensorSource,
        results: Sequence[TaskResult],
        state: ServerState,
    ) -> RoundOutcome:
        from jobs.aggregation.sources import PrefixedTensorSource, as_source

        source = as_source(global_model)
        return RoundOutcome(
            global_params=None,
            state=state,
            metrics={},
            site_metrics={},
            sites=(),
            scores_start_model=False,
            checkpoints={m: PrefixedTensorSource(source, f"{m}/") for m in self.models},
        )


@dataclass(frozen=True)
class CrossSiteEval:
    """A training workflow, then cross-site evaluation of its final global model and of every
    site's own model (see the module's docstring)."""

    train: Workflow
    # False: only the final global model is evaluated (add_final_global_evaluation), with no
    # round where the sites submit their own models.
    site_models: bool = True
    # The sites that evaluate; None: every site of the job.
    clients: tuple[str, ...] | None = None

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
            "site_models": {
                "type": "boolean",
                "description": "evaluate each site's own model too (false: the global only)",
            },
            "clients": {
                "type": ["array", "null"],
                "items": {"type": "string"},
                "description": "the sites that evaluate (null: every site)",
            },
        },
    }

    def __post_init__(self) -> None:
        if isinstance(self.train, CrossSiteEval):
            raise FieldError("train_workflow", "already ends with cross-site evaluation")
        if not isinstance(self.site_models, bool):
            raise FieldError("site_models", f"must be true or false, got {self.site_models!r}")
        if self.clients is not None:
            if isinstance(self.clients, str) or not all(
                isinstance(c, str) and c for c in self.clients
            ):
                raise FieldError("clients", f"must be a list of site names, got {self.clients!r}")
            if not self.clients:
                raise FieldError("clients", "must not be empty (null: every site)")
            object.__setattr__(self, "clients", tuple(self.clients))

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> CrossSiteEval:
        checked = params_checked(cls.name, cls.PARAMETERS, params)
        name = checked["train_workflow"]
        if name == SERVER_MODELS:
            return cls(
                ServerModels.from_params(checked["train_params"]),
                site_models=checked.get("site_models", True),
                clients=checked.get("clients"),
            )
        if name not in TRAINING_WORKFLOWS:
            raise FieldError(
                "train_workflow",
                f"{name!r} is not a training workflow (one of: {', '.join(TRAINING_WORKFLOWS)})",
            )
        return cls(
            workflow_from_spec(name, checked["train_params"]),
            site_models=checked.get("site_models", True),
            clients=checked.get("clients"),
        )

    def to_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "train_workflow": self.train.name,
            "train_params": self.train.to_params(),
        }
        # At their defaults they stay out: specs written before they existed read the same.
        if not self.site_models:
            params["site_models"] = False
        if self.clients is not None:
            params["clients"] = list(self.clients)
        return params

    def exchange_meta(self) -> dict[str, Any]:
        """The training's exchange format for the evaluation tasks too: a NumPy job's script
        gets numpy arrays in every task."""
        exchange_format = getattr(self.train, "exchange_format", "pytorch")
        return {} if exchange_format == "pytorch" else {EXCHANGE_FORMAT_META_KEY: exchange_format}

    def evaluators(self, sites: Sequence[str]) -> list[str]:
        """The sites that evaluate: ``clients`` among the job's sites, or all of them."""
        return list(sites) if self.clients is None else [s for s in sites if s in self.clients]

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

    def evaluation_rounds(self, sites: Sequence[str]) -> int:
        # The submit round (when the sites' models are evaluated), then one round per model.
        return (1 if self.site_models else 0) + len(self.models(sites))

    def total_rounds(self, sites: Sequence[str]) -> int:
        return self.train.total_rounds(sites) + self.evaluation_rounds(sites)

    def total_rounds_given(self, sites: Sequence[str], state: ServerState) -> int:
        # Training stopped early is followed by the evaluation rounds all the same.
        return self.train.total_rounds_given(sites, state) + self.evaluation_rounds(sites)

    def models(self, sites: Sequence[str]) -> list[str]:
        """The models evaluated, in order: the final global model (or the server's models),
        then each site's."""
        server = list(self.train.models) if isinstance(self.train, ServerModels) else ["global"]
        if not self.site_models:
            return server
        return [*server, *(SITE_MODEL_PREFIX + site for site in sorted(sites))]

    def initial_state(self, sites: Sequence[str]) -> ServerState:
        return self.train.initial_state(sites)

    def plan(self, round_number: int, sites: Sequence[str], state: ServerState) -> RoundPlan:
        trained = self.train.total_rounds_given(sites, state)
        if round_number < trained:
            return self.train.plan(round_number, sites, state)
        evaluators = self.evaluators(sites)
        min_results = min(self.min_clients, len(evaluators))
        if round_number == trained and self.site_models:
            spec = TaskSpec(
                task_name=TASK_SUBMIT_MODEL,
                current_round=0,
                total_rounds=1,
                meta={PHASE: SUBMIT, **self.exchange_meta()},
            )
            return every_site(
                sites,
                spec,
                min_results=self.min_clients,
                label="cross-site evaluation: the sites' models",
            )
        submit_rounds = 1 if self.site_models else 0
        model = self.models(sites)[round_number - trained - submit_rounds]
        label = (
            f"cross-site evaluation of {model}" if self.site_models else f"evaluation of {model}"
        )
        if model.startswith(SITE_MODEL_PREFIX) and model not in state.data.get("submitted", ()):
            return RoundPlan(tasks=(), min_results=0, label=f"{label}: not submitted")
        spec = TaskSpec(
            task_name=TASK_VALIDATE,
            current_round=0,
            total_rounds=1,
            meta={PHASE: EVALUATE, "model": model, **self.exchange_meta()},
        )
        ref = GLOBAL_MODEL if model == "global" else ModelRef(model)
        return every_site(evaluators, spec, min_results=min_results, label=label, model=ref)

    def close(
        self,
        round_number: int,
        plan: RoundPlan,
        global_model: Mapping[str, torch.Tensor] | TensorSource,
        results: Sequence[TaskResult],
        state: ServerState,
    ) -> RoundOutcome:
        if not plan.tasks:
            if isinstance(self.train, ServerModels) and round_number == 0:
                return self.train.close(round_number, plan, global_model, results, state)
            return evaluation_outcome("", (), state)  # a model no site submitted
        phase = plan.tasks[0].spec.meta.get(PHASE)
        if phase == SUBMIT:
            submitted = [r for r in results if isinstance(r, SubmittedModel)]
            return RoundOutcome(
                global_params=None,
                state=ServerState(
                    tensors={},
                    data={
                        "submitted": [SITE_MODEL_PREFIX + r.site for r in submitted],
                        # Kept: where training stopped early places the evaluation rounds.
                        **{k: v for k, v in state.data.items() if k == EARLY_STOP_STATE_KEY},
                    },
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
