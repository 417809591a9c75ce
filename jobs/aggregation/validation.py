"""Checks an update must pass before it is folded into a round's aggregate."""

from __future__ import annotations

import math

import torch

from client_agent.wire import all_finite, torch_dtypes
from jobs.aggregation.fedavg import CHUNK_ELEMENTS, SiteUpdate
from jobs.aggregation.sources import TensorSpec
from jobs.numbers import NumberRejected, check_result_metrics, check_update_weight


class UpdateRejected(ValueError):
    """An update that cannot be aggregated; ``reason`` is recorded for the site and round."""

    def __init__(self, site: str, reason: str) -> None:
        self.site = site
        self.reason = reason
        super().__init__(f"update from {site} rejected: {reason}")


def _names(names: set[str] | frozenset[str], limit: int = 5) -> str:
    shown = sorted(names)[:limit]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in shown) + more


def check_update(global_specs: dict[str, TensorSpec], update: SiteUpdate) -> None:
    """Raise :class:`UpdateRejected` unless ``update`` matches the global model exactly.

    Checked: the weight and the metrics are within ``jobs.numbers``' bounds (afterwards
    ``update.weight`` is a float and ``update.metrics`` maps names to floats); the tensor
    names, shapes and dtypes are the global model's; every floating-point value is finite
    (reads the data once, in chunks).
    """
    site = update.site
    try:
        update.weight = check_update_weight(update.weight)
        update.metrics = check_result_metrics(update.metrics)
    except NumberRejected as exc:
        raise UpdateRejected(site, str(exc)) from None
    specs = update.source.specs()
    missing = set(global_specs) - set(specs) - update.withheld
    extra = set(specs) - set(global_specs)
    unknown = update.withheld - set(global_specs)
    if unknown:
        raise UpdateRejected(site, f"withholds tensors the model does not have: {_names(unknown)}")
    if update.withheld & set(specs):
        raise UpdateRejected(
            site, f"sends tensors it says it withholds: {_names(update.withheld & set(specs))}"
        )
    if missing:
        raise UpdateRejected(site, f"missing tensors {_names(missing)}")
    if extra:
        raise UpdateRejected(site, f"unexpected tensors {_names(extra)}")
    for name, (dtype, shape) in global_specs.items():
        if name in update.withheld:
            continue
        got_dtype, got_shape = specs[name]
        if got_shape != shape:
            raise UpdateRejected(
                site, f"tensor {name!r} has shape {list(got_shape)}, expected {list(shape)}"
            )
        if got_dtype != dtype:
            raise UpdateRejected(site, f"tensor {name!r} has dtype {got_dtype}, expected {dtype}")
    names = {torch_dtype: name for name, torch_dtype in torch_dtypes().items()}
    buffers: dict[torch.dtype, torch.Tensor] = {}
    for name, (dtype, shape) in global_specs.items():
        if not dtype.is_floating_point or name in update.withheld:
            continue
        numel = math.prod(shape)
        buf = buffers.setdefault(dtype, torch.empty(min(numel, CHUNK_ELEMENTS), dtype=dtype))
        if buf.numel() < min(numel, CHUNK_ELEMENTS):
            buf = buffers[dtype] = torch.empty(min(numel, CHUNK_ELEMENTS), dtype=dtype)
        for start in range(0, numel, CHUNK_ELEMENTS):
            chunk = update.source.read(name, start, min(start + CHUNK_ELEMENTS, numel), buf)
            # numpy sees the same memory; half precision as its bits (numpy has no bfloat16).
            raw = chunk.view(torch.int16) if chunk.element_size() == 2 else chunk
            if not all_finite(raw.numpy(), names[dtype]):
                bad = "NaN" if bool(torch.isnan(chunk).any()) else "Inf"
                raise UpdateRejected(site, f"tensor {name!r} holds {bad} values")
