"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", control variates option II), with NVFlare's conventions.

The server keeps the control variate ``c`` (one tensor per floating-point weight, zeros at
first) as its server state and sends it with the global model, in the model file's
``meta[AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL]``. Each site corrects its steps with ``c`` and
its own ``c_i`` (``client_agent.pt.PTScaffoldHelper``) and sends its weights and
``meta[SCAFFOLD_CTRL_DIFF]`` = ``c_i+ - c_i``. The server takes FedAvg's weighted mean of the
weights (the paper's global step size 1) and ``c ← c + |S|/N · mean_i(Δc_i)``, ``S`` the sites
whose results were accepted and ``N`` the sites the round asked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from client_agent.fl_model import AlgorithmConstants
from jobs.workflows.base import RoundOutcome, RoundPlan, ServerState, params_checked
from jobs.workflows.fedavg import FedAvg
from jobs.workflows.results import train_updates

if TYPE_CHECKING:
    import torch

    from jobs.aggregation import TensorSource
    from jobs.workflows.results import TaskResult


@dataclass(frozen=True)
class Scaffold(FedAvg):
    """FedAvg's rounds with SCAFFOLD's control variates (see the module's docstring)."""

    name: ClassVar[str] = "scaffold"
    PARAMETERS: ClassVar[dict[str, Any]] = {
        **FedAvg.PARAMETERS,
        "properties": {
            key: value
            for key, value in FedAvg.PARAMETERS["properties"].items()
            # The control variates are a mean's: a robust aggregate would not match them.
            if key not in ("aggregator", "aggregator_args")
        },
    }

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Scaffold:
        return cls(**params_checked(cls.name, cls.PARAMETERS, params))

    def to_params(self) -> dict[str, Any]:
        params = super().to_params()
        del params["aggregator"], params["aggregator_args"]
        return params

    def global_model_meta(
        self, state: ServerState, params: Mapping[str, torch.Tensor]
    ) -> dict[str, Any]:
        """``c`` for the sites, in the model file they get: zeros before the first round."""
        import torch

        controls = {
            name: state.tensors.get(name, torch.zeros_like(tensor))
            for name, tensor in params.items()
            if tensor.is_floating_point()
        }
        return {AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL: controls}

    def close_round(
        self,
        round_number: int,
        plan: RoundPlan,
        global_model: Mapping[str, torch.Tensor] | TensorSource,
        results: Sequence[TaskResult],
        state: ServerState,
    ) -> RoundOutcome:
        import torch

        outcome = super().close_round(round_number, plan, global_model, results, state)
        assert outcome.global_params is not None
        updates = train_updates(list(results))
        share = len(updates) / max(len(plan.tasks), 1)
        floats = {n: t for n, t in outcome.global_params.items() if t.is_floating_point()}
        # Each site's changes are read one site at a time and summed in float64, in site-name
        # order: memory stays one model's worth, and every driver gets the same bits.
        totals: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for update in updates:
            for name, diff in update.source.meta_tensors(
                AlgorithmConstants.SCAFFOLD_CTRL_DIFF
            ).items():
                if name not in floats:
                    continue
                if name in totals:
                    totals[name] += diff.to(torch.float64)
                else:
                    totals[name] = diff.to(torch.float64, copy=True)
                counts[name] = counts.get(name, 0) + 1
        controls: dict[str, torch.Tensor] = {}
        for name, tensor in floats.items():
            current = state.tensors.get(name, torch.zeros_like(tensor))
            if name not in totals:
                controls[name] = current
                continue
            mean = totals[name] / counts[name]
            controls[name] = (current.to(torch.float64) + share * mean).to(current.dtype)
        outcome.state = ServerState(tensors=controls, data={"sites_in_last_round": len(updates)})
        return outcome
