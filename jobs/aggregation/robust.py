"""Robust aggregation: coordinate-wise median, trimmed mean and (Multi-)Krum, chunked like fedavg.

Same inputs and output as :func:`jobs.aggregation.fedavg`: checked updates, FULL or DIFF
(the global weights plus the change), and a new ``state_dict`` with the global model's dtypes.
Each update is read one chunk at a time into a row of one ``(sites, chunk)`` buffer, as full
weights, so memory is one output model plus a few chunks per site.

What we chose, as Flower does (``flwr/server/strategy/aggregate.py``):

- **Weights are ignored** by the median, the trimmed mean and Krum's choice: a weight is a
  count the site reports, and one inflated count would otherwise buy a poisoned update the
  majority. Multi-Krum's mean of the updates it keeps is weighted, like fedavg.
- **Median of an even number** of updates is the mean of the two middle values (numpy's, not
  ``torch.median``'s lower one), computed as ``a/2 + b/2`` so that it cannot overflow.
- **Trimmed mean** drops ``int(trim_fraction · n)`` updates on each side of every coordinate
  (scipy's ``trim_mean``) and averages the rest; ``trim_fraction < 0.5`` always leaves one.
- **Krum** (Blanchard et al., 2017) scores each update by the sum of its squared Euclidean
  distances, over every tensor, to its ``n - f - 2`` nearest others (``f = num_malicious``,
  which needs ``n > 2f + 2``) and keeps the ``num_to_keep`` lowest scores; ties go to the
  site name. We allow ``num_to_keep`` up to ``n - f``: keeping more must keep an attacker.

Integer buffers are sorted and averaged in float64 and rounded back, float16/bfloat16 in
float32, like fedavg. Median and trimmed mean sort each coordinate's values and sum them in
sorted order, so they give the same bits whatever order the updates come in; Krum's
distances and choice are order-free too, and it folds the kept updates in the order given,
as fedavg does (callers sort by site name).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from client_agent.fl_model import ParamsType
from common.validators import FieldError, check_int
from jobs.aggregation.fedavg import SiteUpdate, accumulator_dtype, cast_back, fedavg
from jobs.aggregation.sources import TensorSource, as_source
from jobs.aggregator_arguments import (
    check_aggregator_args,
    check_num_malicious,
    check_num_to_keep,
    check_trim_fraction,
)

logger = logging.getLogger(__name__)

CHUNK_ELEMENTS = 1 << 17
"""Elements per site in a chunk: 512 KiB of float32. Smaller than fedavg's, because all the
sites' rows of a chunk are worked on together and should stay in the CPU cache (bench/)."""

GlobalParams = Mapping[str, torch.Tensor] | TensorSource


# --------------------------------------------------------------------------------------------
# Arguments: checked before any tensor is read
# --------------------------------------------------------------------------------------------


def _check_updates(name: str, updates: Sequence[SiteUpdate]) -> None:
    if not updates:
        raise ValueError(f"{name} needs at least one update")


# --------------------------------------------------------------------------------------------
# Chunks of every update, side by side
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort for ``n`` wires: compare-exchange pairs ``(low, high)``.

    Applied with elementwise ``minimum``/``maximum`` over whole rows, it sorts every coordinate
    of a chunk at once at memory speed, where ``torch.sort`` along the sites is several times
    slower; ``n log² n`` comparators stay cheap for the number of sites a round has.
    """
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple(pairs)


class _Chunks:
    """Reads the same chunk of every update, as full weights, into the rows of one buffer.

    The buffer has a row per update, one for the global chunk (DIFF updates add it) and a
    spare (the sorting network's swap row, Krum's difference): ``(n + 2) × chunk`` elements
    per accumulator dtype. A source that fills a buffer (a file) reads straight into its row.
    """

    def __init__(
        self, updates: Sequence[SiteUpdate], base: TensorSource, chunk_elements: int
    ) -> None:
        self.updates = updates
        self.base = base
        self.any_diff = any(u.params_type == ParamsType.DIFF for u in updates)
        largest: dict[torch.dtype, int] = {}
        for dtype, shape in base.specs().values():
            acc = accumulator_dtype(dtype)
            largest[acc] = max(largest.get(acc, 0), min(math.prod(shape), chunk_elements))
        n = len(updates)
        self._stacks = {acc: torch.empty(n + 2, size, dtype=acc) for acc, size in largest.items()}
        self._scratch: dict[torch.dtype, torch.Tensor] = {}
        self.chunk_elements = chunk_elements

    def _read_into(
        self,
        source: TensorSource,
        name: str,
        dtype: torch.dtype,
        span: tuple[int, int],
        row: torch.Tensor,
    ) -> None:
        start, stop = span
        if dtype == row.dtype:
            chunk = source.read(name, start, stop, row)
        else:
            # Read in the tensor's own dtype, then widened into the row: one scratch buffer
            # serves every site, since each chunk is copied out before the next is read.
            if dtype not in self._scratch:
                self._scratch[dtype] = torch.empty(self.chunk_elements, dtype=dtype)
            chunk = source.read(name, start, stop, self._scratch[dtype])
        if chunk.data_ptr() != row.data_ptr():
            row.copy_(chunk)

    def rows(self, name: str, dtype: torch.dtype, start: int, stop: int) -> list[torch.Tensor]:
        """Row ``i`` holds update ``i``'s elements ``[start, stop)`` of ``name`` as full weights."""
        stack = self._stacks[accumulator_dtype(dtype)]
        count = stop - start
        n = len(self.updates)
        glob = stack[n, :count]
        if self.any_diff:
            self._read_into(self.base, name, dtype, (start, stop), glob)
        rows = [stack[i, :count] for i in range(n)]
        for update, row in zip(self.updates, rows, strict=True):
            self._read_into(update.source, name, dtype, (start, stop), row)
            if update.params_type == ParamsType.DIFF:
                row.add_(glob)
        return rows

    def spare(self, dtype: torch.dtype, count: int) -> torch.Tensor:
        return self._stacks[accumulator_dtype(dtype)][len(self.updates) + 1, :count]


def _sort_rows(rows: list[torch.Tensor], spare: torch.Tensor) -> list[torch.Tensor]:
    """``rows`` sorted coordinate by coordinate (row 0 the smallest), in place: the returned
    list holds the same buffers plus ``spare``, in a new order."""
    rows = list(rows)
    for low, high in sorting_network(len(rows)):
        torch.minimum(rows[low], rows[high], out=spare)
        torch.maximum(rows[low], rows[high], out=rows[high])
        rows[low], spare = spare, rows[low]
    return rows


def _order_statistic_mean(
    updates: Sequence[SiteUpdate],
    global_params: GlobalParams,
    *,
    drop: int,
    chunk_elements: int,
) -> dict[str, torch.Tensor]:
    """Each coordinate's mean of its sorted values ``drop .. n - 1 - drop``."""
    base = as_source(global_params)
    chunks = _Chunks(updates, base, chunk_elements)
    n = len(updates)
    kept = n - 2 * drop
    weight = 1.0 / kept
    result: dict[str, torch.Tensor] = {}
    for name, (dtype, shape) in base.specs().items():
        numel = math.prod(shape)
        out = torch.empty(numel, dtype=accumulator_dtype(dtype))
        for start in range(0, numel, chunk_elements):
            stop = min(start + chunk_elements, numel)
            rows = chunks.rows(name, dtype, start, stop)
            ordered = _sort_rows(rows, chunks.spare(dtype, stop - start))[drop : n - drop]
            acc = out[start:stop]
            # A convex combination, as in fedavg: it cannot overflow whatever the values.
            torch.mul(ordered[0], weight, out=acc)
            for row in ordered[1:]:
                acc.add_(row, alpha=weight)
        result[name] = cast_back(out, dtype, shape)
    return result


# --------------------------------------------------------------------------------------------
# The aggregators
# --------------------------------------------------------------------------------------------


def coordinate_median(
    updates: Sequence[SiteUpdate],
    global_params: GlobalParams,
    *,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> dict[str, torch.Tensor]:
    """Each coordinate's median over ``updates``; for an even count, the two middle values'
    mean. Weights are ignored. Updates must already have passed ``check_update``."""
    _check_updates("coordinate_median", updates)
    n = len(updates)
    # Odd n: the middle value; even n: the mean of the two middle ones.
    return _order_statistic_mean(
        updates, global_params, drop=(n - 1) // 2, chunk_elements=chunk_elements
    )


def trimmed_mean(
    updates: Sequence[SiteUpdate],
    global_params: GlobalParams,
    *,
    trim_fraction: float,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> dict[str, torch.Tensor]:
    """Each coordinate's mean after dropping its ``int(trim_fraction · n)`` lowest and highest
    values. Weights are ignored. Updates must already have passed ``check_update``."""
    fraction = check_trim_fraction(trim_fraction)
    _check_updates("trimmed_mean", updates)
    n = len(updates)
    return _order_statistic_mean(
        updates, global_params, drop=int(fraction * n), chunk_elements=chunk_elements
    )


def krum_scores(distances: Sequence[Sequence[float]], num_malicious: int) -> list[float]:
    """Each update's Krum score: the sum of its ``n - f - 2`` smallest squared distances to the
    others (summed exactly, so the score does not depend on the order of the updates)."""
    n = len(distances)
    closest = n - num_malicious - 2
    scores = []
    for i, row in enumerate(distances):
        others = sorted(d for j, d in enumerate(row) if j != i)
        scores.append(math.fsum(others[:closest]))
    return scores


def krum(
    updates: Sequence[SiteUpdate],
    global_params: GlobalParams,
    *,
    num_malicious: int,
    num_to_keep: int = 1,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> dict[str, torch.Tensor]:
    """Multi-Krum: the weighted mean (as fedavg) of the ``num_to_keep`` updates with the lowest
    Krum scores; with ``num_to_keep=1`` (Krum), the best update itself.

    Two passes over the updates: the first sums the squared distances of every pair chunk by
    chunk (an ``n × n`` matrix), the second is fedavg over the kept updates.
    """
    f = check_num_malicious(num_malicious)
    keep = check_num_to_keep(num_to_keep)
    _check_updates("krum", updates)
    n = len(updates)
    if n <= 2 * f + 2:
        raise FieldError(
            "num_malicious",
            f"{f} is too many for {n} update(s): Krum needs more than 2 × num_malicious + 2",
        )
    check_int("num_to_keep", keep, low=1, high=n - f)
    base = as_source(global_params)
    chunks = _Chunks(updates, base, chunk_elements)
    distances = [[0.0] * n for _ in range(n)]
    for name, (dtype, shape) in base.specs().items():
        numel = math.prod(shape)
        for start in range(0, numel, chunk_elements):
            stop = min(start + chunk_elements, numel)
            rows = chunks.rows(name, dtype, start, stop)
            difference = chunks.spare(dtype, stop - start)
            for i in range(n):
                for j in range(i + 1, n):
                    # (a - b)² is (b - a)² to the bit: the matrix does not depend on the order.
                    torch.sub(rows[i], rows[j], out=difference)
                    distances[i][j] += float(torch.dot(difference, difference))
    for i in range(n):
        for j in range(i + 1, n):
            distances[j][i] = distances[i][j]
    scores = krum_scores(distances, f)
    ranked = sorted(range(n), key=lambda i: (scores[i], updates[i].site, i))
    chosen = sorted(ranked[:keep])
    logger.info(
        "krum kept %s of %d updates (num_malicious=%d); scores %s",
        [updates[i].site for i in chosen],
        n,
        f,
        {u.site: score for u, score in zip(updates, scores, strict=True)},
    )
    return fedavg([updates[i] for i in chosen], base)


# --------------------------------------------------------------------------------------------
# Selection by name
# --------------------------------------------------------------------------------------------

Aggregator = Callable[[Sequence[SiteUpdate], GlobalParams], dict[str, torch.Tensor]]

AGGREGATORS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "mean": fedavg,
    "median": coordinate_median,
    "trimmed_mean": trimmed_mean,
    "krum": krum,
}
"""The aggregators a workflow can be given by name; their keyword-only arguments (but
``chunk_elements``, a tuning knob) are the ones a user may set."""


def make_aggregator(name: Any, **args: Any) -> Aggregator:
    """The aggregator called ``name`` with ``args`` bound, both checked.

    Checks what can be checked before the updates arrive (a known name, its arguments and their
    values, :func:`jobs.aggregator_arguments.check_aggregator_args`); checks that depend on
    the number of updates (``num_malicious``) run in the call.
    """
    checked = check_aggregator_args(name, args)
    return functools.partial(AGGREGATORS[name], **checked)
