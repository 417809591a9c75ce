"""Robust aggregators' throughput and memory: 8 sites × a 25M-parameter float32 model.

``coordinate_median``, ``trimmed_mean`` (``trim_fraction=0.125``: one update dropped on each
side) and ``krum`` (``num_malicious=2``) from ``jobs.aggregation``, beside ``fedavg``, over
updates held in memory (``MemoryTensorSource``), measured as ``bench/fedavg_throughput.py``
measures fedavg (``benchlib.throughput``): best and median of 5 calls after warm-ups, taking
turns, the first call, GB/s = bytes of updates read / time (Krum reads every update once to
measure distances and its kept ones again: counted as one read, like the others), and extra
peak RSS over the RSS before the call. Beside them: Flower's way as a yardstick (numpy's
median over all updates stacked, tensor by tensor) and this machine's memory bandwidth.

    .venv/bin/python bench/robust_throughput.py
"""

from __future__ import annotations

from functools import partial

import benchlib
import numpy as np
from benchlib import md_table
from benchlib.throughput import (
    THROUGHPUT_HEADERS,
    Variant,
    best_of,
    memory_bandwidth,
    run_variants,
    throughput_row,
)

from jobs.aggregation import (
    MemoryTensorSource,
    SiteUpdate,
    coordinate_median,
    fedavg,
    krum,
    trimmed_mean,
)
from jobs.aggregation.robust import CHUNK_ELEMENTS

SITES = 8
REPEATS = 5
WARMUPS = 3
TRIM_FRACTION = 0.125
NUM_MALICIOUS = 2
SHAPES = benchlib.TRANSFORMER_25M_SHAPES
MODEL_BYTES = benchlib.numel(SHAPES) * 4


def row(variant: Variant) -> tuple[str, ...]:
    return throughput_row(variant, read_bytes=SITES * MODEL_BYTES, model_bytes=MODEL_BYTES)


def main() -> None:
    benchlib.print_header(
        f"Robust aggregation throughput: {SITES} sites × {benchlib.numel(SHAPES):,} float32 "
        "parameters",
        f"Model: {len(SHAPES)} tensors shaped like a one-block transformer "
        f"({MODEL_BYTES / 1e6:.0f} MB). Each call reads {SITES} updates held in memory "
        f"({SITES * MODEL_BYTES / 1e9:.1f} GB) and writes one model; GB/s = bytes of updates "
        f"read / time. Best and median of {REPEATS} calls after {WARMUPS} warm-ups, and the "
        f"first (cold) call. The robust aggregators' default chunk: {CHUNK_ELEMENTS:,} elements "
        "per site.",
    )

    print("### Memory bandwidth of this machine (1 GB float32 array, best of 5)\n")
    print(md_table(["stream", "GB/s", "counts"], memory_bandwidth()))
    print(flush=True)

    global_params = benchlib.random_params(SHAPES, seed=0)
    site_params = [benchlib.random_params(SHAPES, seed=site + 1) for site in range(SITES)]
    weights = [100.0 + 10.0 * site for site in range(SITES)]
    updates = [
        SiteUpdate(site=f"site-{site + 1}", source=MemoryTensorSource(params), weight=weight)
        for site, (params, weight) in enumerate(zip(site_params, weights, strict=True))
    ]

    def stacked_numpy_median() -> dict[str, np.ndarray]:
        """Not ours: Flower's ``aggregate_median``, every update of a tensor stacked, then
        ``np.median`` along the sites."""
        return {
            name: np.median(np.asarray([params[name].numpy() for params in site_params]), axis=0)
            for name in SHAPES
        }

    variants = [
        Variant("`fedavg` (weighted mean)", lambda: fedavg(updates, global_params)),
        Variant("`coordinate_median`", lambda: coordinate_median(updates, global_params)),
        Variant(
            f"`trimmed_mean`, trim_fraction={TRIM_FRACTION}",
            lambda: trimmed_mean(updates, global_params, trim_fraction=TRIM_FRACTION),
        ),
        Variant(
            f"`krum`, num_malicious={NUM_MALICIOUS}",
            lambda: krum(updates, global_params, num_malicious=NUM_MALICIOUS),
        ),
        Variant(
            f"`krum`, num_malicious={NUM_MALICIOUS}, num_to_keep={SITES - NUM_MALICIOUS}",
            lambda: krum(
                updates,
                global_params,
                num_malicious=NUM_MALICIOUS,
                num_to_keep=SITES - NUM_MALICIOUS,
            ),
        ),
        Variant(
            "yardstick, not ours: updates stacked per tensor, `np.median` (Flower)",
            stacked_numpy_median,
        ),
    ]
    run_variants(variants, warmups=WARMUPS, repeats=REPEATS)

    # The default chunk against others, to back (or not) the choice.
    chunk_rows = []
    for chunk in (1 << 15, 1 << 16, CHUNK_ELEMENTS, 1 << 18, 1 << 20):
        median_s = best_of(
            partial(coordinate_median, updates, global_params, chunk_elements=chunk), 3
        )
        krum_s = best_of(
            partial(
                krum, updates, global_params, num_malicious=NUM_MALICIOUS, chunk_elements=chunk
            ),
            3,
        )
        mark = " (default)" if chunk == CHUNK_ELEMENTS else ""
        chunk_rows.append(
            (f"{chunk:,}{mark}", f"{chunk * 4 / 2**10:g}", f"{median_s:.3f}", f"{krum_s:.3f}")
        )

    print(f"### Aggregators over {SITES} updates in memory\n")
    print(md_table(THROUGHPUT_HEADERS, [row(v) for v in variants]))
    print()
    print("### Time by chunk size (best of 3)\n")
    print(md_table(["chunk_elements", "KiB per site", "coordinate_median s", "krum s"], chunk_rows))
    print()
    print(
        "Extra memory is over the RSS before the call; the result (one model) is part of it. "
        "The robust aggregators hold one output model plus (sites + 2) chunk rows; Flower's "
        "way holds every update of the largest tensor at once."
    )


if __name__ == "__main__":
    main()
