"""Site updates for the aggregation tests: tiny tensors held in memory."""

from __future__ import annotations

import torch

from client_agent.fl_model import ParamsType
from jobs.aggregation import MemoryTensorSource, SiteUpdate

FULL = ParamsType.FULL
DIFF = ParamsType.DIFF


def update(
    site: str,
    params: dict[str, torch.Tensor],
    weight: float = 1.0,
    params_type: ParamsType = FULL,
    metrics: dict[str, object] | None = None,
) -> SiteUpdate:
    return SiteUpdate(
        site=site,
        source=MemoryTensorSource(params),
        weight=weight,
        params_type=params_type,
        metrics=dict(metrics or {}),
    )
