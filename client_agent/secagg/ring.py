"""Fixed-point numbers in the ring Z/2**64.

A float ``x`` becomes the integer ``round(x · 2**f)`` (``f = FRACTION_BITS``) in two's
complement modulo 2**64. Sums in the ring are exact; a sum of integers whose true value lies
in [−2**63, 2**63) reads back exactly. Quantizing moves each value by at most 2**−(f+1), so
the mean of n sites' values moves by at most 2**−(f+1) per coordinate (:func:`mean_error_bound`)
before the float32 rounding of the result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

FRACTION_BITS = 24
"""2**−25 ≈ 3·10⁻⁸ per value: below float32's resolution for values near 1."""


CHUNK = 1 << 16
"""Values quantized at a time: the temporaries stay in the cache."""


def quantize(values: np.ndarray, *, sites: int, fraction_bits: int = FRACTION_BITS) -> np.ndarray:
    """``values`` (float) as ring elements (``uint64``): rounded to the nearest multiple of
    2**−fraction_bits, two's complement. Raises ValueError for a value that is not finite, or
    whose magnitude would let the sum of ``sites`` such values leave the range that reads
    back exactly (:func:`max_magnitude`)."""
    values = np.asarray(values)
    out = np.zeros(values.size, dtype=np.uint64)
    add_quantized(out, [values.reshape(-1)], sites=sites, fraction_bits=fraction_bits)
    return out.reshape(values.shape)


def add_quantized(
    out: np.ndarray,
    pieces: Sequence[np.ndarray],
    *,
    sites: int,
    weight: float = 1.0,
    fraction_bits: int = FRACTION_BITS,
) -> None:
    """Add :func:`quantize` of ``weight`` × the ``pieces`` (1-D arrays of numbers, end to
    end) to ``out`` (``uint64`` ring elements, as many) in place, a chunk at a time: the
    same bits as ``out + quantize(weight * concatenate(pieces))``, without model-sized
    temporaries. (Scaling by 2**fraction_bits is exact, so ``value · (weight ·
    2**fraction_bits)`` rounds as ``(value · weight) · 2**fraction_bits`` does.) The values
    are checked first, so on a ValueError ``out`` is as it was."""
    length = sum(piece.size for piece in pieces)
    if out.dtype != np.uint64 or out.shape != (length,):
        raise ValueError(
            f"{length} values cannot be added to ring elements {out.dtype} {out.shape}: "
            "they take a 1-D uint64 array of as many"
        )
    limit = max_magnitude(sites, fraction_bits=fraction_bits)
    for piece in pieces:
        if not piece.size:
            continue
        # max and min, not abs: no temporary array; NaN makes both NaN. Rounding is
        # monotonic, so the largest products are those of the extremes.
        ends = (float(np.float64(piece.max()) * weight), float(np.float64(piece.min()) * weight))
        if not all(math.isfinite(end) for end in ends):
            raise ValueError("only finite values can be quantized")
        largest = max(abs(end) for end in ends)
        if largest >= limit:
            raise ValueError(
                f"a value of magnitude {largest:.3g} is too large to sum over {sites} sites "
                f"at {fraction_bits} fraction bits (limit {limit:.3g})"
            )
    scale = weight * float(2**fraction_bits)
    scaled = np.empty(min(CHUNK, length), dtype=np.float64)
    integers = np.empty(len(scaled), dtype=np.int64)
    offset = 0
    for piece in pieces:
        for start in range(0, piece.size, CHUNK):
            count = min(CHUNK, piece.size - start)
            part, rounded = scaled[:count], integers[:count]
            np.multiply(piece[start : start + count], scale, out=part, dtype=np.float64)
            np.rint(part, out=part)
            np.copyto(rounded, part, casting="unsafe")  # exact: an integer below 2**63
            target = out[offset + start : offset + start + count]
            np.add(target, rounded.view(np.uint64), out=target)
        offset += piece.size


def dequantize(
    ring: np.ndarray, *, fraction_bits: int = FRACTION_BITS, in_place: bool = False
) -> np.ndarray:
    """Ring elements back as float64: read as signed (two's complement), scaled down. With
    ``in_place`` (``ring`` a ``uint64`` array the caller no longer needs) the float64 values
    take its memory, a chunk at a time, instead of a fresh array."""
    signed = np.asarray(ring, dtype=np.uint64).view(np.int64)
    scale = 2.0**-fraction_bits  # exact: like dividing by 2**fraction_bits
    if not in_place:
        values = signed.astype(np.float64)
        values *= scale
        return values
    out = signed.view(np.float64)
    for start in range(0, len(signed), CHUNK):
        part = signed[start : start + CHUNK].astype(np.float64)  # in the cache
        part *= scale
        out[start : start + CHUNK] = part
    return out


def max_magnitude(sites: int, *, fraction_bits: int = FRACTION_BITS) -> float:
    """The largest |value| each of ``sites`` may send so that their sum reads back exactly."""
    return 2.0**63 / (sites * 2.0**fraction_bits)


def mean_error_bound(*, fraction_bits: int = FRACTION_BITS) -> float:
    """How far the mean of quantized values can be from the mean of the values themselves."""
    return 2.0 ** -(fraction_bits + 1)
