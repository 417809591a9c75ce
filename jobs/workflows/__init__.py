"""Round logic written once as plain Python over tensors. ``SimEnv`` and the portal's Celery
tasks drive the same workflow objects through the protocol of :mod:`jobs.workflows.base`;
neither has a copy of any algorithm."""

from jobs.workflows.base import (
    GLOBAL_MODEL,
    CloseDecision,
    Evaluation,
    ModelRef,
    PlannedTask,
    QuorumNotMet,
    RoundOutcome,
    RoundPlan,
    ServerState,
    TaskSpec,
    Workflow,
    best_score_after,
    round_close_decision,
    workflow_from_spec,
    workflow_registry,
)
from jobs.workflows.fedavg import FedAvg
from jobs.workflows.results import (
    EvalResult,
    SubmittedModel,
    TaskResult,
    TrainResult,
    close_result,
    fill_withheld,
    result_from_file,
)

__all__ = [
    "GLOBAL_MODEL",
    "CloseDecision",
    "EvalResult",
    "Evaluation",
    "FedAvg",
    "ModelRef",
    "PlannedTask",
    "QuorumNotMet",
    "RoundOutcome",
    "RoundPlan",
    "ServerState",
    "SubmittedModel",
    "TaskResult",
    "TaskSpec",
    "TrainResult",
    "Workflow",
    "best_score_after",
    "close_result",
    "fill_withheld",
    "result_from_file",
    "round_close_decision",
    "workflow_from_spec",
    "workflow_registry",
]
