"""What every workflow offers its driver (``SimEnv`` in-process, Celery on the portal)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from common.validators import FieldError

if TYPE_CHECKING:  # the portal reads workflows' parameters and tasks without torch
    import torch

    from jobs.aggregation import SiteUpdate, TensorSource


# Bounds of every workflow's round and site counts: far beyond any federation, and inside the
# portal database's integer columns (a job's num_rounds and min_clients).
MAX_ROUNDS = 100_000
MAX_CLIENTS = 10_000


class QuorumNotMet(RuntimeError):
    """Fewer sites answered a round acceptably than the workflow needs."""


@dataclass(frozen=True)
class TaskSpec:
    """What a round asks every participating site to do."""

    task_name: str
    current_round: int
    total_rounds: int
    start_round: int = 0
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundOutcome:
    """A closed round: the next global model and the metrics that scored the previous one."""

    global_params: dict[str, torch.Tensor]
    metrics: dict[str, float]
    site_metrics: dict[str, dict[str, Any]]
    sites: tuple[str, ...]


class Workflow(Protocol):
    name: ClassVar[str]

    @property
    def min_clients(self) -> int: ...

    @property
    def num_rounds(self) -> int: ...

    def to_params(self) -> dict[str, Any]: ...

    def round_task(self, round_number: int) -> TaskSpec: ...

    def aggregate(
        self,
        round_number: int,
        global_params: Mapping[str, torch.Tensor] | TensorSource,
        updates: list[SiteUpdate],
    ) -> RoundOutcome: ...

    def score(self, metrics: Mapping[str, Any]) -> float | None: ...

    def is_better(self, score: float, best: float | None) -> bool: ...


def _registry() -> dict[str, type[Any]]:
    from jobs.workflows.fedavg import FedAvg

    return {FedAvg.name: FedAvg}


def workflow_from_spec(name: str, params: Mapping[str, Any]) -> Workflow:
    """The workflow a job spec names, with its params; a :class:`FieldError` (a ``ValueError``)
    names the bad field."""
    registry = _registry()
    if name not in registry:
        raise FieldError(
            "workflow", f"unknown workflow {name!r} (known: {', '.join(sorted(registry))})"
        )
    workflow: Workflow = registry[name].from_params(params)
    return workflow
