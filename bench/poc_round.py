"""PocEnv's cost per round, with real processes: portal (Daphne), Celery worker, site agents.

Workloads, all FedAvg with an "echo" client that sends the received model straight back:

* 3 agents, LeNet-5 (61,706 float32 parameters), 20 rounds: the fixed overhead of a round,
  ``execute()`` → the first site's script receiving its model, and the peak memory (PSS) of
  every process PocEnv started (portal, worker, agents, their fork servers and scripts).
* 50 agents, a tiny model, 3 rounds (``--quick`` skips it).
* hello-pt (3 sites, 5 rounds, the small CNN) in PocEnv: the whole ``python job.py`` process,
  start and stop included.

Every workload runs 3 times (``--quick``: once); the table gives medians (maxima for the
round maximum and memory).

A round's time is the portal's own record: round n+1 opened minus round n opened (download,
script, upload, update check, aggregation, next round's open, and the agents learning of it).
Round 1 includes the scripts' start, so it is reported apart.

    .venv/bin/python bench/poc_round.py [--quick]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import benchlib
import torch
from benchlib import median
from benchlib.portal import round_cycles

from jobs.envs import PocEnv, RunStatus
from jobs.recipes import FedAvgRecipe

ECHO = textwrap.dedent(
    """
    import sys, time
    import client_agent.api as flare

    flare.init()
    first = True
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        if first:
            with open(sys.argv[1], "a") as fh:
                fh.write(f"{time.time()}\\n")
            first = False
        flare.send(flare.FLModel(params=model.params, metrics={"accuracy": 0.5},
                                 meta={"NUM_STEPS_CURRENT_ROUND": 1}))
    """
)


def run_echo(agents: int, rounds: int, model: object, workdir: Path) -> dict[str, float]:
    app = workdir / f"app-{agents}"
    app.mkdir(parents=True)
    workdir.mkdir(parents=True, exist_ok=True)
    (app / "client.py").write_text(ECHO)
    marks = workdir / f"first-receive-{agents}.txt"
    recipe = FedAvgRecipe(
        name=f"echo-{agents}",
        min_clients=agents,
        num_rounds=rounds,
        model=model,
        train_script=str(app / "client.py"),
        train_args=str(marks),
    )
    env = PocEnv(
        num_clients=agents,
        workspace=workdir / f"poc-{agents}",
        redis_db=13,
        show_progress=False,
        keep_running=True,
    )
    sampler = benchlib.TreeMemorySampler(interval=0.25)
    sampler.start()
    started = time.time()
    try:
        run = recipe.execute(env)
        ended = time.time()
        cycles = round_cycles(env.url, env.credentials["api_token"], run.job_id)
    finally:
        env.stop()
        sampler.stop()
    assert run.status == RunStatus.COMPLETED, run.error
    first_receive = min(float(line) for line in marks.read_text().split())
    return {
        "round_1": cycles[0],
        "round_median": median(cycles[1:]),
        "round_max": max(cycles[1:]),
        "execute_to_first_training": first_receive - started,
        "whole": ended - started,
        "peak_pss_gb": sampler.peak_pss_gb,
        "peak_rss_gb": sampler.peak_rss_gb,
    }


def hello_pt_whole_run() -> float:
    """``python job.py --env poc --no-serve`` in examples/hello-pt: start, 5 rounds, stop."""
    example = Path(__file__).resolve().parent.parent / "examples" / "hello-pt"
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "job.py", "--env", "poc", "--no-serve"],
        cwd=example,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="one run each; skip 50 agents")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    benchlib.print_header("PocEnv round overhead", "portal + worker + agents, echo clients")
    with tempfile.TemporaryDirectory(prefix="poc-bench-") as tmp:
        workdir = Path(tmp)
        runs = []
        for attempt in range(repeats):
            lenet = benchlib.random_params(benchlib.LENET5_SHAPES)
            runs.append(run_echo(3, 20, lenet, workdir / str(attempt)))
        three = {
            key: (max if key in ("round_max", "peak_pss_gb", "peak_rss_gb") else median)(
                [r[key] for r in runs]
            )
            for key in runs[0]
        }
        rows = [(f"3 agents, LeNet-5 (61,706 params), 20 rounds (median of {repeats})", three)]
        if not args.quick:
            fifty = run_echo(50, 3, torch.nn.Linear(4, 2), workdir / "fifty")
            rows.append(("50 agents, Linear(4, 2), 3 rounds", fifty))
    print(
        benchlib.md_table(
            [
                "workload",
                "round median (s)",
                "round max (s)",
                "round 1 (s)",
                "execute() → first script receives (s)",
                "whole run incl. start/stop (s)",
                "peak PSS, all processes (GB)",
                "peak RSS summed (GB)",
            ],
            [
                (
                    name,
                    f"{r['round_median']:.3f}",
                    f"{r['round_max']:.3f}",
                    f"{r['round_1']:.2f}",
                    f"{r['execute_to_first_training']:.2f}",
                    f"{r['whole']:.1f}",
                    f"{r['peak_pss_gb']:.2f}",
                    f"{r['peak_rss_gb']:.2f}",
                )
                for name, r in rows
            ],
        )
    )
    wholes = [hello_pt_whole_run() for _ in range(repeats)]
    print(
        f"\nhello-pt in PocEnv (3 sites x 5 rounds), `python job.py --env poc --no-serve`, "
        f"whole process: median {median(wholes):.1f} s of {repeats} "
        f"({', '.join(f'{w:.1f}' for w in wholes)})"
    )


if __name__ == "__main__":
    main()
