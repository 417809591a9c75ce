"""Helpers shared by the bench scripts: the machine header, markdown tables, memory probes.

This is a package (``bench/benchlib/``) rather than ``bench/_common.py`` because ``make bench``
runs every ``bench/*.py``; the scripts find it because Python puts ``bench/`` on ``sys.path``
when it runs ``bench/<name>.py``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
import timeit
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy
import safetensors
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def command_line() -> str:
    """How this script was started, with the interpreter relative to the current folder."""
    python = sys.executable
    try:
        relative = os.path.relpath(python)
        if not relative.startswith(".."):
            python = relative
    except ValueError:
        pass
    return shlex.join([python, *sys.argv])


def print_header(title: str, what: str) -> None:
    """The script's title, what it measures, how it was run, and the machine it ran on."""
    print(f"## {title}\n")
    print(what + "\n")
    print(f"command: `{command_line()}`  (cwd {os.getcwd()})\n")
    print(
        f"machine: nproc {len(os.sched_getaffinity(0))}, CPU {cpu_model()}, "
        f"{mem_total_gib():.1f} GiB RAM; Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"numpy {numpy.__version__}, safetensors {safetensors.__version__}; "
        f"core sources sha256 {core_fingerprint()}\n",
        flush=True,
    )
    print(
        f"CPU speed now: `sum(range(10**6))` takes {reference_ms():.1f} ms (best of 5). This "
        "VM's speed changes with its host's load, by half and more within a day, so compare "
        "runs made at different times only beside this figure\n",
        flush=True,
    )
    for note in environment_notes():
        print(f"note: {note}\n", flush=True)


def reference_ms() -> float:
    """Milliseconds for one ``sum(range(10**6))`` on one core, best of 5 (``python -m timeit``'s
    figure): the machine's single-core speed at the moment, for runs compared across time."""
    timer = timeit.Timer("sum(range(10**6))")
    loops, _ = timer.autorange()
    return min(timer.repeat(repeat=5, number=loops)) / loops * 1000


def environment_notes() -> list[str]:
    """Things about this machine that make timings noisy, found in /sys."""
    notes = []
    damon = Path("/sys/kernel/mm/damon/admin/kdamonds")
    actions = set()
    for state in damon.glob("*/state"):
        try:
            if state.read_text().strip() == "on":
                for action in state.parent.glob("contexts/*/schemes/*/action"):
                    actions.add(action.read_text().strip())
        except OSError:
            continue
    if "pageout" in actions:
        notes.append(
            "the kernel's DAMON 'pageout' scheme is on: page cache that looks cold (model files, "
            "libraries) may be reclaimed between runs and read from disk again"
        )
    if Path("/sys/bus/virtio/drivers/virtio_balloon").exists():
        notes.append(
            "this is a VM with a virtio balloon: memory freed to the kernel may go back to the "
            "host, and touching it again is slow, so the first calls of a run can be several "
            "times slower than later ones (hence best and median)"
        )
    return notes


def core_fingerprint() -> str:
    """A short hash of the core's sources, to tell which version of the core was measured.

    The repository may have no commit to name, and the core changes while benches run.
    """
    digest = hashlib.sha256()
    for folder in ("client_agent", "jobs"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            digest.update(str(path.relative_to(REPO_ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def filesystem(path: str | Path) -> str:
    """``"ext4 at /"``: the type and mount point of the file system that holds ``path``."""
    target = os.path.realpath(path)
    best = ("?", "/")
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best[1]):
            best = (parts[2], mount)
    return f"{best[0]} at {best[1]}"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table; numbers are expected already formatted as strings."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --------------------------------------------------------------------------------------------
# Memory of a process tree
# --------------------------------------------------------------------------------------------


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, from the ppid field of ``/proc/*/stat``."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # the process exited while we looked
            continue
        # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def pss_rss_kib(pid: int) -> tuple[int, int]:
    """Proportional and resident set size of one process, in KiB (0, 0 if it is gone)."""
    pss = rss = 0
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            pss = int(line.split()[1])
        elif line.startswith("Rss:"):
            rss = int(line.split()[1])
    return pss, rss


class TreeMemorySampler:
    """Samples the summed PSS and RSS of this process and all its descendants in a thread.

    PSS is the honest total: a page shared by N processes (torch's libraries, a model file
    that several sites map) counts 1/N in each, so the sum is what the tree really occupies.
    RSS counts such pages once per process and so overstates the total.

    Samples start every ``interval`` seconds, or back to back when one sample takes longer
    (the kernel walks each process's page tables to answer ``smaps_rollup``).
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak_pss_kib = 0
        self.peak_rss_kib = 0
        self.first_pss_kib = 0
        self.samples = 0
        self._started = 0.0
        self._stopped = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)

    @staticmethod
    def sample() -> tuple[int, int]:
        pss = rss = 0
        for pid in descendants(os.getpid()):
            p, r = pss_rss_kib(pid)
            pss += p
            rss += r
        return pss, rss

    def _loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            pss, rss = self.sample()
            if not self.samples:
                self.first_pss_kib = pss
            self.peak_pss_kib = max(self.peak_pss_kib, pss)
            self.peak_rss_kib = max(self.peak_rss_kib, rss)
            self.samples += 1
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at, time.monotonic())

    def start(self) -> None:
        self._started = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._stopped = time.monotonic()

    @property
    def peak_pss_gb(self) -> float:
        return self.peak_pss_kib * 1024 / 1e9

    @property
    def peak_rss_gb(self) -> float:
        return self.peak_rss_kib * 1024 / 1e9

    @property
    def first_pss_gb(self) -> float:
        return self.first_pss_kib * 1024 / 1e9

    @property
    def mean_interval(self) -> float:
        return (self._stopped - self._started) / max(1, self.samples)


def proc_status_kib(field: str, pid: int | str = "self") -> int:
    """A ``VmXXX:`` line of ``/proc/<pid>/status`` (this process by default), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def release_free_heap() -> None:
    """Hand memory that glibc keeps after ``free`` back to the kernel (``malloc_trim(0)``).

    Without it, RSS before a call includes freed heap pages that the call then reuses, and the
    call's allocations do not show in its peak RSS.
    """
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss(pid: int | str = "self") -> None:
    """Make VmHWM (peak RSS) equal to the current RSS (Linux >= 4.0, ``clear_refs`` 5).

    For another process this needs the right to write its ``/proc/<pid>/clear_refs`` (same
    user, or root).
    """
    with open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")


def cpu_seconds(pid: int | str = "self") -> tuple[float, float]:
    """User and system CPU seconds a process has used (``/proc/<pid>/stat``, 10 ms steps)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def load_average() -> str:
    """``/proc/loadavg``'s 1, 5 and 15 minute figures: other work on the machine."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class RssSampler:
    """Samples one process's VmRSS every ``interval`` seconds in a thread, with wall times.

    Cheap (one read of ``/proc/<pid>/status``, no page-table walk), so it can run beside the
    work it watches. Use :meth:`peak_kib` for the highest sample in a time window (wall clock,
    ``time.time()``, so that it lines up with database and log timestamps).
    """

    def __init__(self, pid: int | str = "self", interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                rss = proc_status_kib("VmRSS", self.pid)
            except (OSError, KeyError):  # the process is gone
                return
            self.samples.append((time.time(), rss))
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at, time.monotonic())

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, start: float, stop: float) -> list[int]:
        return [kib for at, kib in list(self.samples) if start <= at <= stop]

    def peak_kib(self, start: float, stop: float) -> int:
        """The highest sample taken between the wall times ``start`` and ``stop`` (0 if none)."""
        return max(self.between(start, stop), default=0)

    def median_kib(self, start: float, stop: float) -> float:
        return median(self.between(start, stop))


def birth_time(path: str | Path) -> float:
    """When ``path`` was created (statx btime, through GNU ``stat``), NaN if unknown.

    Python 3.11 has no ``st_birthtime`` on Linux. A file renamed into place keeps the birth
    time of the temporary file it was written as.
    """
    try:
        out = subprocess.run(
            ["stat", "--format=%.9W", str(path)], capture_output=True, text=True, check=True
        ).stdout.strip()
        value = float(out)
    except (OSError, ValueError, subprocess.CalledProcessError):
        return float("nan")
    return value if value > 0 else float("nan")


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``."""

    def __init__(self) -> None:
        self.seconds = float("nan")
        self._start = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


# --------------------------------------------------------------------------------------------
# Model shapes
# --------------------------------------------------------------------------------------------

LENET5_SHAPES: dict[str, tuple[int, ...]] = {
    "conv1.weight": (6, 1, 5, 5),
    "conv1.bias": (6,),
    "conv2.weight": (16, 6, 5, 5),
    "conv2.bias": (16,),
    "fc1.weight": (120, 400),
    "fc1.bias": (120,),
    "fc2.weight": (84, 120),
    "fc2.bias": (84,),
    "fc3.weight": (10, 84),
    "fc3.bias": (10,),
}
"""LeNet-5: 61,706 parameters, the "tiny model" of the overhead benchmarks."""

TRANSFORMER_25M_SHAPES: dict[str, tuple[int, ...]] = {
    "embed.weight": (8000, 1000),
    "attn.qkv.weight": (3000, 1000),
    "attn.qkv.bias": (3000,),
    "attn.proj.weight": (1000, 1000),
    "attn.proj.bias": (1000,),
    "ln1.weight": (1000,),
    "ln1.bias": (1000,),
    "mlp.fc1.weight": (4000, 1000),
    "mlp.fc1.bias": (4000,),
    "mlp.fc2.weight": (1000, 4000),
    "mlp.fc2.bias": (1000,),
    "ln2.weight": (1000,),
    "ln2.bias": (1000,),
    "lm_head.weight": (4987, 1000),
}
"""A one-block transformer: a few multi-million-element matrices plus small vectors, 25,000,000
parameters in all (100 MB of float32)."""


def numel(shapes: dict[str, tuple[int, ...]]) -> int:
    total = 0
    for shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def random_params(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Float32 tensors of normal noise with the given shapes (values do not matter to timing)."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
