"""Whether values of the secure-aggregation ring (uint64) look uniform: what the portal keeps
of a masked upload must, an unmasked update must not.

The test: the top 4 bits of each value in 16 bins, chi-square with 15 degrees of freedom.
Under :data:`UNIFORM_CHI2_MAX` counts as uniform: p > 1e-6, not the usual 0.001, because the
suite tests many masked vectors each run and at 0.001 a truly uniform one failed about once in
a few hundred runs (a full suite saw 38.8 against 37.7). Unmasked updates score over 1,000, so
the test keeps all its power."""

from __future__ import annotations

import numpy as np

UNIFORM_CHI2_MAX = 56.5  # scipy.stats.chi2.isf(1e-6, 15) = 56.49


def chi2_top_bits(values: np.ndarray) -> float:
    """Chi-square of the top 4 bits of 64-bit ring elements over their 16 values."""
    counts = np.bincount((values >> np.uint64(60)).astype(np.int64), minlength=16)
    expected = len(values) / 16
    return float(((counts - expected) ** 2 / expected).sum())
