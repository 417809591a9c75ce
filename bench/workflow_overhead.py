"""Round overhead of every workflow in SimEnv, beside FedAvg's: sites that echo.

Three sites run a client script that sends back what it received (the weights for a train or
submit_model task, SCAFFOLD's control as its control change, a constant metric for an evaluate
task), with LeNet-5's shapes (61,706 float32 parameters), so every second measured is the
workflow's and the driver's own. Each workflow runs ``REPEATS`` jobs of about 20 rounds; a job's
figure is the median of its rounds after the first (the first also waits for the sites to
start), and the table gives the median of the jobs' figures and their range.

Cyclic is timed per site-turn (one driver round, one site). Cross-site evaluation is timed over
its own rounds only (the submit round and one evaluation round per model), after 2 FedAvg
rounds.

    .venv/bin/python bench/workflow_overhead.py
"""

from __future__ import annotations

import tempfile
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib
from benchlib import md_table, median

from jobs.envs import RunStatus, SimEnv
from jobs.recipes import (
    CyclicRecipe,
    FedAvgRecipe,
    FedOptRecipe,
    FedProxRecipe,
    Recipe,
    ScaffoldRecipe,
    add_cross_site_evaluation,
)

NUM_SITES = 3
ROUNDS = 20
REPEATS = 5
TARGET_RATIO = 1.5
TARGET_SECONDS = 0.03

ECHO_CLIENT = textwrap.dedent(
    '''\
    """Echo client for every task: sends back what it received."""

    import client_agent.api as flare
    from client_agent.fl_model import AlgorithmConstants

    flare.init()
    last_params = None
    while flare.is_running():
        model = flare.receive()
        if flare.is_evaluate():
            flare.send(flare.FLModel(metrics={"accuracy": 0.5}))
            continue
        if flare.is_submit_model():
            flare.send(flare.FLModel(params=last_params))
            continue
        last_params = model.params
        meta = {}
        controls = model.meta.get(AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL)
        if controls is not None:
            meta[AlgorithmConstants.SCAFFOLD_CTRL_DIFF] = controls
        flare.send(flare.FLModel(params=model.params, meta=meta))
    '''
)


@dataclass(frozen=True)
class Case:
    label: str
    make: Callable[[dict[str, Any], Path], Recipe]
    unit: str = "round"
    timed_from: int = 1
    """The first driver round timed (0-based): later than 1 when the case has a training phase
    it does not measure."""


def _fedavg(params: dict[str, Any], script: Path, **kwargs: Any) -> FedAvgRecipe:
    return FedAvgRecipe("bench-echo", NUM_SITES, ROUNDS, params, script, key_metric=None, **kwargs)


CROSS_SITE_TRAINING_ROUNDS = 2

CASES = [
    Case("FedAvg", lambda p, s: _fedavg(p, s)),
    Case("FedAvg, median", lambda p, s: _fedavg(p, s, aggregator="median")),
    Case(
        "FedProx",
        lambda p, s: FedProxRecipe("bench-echo", NUM_SITES, ROUNDS, p, s, key_metric=None),
    ),
    Case(
        "FedOpt (FedAvgM)",
        lambda p, s: FedOptRecipe("bench-echo", NUM_SITES, ROUNDS, p, s, key_metric=None),
    ),
    Case(
        "FedOpt (FedAdam)",
        lambda p, s: FedOptRecipe(
            "bench-echo",
            NUM_SITES,
            ROUNDS,
            p,
            s,
            key_metric=None,
            optimizer_args={
                "path": "jobs.aggregation.server_opt.FedAdam",
                "args": {"lr": 1e-2, "betas": (0.9, 0.99), "tau": 1e-3},
            },
        ),
    ),
    Case(
        "SCAFFOLD",
        lambda p, s: ScaffoldRecipe("bench-echo", NUM_SITES, ROUNDS, p, s, key_metric=None),
    ),
    Case(
        "Cyclic",
        # 7 passes × 3 sites = 21 turns, about the 20 rounds of the others.
        lambda p, s: CyclicRecipe("bench-echo", p, 7, s, min_clients=NUM_SITES, key_metric=None),
        unit="site-turn",
    ),
    Case(
        "cross-site evaluation",
        lambda p, s: add_cross_site_evaluation(
            FedAvgRecipe("bench-echo", NUM_SITES, CROSS_SITE_TRAINING_ROUNDS, p, s, key_metric=None)
        ),
        unit="submit or evaluation round",
        timed_from=CROSS_SITE_TRAINING_ROUNDS,
    ),
]


@dataclass
class Measured:
    case: Case
    per_job: list[float]
    """Each job's median seconds per timed round."""
    rounds: int

    @property
    def seconds(self) -> float:
        return median(self.per_job)


def run_once(case: Case, script: Path, workspace: Path) -> tuple[float, int]:
    """One job of ``case``: the median seconds of its timed rounds, and how many there were."""
    recipe = case.make(benchlib.random_params(benchlib.LENET5_SHAPES), script)
    run = recipe.execute(SimEnv(num_clients=NUM_SITES, workspace=workspace, show_progress=False))
    if run.status != RunStatus.COMPLETED:
        raise SystemExit(f"{case.label}: {run.status.value}: {run.error}")
    timed = [r.seconds for r in run.rounds[case.timed_from :]]
    return median(timed), len(timed)


def measure_all(script: Path, workspace: Path) -> list[Measured]:
    """Every case ``REPEATS`` times, taking turns, so that whatever else the machine does at
    some moment slows one job of each case rather than every job of one case."""
    # One untimed job first: the fork server and the page cache warm up in it.
    run_once(CASES[0], script, workspace / "warm-up")
    results = [Measured(case, [], 0) for case in CASES]
    for repeat in range(REPEATS):
        for i, measured in enumerate(results):
            seconds, rounds = run_once(measured.case, script, workspace / f"{i}-{repeat}")
            measured.per_job.append(seconds)
            measured.rounds = rounds
    return results


def main() -> None:
    benchlib.print_header(
        "Round overhead per workflow, SimEnv (echo clients)",
        f"{NUM_SITES} sites echo LeNet-5 ({benchlib.numel(benchlib.LENET5_SHAPES):,} float32 "
        f"params); {REPEATS} jobs per workflow, each ~{ROUNDS} rounds; a job's figure is the "
        "median of its rounds after the first. Target: FedOpt, SCAFFOLD and Cyclic (per "
        f"site-turn) within {TARGET_RATIO}× FedAvg's round and ≤ {TARGET_SECONDS} s. "
        f"Workspaces on {benchlib.filesystem(tempfile.gettempdir())}.",
    )
    with tempfile.TemporaryDirectory(prefix="fedportal-bench-") as tmp:
        app = Path(tmp, "app")
        app.mkdir()
        script = app / "echo_client.py"
        script.write_text(ECHO_CLIENT)
        results = measure_all(script, Path(tmp, "ws"))
    fedavg = results[0].seconds
    rows = []
    for m in results:
        ratio = m.seconds / fedavg
        targeted = m.case.label.startswith(("FedOpt", "SCAFFOLD", "Cyclic"))
        verdict = ""
        if targeted:
            met = ratio <= TARGET_RATIO and m.seconds <= TARGET_SECONDS
            verdict = "yes" if met else "**no**"
        rows.append(
            (
                m.case.label,
                m.case.unit,
                f"**{m.seconds:.4f}**",
                f"{min(m.per_job):.4f}–{max(m.per_job):.4f}",
                f"{ratio:.2f}×",
                verdict,
                str(m.rounds),
            )
        )
    print()
    print(
        md_table(
            [
                "workflow",
                "timed unit",
                "s per unit (median of jobs)",
                "range over jobs",
                "÷ FedAvg",
                f"≤ {TARGET_RATIO}× and ≤ {TARGET_SECONDS} s",
                "units timed per job",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
