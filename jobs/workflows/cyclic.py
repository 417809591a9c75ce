"""Cyclic (NVFlare's ``CyclicRecipe``): the sites train one after another, each starting from
the model the previous site sent; ``num_rounds`` passes over all the sites.

Each site's turn is one driver round with one task (a relay), so a turn costs what a FedAvg
round with one site does. The order is the sites' names in order (``order="fixed"``) or a
shuffle for every pass (``order="random"``) drawn from ``seed`` and the pass number: the same
job gives the same order in every env and after a restart. A site that fails, times out or
sends an update that is rejected is skipped: the model passes on unchanged to the next site,
and the round records why.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from client_agent.runtime import TASK_TRAIN
from common.rounds import round_for_people
from common.validators import FieldError, is_int
from jobs.workflows.base import (
    KEY_METRIC_PARAMETERS,
    ROUND_COUNT_PARAMETERS,
    PlannedTask,
    RoundOutcome,
    RoundPlan,
    ServerState,
    TaskSpec,
    WorkflowDefaults,
    check_key_metric,
    check_round_counts,
    params_checked,
)
from jobs.workflows.results import train_updates

if TYPE_CHECKING:
    import torch

    from jobs.aggregation import TensorSource
    from jobs.workflows.results import TaskResult

ORDERS = ("fixed", "random")
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Cyclic(WorkflowDefaults):
    """``num_rounds`` passes of a relay over the sites; ``min_clients`` sites to start."""

    min_clients: int
    num_rounds: int
    order: str = "fixed"
    seed: int = 0
    key_metric: str | None = "accuracy"
    key_metric_mode: str = "max"

    name: ClassVar[str] = "cyclic"
    PARAMETERS: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["min_clients", "num_rounds"],
        "additionalProperties": False,
        "properties": {
            **ROUND_COUNT_PARAMETERS,
            "num_rounds": {
                **ROUND_COUNT_PARAMETERS["num_rounds"],
                "description": "passes over all the sites",
            },
            "order": {
                "enum": list(ORDERS),
                "description": "the sites' order: by name (fixed) or shuffled every pass",
            },
            "seed": {
                "type": "integer",
                "minimum": 0,
                "maximum": MAX_SEED,
                "description": "the shuffle's seed (order=random)",
            },
            **KEY_METRIC_PARAMETERS,
        },
    }

    def __post_init__(self) -> None:
        check_round_counts(self.min_clients, self.num_rounds)
        check_key_metric(self.key_metric, self.key_metric_mode)
        if self.order not in ORDERS:
            raise FieldError("order", f"must be 'fixed' or 'random', got {self.order!r}")
        if not is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise FieldError("seed", f"must be an integer from 0 to {MAX_SEED}, got {self.seed!r}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Cyclic:
        return cls(**params_checked(cls.name, cls.PARAMETERS, params))

    def to_params(self) -> dict[str, Any]:
        return asdict(self)

    def total_rounds(self, sites: Sequence[str]) -> int:
        return self.num_rounds * len(sites)

    def relay_order(self, pass_number: int, sites: Sequence[str]) -> list[str]:
        """The sites' order in pass ``pass_number`` (from 0)."""
        ordered = sorted(sites)
        if self.order == "random":
            random.Random(f"{self.seed}:{pass_number}").shuffle(ordered)
        return ordered

    def initial_state(self, sites: Sequence[str]) -> ServerState:
        return ServerState(data={"order": self.relay_order(0, sites), "position": 0})

    def plan(self, round_number: int, sites: Sequence[str], state: ServerState) -> RoundPlan:
        pass_number, position = divmod(round_number, len(sites))
        holder = self.relay_order(pass_number, sites)[position]
        spec = TaskSpec(
            task_name=TASK_TRAIN,
            current_round=pass_number,
            total_rounds=self.num_rounds,
            meta={"relay_position": position, "relay_length": len(sites)},
        )
        return RoundPlan(
            tasks=(PlannedTask(holder, spec),),
            min_results=0,  # a turn with no good result is skipped, not failed
            label=(
                f"round {round_for_people(pass_number)}, turn {position + 1}/{len(sites)} "
                f"({holder})"
            ),
        )

    def close(
        self,
        round_number: int,
        plan: RoundPlan,
        global_model: Mapping[str, torch.Tensor] | TensorSource,
        results: Sequence[TaskResult],
        state: ServerState,
    ) -> RoundOutcome:
        """The holder's model is the next global model (FULL, or DIFF added to the model it
        received); with no acceptable result, the model passes on unchanged."""
        from jobs.aggregation import fedavg

        pass_number, position = divmod(round_number + 1, len(state.data["order"]))
        next_state = ServerState(
            tensors=state.tensors,
            data={
                "order": self.relay_order(pass_number, state.data["order"]),
                "position": position,
            },
        )
        updates = train_updates(list(results))
        if not updates:
            return RoundOutcome(
                global_params=None,
                state=next_state,
                metrics={},
                site_metrics={},
                sites=(),
            )
        # The weight a site reports means nothing in a relay: one model, passed on.
        update = dataclasses.replace(updates[0], weight=1.0)
        # fedavg of one update is that update (weight 1, exact in the accumulator's dtype),
        # and a DIFF one is added to the model it was made from.
        return RoundOutcome(
            global_params=fedavg([update], global_model),
            state=next_state,
            metrics=dict(update.metrics),
            site_metrics={update.site: dict(update.metrics)},
            sites=(update.site,),
        )
