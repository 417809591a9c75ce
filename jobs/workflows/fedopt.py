"""FedOpt (Reddi et al. 2021, "Adaptive Federated Optimization"): FedAvg's aggregate, then a
server optimizer step.

The server treats the negated change of the round (global model − aggregate) as a gradient and
steps a real ``torch.optim`` optimizer with it (:mod:`jobs.aggregation.server_opt`): SGD with
momentum is FedAvgM, ``FedAdam``/``FedYogi``/``FedAdagrad`` are the paper's adaptive
optimizers. The optimizer's state (momentum, moments, step counts, the scheduler's position)
is the workflow's server state: the driver stores it with every round, so a job resumed after
a worker died mid-round steps from the same state and gives the same bits.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from common.validators import FieldError
from jobs.workflows.base import RoundOutcome, RoundPlan, ServerState, params_checked
from jobs.workflows.fedavg import FedAvg

if TYPE_CHECKING:
    import torch

    from jobs.aggregation import TensorSource
    from jobs.aggregation.server_opt import ServerOptimizer
    from jobs.workflows.results import TaskResult

# FedAvgM, as NVFlare's FedOpt controller and its documentation default to (NVFlare's recipe
# without optimizer_args uses lr 1.0 and no momentum: FedAvg with extra steps).
DEFAULT_OPTIMIZER_ARGS: dict[str, Any] = {
    "path": "torch.optim.SGD",
    "args": {"lr": 1.0, "momentum": 0.6},
}


@dataclass(frozen=True)
class FedOpt(FedAvg):
    """FedAvg's rounds and aggregators, and a server optimizer on the aggregate."""

    optimizer_args: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_OPTIMIZER_ARGS))
    lr_scheduler_args: Mapping[str, Any] | None = None
    buffers: Sequence[str] = ()

    name: ClassVar[str] = "fedopt"
    PARAMETERS: ClassVar[dict[str, Any]] = {
        **FedAvg.PARAMETERS,
        "properties": {
            **FedAvg.PARAMETERS["properties"],
            "optimizer_args": {
                "type": "object",
                "description": 'the server optimizer: {"path": "torch.optim.SGD", "args": '
                '{"lr": 1.0, "momentum": 0.6}}; FedAdam, FedYogi, FedAdagrad too',
            },
            "lr_scheduler_args": {
                "type": ["object", "null"],
                "description": 'a torch.optim.lr_scheduler stepped once a round: {"path": '
                '"torch.optim.lr_scheduler.StepLR", "args": {"step_size": 10}}',
            },
            "buffers": {
                "type": "array",
                "items": {"type": "string"},
                "description": "the model's float buffers (BatchNorm statistics): averaged, "
                "not stepped by the optimizer",
            },
        },
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.buffers, str | bytes) or not all(
            isinstance(b, str) for b in self.buffers
        ):
            raise FieldError("buffers", f"must be a list of tensor names, got {self.buffers!r}")
        object.__setattr__(self, "buffers", tuple(self.buffers))
        optimizer_args, scheduler_args = self.server_optimizer.to_args()
        object.__setattr__(self, "optimizer_args", optimizer_args)
        object.__setattr__(self, "lr_scheduler_args", scheduler_args)

    @functools.cached_property
    def server_optimizer(self) -> ServerOptimizer:
        """The optimizer the arguments name, checked (FieldError names what is wrong); built
        once per workflow object (it keeps no state between steps: the state is the round's)."""
        from jobs.aggregation.server_opt import ServerOptimizer

        return ServerOptimizer.from_args(self.optimizer_args, self.lr_scheduler_args)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> FedOpt:
        return cls(**params_checked(cls.name, cls.PARAMETERS, params))

    def to_params(self) -> dict[str, Any]:
        params = super().to_params()
        params["optimizer_args"] = dict(self.optimizer_args)
        params["lr_scheduler_args"] = (
            dict(self.lr_scheduler_args) if self.lr_scheduler_args is not None else None
        )
        params["buffers"] = list(self.buffers)
        return params

    def close_round(
        self,
        round_number: int,
        plan: RoundPlan,
        global_model: Mapping[str, torch.Tensor] | TensorSource,
        results: Sequence[TaskResult],
        state: ServerState,
    ) -> RoundOutcome:
        from jobs.aggregation.sources import tensors_of

        outcome = super().close_round(round_number, plan, global_model, results, state)
        assert outcome.global_params is not None  # FedAvg always makes one
        start = (
            dict(global_model) if isinstance(global_model, Mapping) else tensors_of(global_model)
        )
        params, tensors, data = self.server_optimizer.step(
            start,
            outcome.global_params,
            state.tensors,
            state.data,
            buffers=self.buffers,
        )
        outcome.global_params = params
        outcome.state = ServerState(tensors=tensors, data=data)
        return outcome
