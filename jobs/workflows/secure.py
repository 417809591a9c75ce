"""Secure aggregation as both drivers use it: which workflows take it, the vector a site
protects, and the round closed from the sum alone.

A FedAvg-family workflow (FedAvg, FedProx, FedOpt) needs only the weighted mean of the
sites' updates: FedAvg's next model is that mean, FedOpt's server step starts from it. With
``secure_aggregation`` set, each site sends its weighted update protected
(:mod:`client_agent.secagg`), the driver gets back only the sum ``Σ wᵢ xᵢ`` over the sites
that answered, and :func:`close_from_sum` hands the workflow one update, the mean
``Σ wᵢ xᵢ / Σ wᵢ``, as if a single site had sent it. The workflow's own ``close`` does the
rest (FedOpt's optimizer step, ``exclude_vars``, early stopping), unchanged.

What stays in the clear, as on a plain round: each site's weight (its
``NUM_STEPS_CURRENT_ROUND``) and metrics. What the workflow cannot have: anything that needs
one site's update, so robust aggregators, ``aggregation_weights`` (per-site weights applied
by the server) and server-side DP (per-site clipping) are refused with the option.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from client_agent.fl_model import ParamsType
from client_agent.secagg.session import (
    HOMOMORPHIC,
    KINDS,
    MASKING,
    MIN_SITES,
    SECURE_AGGREGATION_META_KEY,
    error_bound,
)
from client_agent.secagg.vector import Layout, WeightedUpdate
from common.validators import FieldError
from jobs.workflows.base import RoundOutcome, RoundPlan, ServerState

if TYPE_CHECKING:
    import torch

    from jobs.aggregation import SiteUpdate, TensorSource
    from jobs.workflows.base import Workflow

SECURE_WORKFLOWS = ("fedavg", "fedprox", "fedopt")
AGGREGATE_SITE = "(secure aggregate)"
"""The name the sum goes by when the workflow folds it: not a site name (those have no
parentheses), so it cannot be taken for one."""

__all__ = [
    "AGGREGATE_SITE",
    "HOMOMORPHIC",
    "KINDS",
    "MASKING",
    "SECURE_AGGREGATION_META_KEY",
    "SECURE_WORKFLOWS",
    "check_secure_aggregation",
    "close_from_sum",
    "error_bound",
    "layout_of",
    "protection_of",
    "site_vector",
]


def check_secure_aggregation(
    value: Any,
    *,
    workflow: str,
    min_clients: int,
    aggregator: str,
    aggregation_weights: Mapping[str, float],
    dp: Any,
) -> str | None:
    """``secure_aggregation`` checked against the rest of the workflow: None, ``"masking"``
    or ``"he"``; :class:`FieldError` naming what cannot go with it."""
    if value is None or value is False:
        return None
    if value is True:
        value = MASKING
    if value not in KINDS:
        raise FieldError(
            "secure_aggregation",
            f"must be 'masking', 'he' or null, got {value!r}",
        )
    if workflow not in SECURE_WORKFLOWS:
        raise FieldError(
            "secure_aggregation",
            f"the {workflow} workflow needs each site's result; secure aggregation gives only "
            f"the sum (use {', '.join(SECURE_WORKFLOWS)})",
        )
    if min_clients < MIN_SITES:
        raise FieldError(
            "secure_aggregation",
            f"needs min_clients ≥ {MIN_SITES}, got {min_clients}: the sum of one site's "
            "update is that update",
        )
    if aggregator != "mean":
        raise FieldError(
            "secure_aggregation",
            f"cannot be combined with aggregator={aggregator!r}: a robust aggregate needs "
            "each site's update, and the server sees only the sum",
        )
    if aggregation_weights:
        raise FieldError(
            "secure_aggregation",
            "cannot be combined with aggregation_weights: the server would weigh each site's "
            "update, and it sees only the sum",
        )
    if dp is not None:
        raise FieldError(
            "secure_aggregation",
            "cannot be combined with server-side dp, which clips each site's update: use the "
            "sites' own privacy policy (privacy.toml), which clips and noises before masking",
        )
    return str(value)


def protection_of(workflow: Workflow) -> str | None:
    """The workflow's secure aggregation (``"masking"``, ``"he"``), or None."""
    value = getattr(workflow, "secure_aggregation", None)
    return str(value) if value else None


def layout_of(workflow: Workflow, specs: Mapping[str, Any]) -> Layout:
    """The vector a round sums: the global model's tensors (``specs``: name → (dtype,
    shape)), name order, less the ones ``exclude_vars`` keeps at the sites."""
    return Layout.for_model(
        {name: spec[1] for name, spec in specs.items()}, getattr(workflow, "exclude_vars", None)
    )


def site_vector(
    layout: Layout, update: SiteUpdate, global_model: Mapping[str, torch.Tensor] | TensorSource
) -> WeightedUpdate:
    """A site's weighted update as the vector it protects (``Layout.update_vector``, the
    agent's own function): checked here, before any masking, for the names, shapes and
    finiteness a plain update is checked for."""
    from jobs.aggregation.sources import SubsetTensorSource, as_source, tensors_of

    base = as_source(global_model)
    return layout.update_vector(
        tensors_of(update.source),
        weight=float(update.weight),
        model_names=set(base.specs()),
        withheld=update.withheld,
        global_params=lambda names: tensors_of(SubsetTensorSource(base, names)),
        diff=update.params_type == ParamsType.DIFF,
    )


def close_from_sum(
    workflow: Workflow,
    round_number: int,
    plan: RoundPlan,
    global_model: Mapping[str, torch.Tensor] | TensorSource,
    layout: Layout,
    total: np.ndarray,
    survivors: Sequence[SiteUpdate],
    state: ServerState,
) -> RoundOutcome:
    """The round closed by the workflow from the survivors' sum: one update, their weighted
    mean, with their weighted metrics; the outcome then names the survivors, each with its
    own (clear) metrics. ``survivors`` carry each site's weight, params type and metrics
    (their tensors are not read)."""
    import torch

    from jobs.aggregation import SiteUpdate, weighted_metrics
    from jobs.aggregation.sources import MemoryTensorSource, as_source
    from jobs.workflows.results import TrainResult

    weight = math.fsum(float(u.weight) for u in survivors)
    if not survivors or weight <= 0:
        raise ValueError(f"the survivors' weights must add up to a positive number, got {weight}")
    types = {u.params_type for u in survivors}
    if len(types) != 1:
        raise ValueError("the sites sent both FULL and DIFF updates; the sum mixes them")
    specs = as_source(global_model).specs()
    numpy_floats = {torch.float32: np.float32, torch.float64: np.float64}
    params = {}
    for name, array in layout.unflatten(np.asarray(total, dtype=np.float64)).items():
        dtype = specs[name][0]
        # The mean in float64, rounded once into the model's dtype where numpy has it (no
        # float64 copy of the model), else through torch (bfloat16; integers rounded).
        mean = np.empty(array.shape, dtype=numpy_floats.get(dtype, np.float64))
        np.divide(array, weight, out=mean, dtype=np.float64, casting="same_kind")
        values = torch.from_numpy(mean)
        if dtype in numpy_floats:
            params[name] = values
            continue
        if not dtype.is_floating_point:
            values = torch.round(values)
        params[name] = values.to(dtype)
    aggregate = SiteUpdate(
        site=AGGREGATE_SITE,
        source=MemoryTensorSource(params),
        weight=1.0,
        params_type=types.pop(),
        metrics=weighted_metrics(list(survivors)),
    )
    outcome = workflow.close(
        round_number, plan, global_model, [TrainResult(AGGREGATE_SITE, aggregate)], state
    )
    outcome.sites = tuple(sorted(u.site for u in survivors))
    outcome.site_metrics = {u.site: dict(u.metrics) for u in survivors}
    return outcome
