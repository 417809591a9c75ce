"""SimEnv's own cost per round: sites that send the received model straight back ("echo").

Two workloads, both FedAvg in ``SimEnv`` with the echo client below:

* 3 sites, LeNet-5 (61,706 float32 parameters), 20 rounds: the fixed overhead of a round.
* 4 sites, a 25M-parameter float32 model (100 MB), 5 rounds: the cost of moving weights, and
  the peak memory (PSS) of the whole process tree.

Round 1 also waits for the site processes to start and connect, so it is reported apart and
left out of the per-round figures. To show where the time goes, the bench wraps with timers
the functions that ``SimEnv`` calls (``Recipe.export``, ``_start_sites``, ``_stop_sites``,
``result_from_file``, ``load_state_dict``, ``write_global_model``, ``FedAvg.close``), and the echo
client writes when its task arrived, when ``flare.receive()`` returned and when
``flare.send()`` returned. Nothing in the core is edited; a wrapped name that the core no
longer has leaves its row at n/a.

    .venv/bin/python bench/sim_overhead.py
"""

from __future__ import annotations

import json
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib
from benchlib import md_table, median

import jobs.envs
import jobs.envs.sim
from jobs.envs import Run, RunStatus, SimEnv
from jobs.recipes import FedAvgRecipe, Recipe
from jobs.workflows.fedavg import FedAvg

MARKS_FILE = "bench_marks.jsonl"
_MISSING = object()

ECHO_CLIENT = textwrap.dedent(
    f'''\
    """Echo client: sends the received global model straight back, and notes the times."""

    import json
    import time

    import client_agent.api as flare

    flare.init()
    # In the site's working folder; the bench reads it after the run.
    with open({MARKS_FILE!r}, "a", buffering=1) as marks:
        while flare.is_running():
            task_arrived = time.time()  # is_running() returns once the task frame is in
            model = flare.receive()
            received = time.time()
            flare.send(flare.FLModel(params=model.params))
            sent = time.time()
            marks.write(
                json.dumps(
                    {{
                        "round": model.current_round,
                        "task": task_arrived,
                        "received": received,
                        "sent": sent,
                    }}
                )
                + "\\n"
            )
    '''
)


class CoreSpans:
    """Wall-clock spans (``time.time()``, the clock the site processes use) of core functions.

    Wraps attributes of core modules and classes for the duration of a run and puts them back
    afterwards. A name that the core no longer has is skipped, so the bench still runs (with a
    blank row) when the core is refactored.
    """

    def __init__(self) -> None:
        self.spans: dict[str, list[tuple[float, float]]] = {}
        self._lock = threading.Lock()
        self._undo: list[tuple[object, str, Any]] = []

    def wrap(self, owner: object, attr: str, label: str) -> None:
        original = getattr(owner, attr, None)
        if original is None:
            return
        record = self.spans.setdefault(label, [])
        lock = self._lock

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.time()
            try:
                return original(*args, **kwargs)
            finally:
                with lock:
                    record.append((start, time.time()))

        # For a class, remember what its own __dict__ held (nothing, for an inherited method)
        # so that restoring does not turn a plain function into a bound method.
        saved = vars(owner).get(attr, _MISSING) if isinstance(owner, type) else original
        self._undo.append((owner, attr, saved))
        setattr(owner, attr, timed)

    def restore(self) -> None:
        for owner, attr, saved in reversed(self._undo):
            if saved is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, saved)
        self._undo.clear()

    def total(self, label: str) -> float:
        """Seconds spent in ``label`` (NaN when the core no longer has that function)."""
        if label not in self.spans:
            return float("nan")
        return sum(end - start for start, end in self.spans[label])


@dataclass
class EchoResult:
    run: Run
    wall: float
    core: CoreSpans
    marks: list[dict[str, Any]]
    sampler: benchlib.TreeMemorySampler | None = None

    @property
    def later_rounds(self) -> list[float]:
        """Seconds of rounds 2..N: round 1 also waits for the site processes to start."""
        return [r.seconds for r in self.run.rounds[1:]]


def run_echo(
    *, num_sites: int, num_rounds: int, shapes: dict[str, tuple[int, ...]], sample_memory: bool
) -> EchoResult:
    """Run the echo job in a temporary folder (removed afterwards) and collect its timings."""
    with tempfile.TemporaryDirectory(prefix="fedportal-bench-") as tmp:
        app = Path(tmp, "app")
        app.mkdir()
        (app / "echo_client.py").write_text(ECHO_CLIENT)
        params = benchlib.random_params(shapes)
        recipe = FedAvgRecipe(
            name="bench-echo",
            min_clients=num_sites,
            num_rounds=num_rounds,
            model=params,
            train_script=app / "echo_client.py",
            key_metric=None,
        )
        del params  # the recipe keeps its own copy
        env = SimEnv(num_clients=num_sites, workspace=Path(tmp, "ws"), show_progress=False)
        core = CoreSpans()
        core.wrap(Recipe, "export", "export")
        simulation = getattr(jobs.envs.sim, "_Simulation", None)  # private: may be renamed
        core.wrap(simulation, "_start_sites", "start_sites")
        core.wrap(simulation, "_stop_sites", "stop_sites")
        core.wrap(jobs.envs.sim, "write_global_model", "save_global")
        core.wrap(jobs.envs.sim, "result_from_file", "check_update")
        core.wrap(jobs.envs.sim, "load_state_dict", "load_global")
        core.wrap(FedAvg, "close", "aggregate")
        sampler = benchlib.TreeMemorySampler() if sample_memory else None
        try:
            if sampler:
                sampler.start()
            started = time.perf_counter()
            run = recipe.execute(env)
            wall = time.perf_counter() - started
        finally:
            if sampler:
                sampler.stop()
            core.restore()
        if run.status != RunStatus.COMPLETED:
            raise SystemExit(f"the echo job did not complete: {run.status.value}: {run.error}")
        marks = [
            json.loads(line)
            for path in sorted(run.workspace.glob(f"sites/*/{MARKS_FILE}"))
            for line in path.read_text().splitlines()
        ]
    return EchoResult(run=run, wall=wall, core=core, marks=marks, sampler=sampler)


def fmt(seconds: float) -> str:
    return "n/a" if seconds != seconds else f"{seconds:.3f}"


def whole_run(result: EchoResult, num_sites: int) -> str:
    """Per-round figures and where the whole run's wall time goes."""
    rounds = result.run.rounds
    later = result.later_rounds
    core = result.core
    n = len(rounds)
    rows = [
        (f"per round, rounds 2..{n}, **median**", f"**{fmt(median(later))}**"),
        (f"per round, rounds 2..{n}, mean", fmt(sum(later) / len(later))),
        (f"per round, rounds 2..{n}, min / max", f"{fmt(min(later))} / {fmt(max(later))}"),
        (f"round 1 (waits for the {num_sites} sites to connect)", fmt(rounds[0].seconds)),
        ("**whole run: `recipe.execute(env)` wall time**", f"**{fmt(result.wall)}**"),
        ("  export the job bundle (`Recipe.export`)", fmt(core.total("export"))),
        ("  start the site processes (`_start_sites`)", fmt(core.total("start_sites"))),
        ("  all rounds (`RoundRecord.seconds` summed)", fmt(sum(r.seconds for r in rounds))),
        ("  stop the sites (`_stop_sites`)", fmt(core.total("stop_sites"))),
    ]
    return md_table(["figure", "seconds"], rows)


def breakdown(result: EchoResult) -> str:
    """Where a round's seconds go, as medians over rounds 2..N."""
    spans = result.core.spans
    # The initial model is written once before round 1, then one global model per round.
    saves = sorted(spans.get("save_global", []))[1:]
    num_rounds = len(result.run.rounds)
    if len(saves) != num_rounds:
        return "(no breakdown: the core no longer writes one global model per round)"

    def in_round(label: str, rnd: int) -> list[tuple[float, float]]:
        # Round rnd runs from the end of the previous round's save to the end of its own.
        lo, hi = saves[rnd - 1][1], saves[rnd][1]
        return [s for s in spans.get(label, []) if lo <= s[0] <= hi]

    rows: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        rows.setdefault(key, []).append(value)

    for rnd in range(1, num_rounds):
        start = saves[rnd - 1][1]
        site_marks = [m for m in result.marks if m["round"] == rnd]
        checks = in_round("check_update", rnd)
        if site_marks:
            add("dispatch", min(m["task"] for m in site_marks) - start)
            add("receive", median([m["received"] - m["task"] for m in site_marks]))
            add("send", median([m["sent"] - m["received"] for m in site_marks]))
            add("last_sent", max(m["sent"] for m in site_marks) - start)
        if checks:
            add("check", median([end - begin for begin, end in checks]))
            add("collect", max(end for _, end in checks) - start)
        for label in ("load_global", "aggregate", "save_global"):
            add(label, sum(end - begin for begin, end in in_round(label, rnd)))
        add("round", result.run.rounds[rnd].seconds)

    def cell(key: str) -> str:
        return fmt(median(rows.get(key, [])))

    table = [
        ("round start → first site has its task", cell("dispatch"), "server → site"),
        ("`flare.receive()`: open the global model file", cell("receive"), "each site (median)"),
        ("`flare.send()`: write the update file", cell("send"), "each site (median)"),
        ("round start → last site's `send()` returned", cell("last_sent"), "sites in parallel"),
        (
            "`result_from_file`: check one update (reads it all)",
            cell("check"),
            "server, thread per site",
        ),
        ("round start → every update checked", cell("collect"), "server"),
        ("`load_state_dict(global)` (and of the initial model)", cell("load_global"), "server"),
        ("`FedAvg.close` (fedavg over the files)", cell("aggregate"), "server"),
        ("`write_global_model` (the new global model's file)", cell("save_global"), "server"),
        ("whole round (`RoundRecord.seconds`)", cell("round"), ""),
    ]
    return md_table([f"phase, rounds 2..{num_rounds}", "median s", "where"], table)


def main() -> None:
    benchlib.print_header(
        "SimEnv round overhead (echo clients)",
        "Each site's client script sends the received model straight back, so every second "
        "here is FedPortal's own: processes, socket, safetensors files, checks, aggregation. "
        "The first job below is the first of this process, so any one-time start-up of the "
        "runtime falls in its 'start the site processes'. Workspaces are temporary folders on "
        f"{benchlib.filesystem(tempfile.gettempdir())} (set TMPDIR to move them).",
    )

    tiny_shapes = benchlib.LENET5_SHAPES
    tiny = run_echo(num_sites=3, num_rounds=20, shapes=tiny_shapes, sample_memory=False)
    print(f"### 3 sites, LeNet-5 ({benchlib.numel(tiny_shapes):,} float32 params), 20 rounds\n")
    print(whole_run(tiny, 3))
    print()
    print(breakdown(tiny))
    print(flush=True)

    big_shapes = benchlib.TRANSFORMER_25M_SHAPES
    model_mb = benchlib.numel(big_shapes) * 4 / 1e6
    # Timing and memory come from two runs: reading smaps_rollup costs the kernel a few ms
    # per process, which on 2 cores would slow the rounds being timed.
    big = run_echo(num_sites=4, num_rounds=5, shapes=big_shapes, sample_memory=False)
    mem = run_echo(num_sites=4, num_rounds=5, shapes=big_shapes, sample_memory=True)
    assert mem.sampler is not None
    print(
        f"### 4 sites, {benchlib.numel(big_shapes):,} float32 params ({model_mb:.0f} MB), "
        "5 rounds\n"
    )
    print(whole_run(big, 4))
    print()
    print(breakdown(big))
    print()
    sampler = mem.sampler
    print(
        md_table(
            ["memory (a second, identical run, sampled)", "value"],
            [
                (
                    "**peak PSS, this process + all descendants, GB**",
                    f"**{sampler.peak_pss_gb:.2f}**",
                ),
                ("peak RSS summed over the same processes, GB", f"{sampler.peak_rss_gb:.2f}"),
                ("model size, GB", f"{model_mb / 1e3:.2f}"),
                (
                    "PSS at the first sample (this process and the children it already had), GB",
                    f"{sampler.first_pss_gb:.2f}",
                ),
                (
                    "samples, mean interval",
                    f"{sampler.samples}, {sampler.mean_interval * 1e3:.0f} ms",
                ),
                ("per round in this sampled run, median, s", fmt(median(mem.later_rounds))),
            ],
        )
    )
    print()
    print(
        "PSS is the figure: RSS counts a shared page (torch's libraries, the global model file "
        "that every site maps, pages shared after a fork) once in every process that maps it, "
        "PSS splits it between them. Page cache that no process maps (update files already "
        "written) is in neither."
    )


if __name__ == "__main__":
    main()
