"""A worker killed in the middle of a round's aggregation, another worker alive: the stall.

PocEnv with real processes on a PostgreSQL database of the bench's own: a Daphne portal, two
Celery workers (``num_workers=2``), three echo agents (each sends the received model back),
FedAvg over a ``--numel``-float model. The beat's resume is set to an hour and the round's
deadline to ten minutes, so that only the claim's lease (``FEDPORTAL_CLAIM_LEASE_SECONDS``)
and the surviving worker's watchdog (``FEDPORTAL_CLAIM_CHECK_SECONDS``) can hand the round on.

Each trial is one job. The bench watches the rounds table over one connection, and the moment
a worker holds a round's claim and has started aggregating it, it SIGKILLs that worker's
process group (the worker is not started again). It reports:

* **hand-over**: the kill until another worker holds the round's claim;
* **stall**: the kill until the round is closed (the hand-over, then the whole aggregation
  again);
* **same model**: the job's final model against SimEnv's, bit for bit.

Before the lease (issue 18), the round waited for the broker's redelivery of the dead
worker's task: 396 s measured.

    .venv/bin/python bench/worker_failover.py               # 3 trials, 4M floats
    .venv/bin/python bench/worker_failover.py --trials 1 --numel 25000000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import benchlib
import psycopg
import torch
from benchlib import median
from benchlib.portal import scratch_database

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.chaos.services: the wait the chaos tests use

from client_agent.wire import load_state_dict  # noqa: E402
from jobs.envs import PocEnv, RunStatus, SimEnv  # noqa: E402
from jobs.envs.portal import PortalRun, ProdEnv  # noqa: E402
from jobs.recipes import FedAvgRecipe  # noqa: E402
from tests.chaos.services import wait_until  # noqa: E402

ECHO = textwrap.dedent(
    """
    import client_agent.api as flare

    flare.init()
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        k = int(flare.get_site_name().rsplit("-", 1)[1])
        params = {name: value + k for name, value in model.params.items()}
        flare.send(flare.FLModel(params=params, metrics={"accuracy": 0.5},
                                 meta={"NUM_STEPS_CURRENT_ROUND": k}))
    """
)
ROUNDS = 3


def recipe(app: Path, numel: int) -> FedAvgRecipe:
    return FedAvgRecipe(
        name=f"failover-{numel}",
        min_clients=3,
        num_rounds=ROUNDS,
        model={"w": torch.linspace(-1.0, 1.0, numel)},
        train_script=str(app / "client.py"),
    )


def trial(app: Path, numel: int, workdir: Path) -> dict[str, float | bool]:
    with scratch_database("fedportal_failover") as url:
        env = PocEnv(
            num_clients=3,
            num_workers=2,
            workspace=workdir / "poc",
            redis_db=12,
            show_progress=False,
            keep_running=True,
            database_url=url,
            round_timeout_seconds=600,
            extra_env={"FEDPORTAL_RESUME_SECONDS": "3600"},
        )
        env.start()
        try:
            prod = ProdEnv(
                env.url,
                token=env.credentials["api_token"],
                project=env.credentials["project"],
                workspace=workdir / "runs",
                show_progress=False,
                wait=False,
            )
            run = recipe(app, numel).execute(prod)
            assert isinstance(run, PortalRun)
            with psycopg.connect(url, autocommit=True) as watch:
                found = watch.execute(
                    "SELECT id FROM jobs_job WHERE uid = %s", [run.job_id]
                ).fetchone()
                assert found is not None, run.job_id
                job_id = found[0]

                def latest() -> tuple[int, str, int, str]:
                    row = watch.execute(
                        "SELECT number, state, aggregation_attempts, claim_holder "
                        "FROM jobs_round WHERE job_id = %s ORDER BY number DESC LIMIT 1",
                        [job_id],
                    ).fetchone()
                    return (-1, "", 0, "") if row is None else (int(row[0]), *row[1:])

                def aggregating() -> tuple[int, str, int, str] | None:
                    row = latest()
                    return row if row[1] == "aggregating" and row[2] >= 1 and row[3] else None

                caught = wait_until(aggregating, 300, "aggregation", 0.002)
                assert caught is not None
                number, _, _, dead_holder = caught
                pid = int(dead_holder.split(":")[1])
                dead = next(name for name in env.workers if env.processes[name].pid == pid)
                env.kill(dead)
                killed = time.monotonic()

                def round_row() -> tuple[str, str]:
                    row = watch.execute(
                        "SELECT state, claim_holder FROM jobs_round "
                        "WHERE job_id = %s AND number = %s",
                        [job_id, number],
                    ).fetchone()
                    assert row is not None
                    return str(row[0]), str(row[1])

                def handed_over() -> bool:
                    state, holder = round_row()
                    return state == "closed" or holder not in ("", dead_holder)

                wait_until(handed_over, 120, "hand-over", 0.005)
                hand_over = time.monotonic() - killed
                wait_until(lambda: round_row()[0] == "closed", 120, "round closed", 0.005)
                stall = time.monotonic() - killed
            finished = run.wait(timeout=600)
        finally:
            env.stop()
    assert finished.status == RunStatus.COMPLETED, finished.error
    final = load_state_dict(finished.workspace / "models" / f"round-{ROUNDS:03d}.safetensors")
    sim = recipe(app, numel).execute(
        SimEnv(num_clients=3, workspace=workdir / "sim", show_progress=False)
    )
    assert sim.global_model is not None
    same = all(torch.equal(final[name], sim.global_model[name]) for name in sim.global_model)
    return {"hand_over": hand_over, "stall": stall, "same": same, "round": number + 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--numel", type=int, default=4_000_000, help="floats in the model")
    args = parser.parse_args()
    benchlib.print_header(
        "A worker killed mid-aggregation, another alive",
        f"PocEnv on PostgreSQL: 2 solo workers, 3 echo agents, {args.numel:,} floats; "
        f"lease {os.environ.get('FEDPORTAL_CLAIM_LEASE_SECONDS', '6')} s, watchdog every "
        f"{os.environ.get('FEDPORTAL_CLAIM_CHECK_SECONDS', '1')} s",
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="failover-bench-") as tmp:
        app = Path(tmp) / "app"
        app.mkdir()
        (app / "client.py").write_text(ECHO)
        for number in range(args.trials):
            figures = trial(app, args.numel, Path(tmp) / f"trial-{number}")
            print(f"trial {number + 1}: {figures}", flush=True)
            rows.append(figures)
    print()
    print(
        benchlib.md_table(
            ["figure", "median (s)", "max (s)", "trials"],
            [
                (
                    name,
                    f"{median([float(r[key]) for r in rows]):.1f}",
                    f"{max(float(r[key]) for r in rows):.1f}",
                    len(rows),
                )
                for name, key in (("hand-over", "hand_over"), ("stall", "stall"))
            ],
        )
    )
    print(f"\nfinal model bit-identical to SimEnv's: {all(r['same'] for r in rows)}")


if __name__ == "__main__":
    main()
