"""Start-up of the hello-pt job: from ``python job.py`` to the first site training.

The job is a temporary copy of ``examples/hello-pt`` (3 sites, 5 rounds, ``SimEnv``): its
``job.py`` unchanged, its ``client.py`` with a few lines put in front of the script's own code
that note, in a file, when the script starts, when ``flare.init()`` returns and when the first
``flare.receive()`` returns (the site has the global model and starts training). ``TMPDIR``
points the simulation workspace into the temporary folder, which is removed afterwards.

Then the imports that a start-up pays for, each timed in a fresh interpreter.

    .venv/bin/python bench/startup.py
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import benchlib
from benchlib import REPO_ROOT, md_table, median

EXAMPLE = REPO_ROOT / "examples" / "hello-pt"
REPEATS = 3
MARKS_ENV = "FEDPORTAL_BENCH_MARKS"

# Put in front of the client script's own code. It only notes times: the script's lines run
# unchanged after it, and call the same flare.init/receive, wrapped.
CLIENT_HOOK = f"""\
# --- bench/startup.py: note when this site starts, connects and first receives a model ---
import os as _bench_os
import time as _bench_time


def _bench_mark(event: str) -> None:
    with open(_bench_os.environ[{MARKS_ENV!r}], "a") as _fh:
        _fh.write(f"{{event}} {{_bench_time.time()!r}} {{_bench_os.getpid()}}\\n")


_bench_mark("script_start")
import client_agent.api as _bench_flare  # noqa: E402


def _bench_wrap(name: str, event: str) -> None:
    original = getattr(_bench_flare, name)
    state = {{"first": True}}

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        if state["first"]:
            state["first"] = False
            _bench_mark(event)
        return result

    setattr(_bench_flare, name, wrapper)


_bench_wrap("init", "init_returned")
_bench_wrap("receive", "first_receive")
# --- end of bench/startup.py's lines; the example's client.py follows unchanged ---
"""


def instrument(source: str) -> str:
    """``source`` with :data:`CLIENT_HOOK` after its docstring and ``__future__`` imports."""
    body = ast.parse(source).body
    insert_at = 0  # a line index: the hook goes before this line
    for index, node in enumerate(body):
        is_docstring = (
            index == 0
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        )
        is_future = isinstance(node, ast.ImportFrom) and node.module == "__future__"
        if not (is_docstring or is_future):
            break
        insert_at = node.end_lineno or 0
    lines = source.splitlines(keepends=True)
    return "".join(lines[:insert_at]) + "\n" + CLIENT_HOOK + "\n" + "".join(lines[insert_at:])


@dataclass
class JobTimes:
    """Seconds from the start of ``python job.py``; NaN when the event was not seen."""

    sim_started: float = float("nan")
    first_script: float = float("nan")
    first_init: float = float("nan")
    first_receive: float = float("nan")
    last_receive: float = float("nan")
    round1_done: float = float("nan")
    exited: float = float("nan")
    output: list[str] = field(default_factory=list)


def run_job(tmp: Path, index: int) -> JobTimes:
    """One ``python job.py`` of a fresh copy of the example; returns its event times."""
    job_dir = tmp / f"hello-pt-{index}"
    shutil.copytree(EXAMPLE, job_dir, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    client = job_dir / "client.py"
    client.write_text(instrument(client.read_text()))
    marks = tmp / f"marks-{index}.txt"
    workspace_tmp = tmp / f"tmp-{index}"
    workspace_tmp.mkdir()
    env = {
        **os.environ,
        MARKS_ENV: str(marks),
        "TMPDIR": str(workspace_tmp),  # SimEnv's default workspace is under tempfile's folder
        "PYTHONUNBUFFERED": "1",
    }
    times = JobTimes()
    started = time.time()
    proc = subprocess.Popen(
        [sys.executable, "job.py"],
        cwd=job_dir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.time() - started
        times.output.append(line.rstrip("\n"))
        if times.sim_started != times.sim_started:  # SimEnv prints its first line on start
            times.sim_started = now
        if line.startswith("round 1/"):
            times.round1_done = now
    code = proc.wait()
    times.exited = time.time() - started
    if code != 0 or not any("COMPLETED" in line for line in times.output):
        tail = "\n".join(times.output[-30:])
        raise SystemExit(f"hello-pt job failed (exit code {code}):\n{tail}")
    events: dict[str, list[float]] = {}
    for line in marks.read_text().splitlines():
        event, stamp, _pid = line.split()
        events.setdefault(event, []).append(float(stamp) - started)
    times.first_script = min(events.get("script_start", [float("nan")]))
    times.first_init = min(events.get("init_returned", [float("nan")]))
    receives = events.get("first_receive", [float("nan")])
    times.first_receive, times.last_receive = min(receives), max(receives)
    return times


def python_wall(code: str, *, cwd: Path | None = None) -> float:
    """Wall seconds of ``python -c code`` in a fresh interpreter."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - started


def import_times(statements: list[str]) -> dict[str, float]:
    """Cumulative ``-X importtime`` seconds of each top-level import, run in that order.

    Each statement is charged with the top-level entries of the modules it names, so a later
    statement does not pay again for what an earlier one imported (as in a real script).
    """
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "; ".join(statements)],
        check=True,
        capture_output=True,
        text=True,
    )
    totals = {statement: 0.0 for statement in statements}
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        if name.startswith("  ") or not cumulative.strip().isdigit():
            continue  # nested entry, or the header line
        module = name.strip()
        for statement in statements:
            named = statement.removeprefix("import ").replace(" ", "").split(",")
            if any(module == n or module.startswith(n.split(".")[0] + ".") for n in named):
                totals[statement] += int(cumulative) / 1e6
                break
    return totals


def first_optimizer_seconds() -> float:
    """Seconds of the first optimizer a fresh process makes (torch imports more on first use)."""
    code = (
        "import time, torch; m = torch.nn.Linear(2, 2); t = time.perf_counter(); "
        "torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9); print(time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout)


def fmt(seconds: float) -> str:
    return "n/a" if seconds != seconds else f"{seconds:.2f}"


def main() -> None:
    benchlib.print_header(
        "Start-up: `python job.py` to the first site training (hello-pt, SimEnv)",
        f"Median of {REPEATS} runs of a temporary copy of examples/hello-pt (3 sites, 5 rounds, "
        "2 epochs); 'first receive' is the first `flare.receive()` of a site returning, right "
        "before it trains. Times in seconds from the start of `python job.py`.",
    )
    with tempfile.TemporaryDirectory(prefix="fedportal-bench-") as tmp_name:
        tmp = Path(tmp_name)
        runs = [run_job(tmp, index) for index in range(REPEATS)]
        data_code = (
            "import time; from data import load_data; t = time.perf_counter(); "
            "load_data('site-1', 3); print(time.perf_counter() - t)"
        )
        load_data_seconds = [
            float(
                subprocess.run(
                    [sys.executable, "-c", data_code],
                    cwd=tmp / "hello-pt-0",
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
            )
            for _ in range(REPEATS)
        ]

    def row(label: str, attr: str) -> tuple[str, str, str]:
        values = [getattr(run, attr) for run in runs]
        return label, f"**{fmt(median(values))}**", " / ".join(fmt(v) for v in values)

    print(
        md_table(
            ["event", "median s", "each run"],
            [
                row(
                    "SimEnv starts (job.py imported, recipe built, bundle exported)", "sim_started"
                ),
                row("first site's client script starts", "first_script"),
                row("first site's `flare.init()` returns (its imports done)", "first_init"),
                row(
                    "**first site's first `flare.receive()` returns: training starts**",
                    "first_receive",
                ),
                row("last site's first `flare.receive()` returns", "last_receive"),
                row("round 1 of 5 done", "round1_done"),
                row("**`python job.py` exits (whole run, 5 rounds)**", "exited"),
            ],
        )
    )
    print()

    # The same runs as durations between events: where the start-up goes.
    phases = [
        ("job.py imports, builds the recipe, exports the bundle", None, "sim_started"),
        (
            "SimEnv start → first client script runs (site processes start)",
            "sim_started",
            "first_script",
        ),
        (
            "script start → `flare.init()` returns (the script's imports)",
            "first_script",
            "first_init",
        ),
        (
            "`init()` → first `receive()` returns (data, model, optimizer, task, model file)",
            "first_init",
            "first_receive",
        ),
        ("first site training → round 1 done", "first_receive", "round1_done"),
        ("round 1 done → exit (rounds 2..5, stopping the sites)", "round1_done", "exited"),
    ]
    phase_rows = []
    for label, begin, end in phases:
        spans = [getattr(r, end) - (getattr(r, begin) if begin else 0.0) for r in runs]
        phase_rows.append((label, fmt(median(spans))))
    print(md_table(["phase (first site)", "median s"], phase_rows))
    print()

    # What the start-up pays for, each in a fresh interpreter (median of REPEATS).
    statements = [
        "import torch",
        "import client_agent.api",
        "import sklearn.datasets",
        "import jobs.envs, jobs.recipes",
    ]
    samples = [import_times(statements) for _ in range(REPEATS)]
    interpreter = median([python_wall("pass") for _ in range(REPEATS)])
    torch_wall = median([python_wall("import torch") for _ in range(REPEATS)])
    rows = [
        ("`python -c pass` (interpreter start), wall", fmt(interpreter)),
        ("`python -c 'import torch'`, wall", fmt(torch_wall)),
    ]
    notes = {
        "import torch": "",
        "import client_agent.api": " (after torch)",
        "import sklearn.datasets": " (after torch; hello-pt's data.py)",
        "import jobs.envs, jobs.recipes": " (after torch; job.py)",
    }
    for statement in statements:
        value = median([sample[statement] for sample in samples])
        rows.append((f"`{statement}`{notes[statement]}, -X importtime cumulative", fmt(value)))
    rows.append(
        ("hello-pt `load_data('site-1')` (load_digits + split)", fmt(median(load_data_seconds)))
    )
    rows.append(
        (
            "first `torch.optim.SGD(...)` of a process (after `import torch`)",
            fmt(median([first_optimizer_seconds() for _ in range(REPEATS)])),
        )
    )
    print(md_table(["start-up cost, one process alone", "median s"], rows))
    print()
    print(
        f"This machine has {len(os.sched_getaffinity(0))} cores: job.py and 3 sites that each "
        "import something heavy at the same time take about (processes / cores) times longer "
        "than one process alone."
    )


if __name__ == "__main__":
    main()
