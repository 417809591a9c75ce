"""Fixed-point numbers in the ring Z/2**64.

A float ``x`` becomes the integer ``round(x · 2**f)`` (``f = FRACTION_BITS``) in two's
complement modulo 2**64. Sums in the ring are exact; a sum of integers whose true value lies
in [−2**63, 2**63) reads back exactly. Quantizing moves each value by at most 2**−(f+1), so
the mean of n sites' values moves by at most 2**−(f+1) per coordinate (:func:`mean_error_bound`)
before the float32 rounding of the result.
"""

from __future__ import annotations

import numpy as np

FRACTION_BITS = 24
"""2**−25 ≈ 3·10⁻⁸ per value: below float32's resolution for values near 1."""


def quantize(values: np.ndarray, *, sites: int, fraction_bits: int = FRACTION_BITS) -> np.ndarray:
    """``values`` (float) as ring elements (``uint64``): rounded to the nearest multiple of
    2**−fraction_bits, two's complement. Raises ValueError for a value that is not finite, or
    whose magnitude would let the sum of ``sites`` such values leave the range that reads
    back exactly (:func:`max_magnitude`)."""
    values = np.asarray(values, dtype=np.float64)
    limit = max_magnitude(sites, fraction_bits=fraction_bits)
    if values.size:
        # max and min, not abs: no temporary array; NaN makes both NaN.
        high, low = float(np.max(values)), float(np.min(values))
        if not (np.isfinite(high) and np.isfinite(low)):
            raise ValueError("only finite values can be quantized")
        largest = max(abs(high), abs(low))
        if largest >= limit:
            raise ValueError(
                f"a value of magnitude {largest:.3g} is too large to sum over {sites} sites "
                f"at {fraction_bits} fraction bits (limit {limit:.3g})"
            )
    scaled = values * float(2**fraction_bits)  # the one temporary: rounded in place
    np.rint(scaled, out=scaled)
    return scaled.astype(np.int64).view(np.uint64)


def dequantize(ring: np.ndarray, *, fraction_bits: int = FRACTION_BITS) -> np.ndarray:
    """Ring elements back as float64: read as signed (two's complement), scaled down."""
    return np.asarray(ring, dtype=np.uint64).view(np.int64).astype(np.float64) / float(
        2**fraction_bits
    )


def max_magnitude(sites: int, *, fraction_bits: int = FRACTION_BITS) -> float:
    """The largest |value| each of ``sites`` may send so that their sum reads back exactly."""
    return 2.0**63 / (sites * 2.0**fraction_bits)


def mean_error_bound(*, fraction_bits: int = FRACTION_BITS) -> float:
    """How far the mean of quantized values can be from the mean of the values themselves."""
    return 2.0 ** -(fraction_bits + 1)
