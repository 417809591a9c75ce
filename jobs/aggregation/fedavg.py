"""Federated averaging (McMahan et al., 2017) over chunks, with numbers you can check by hand.

``fedavg(updates, global_params)`` returns ``Σ wᵢ xᵢ / Σ wᵢ``, where ``xᵢ`` is a site's weights
(FULL) or the global weights plus its change (DIFF), and ``wᵢ`` its
``NUM_STEPS_CURRENT_ROUND``. Each output chunk is a running sum over the sites, kept small
enough to stay in the CPU cache, so every update is read once and memory is one output model
plus one chunk per site. Sites are folded in the order given; callers sort by site name so that
the same updates give the same bits whatever order they arrived in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from client_agent.config import PRIVACY_META_KEY
from client_agent.fl_model import FLModel, ParamsType
from client_agent.wire import model_fields
from common.validators import is_number
from jobs.aggregation.sources import (
    FileTensorSource,
    MemoryTensorSource,
    TensorSource,
    as_source,
)

CHUNK_ELEMENTS = 1 << 20
"""Elements per chunk: 4 MiB of float32, measured fastest on a 2-core machine (bench/)."""

_FLOAT_KEEP = (torch.float32,)
_FLOAT_WIDEN = (torch.float16, torch.bfloat16)


@dataclass
class SiteUpdate:
    """One site's answer to a train task, ready to be checked and folded."""

    site: str
    source: TensorSource
    weight: float = 1.0
    params_type: ParamsType = ParamsType.FULL
    metrics: dict[str, Any] = field(default_factory=dict)
    withheld: frozenset[str] = frozenset()
    """Tensors the site's privacy policy kept at the site (not in ``source``): they count as
    no change from this site once :func:`jobs.workflows.fill_withheld` fills them in."""

    @classmethod
    def from_model(cls, site: str, model: FLModel) -> SiteUpdate:
        return cls(
            site=site,
            source=MemoryTensorSource(dict(model.params or {})),
            weight=model.weight,
            params_type=ParamsType(model.params_type or ParamsType.FULL),
            metrics=dict(model.metrics or {}),
            withheld=withheld_names((model.meta or {}).get(PRIVACY_META_KEY)),
        )

    @classmethod
    def from_file(cls, site: str, path: str | Path) -> SiteUpdate:
        """Read a model file's header and metadata; the tensors stay on disk until folded."""
        source = FileTensorSource(path)
        model = FLModel(**model_fields(source.metadata, Path(path).name))
        return cls(
            site=site,
            source=source,
            weight=model.weight,  # checked by check_update, which names a bad value
            params_type=ParamsType(model.params_type or ParamsType.FULL),
            metrics=dict(model.metrics or {}),
            withheld=withheld_names(model.meta.get(PRIVACY_META_KEY)),
        )


def withheld_names(report: Any) -> frozenset[str]:
    """The tensor names a result's privacy report says the site kept; a report that is not
    what an agent writes withholds nothing (the update check then finds what is missing)."""
    names = report.get("excluded") if isinstance(report, Mapping) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return frozenset()
    return frozenset(names)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor of ``dtype`` is aggregated in."""
    if dtype in _FLOAT_KEEP:
        return dtype
    if dtype in _FLOAT_WIDEN:
        return torch.float32
    # float64 stays float64; integer and bool buffers (BatchNorm's num_batches_tracked) are
    # averaged exactly in float64 and rounded back.
    return torch.float64


def cast_back(out: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """An accumulator as the global model's tensor: its dtype (integers rounded), its shape."""
    if dtype.is_floating_point:
        tensor = out if out.dtype == dtype else out.to(dtype)
    else:
        tensor = out.round_().to(dtype)
    return tensor.reshape(shape)


def fedavg(
    updates: Sequence[SiteUpdate],
    global_params: Mapping[str, torch.Tensor] | TensorSource,
    *,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> dict[str, torch.Tensor]:
    """The weighted mean of ``updates`` as a new ``state_dict`` with the global model's dtypes.

    Updates must already have passed :func:`jobs.aggregation.check_update`.
    """
    if not updates:
        raise ValueError("fedavg needs at least one update")
    total = math.fsum(float(u.weight) for u in updates)
    if not total > 0:
        raise ValueError(f"fedavg: the weights must add up to a positive number, got {total}")
    base = as_source(global_params)
    weights = [float(u.weight) / total for u in updates]
    diff_weight = math.fsum(
        w for u, w in zip(updates, weights, strict=True) if u.params_type == ParamsType.DIFF
    )
    buffers: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def buffer(slot: int, dtype: torch.dtype) -> torch.Tensor:
        key = (slot, dtype)
        if key not in buffers:
            buffers[key] = torch.empty(chunk_elements, dtype=dtype)
        return buffers[key]

    result: dict[str, torch.Tensor] = {}
    for name, (dtype, shape) in base.specs().items():
        numel = math.prod(shape)
        acc_dtype = accumulator_dtype(dtype)
        out = torch.empty(numel, dtype=acc_dtype)
        for start in range(0, numel, chunk_elements):
            stop = min(start + chunk_elements, numel)
            acc = out[start:stop]
            first = True
            # DIFF updates are global + change: fold the global chunk once, with their weight.
            terms: list[tuple[int, TensorSource, float]] = []
            if diff_weight:
                terms.append((-1, base, diff_weight))
            terms.extend(
                (i, u.source, w) for i, (u, w) in enumerate(zip(updates, weights, strict=True))
            )
            for slot, source, w in terms:
                chunk = source.read(name, start, stop, buffer(slot, dtype))
                if chunk.dtype != acc_dtype:
                    chunk = chunk.to(acc_dtype)
                if first:
                    torch.mul(chunk, w, out=acc)
                    first = False
                else:
                    acc.add_(chunk, alpha=w)
        result[name] = cast_back(out, dtype, shape)
    return result


def weighted_metrics(updates: Sequence[SiteUpdate]) -> dict[str, float]:
    """Each numeric metric's mean over the sites that sent it, weighted like the params.

    Computed as a convex combination (weights normalised first, summed exactly with
    ``math.fsum``), so the mean lies between the smallest and largest value folded in and cannot
    overflow, whatever the weights; a key whose mean is still not finite is left out rather
    than failing the round.
    """
    values: dict[str, list[tuple[float, float]]] = {}
    for update in updates:
        for key, value in update.metrics.items():
            if not is_number(value):
                continue
            if not math.isfinite(value):
                continue
            values.setdefault(key, []).append((float(update.weight), float(value)))
    means: dict[str, float] = {}
    for key, pairs in values.items():
        total = math.fsum(weight for weight, _ in pairs)
        if not (total > 0 and math.isfinite(total)):
            continue
        try:
            mean = math.fsum((weight / total) * value for weight, value in pairs)
        except OverflowError:
            continue
        if math.isfinite(mean):
            means[key] = mean
    return means
