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

import gc
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import benchlib
import numpy as np
import torch
from benchlib import md_table, median

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
BANDWIDTH_BYTES = 10**9  # the streamed array: 1 GB of float32


@dataclass
class Variant:
    """One thing to time: ``prepare`` (untimed) then ``call`` (timed)."""

    label: str
    call: Callable[[], object]
    prepare: Callable[[], None] | None = None
    first: float = float("nan")
    seconds: list[float] = field(default_factory=list)
    extra_kib: int = 0

    def time_once(self) -> float:
        if self.prepare:
            self.prepare()
        started = time.perf_counter()
        self.call()
        return time.perf_counter() - started

    def measure_memory(self) -> None:
        """Extra peak RSS of one call, over the RSS before it.

        Measured in a call of its own, after the timed ones: handing freed heap back to the
        kernel first makes this call fault its pages in again, which the timed calls do not.
        """
        if self.prepare:
            self.prepare()
        gc.collect()
        benchlib.release_free_heap()
        rss_before = benchlib.proc_status_kib("VmRSS")
        benchlib.reset_peak_rss()
        result = self.call()
        self.extra_kib = benchlib.proc_status_kib("VmHWM") - rss_before
        del result

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return median(self.seconds)

    @property
    def extra_mb(self) -> float:
        return self.extra_kib * 1024 / 1e6


def run_variants(variants: list[Variant]) -> None:
    """First (cold) call of each, more warm-ups, then REPEATS timed calls, taking turns."""
    for variant in variants:
        variant.first = variant.time_once()
    for _ in range(WARMUPS - 1):
        for variant in variants:
            variant.time_once()
    for _ in range(REPEATS):
        for variant in variants:
            variant.seconds.append(variant.time_once())
    for variant in variants:
        variant.measure_memory()


def best_of(call: Callable[[], object], repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times)


def memory_bandwidth() -> list[tuple[str, str, str]]:
    """Streaming read (sum) and copy of a 1 GB float32 array, best of 5, in GB/s."""
    n = BANDWIDTH_BYTES // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.fill_(0.0)  # fault the pages in before timing
    src_np, dst_np = src.numpy(), dst.numpy()
    threads = torch.get_num_threads()
    rows = []
    for label, call, moved in (
        (f"torch `x.sum()`, {threads} threads", src.sum, 1),
        (f"torch `y.copy_(x)`, {threads} threads", lambda: dst.copy_(src), 2),
        ("numpy `x.sum()`, 1 thread", src_np.sum, 1),
        ("numpy `np.copyto(y, x)`, 1 thread", lambda: np.copyto(dst_np, src_np), 2),
    ):
        seconds = best_of(call, 5)
        what = "read" if moved == 1 else "read + write (2 GB moved)"
        rows.append((label, f"{moved * BANDWIDTH_BYTES / seconds / 1e9:.1f}", what))
    torch.set_num_threads(1)
    try:
        seconds = best_of(src.sum, 5)
        rows.append(("torch `x.sum()`, 1 thread", f"{BANDWIDTH_BYTES / seconds / 1e9:.1f}", "read"))
    finally:
        torch.set_num_threads(threads)
    return rows


def gbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f}"


def row(variant: Variant) -> tuple[str, ...]:
    read = SITES * MODEL_BYTES
    return (
        variant.label,
        f"{variant.best:.3f}",
        f"{variant.median:.3f}",
        f"{variant.first:.3f}",
        gbps(read, variant.best),
        gbps(read, variant.median),
        f"{variant.extra_mb:.0f}",
        f"{variant.extra_mb * 1e6 / MODEL_BYTES:.2f}×",
    )


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
        run_variants([*fedavg_variants, checks])

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

    headers = [
        "",
        "best s",
        "median s",
        "first s",
        "GB/s best",
        "GB/s median",
        "extra MB",
        "× model",
    ]
    print(f"### `fedavg()` of {SITES} updates\n")
    print(md_table(headers, [row(v) for v in fedavg_variants]))
    print()
    print(md_table(headers, [row(checks)]))
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
