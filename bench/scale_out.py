"""Many agents on one portal on PostgreSQL: round time, database connections and failures.

PocEnv with real processes (Daphne portals, Celery workers, N site agents with an "echo"
script that sends the received model straight back, a tiny model) on a PostgreSQL database
of the bench's own, FedAvg with every site required each round. Each configuration runs one
job of ``--rounds`` rounds, with the portal's and the worker's connection pool on (the
default, ``DATABASE_POOL_MAX_SIZE`` 10 per process) and off (``DATABASE_POOL_MAX_SIZE=0``:
a connection opened and closed per request, task and WebSocket message, as before the pool).
The tiny model's updates go on the agents' sockets (``FEDPORTAL_SOCKET_UPDATE_MAX_BYTES``, 64
KiB by default); with ``FEDPORTAL_SOCKET_UPDATE_MAX_BYTES=0`` in the environment, the
portals take every update as a signed HTTP upload, as before the ninth session.

Per configuration:

* **round median / max** (rounds 2 on) and **round 1** (which includes the scripts' start):
  the portal's own record, round n+1 opened minus round n opened (the last: the job's end);
* **connections opened per site-round**: PostgreSQL's count of sessions opened on the
  bench's database (``pg_stat_database.sessions``) over the job, divided by agents × rounds;
* **peak connections**: the most sessions open on the database at once, sampled every 20 ms
  from ``pg_stat_activity`` (the sampler's own excluded);
* **CPU per site-round** of the portal processes, the worker processes (each with its
  children) and the whole machine (``/proc/stat``), from the moment round 2 opens to the job's
  end (its state in the database; not ``execute()``'s return, after the results' download),
  divided by agents × (rounds - 1): the steady rounds, without the agents' start;
* **failures**: answers with status 500 in the portals' logs, "too many connections"
  anywhere in the portals', workers' and agents' logs, and the agents' connection attempts
  that failed or connections lost ("portal unreachable", "connection to the portal lost"),
  the first ten of those lines printed (the logs go with the workspace);
* with ``--phases``, each round's steps as the database showed them (``RoundPhases``): when
  the round was committed, its tasks first marked training, its first, half and last
  updates stored, and it closed, in seconds after it opened.

Everything is the bench's own and removed at the end: the database ``fedportal_scale_<pid>``
(server from BENCH_POSTGRES_URL, default postgres://postgres@127.0.0.1:5432), Redis database
12, the PocEnv workspace in a temporary folder.

    .venv/bin/python bench/scale_out.py                 # 100 agents, pool on and off
    .venv/bin/python bench/scale_out.py --agents 10 --rounds 3    # a quick look
    .venv/bin/python bench/scale_out.py --pool on                 # the pool's figures only
    .venv/bin/python bench/scale_out.py --pool on --agents 200 --portals 2 --workers 2
    FEDPORTAL_SOCKET_UPDATE_MAX_BYTES=0 .venv/bin/python bench/scale_out.py --pool on  # HTTP
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import benchlib
import psycopg
import torch
from benchlib import median
from benchlib.portal import POSTGRES, round_cycles, scratch_database

from jobs.envs import PocEnv, RunStatus
from jobs.recipes import FedAvgRecipe

ECHO = textwrap.dedent(
    """
    import client_agent.api as flare

    flare.init()
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        flare.send(flare.FLModel(params=model.params, metrics={"accuracy": 0.5},
                                 meta={"NUM_STEPS_CURRENT_ROUND": 1}))
    """
)
SERVER = POSTGRES.rstrip("/")


class ConnectionWatch:
    """The sessions open on one database, sampled on a thread; and the sessions opened."""

    def __init__(self, url: str) -> None:
        self.name = url.rsplit("/", 1)[1]
        self.conn = psycopg.connect(f"{SERVER}/postgres", autocommit=True)
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def sessions(self) -> int:
        row = self.conn.execute(
            "SELECT sessions FROM pg_stat_database WHERE datname = %s", [self.name]
        ).fetchone()
        return int(row[0]) if row else 0

    def _sample(self) -> None:
        while not self.stop.is_set():
            row = self.conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [self.name]
            ).fetchone()
            self.peak = max(self.peak, int(row[0]) if row else 0)
            time.sleep(0.02)

    def __enter__(self) -> ConnectionWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.conn.close()


class RoundPhases:
    """When each round's steps were first seen in the database (``--phases``), in seconds after
    the round's ``opened_at``: the round committed; the first of its tasks marked training
    (the portal marks those whose model came with the event); the first, half and all of its
    updates stored; the round aggregating, and closed. Polled every 25 ms, so each time is up
    to that late."""

    STEPS = (
        "committed",
        "first marked",
        "first upload",
        "half uploaded",
        "all uploaded",
        "aggregating",
        "closed",
    )
    _STORED = ("uploaded", "accepted", "rejected", "failed", "late")

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        self.seen: dict[int, dict[str, float]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stop.wait(0.025):
            latest = self.conn.execute(
                "SELECT id, number, state, extract(epoch FROM opened_at) FROM jobs_round"
                " ORDER BY number DESC LIMIT 1"
            ).fetchone()
            if latest is None:
                continue
            round_id, number, state, opened = latest
            counts: dict[str, int] = dict(
                self.conn.execute(
                    "SELECT state, count(*) FROM jobs_sitetask WHERE round_id = %s GROUP BY state",
                    (round_id,),
                ).fetchall()
            )
            total = sum(counts.values()) or 1
            stored = sum(counts.get(s, 0) for s in self._STORED)
            reached = {
                "committed": True,
                "first marked": total - counts.get("assigned", 0) > 0,
                "first upload": stored > 0,
                "half uploaded": stored >= total / 2,
                "all uploaded": stored == total,
                "aggregating": state in ("aggregating", "closed"),
                "closed": state == "closed",
            }
            steps = self.seen.setdefault(int(number), {})
            for step, done in reached.items():
                if done and step not in steps:
                    steps[step] = time.time() - float(opened)

    def table(self) -> str:
        self.stop.set()
        self.thread.join()
        self.conn.close()
        return benchlib.md_table(
            ["round", *self.STEPS],
            [
                (number, *(f"{steps[s]:.2f}" if s in steps else "—" for s in self.STEPS))
                for number, steps in sorted(self.seen.items())
            ],
        )


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and every process below it (children that exited included)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for member in benchlib.descendants(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        total += sum(int(f) for f in fields[11:15]) / tick  # utime, stime, cutime, cstime
    return total


def machine_cpu() -> float:
    """CPU seconds the whole machine spent busy (``/proc/stat``: user, nice, system, irq and
    softirq; not idle, iowait, or the time the hypervisor gave to other guests, "steal")."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = values[0] + values[1] + values[2] + values[5] + values[6]
    return busy / os.sysconf("SC_CLK_TCK")


def cpu_by_role(env: PocEnv) -> dict[str, float]:
    """CPU seconds so far of the portals, the workers, and the whole machine."""
    return {
        "portal": sum(tree_cpu(p.pid) for n, p in env.processes.items() if n in env.portals),
        "worker": sum(tree_cpu(p.pid) for n, p in env.processes.items() if n in env.workers),
        "machine": machine_cpu(),
    }


class SteadyRounds:
    """CPU used from the moment round 2 opens to the job's end: the rounds after the first,
    without the agents' start (torch imports, handshakes, the first listing) that round 1
    and the time before it hold, nor what ``execute()`` does after the end (it downloads the
    job's records and models into the run's workspace)."""

    def __init__(self, url: str, env: PocEnv) -> None:
        self.env = env
        self.conn = psycopg.connect(url, autocommit=True)
        self.start: dict[str, float] | None = None
        self.end: dict[str, float] | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stop.is_set() and self.start is None:
            row = self.conn.execute("SELECT max(number) FROM jobs_round").fetchone()
            if row and row[0] is not None and int(row[0]) >= 1:
                self.start = cpu_by_role(self.env)
            time.sleep(0.02)
        while not self.stop.is_set():
            ended = self.conn.execute(
                "SELECT 1 FROM jobs_job WHERE state IN ('completed', 'failed', 'aborted')"
            ).fetchone()
            if ended:
                self.end = cpu_by_role(self.env)
                return
            time.sleep(0.02)

    def finish(self) -> tuple[dict[str, float], dict[str, float]]:
        after = cpu_by_role(self.env)
        self.stop.set()
        self.thread.join()
        self.conn.close()
        assert self.start is not None, "round 2 never opened"
        return self.start, self.end or after


LOST_SHOWN = 10


def failures(logs: Path) -> tuple[int, int, int]:
    """(answers with a 5xx status in the portals' logs, "too many connections" in any log,
    connection attempts the agents saw fail: "portal unreachable" or "connection … lost")."""
    texts = {path.name: path.read_text(errors="replace") for path in logs.glob("*.log")}
    server_errors = sum(
        # Daphne's access log ("GET /x" 500 …), and what the server answers itself before
        # the application: "refused a site's update from …: 503 unavailable".
        len(re.findall(r'" 5\d\d |^.*refused .* from .*: 5\d\d ', text, re.MULTILINE))
        for name, text in texts.items()
        if name.startswith("portal")
    )
    too_many = sum(text.count("too many connections") for text in texts.values())
    said = [
        f"{name}: {line.strip()[:240]}"
        for name, text in sorted(texts.items())
        if name.startswith("agent-")
        for line in text.splitlines()
        if "portal unreachable" in line or "connection to the portal lost" in line
    ]
    # What the agents said, since the logs go with the workspace: the first few, to tell a
    # crowd at the first connections from a connection lost mid-job.
    for line in said[:LOST_SHOWN]:
        print(f"agent connection failed or lost: {line}", flush=True)
    if len(said) > LOST_SHOWN:
        print(f"… and {len(said) - LOST_SHOWN} more", flush=True)
    return server_errors, too_many, len(said)


def run(
    agents: int,
    rounds: int,
    pool: bool,
    workdir: Path,
    portals: int = 1,
    workers: int = 1,
    phases: bool = False,
    inputs: int = 4,
) -> dict[str, float]:
    app = workdir / "app"
    app.mkdir(parents=True)
    (app / "client.py").write_text(ECHO)
    recipe = FedAvgRecipe(
        name=f"echo-{agents}",
        min_clients=agents,
        num_rounds=rounds,
        model=torch.nn.Linear(inputs, 2),
        train_script=str(app / "client.py"),
    )
    before = os.environ.get("DATABASE_POOL_MAX_SIZE")
    os.environ["DATABASE_POOL_MAX_SIZE"] = "10" if pool else "0"  # PocEnv's processes read it
    try:
        with scratch_database("fedportal_scale") as url:
            env = PocEnv(
                num_clients=agents,
                workspace=workdir / "poc",
                redis_db=12,
                show_progress=False,
                keep_running=True,
                database_url=url,
                num_portals=portals,
                num_workers=workers,
            )
            with ConnectionWatch(url) as watch:
                try:
                    env.start()  # not counted: the job's figures start at its submission
                    steady = SteadyRounds(url, env)
                    timeline = RoundPhases(url) if phases else None
                    opened_before = watch.sessions()
                    result = recipe.execute(env)
                    opened = watch.sessions() - opened_before
                    cpu_before, cpu_after = steady.finish()
                    if timeline is not None:
                        print(timeline.table() + "\n", flush=True)
                    cycles = round_cycles(env.url, env.credentials["api_token"], result.job_id)
                finally:
                    env.stop()
            peak = watch.peak
    finally:
        if before is None:
            os.environ.pop("DATABASE_POOL_MAX_SIZE", None)
        else:
            os.environ["DATABASE_POOL_MAX_SIZE"] = before
    assert result.status == RunStatus.COMPLETED, result.error
    # Each round, not just their median: the first steady rounds of a run are the slowest
    # (the processes' caches and pools still filling), which a median of few rounds hides.
    print("rounds (s): " + " ".join(f"{cycle:.2f}" for cycle in cycles), flush=True)
    server_errors, too_many, lost = failures(workdir / "poc" / "logs")
    return {
        "round_1": cycles[0],
        "round_median": median(cycles[1:]),
        "round_max": max(cycles[1:]),
        "opened_per_site_round": opened / (agents * rounds),
        "peak_connections": peak,
        "server_errors": server_errors,
        "too_many": too_many,
        "lost": lost,
        **{
            f"{role}_ms_per_site_round": (cpu_after[role] - cpu_before[role])
            * 1000
            / (agents * (rounds - 1))
            for role in cpu_before
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[100])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--pool", choices=["on", "off", "both"], default="both", help="which configurations"
    )
    parser.add_argument("--portals", type=int, default=1, help="portal processes (nginx)")
    parser.add_argument("--workers", type=int, default=1, help="Celery workers")
    parser.add_argument(
        "--inputs",
        type=int,
        default=4,
        help="the model is Linear(inputs, 2): 4 (the default) is a tiny model; 7900 makes a "
        "63 kB one, which FEDPORTAL_EVENT_MODEL_MAX_BYTES and _SOCKET_UPDATE_MAX_BYTES still take",
    )
    parser.add_argument(
        "--phases",
        action="store_true",
        help="print when each round's steps were seen in the database (polled every 25 ms)",
    )
    args = parser.parse_args()
    pools = {"on": (True,), "off": (False,), "both": (True, False)}[args.pool]
    benchlib.print_header(
        "Many agents on one portal on PostgreSQL",
        f"PocEnv: {args.portals} Daphne portal(s) (several: behind nginx), {args.workers} Celery "
        f"worker(s), echo agents, Linear({args.inputs}, 2); updates on the agents' sockets up to "
        f"{os.environ.get('FEDPORTAL_SOCKET_UPDATE_MAX_BYTES', '65536 (the default)')} bytes",
    )
    print(f"load average before: {benchlib.load_average()}\n", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
        for agents in args.agents:
            for pool in pools:
                started = time.perf_counter()
                figures = run(
                    agents,
                    args.rounds,
                    pool,
                    Path(tmp) / f"{agents}-{pool}",
                    portals=args.portals,
                    workers=args.workers,
                    phases=args.phases,
                    inputs=args.inputs,
                )
                label = (
                    f"{agents} agents, {args.portals} portal(s), {args.workers} worker(s), "
                    f"pool {'on (10 a process)' if pool else 'off'}"
                )
                print(f"{label}: {figures} ({time.perf_counter() - started:.0f} s)", flush=True)
                rows.append((label, figures))
    print(f"\nload average after: {benchlib.load_average()}\n")
    print(
        benchlib.md_table(
            [
                "configuration",
                "round median (s)",
                "round max (s)",
                "round 1 (s)",
                "connections opened per site-round",
                "peak connections",
                "HTTP 5xx answers",
                '"too many connections"',
                "agent connections failed or lost",
                "portal CPU ms / site-round (rounds 2 on)",
                "worker CPU ms / site-round (rounds 2 on)",
                "machine CPU ms / site-round (rounds 2 on)",
            ],
            [
                (
                    label,
                    f"{r['round_median']:.2f}",
                    f"{r['round_max']:.2f}",
                    f"{r['round_1']:.1f}",
                    f"{r['opened_per_site_round']:.2f}",
                    f"{r['peak_connections']:.0f}",
                    f"{r['server_errors']:.0f}",
                    f"{r['too_many']:.0f}",
                    f"{r['lost']:.0f}",
                    f"{r['portal_ms_per_site_round']:.1f}",
                    f"{r['worker_ms_per_site_round']:.1f}",
                    f"{r['machine_ms_per_site_round']:.1f}",
                )
                for label, r in rows
            ],
        )
    )


if __name__ == "__main__":
    main()
