"""FedAvg: every round, each site trains from the global model; the weighted mean is next."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from client_agent.runtime import TASK_TRAIN
from common.rounds import round_for_people
from common.validators import FieldError, is_int, is_number
from jobs.workflows.base import MAX_CLIENTS, MAX_ROUNDS, QuorumNotMet, RoundOutcome, TaskSpec

if TYPE_CHECKING:  # the aggregation (torch) is imported where a round is aggregated
    import torch

    from jobs.aggregation import SiteUpdate, TensorSource

KEY_METRIC_MODES = ("max", "min")


@dataclass(frozen=True)
class FedAvg:
    """Federated averaging for ``num_rounds`` rounds, each needing ``min_clients`` good updates.

    ``key_metric`` picks the best global model: a site's train result carries metrics that
    score the global model it *received* (NVFlare's convention), so round ``r``'s aggregated
    ``key_metric`` belongs to the model that round ``r`` started from.
    """

    min_clients: int
    num_rounds: int
    key_metric: str | None = "accuracy"
    key_metric_mode: str = "max"

    name: ClassVar[str] = "fedavg"
    PARAMETERS: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["min_clients", "num_rounds"],
        "additionalProperties": False,
        "properties": {
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
            "key_metric": {
                "type": ["string", "null"],
                "description": "metric that selects the best model",
            },
            "key_metric_mode": {"enum": list(KEY_METRIC_MODES), "description": "max or min"},
        },
    }

    def __post_init__(self) -> None:
        for field_name, highest in (("min_clients", MAX_CLIENTS), ("num_rounds", MAX_ROUNDS)):
            value = getattr(self, field_name)
            if not is_int(value) or not 1 <= value <= highest:
                raise FieldError(
                    field_name, f"must be an integer from 1 to {highest}, got {value!r}"
                )
        if self.key_metric is not None and (
            not isinstance(self.key_metric, str) or not self.key_metric
        ):
            raise FieldError(
                "key_metric", f"must be a metric name or None, got {self.key_metric!r}"
            )
        if self.key_metric_mode not in KEY_METRIC_MODES:
            raise FieldError(
                "key_metric_mode", f"must be 'max' or 'min', got {self.key_metric_mode!r}"
            )

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> FedAvg:
        if not isinstance(params, Mapping):
            raise FieldError("params", "must be an object")
        known = set(cls.PARAMETERS["properties"])
        unknown = sorted(set(params) - known)
        if unknown:
            raise FieldError(unknown[0], "not a parameter of the fedavg workflow")
        for required in cls.PARAMETERS["required"]:
            if required not in params:
                raise FieldError(required, "required by the fedavg workflow")
        return cls(**params)

    def to_params(self) -> dict[str, Any]:
        return asdict(self)

    def round_task(self, round_number: int) -> TaskSpec:
        return TaskSpec(
            task_name=TASK_TRAIN, current_round=round_number, total_rounds=self.num_rounds
        )

    def aggregate(
        self,
        round_number: int,
        global_params: Mapping[str, torch.Tensor] | TensorSource,
        updates: list[SiteUpdate],
    ) -> RoundOutcome:
        """Fold the round's accepted updates, in site-name order so the bits are repeatable."""
        from jobs.aggregation import fedavg, weighted_metrics

        if len(updates) < self.min_clients:
            raise QuorumNotMet(
                f"round {round_for_people(round_number)}: {len(updates)} acceptable update(s), "
                f"min_clients is {self.min_clients}"
            )
        ordered = sorted(updates, key=lambda u: u.site)
        return RoundOutcome(
            global_params=fedavg(ordered, global_params),
            metrics=weighted_metrics(ordered),
            site_metrics={u.site: dict(u.metrics) for u in ordered},
            sites=tuple(u.site for u in ordered),
        )

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
