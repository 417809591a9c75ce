"""Round logic written once as plain Python over tensors. ``SimEnv`` and the portal's Celery
tasks drive the same workflow objects; neither has a copy of the algorithm."""

from jobs.workflows.base import QuorumNotMet, RoundOutcome, TaskSpec, Workflow, workflow_from_spec
from jobs.workflows.fedavg import FedAvg

__all__ = [
    "FedAvg",
    "QuorumNotMet",
    "RoundOutcome",
    "TaskSpec",
    "Workflow",
    "workflow_from_spec",
]
