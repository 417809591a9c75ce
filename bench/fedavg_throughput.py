"""FedAvg throughput and memory: 8 sites × a 25M-parameter float32 model (100 MB each).

``fedavg()`` from ``jobs.aggregation`` over updates held in memory (``MemoryTensorSource``)
and over safetensors files on disk (``FileTensorSource``, page cache warm), timed best and
median of 5 calls after warm-ups (the variants take turns, so that the drift of a noisy VM
falls on all of them alike); the first, cold call is shown too. Throughput is the bytes of
updates read divided by the time. Extra memory is the peak RSS during one more call (VmHWM,
reset just before it through ``/proc/self/clear_refs``) minus the RSS before it, with glibc's
freed heap handed back to the kernel first so that it cannot hide the call's allocations.
Beside them: this machine's memory bandwidth, measured by streaming a 1 GB float32 array, so
the reader can see how far from the hardware's limit aggregation runs.

    .venv/bin/python bench/fedavg_throughput.py
"""

from __future__ import annotations

import os
import tempfile
from functools import partial
from pathlib import Path

import benchlib
import torch
from benchlib import md_table
from benchlib.throughput import (
    THROUGHPUT_HEADERS,
    Variant,
    best_of,
    memory_bandwidth,
    run_variants,
    throughput_row,
)

from client_agent.wire import save_state_dict
from jobs.aggregation import (
    FileTensorSource,
    MemoryTensorSource,
    SiteUpdate,
    check_update,
    fedavg,
)
from jobs.aggregation.fedavg import CHUNK_ELEMENTS

SITES = 8
REPEATS = 5
WARMUPS = 3
SHAPES = benchlib.TRANSFORMER_25M_SHAPES
MODEL_BYTES = benchlib.numel(SHAPES) * 4


def row(variant: Variant) -> tuple[str, ...]:
    return throughput_row(variant, read_bytes=SITES * MODEL_BYTES, model_bytes=MODEL_BYTES)


def main() -> None:
    benchlib.print_header(
        f"FedAvg throughput: {SITES} sites × {benchlib.numel(SHAPES):,} float32 parameters",
        f"Model: {len(SHAPES)} tensors shaped like a one-block transformer "
        f"({MODEL_BYTES / 1e6:.0f} MB). Each call reads {SITES} updates "
        f"({SITES * MODEL_BYTES / 1e9:.1f} GB) and writes one model; GB/s = bytes of updates "
        f"read / time. Best and median of {REPEATS} calls after {WARMUPS} warm-ups, and the "
        f"first (cold) call. fedavg's default chunk: {CHUNK_ELEMENTS:,} elements.",
    )

    print("### Memory bandwidth of this machine (1 GB float32 array, best of 5)\n")
    print(md_table(["stream", "GB/s", "counts"], memory_bandwidth()))
    print(flush=True)

    global_params = benchlib.random_params(SHAPES, seed=0)
    site_params = [benchlib.random_params(SHAPES, seed=site + 1) for site in range(SITES)]
    # Unequal weights, like NUM_STEPS_CURRENT_ROUND of sites with different data sizes.
    weights = [100.0 + 10.0 * site for site in range(SITES)]
    names = [f"site-{site + 1}" for site in range(SITES)]
    memory_updates = [
        SiteUpdate(site=name, source=MemoryTensorSource(params), weight=weight)
        for name, params, weight in zip(names, site_params, weights, strict=True)
    ]
    total = sum(weights)

    def whole_tensors() -> dict[str, torch.Tensor]:
        """Not fedavg: out = Σ wᵢ·xᵢ over whole tensors, no chunks, as a yardstick."""
        out: dict[str, torch.Tensor] = {}
        for name in SHAPES:
            acc = torch.mul(site_params[0][name], weights[0] / total)
            for params, weight in zip(site_params[1:], weights[1:], strict=True):
                acc.add_(params[name], alpha=weight / total)
            out[name] = acc
        return out

    with tempfile.TemporaryDirectory(prefix="fedportal-bench-") as tmp:
        paths = [Path(tmp, f"{name}.safetensors") for name in names]
        for path, params in zip(paths, site_params, strict=True):
            save_state_dict(path, params)
            # On disk now, so that background writeback does not compete with the timing;
            # the pages stay in the page cache (warm) for the reads.
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        file_updates: list[SiteUpdate] = []

        def open_files() -> None:
            """Fresh sources, as a round makes them (SiteUpdate.from_file reads the header)."""
            for update in file_updates:
                update.source.close()
            file_updates[:] = [
                SiteUpdate(site=name, source=FileTensorSource(path), weight=weight)
                for name, path, weight in zip(names, paths, weights, strict=True)
            ]

        specs = MemoryTensorSource(global_params).specs()

        def check_all() -> None:
            for update in file_updates:
                check_update(specs, update)

        fedavg_variants = [
            Variant(
                "in memory (`MemoryTensorSource`)",
                lambda: fedavg(memory_updates, global_params),
            ),
            Variant(
                "on disk (`FileTensorSource`, warm page cache)",
                lambda: fedavg(file_updates, global_params),
                prepare=open_files,
            ),
            Variant("yardstick, not fedavg: whole tensors in memory, no chunks", whole_tensors),
        ]
        checks = Variant(
            f"`check_update` of the {SITES} files, as a round does before fedavg",
            check_all,
            prepare=open_files,
        )
        run_variants([*fedavg_variants, checks], warmups=WARMUPS, repeats=REPEATS)

        # The default chunk against others, to back (or not) the core's choice.
        chunk_rows = []
        for chunk in sorted({1 << 16, 1 << 17, 1 << 18, 1 << 19, CHUNK_ELEMENTS, 1 << 22, 1 << 24}):
            mem = best_of(partial(fedavg, memory_updates, global_params, chunk_elements=chunk), 5)
            open_files()
            disk = best_of(partial(fedavg, file_updates, global_params, chunk_elements=chunk), 5)
            mark = " (default)" if chunk == CHUNK_ELEMENTS else ""
            chunk_rows.append(
                (f"{chunk:,}{mark}", f"{chunk * 4 / 2**20:g}", f"{mem:.3f}", f"{disk:.3f}")
            )
        for update in file_updates:
            update.source.close()

    print(f"### `fedavg()` of {SITES} updates\n")
    print(md_table(THROUGHPUT_HEADERS, [row(v) for v in fedavg_variants]))
    print()
    print(md_table(THROUGHPUT_HEADERS, [row(checks)]))
    print()
    print("### `fedavg()` time by chunk size (best of 5)\n")
    print(md_table(["chunk_elements", "MiB per site", "in memory s", "on disk s"], chunk_rows))
    print()
    print(
        "Extra memory is over the RSS before the call; the result (one model) is part of it. "
        "fedavg should need about one model plus a chunk buffer per site: a figure that grows "
        "with the number of sites would break the O(model size) rule of DESIGN.md."
    )


if __name__ == "__main__":
    main()
