"""Checks an update must pass before it is folded into a round's aggregate."""

from __future__ import annotations

import math
import numbers

import torch

from jobs.aggregation.fedavg import CHUNK_ELEMENTS, SiteUpdate
from jobs.aggregation.sources import TensorSpec


class UpdateRejected(ValueError):
    """An update that cannot be aggregated; ``reason`` is recorded for the site and round."""

    def __init__(self, site: str, reason: str) -> None:
        self.site = site
        self.reason = reason
        super().__init__(f"update from {site} rejected: {reason}")


def _names(names: set[str], limit: int = 5) -> str:
    shown = sorted(names)[:limit]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in shown) + more


def check_update(global_specs: dict[str, TensorSpec], update: SiteUpdate) -> None:
    """Raise :class:`UpdateRejected` unless ``update`` matches the global model exactly.

    Checked: the weight is a positive finite number; the tensor names, shapes and dtypes are
    the global model's; every floating-point value is finite (reads the data once, in chunks).
    """
    site = update.site
    weight = update.weight
    if (
        isinstance(weight, bool)
        or not isinstance(weight, numbers.Real)
        or not math.isfinite(weight)
        or weight <= 0
    ):
        raise UpdateRejected(
            site, f"NUM_STEPS_CURRENT_ROUND must be a positive number, got {weight!r}"
        )
    specs = update.source.specs()
    missing = set(global_specs) - set(specs)
    extra = set(specs) - set(global_specs)
    if missing:
        raise UpdateRejected(site, f"missing tensors {_names(missing)}")
    if extra:
        raise UpdateRejected(site, f"unexpected tensors {_names(extra)}")
    for name, (dtype, shape) in global_specs.items():
        got_dtype, got_shape = specs[name]
        if got_shape != shape:
            raise UpdateRejected(
                site, f"tensor {name!r} has shape {list(got_shape)}, expected {list(shape)}"
            )
        if got_dtype != dtype:
            raise UpdateRejected(site, f"tensor {name!r} has dtype {got_dtype}, expected {dtype}")
    buffers: dict[torch.dtype, torch.Tensor] = {}
    for name, (dtype, shape) in global_specs.items():
        if not dtype.is_floating_point:
            continue
        numel = math.prod(shape)
        buf = buffers.setdefault(dtype, torch.empty(min(numel, CHUNK_ELEMENTS), dtype=dtype))
        if buf.numel() < min(numel, CHUNK_ELEMENTS):
            buf = buffers[dtype] = torch.empty(min(numel, CHUNK_ELEMENTS), dtype=dtype)
        for start in range(0, numel, CHUNK_ELEMENTS):
            chunk = update.source.read(name, start, min(start + CHUNK_ELEMENTS, numel), buf)
            # NaN and Inf survive a sum, so a finite sum (cheap) clears the chunk; a sum that
            # overflowed from large finite values falls through to the exact test.
            total = chunk.sum(dtype=torch.float64 if dtype == torch.float64 else torch.float32)
            if bool(torch.isfinite(total)):
                continue
            if not bool(torch.isfinite(chunk).all()):
                bad = "NaN" if bool(torch.isnan(chunk).any()) else "Inf"
                raise UpdateRejected(site, f"tensor {name!r} holds {bad} values")
