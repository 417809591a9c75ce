"""DP-FedAvg's aggregate (McMahan et al. 2018) over chunks: clip each site's update, average
over a fixed denominator, add Gaussian noise.

``dp_fedavg`` reads every update twice, chunk by chunk as :func:`jobs.aggregation.fedavg`
does, so memory stays one output model plus a chunk per site: a first pass for each update's
L2 norm (clipping scales a whole update, so its norm is needed before any of it is folded),
then the folding pass. The update is ``Δᵢ = xᵢ − global`` for a FULL result and ``xᵢ`` for a
DIFF one, over the floating-point tensors; integer tensors (BatchNorm's batch counts, which
count a site's data) keep the global model's values, since their change could not be noised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from client_agent.fl_model import ParamsType
from jobs.aggregation.fedavg import CHUNK_ELEMENTS, SiteUpdate, accumulator_dtype, cast_back
from jobs.aggregation.sources import TensorSource


@dataclass(frozen=True)
class ClippedRound:
    """What a DP aggregate did: each update's norm before clipping (the updates' order) and
    how many of them the clip left whole (adaptive clipping's count)."""

    norms: tuple[float, ...]
    clip_norm: float
    noise_std: float

    @property
    def unclipped(self) -> int:
        return sum(1 for norm in self.norms if norm <= self.clip_norm)


def _float_specs(base: TensorSource) -> list[tuple[str, torch.dtype, int]]:
    return [
        (name, dtype, math.prod(shape))
        for name, (dtype, shape) in base.specs().items()
        if dtype.is_floating_point
    ]


def _change(
    update: SiteUpdate,
    base: TensorSource,
    name: str,
    start: int,
    stop: int,
    buffers: tuple[torch.Tensor | None, torch.Tensor | None],
) -> torch.Tensor:
    """Elements ``[start, stop)`` of the site's change to tensor ``name``, in float64."""
    chunk = update.source.read(name, start, stop, buffers[0]).to(torch.float64)
    if update.params_type == ParamsType.DIFF:
        return chunk
    return chunk - base.read(name, start, stop, buffers[1]).to(torch.float64)


def update_norms(
    updates: Sequence[SiteUpdate],
    base: TensorSource,
    *,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> list[float]:
    """Each update's whole-model L2 norm over the floating-point tensors (float64 sums)."""
    specs = _float_specs(base)
    norms: list[float] = []
    for update in updates:
        total = 0.0
        for name, dtype, numel in specs:
            scratch = (
                torch.empty(chunk_elements, dtype=dtype),
                torch.empty(chunk_elements, dtype=dtype),
            )
            for start in range(0, numel, chunk_elements):
                stop = min(start + chunk_elements, numel)
                change = _change(update, base, name, start, stop, scratch)
                total += float(torch.dot(change, change))
        norms.append(math.sqrt(total))
    return norms


def dp_fedavg(
    updates: Sequence[SiteUpdate],
    base: TensorSource,
    *,
    clip_norm: float,
    noise_std: float,
    denominator: int,
    generator: torch.Generator,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[dict[str, torch.Tensor], ClippedRound]:
    """``global + (Σᵢ clip(Δᵢ, C)) / denominator + N(0, noise_std²)`` as a new ``state_dict``
    with the global model's dtypes, and what the clipping did.

    Every update counts the same (weights are ignored: a weight would let one site's data
    move the model more than C/denominator, which is the bound the noise is sized for).
    ``denominator`` is fixed by the caller, not the number of updates, for the same reason.
    Updates must already have passed :func:`jobs.aggregation.check_update`.
    """
    if denominator < 1:
        raise ValueError(f"dp_fedavg: the denominator must be at least 1, got {denominator}")
    if len(updates) > denominator:
        raise ValueError(
            f"dp_fedavg: {len(updates)} updates for a denominator of {denominator}: "
            "each site's share would exceed the bound the noise is sized for"
        )
    norms = update_norms(updates, base, chunk_elements=chunk_elements)
    scales = [min(1.0, clip_norm / norm) if norm > 0 else 1.0 for norm in norms]
    result: dict[str, torch.Tensor] = {}
    for name, (dtype, shape) in base.specs().items():
        numel = math.prod(shape)
        if not dtype.is_floating_point:
            result[name] = base.read(name, 0, numel, None).clone().reshape(shape)
            continue
        acc_dtype = accumulator_dtype(dtype)
        out = torch.empty(numel, dtype=acc_dtype)
        scratch = (
            torch.empty(chunk_elements, dtype=dtype),
            torch.empty(chunk_elements, dtype=dtype),
        )
        for start in range(0, numel, chunk_elements):
            stop = min(start + chunk_elements, numel)
            total = torch.zeros(stop - start, dtype=torch.float64)
            for update, scale in zip(updates, scales, strict=True):
                total.add_(_change(update, base, name, start, stop, scratch), alpha=scale)
            total.div_(denominator)
            if noise_std > 0:
                noise = torch.randn(stop - start, generator=generator, dtype=torch.float64)
                total.add_(noise, alpha=noise_std)
            total.add_(base.read(name, start, stop, scratch[1]).to(torch.float64))
            out[start:stop] = total.to(acc_dtype)
        result[name] = cast_back(out, dtype, shape)
    return result, ClippedRound(tuple(norms), clip_norm, noise_std)
