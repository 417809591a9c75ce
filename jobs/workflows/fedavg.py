"""FedAvg: every round, each site trains from the global model; the aggregate is next.

The aggregate is the weighted mean by default (``aggregator="mean"``), or one of the robust
aggregators of :mod:`jobs.aggregation.robust` (``"median"``, ``"trimmed_mean"``, ``"krum"``)
with its ``aggregator_args``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from client_agent.runtime import TASK_TRAIN
from common.validators import FieldError, check_finite_number
from jobs.workflows.aggregators import AGGREGATOR_PARAMETERS, check_aggregator
from jobs.workflows.base import (
    KEY_METRIC_PARAMETERS,
    ROUND_COUNT_PARAMETERS,
    RoundOutcome,
    RoundPlan,
    ServerState,
    TaskSpec,
    WorkflowDefaults,
    check_key_metric,
    check_round_counts,
    every_site,
    params_checked,
    round_label,
)
from jobs.workflows.results import train_updates

if TYPE_CHECKING:  # the aggregation (torch) is imported where a round is aggregated
    import torch

    from jobs.aggregation import SiteUpdate, TensorSource
    from jobs.workflows.results import TaskResult


def fold(
    aggregator: str,
    aggregator_args: Mapping[str, Any],
    updates: list[SiteUpdate],
    global_model: Mapping[str, torch.Tensor] | TensorSource,
) -> dict[str, torch.Tensor]:
    """The aggregate of checked updates (site-name order) by the named aggregator."""
    from jobs.aggregation import make_aggregator

    return make_aggregator(aggregator, **aggregator_args)(updates, global_model)


# NVFlare's TransferType names; the meta key is the one the Client API reads.
PARAMS_TRANSFER_TYPES = ("FULL", "DIFF")
PARAMS_TRANSFER_TYPE_META_KEY = "params_transfer_type"


@dataclass(frozen=True)
class FedAvg(WorkflowDefaults):
    """Federated averaging for ``num_rounds`` rounds, each needing ``min_clients`` good updates.

    ``key_metric`` picks the best global model: a site's train result carries metrics that
    score the global model it *received* (NVFlare's convention), so round ``r``'s aggregated
    ``key_metric`` belongs to the model that round ``r`` started from.
    """

    min_clients: int
    num_rounds: int
    key_metric: str | None = "accuracy"
    key_metric_mode: str = "max"
    aggregator: str = "mean"
    aggregator_args: Mapping[str, Any] = field(default_factory=dict)
    params_transfer_type: str = "FULL"

    name: ClassVar[str] = "fedavg"
    PARAMETERS: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["min_clients", "num_rounds"],
        "additionalProperties": False,
        "properties": {
            **ROUND_COUNT_PARAMETERS,
            **KEY_METRIC_PARAMETERS,
            **AGGREGATOR_PARAMETERS,
            "params_transfer_type": {
                "enum": list(PARAMS_TRANSFER_TYPES),
                "description": "FULL: sites send their weights; DIFF: their change",
            },
        },
    }

    def __post_init__(self) -> None:
        check_round_counts(self.min_clients, self.num_rounds)
        if self.params_transfer_type not in PARAMS_TRANSFER_TYPES:
            raise FieldError(
                "params_transfer_type",
                f"must be one of {list(PARAMS_TRANSFER_TYPES)}, got {self.params_transfer_type!r}",
            )
        check_key_metric(self.key_metric, self.key_metric_mode)
        object.__setattr__(
            self,
            "aggregator_args",
            check_aggregator(self.aggregator, self.aggregator_args, self.min_clients),
        )

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> FedAvg:
        return cls(**params_checked(cls.name, cls.PARAMETERS, params))

    def to_params(self) -> dict[str, Any]:
        params = asdict(self)
        params["aggregator_args"] = dict(self.aggregator_args)
        if self.params_transfer_type == "FULL":
            # The default stays out of the spec: job specs written before it existed read
            # the same, and a FULL job's spec is unchanged.
            del params["params_transfer_type"]
        return params

    def total_rounds(self, sites: Sequence[str]) -> int:
        return self.num_rounds

    def initial_state(self, sites: Sequence[str]) -> ServerState:
        return ServerState()

    def train_meta(self) -> dict[str, Any]:
        """What every train task's ``FLModel.meta`` carries: with DIFF, the Client API sends
        the site's weights minus the global weights it received, NVFlare's way."""
        if self.params_transfer_type == "FULL":
            return {}  # absent means FULL, so bundles made before this key read the same
        return {PARAMS_TRANSFER_TYPE_META_KEY: self.params_transfer_type}

    def round_task(self, round_number: int) -> TaskSpec:
        return TaskSpec(
            task_name=TASK_TRAIN,
            current_round=round_number,
            total_rounds=self.num_rounds,
            meta=self.train_meta(),
        )

    def plan(self, round_number: int, sites: Sequence[str], state: ServerState) -> RoundPlan:
        return every_site(
            sites,
            self.round_task(round_number),
            min_results=self.min_clients,
            label=round_label(round_number),
        )

    def close(
        self,
        round_number: int,
        plan: RoundPlan,
        global_model: Mapping[str, torch.Tensor] | TensorSource,
        results: Sequence[TaskResult],
        state: ServerState,
    ) -> RoundOutcome:
        """Fold the round's accepted updates, in site-name order so the bits are repeatable."""
        from jobs.aggregation import weighted_metrics

        updates = train_updates(list(results))
        return RoundOutcome(
            global_params=fold(self.aggregator, self.aggregator_args, updates, global_model),
            state=state,
            metrics=weighted_metrics(updates),
            site_metrics={u.site: dict(u.metrics) for u in updates},
            sites=tuple(u.site for u in updates),
        )


FEDPROX_MU_META_KEY = "fedprox_mu"


@dataclass(frozen=True)
class FedProx(FedAvg):
    """FedAvg whose train tasks carry the proximal weight ``fedprox_mu`` in ``FLModel.meta``
    (``meta["fedprox_mu"]``); the site script adds ``PTFedProxLoss(mu)`` (Li et al. 2020) to
    its loss. The server side is FedAvg's, aggregator included."""

    fedprox_mu: float = 0.01

    name: ClassVar[str] = "fedprox"
    PARAMETERS: ClassVar[dict[str, Any]] = {
        **FedAvg.PARAMETERS,
        "properties": {
            **FedAvg.PARAMETERS["properties"],
            "fedprox_mu": {
                "type": "number",
                "minimum": 0,
                "description": "the proximal term's weight mu, handed to the site script",
            },
        },
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        mu = check_finite_number("fedprox_mu", self.fedprox_mu)
        if mu < 0:
            raise FieldError("fedprox_mu", f"must be at least 0, got {self.fedprox_mu!r}")
        object.__setattr__(self, "fedprox_mu", mu)

    def round_task(self, round_number: int) -> TaskSpec:
        return TaskSpec(
            task_name=TASK_TRAIN,
            current_round=round_number,
            total_rounds=self.num_rounds,
            meta={**self.train_meta(), FEDPROX_MU_META_KEY: self.fedprox_mu},
        )
