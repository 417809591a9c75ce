"""Timing an aggregation in this process: variants taking turns, extra peak RSS, bandwidth.

Shared by the aggregation benches (``fedavg_throughput.py``, ``robust_throughput.py``), so that
their figures are measured the same way and can be read side by side.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from benchlib import median, proc_status_kib, release_free_heap, reset_peak_rss

BANDWIDTH_BYTES = 10**9
"""The array streamed to measure the memory bandwidth: 1 GB of float32."""

THROUGHPUT_HEADERS = [
    "",
    "best s",
    "median s",
    "first s",
    "GB/s best",
    "GB/s median",
    "extra MB",
    "× model",
]


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
        release_free_heap()
        rss_before = proc_status_kib("VmRSS")
        reset_peak_rss()
        result = self.call()
        self.extra_kib = proc_status_kib("VmHWM") - rss_before
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


def run_variants(variants: list[Variant], *, warmups: int, repeats: int) -> None:
    """First (cold) call of each, more warm-ups, then ``repeats`` timed calls, taking turns, so
    that the drift of a noisy VM falls on all of them alike; then each one's memory."""
    for variant in variants:
        variant.first = variant.time_once()
    for _ in range(warmups - 1):
        for variant in variants:
            variant.time_once()
    for _ in range(repeats):
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


def throughput_row(variant: Variant, *, read_bytes: int, model_bytes: int) -> tuple[str, ...]:
    """A row under :data:`THROUGHPUT_HEADERS`: times, GB/s of ``read_bytes``, extra memory."""
    return (
        variant.label,
        f"{variant.best:.3f}",
        f"{variant.median:.3f}",
        f"{variant.first:.3f}",
        gbps(read_bytes, variant.best),
        gbps(read_bytes, variant.median),
        f"{variant.extra_mb:.0f}",
        f"{variant.extra_mb * 1e6 / model_bytes:.2f}×",
    )
