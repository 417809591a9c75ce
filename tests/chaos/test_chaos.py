"""Faults in the middle of a round, on real processes: the job loses nothing.

Each test runs a PocEnv — a real portal, Celery worker (with its periodic resume) and three
site agents — on a PostgreSQL and a Redis of its own (``services``), breaks something while
a job runs, and checks that the job ends with exactly the final model of an undisturbed run
(the same bits), or fails with a reason that names what happened where no quorum is left.

The sites run one deterministic script: site k adds k to every weight and reports weight k,
so an undisturbed job's result is also known by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import torch
from celery import Celery

from client_agent.portal import PortalClient, PortalError, PortalUnreachable
from client_agent.secagg.session import error_bound
from client_agent.wire import load_state_dict, read_header
from jobs.envs import PocEnv, ProdEnv, RunStatus, SimEnv
from jobs.envs.portal import PortalRun
from jobs.recipes import FedAvgRecipe
from tests.chaos.services import (
    PrivatePostgres,
    PrivateRedis,
    TcpProxy,
    can_mount_tmpfs,
    mounted_tmpfs,
    postgres_available,
    wait_until,
)

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(not postgres_available(), reason="needs PostgreSQL's server binaries"),
]

SITES = ["site-1", "site-2", "site-3"]
ROUNDS = 3

SCRIPT = textwrap.dedent(
    """
    import client_agent.api as flare

    flare.init()
    k = int(flare.get_site_name().rsplit("-", 1)[1])
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        print(f"round {model.current_round}: adding {k}", flush=True)
        params = {name: value + k for name, value in model.params.items()}
        flare.send(flare.FLModel(params=params, metrics={"score": float(k)},
                                 meta={"NUM_STEPS_CURRENT_ROUND": k}))
    """
)


def make_recipe(app: Path, *, min_clients: int = 3, size: int = 1000) -> FedAvgRecipe:
    return FedAvgRecipe(
        name=f"chaos-{size}",
        min_clients=min_clients,
        num_rounds=ROUNDS,
        model={"w": torch.linspace(-1.0, 1.0, size), "steps": torch.tensor(0)},
        train_script=str(app / "client.py"),
        key_metric="score",
    )


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("chaos-app")
    (folder / "client.py").write_text(SCRIPT)
    return folder


@pytest.fixture(scope="module")
def postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    yield server
    server.close()


_reference_models: dict[int, dict[str, torch.Tensor]] = {}


def undisturbed(app: Path, tmp_path: Path, size: int = 1000) -> dict[str, torch.Tensor]:
    """The final model of the same job with nothing broken (SimEnv gives PocEnv's bits)."""
    if size not in _reference_models:
        run = make_recipe(app, size=size).execute(
            SimEnv(clients=SITES, workspace=tmp_path / f"sim-{size}", show_progress=False)
        )
        assert run.status == RunStatus.COMPLETED, run.error
        assert run.global_model is not None
        _reference_models[size] = run.global_model
    return _reference_models[size]


def by_hand(size: int = 1000) -> dict[str, torch.Tensor]:
    # Sites 1, 2, 3 add 1, 2, 3 with weights 1, 2, 3: (1 + 4 + 9) / 6 = 7/3 a round.
    w = torch.linspace(-1.0, 1.0, size, dtype=torch.float64) + ROUNDS * 7 / 3
    return {"w": w.float(), "steps": torch.tensor(ROUNDS * 2)}


@dataclass
class Chaos:
    """A PocEnv on the private services, and what a test needs to watch and break it."""

    env: PocEnv
    postgres: PrivatePostgres
    redis: PrivateRedis
    database: str
    people: PortalClient

    def submit(self, recipe: FedAvgRecipe) -> PortalRun:
        prod = ProdEnv(
            self.env.url,
            token=self.env.credentials["api_token"],
            project=self.env.credentials["project"],
            round_timeout_seconds=self.env.round_timeout_seconds,
            workspace=self.env.workspace / "runs",
            show_progress=False,
            wait=False,
        )
        run = recipe.execute(prod)
        assert isinstance(run, PortalRun)
        return run

    def get(self, path: str) -> Any:
        """A people's API call that rides out a portal restart."""
        for _ in range(100):
            try:
                return self.people.get(path)
            except PortalUnreachable:
                time.sleep(0.2)
            except PortalError as exc:
                if exc.status < 500:
                    raise
                time.sleep(0.2)
        raise AssertionError(f"the portal did not answer {path}")

    def rounds(self, run: PortalRun) -> list[dict[str, Any]]:
        return list(self.get(f"/api/v1/jobs/{run.job_id}/rounds/")["results"])

    def tasks(self, run: PortalRun, number: int) -> dict[str, str]:
        """Each site's task state in round ``number``."""
        states = {}
        for participant in self.get(f"/api/v1/jobs/{run.job_id}/sites/")["results"]:
            for task in participant.get("tasks") or []:
                if int(task["round"]) == number:
                    states[participant["site"]] = task["state"]
        return states

    def round_is(self, run: PortalRun, number: int, state: str) -> bool:
        return any(r["number"] == number and r["state"] == state for r in self.rounds(run))

    def job_id(self, run: PortalRun) -> int:
        return int(
            self.postgres.sql(self.database, f"SELECT id FROM jobs_job WHERE uid='{run.job_id}'")
        )

    def finish(self, run: PortalRun, timeout: float = 240) -> PortalRun:
        """Follow the job to its end (riding out a portal restart) and fetch its results."""
        return run.wait(timeout=timeout)

    def final_model(self, run: PortalRun) -> dict[str, torch.Tensor]:
        path = run.workspace / "models" / f"round-{ROUNDS:03d}.safetensors"
        return load_state_dict(path)

    def logs(self, name: str) -> str:
        path = self.env.workspace / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def put_site_behind(self, site: str, proxy: TcpProxy) -> None:
        """Send ``site``'s agent through ``proxy`` from now on (restarts the agent)."""
        config = self.env.site_dir(site) / "site.json"
        identity = json.loads(config.read_text())
        identity["portal"] = proxy.url
        config.write_text(json.dumps(identity))
        self.env.kill(f"agent:{site}", signal.SIGTERM)
        self.env.start_agent(site)


_databases = iter(range(1, 1000))


@contextlib.contextmanager
def started(
    postgres: PrivatePostgres, redis: PrivateRedis, tmp_path: Path, options: dict[str, Any]
) -> Iterator[Chaos]:
    """A PocEnv on a new database of the private PostgreSQL; stopped on leaving."""
    database = f"chaos_{next(_databases)}"
    url = postgres.create_database(database)
    redis.flush()
    env = PocEnv(
        clients=options.get("clients", SITES),
        workspace=tmp_path / "poc",
        redis_url=redis.url,
        redis_db=0,
        database_url=url,
        round_timeout_seconds=options.get("round_timeout", 120),
        show_progress=False,
        extra_env={"FEDPORTAL_RESUME_SECONDS": "2", **options.get("env", {})},
        num_workers=options.get("workers", 1),
        num_portals=options.get("portals", 1),
    )
    env.start()
    try:
        yield Chaos(
            env=env,
            postgres=postgres,
            redis=redis,
            database=database,
            people=PortalClient(env.url, api_token=env.credentials["api_token"]),
        )
    finally:
        env.stop()


@pytest.fixture
def chaos(
    postgres: PrivatePostgres, redis: PrivateRedis, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Chaos]:
    with started(postgres, redis, tmp_path, getattr(request, "param", {}) or {}) as running:
        yield running


def assert_same_bits(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert torch.equal(actual[name], expected[name]), name


def test_an_undisturbed_run_is_the_hand_computed_model(app: Path, tmp_path: Path) -> None:
    reference = undisturbed(app, tmp_path)
    expected = by_hand()
    assert torch.allclose(reference["w"], expected["w"], atol=1e-6)
    assert torch.equal(reference["steps"], expected["steps"])


def gated_app(folder: Path, gate: Path) -> Path:
    """The chaos app, whose scripts answer round 2 only once ``gate`` exists: the round stays
    open for as long as a test needs (rounds of this tiny job last a tenth of a second)."""
    folder.mkdir()
    answer = "\n    params = {"  # in the script's loop
    assert answer in SCRIPT
    held = SCRIPT.replace(
        answer,
        f"\n    while model.current_round == 1 and not os.path.exists({str(gate)!r}):"
        "\n        time.sleep(0.05)" + answer,
        1,
    )
    (folder / "client.py").write_text("import os\nimport time\n" + held)
    return folder


def test_redis_restarted_mid_round(chaos: Chaos, app: Path, tmp_path: Path) -> None:
    # Redis keeps nothing on disk: the restart loses the queued tasks (the next round's kick,
    # deadline countdowns) and every channel-layer group the agents listened on.
    gate = tmp_path / "gate"
    run = chaos.submit(make_recipe(gated_app(tmp_path / "gated", gate)))
    wait_until(lambda: chaos.round_is(run, 1, "open"), 120, "round 2 to open")

    chaos.redis.restart()
    assert chaos.round_is(run, 1, "open")  # restarted mid-round indeed
    gate.touch()

    run = chaos.finish(run)
    assert run.status == RunStatus.COMPLETED, run.error
    assert_same_bits(chaos.final_model(run), undisturbed(app, tmp_path))


def test_postgres_restarted_mid_aggregation(chaos: Chaos, app: Path, tmp_path: Path) -> None:
    run = chaos.submit(make_recipe(app))
    job_id = chaos.job_id(run)
    # Hold the worker in the middle of closing round 2: an uncommitted row in the way of the
    # new global model it stores last (the models' unique index makes it wait on us).
    blocker = psycopg.connect(chaos.postgres.url(chaos.database))
    blocker.execute(
        "INSERT INTO jobs_modelversion (job_id, round_number, file, sha256, size, metrics, "
        "is_best, created_at) VALUES (%s, 2, 'held', 'held', 0, '{}', false, now())",
        [job_id],
    )
    waiting = (
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND query LIKE '%jobs_modelversion%'"
    )
    wait_until(
        lambda: chaos.postgres.sql(chaos.database, waiting) == "1",
        120,
        "the worker to wait on the held round",
    )

    chaos.postgres.restart(mode="immediate")  # a crash: every session cut, nothing committed
    with contextlib.suppress(Exception):
        blocker.close()

    run = chaos.finish(run)
    assert run.status == RunStatus.COMPLETED, run.error
    assert_same_bits(chaos.final_model(run), undisturbed(app, tmp_path))
    assert "OperationalError" in chaos.logs("worker")  # it did see the database go


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs root to mount a small filesystem")
def test_disk_full_during_update_uploads(
    postgres: PrivatePostgres, redis: PrivateRedis, app: Path, tmp_path: Path
) -> None:
    media = tmp_path / "media"
    with mounted_tmpfs(media, 8 << 20):
        options = {"env": {"DJANGO_MEDIA_ROOT": str(media)}}
        with started(postgres, redis, tmp_path, options) as chaos:
            gate = tmp_path / "gate"
            run = chaos.submit(make_recipe(gated_app(tmp_path / "gated", gate)))
            wait_until(lambda: chaos.round_is(run, 1, "open"), 120, "round 2 to open")
            filler = media / "filler"
            # Round 2 is open and its model stored, and its scripts wait for the gate: fill
            # what is left of the disk, then let them answer.
            _fill(filler)
            gate.touch()
            wait_until(
                lambda: "storage" in "".join(chaos.logs(f"agent-{s}") for s in SITES).lower(),
                120,
                "an agent to be told the portal's storage is full",
            )
            # Nothing half-stored: an update file of round 2 is kept only for a site whose
            # upload the portal took whole, and it reads as a model.
            tasks = chaos.tasks(run, 1)
            updates = list(media.glob("jobs/*/*/updates/round-001/*"))
            stored = {"uploaded", "accepted"}
            assert {path.stem for path in updates} == {s for s, st in tasks.items() if st in stored}
            for path in updates:
                read_header(path)  # a whole safetensors file, not a cut one
            assert set(tasks.values()) <= {"assigned", "downloaded", "training", *stored}

            filler.unlink()

            run = chaos.finish(run)
            assert run.status == RunStatus.COMPLETED, run.error
            assert_same_bits(chaos.final_model(run), undisturbed(app, tmp_path))


def cut_after_round_1(chaos: Chaos, run: PortalRun, proxy: TcpProxy) -> None:
    """Cut site-3 off as soon as its update of round 1 is in, then let round 1 close.

    Cutting once round 1 has closed would race site-3's next round: a round can take less
    than the time it takes to see that it closed, and site-3 would have sent round 2 already.
    """
    wait_until(
        lambda: chaos.tasks(run, 0).get("site-3") in ("uploaded", "accepted"),
        120,
        "site-3's update of round 1",
        every=0.01,
    )
    proxy.cut()
    wait_until(lambda: chaos.round_is(run, 0, "closed"), 120, "round 1 to close")


@pytest.mark.parametrize("chaos", [{"round_timeout": 12}], indirect=True)
def test_an_agent_cut_off_past_the_deadline_fails_a_job_that_needs_every_site(
    chaos: Chaos, app: Path
) -> None:
    proxy = TcpProxy(chaos.env.port or 0)
    try:
        chaos.put_site_behind("site-3", proxy)
        run = chaos.submit(make_recipe(app, min_clients=3))
        cut_after_round_1(chaos, run, proxy)
        run = chaos.finish(run)
        proxy.restore()
    finally:
        proxy.close()

    assert run.status == RunStatus.FAILED
    error = run.error or ""
    assert error.startswith("round 2: ") and "site-3" in error, error
    assert "min_clients is 3" in error


@pytest.mark.parametrize("chaos", [{"round_timeout": 12}], indirect=True)
def test_an_agent_cut_off_past_the_deadline_rejoins_the_next_round(chaos: Chaos, app: Path) -> None:
    proxy = TcpProxy(chaos.env.port or 0)
    try:
        chaos.put_site_behind("site-3", proxy)
        run = chaos.submit(make_recipe(app, min_clients=2))
        cut_after_round_1(chaos, run, proxy)
        wait_until(lambda: chaos.round_is(run, 1, "closed"), 120, "round 2 to close without it")
        proxy.restore()

        run = chaos.finish(run)
    finally:
        proxy.close()

    assert run.status == RunStatus.COMPLETED, run.error
    assert [r.accepted for r in run.rounds] == [SITES, ["site-1", "site-2"], SITES]
    # By hand: round 2 adds (1 + 4) / 3 = 5/3 instead of 7/3.
    final = chaos.final_model(run)
    expected = torch.linspace(-1.0, 1.0, 1000, dtype=torch.float64) + 7 / 3 + 5 / 3 + 7 / 3
    assert torch.allclose(final["w"].double(), expected, atol=1e-5)


@pytest.mark.parametrize("chaos", [{"workers": 2}], indirect=True)
def test_two_workers_racing_on_one_job(chaos: Chaos, app: Path, tmp_path: Path) -> None:
    env = chaos.env
    run = chaos.submit(make_recipe(app))
    job_id = chaos.job_id(run)
    # Both workers are kicked for the job many times a second: duplicate deliveries, as a
    # redelivery after a visibility timeout or two events at once would make.
    kicker = Celery("chaos-kicker", broker=f"{chaos.redis.url}/0")
    kicker.conf.task_serializer = "json"
    stop = threading.Event()

    def kick() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                kicker.send_task("jobs.tasks.job_advance_task", args=[job_id], queue=env.run_tag)
            time.sleep(0.2)

    kickers = [threading.Thread(target=kick, daemon=True) for _ in range(2)]
    for thread in kickers:
        thread.start()
    try:
        run = chaos.finish(run)
    finally:
        stop.set()
        for thread in kickers:
            thread.join(5)

    assert run.status == RunStatus.COMPLETED, run.error
    assert_same_bits(chaos.final_model(run), undisturbed(app, tmp_path))
    # Each round was aggregated once, by one worker, and stored one model.
    attempts = chaos.postgres.sql(
        chaos.database,
        f"SELECT string_agg(aggregation_attempts::text, ',' ORDER BY number) FROM jobs_round "
        f"WHERE job_id = {job_id}",
    )
    assert attempts == "1,1,1"
    assert "succeeded" in chaos.logs("worker-2")  # the second worker did take work


# No beat to fall back on (its resume every hour): only the claim's lease and the surviving
# worker's watchdog can hand the round on, and the round's deadline is minutes away.
@pytest.mark.parametrize(
    "chaos", [{"workers": 2, "env": {"FEDPORTAL_RESUME_SECONDS": "3600"}}], indirect=True
)
def test_a_worker_killed_mid_aggregation_is_replaced_by_the_other_within_seconds(
    chaos: Chaos, app: Path, tmp_path: Path
) -> None:
    size = 4_000_000  # 16 MB updates: aggregating three takes a moment
    run = chaos.submit(make_recipe(app, size=size))
    job_id = chaos.job_id(run)
    env = chaos.env

    with psycopg.connect(chaos.postgres.url(chaos.database), autocommit=True) as watch:

        def look() -> tuple[int, str, int, str]:
            row = watch.execute(
                "SELECT number, state, aggregation_attempts, claim_holder FROM jobs_round "
                "WHERE job_id = %s ORDER BY number DESC LIMIT 1",
                [job_id],
            ).fetchone()
            return (-1, "", 0, "") if row is None else (int(row[0]), *row[1:])

        def caught() -> tuple[int, str, int, str] | None:
            """A worker holds the round's claim and started aggregating it (counted)."""
            row = look()
            return row if row[1] == "aggregating" and row[2] >= 1 and row[3] else None

        row = wait_until(caught, 180, "a worker aggregating a round", every=0.002)
        assert row is not None
        number, _, _, holder = row
        pid = int(holder.split(":")[1])
        dead = next(name for name in env.workers if env.processes[name].pid == pid)
        env.kill(dead)  # not started again: the other worker must take over
        killed_at = time.monotonic()

        def closed() -> bool:
            return look()[0] > number or look()[1] == "closed"

        wait_until(closed, 60, f"round {number + 1} to be taken over and closed", every=0.05)
        stall = time.monotonic() - killed_at

    run = chaos.finish(run, timeout=300)
    assert run.status == RunStatus.COMPLETED, run.error
    assert_same_bits(chaos.final_model(run), undisturbed(app, tmp_path, size=size))
    # The lease (FEDPORTAL_CLAIM_LEASE_SECONDS, 6 s) and one watchdog look (1 s) bound the
    # hand-over; the round's deadline and the beat are minutes away.
    assert stall < 20, f"the round stalled {stall:.1f} s after its worker died"
    survivor = next(name for name in env.workers if name != dead)
    assert "lapsed" in chaos.logs(survivor)
    attempts = chaos.postgres.sql(
        chaos.database,
        f"SELECT aggregation_attempts FROM jobs_round WHERE job_id = {job_id} "
        f"AND number = {number}",
    )
    assert attempts == "2"  # the killed aggregation counted as a start


@pytest.mark.parametrize("chaos", [{"portals": 2, "workers": 2}], indirect=True)
def test_two_portals_behind_a_proxy_one_killed_mid_round(
    chaos: Chaos, app: Path, tmp_path: Path
) -> None:
    env = chaos.env

    def connected(portal: str) -> set[str]:
        """The sites whose agents opened a socket on ``portal``."""
        return set(re.findall(r"agent connected: site=(site-\d+)", chaos.logs(portal)))

    # The proxy spreads the agents' sockets over both portals.
    wait_until(lambda: len(connected("portal") | connected("portal-2")) == 3, 60, "3 sockets")
    first, second = connected("portal"), connected("portal-2")
    assert first and second, (first, second)

    gate = tmp_path / "gate"
    run = chaos.submit(make_recipe(gated_app(tmp_path / "gated", gate)))
    wait_until(lambda: chaos.round_is(run, 1, "open"), 120, "round 2 to open")
    # Round 2 opened: its event reached the agents on both portals, through the shared
    # channel layer, and their scripts wait for the gate. Then one portal dies mid-round.
    env.kill("portal")
    gate.touch()
    run = chaos.finish(run, timeout=300)

    assert run.status == RunStatus.COMPLETED, run.error
    assert_same_bits(chaos.final_model(run), undisturbed(app, tmp_path))
    # The killed portal's agents came back through the proxy, to the other portal.
    assert first <= connected("portal-2"), (first, connected("portal-2"))


def test_portal_restarted_with_three_uploads_in_flight(
    chaos: Chaos, app: Path, tmp_path: Path
) -> None:
    size = 1_000_000  # 4 MB updates, throttled to take seconds each
    proxy = TcpProxy(chaos.env.port or 0)
    try:
        for site in SITES:
            chaos.put_site_behind(site, proxy)
        run = chaos.submit(make_recipe(app, size=size))
        wait_until(lambda: chaos.round_is(run, 0, "closed"), 180, "round 1 to close")
        proxy.throttle(1_000_000)
        wait_until(lambda: proxy.uploads_in_flight() == 3, 120, "three uploads in flight")

        chaos.env.kill("portal")
        proxy.throttle(None)
        chaos.env.restart("portal")

        run = chaos.finish(run, timeout=300)
    finally:
        proxy.close()

    assert run.status == RunStatus.COMPLETED, run.error
    assert_same_bits(chaos.final_model(run), undisturbed(app, tmp_path, size=size))


# --- helpers ------------------------------------------------------------------------------------


def _fill(path: Path) -> None:
    """Write to ``path`` until its filesystem is full."""
    block = b"\0" * (64 * 1024)
    with open(path, "wb") as out, contextlib.suppress(OSError):
        while True:
            out.write(block)
            out.flush()
            os.fsync(out.fileno())
    assert os.statvfs(path.parent).f_bavail * os.statvfs(path.parent).f_frsize < 64 * 1024


# --- secure aggregation ---------------------------------------------------------------------------

# A masked round's sum is exact in the ring: two masked runs of the deterministic script give
# the same bits whatever the masks, so SimEnv's masked run is the undisturbed reference.
_masked_references: dict[int, dict[str, torch.Tensor]] = {}


def make_masked_recipe(app: Path, *, size: int = 1000, **options: Any) -> FedAvgRecipe:
    return FedAvgRecipe(
        name=f"chaos-masked-{size}",
        min_clients=options.pop("min_clients", 3),
        num_rounds=ROUNDS,
        model={"w": torch.linspace(-1.0, 1.0, size), "steps": torch.tensor(0)},
        train_script=str(app / "client.py"),
        key_metric="score",
        secure_aggregation=True,
        **options,
    )


def undisturbed_masked(app: Path, tmp_path: Path, size: int) -> dict[str, torch.Tensor]:
    if size not in _masked_references:
        run = make_masked_recipe(app, size=size).execute(
            SimEnv(clients=SITES, workspace=tmp_path / f"sim-masked-{size}", show_progress=False)
        )
        assert run.status == RunStatus.COMPLETED, run.error
        assert run.global_model is not None
        _masked_references[size] = run.global_model
    return _masked_references[size]


def test_a_worker_killed_mid_aggregation_of_a_masked_round_gives_the_same_model(
    chaos: Chaos, app: Path, tmp_path: Path
) -> None:
    # The aggregation of a masked round sums the uploads and removes the masks in one pass,
    # from the stored uploads and finish answers: a worker killed in it leaves nothing half
    # done, and the next one does it all again.
    size = 2_000_000  # 16 MB masked uploads: summing and unmasking three take a moment
    run = chaos.submit(make_masked_recipe(app, size=size))
    job_id = chaos.job_id(run)

    # Polled over one connection: a psql per look would miss a short aggregation.
    with psycopg.connect(chaos.postgres.url(chaos.database), autocommit=True) as watch:

        def look() -> tuple[int, str, int] | None:
            row = watch.execute(
                "SELECT number, state, aggregation_attempts FROM jobs_round WHERE job_id = %s "
                "ORDER BY number DESC LIMIT 1",
                [job_id],
            ).fetchone()
            return None if row is None else (int(row[0]), str(row[1]), int(row[2]))

        def caught() -> tuple[int, str, int] | None:
            """The worker is in the middle of it: the round's aggregation started (counted)
            and not finished."""
            row = look()
            return row if row is not None and row[1] == "aggregating" and row[2] >= 1 else None

        row = wait_until(caught, 180, "a worker aggregating a masked round", every=0.002)
        assert row is not None
        chaos.env.kill("worker")
        killed_in = row[0]
        # Nothing else moves the round on: the kill cut the unmasking short.
        after = look()
        assert after is not None and after[:2] == row[:2], (row, after)
    chaos.env.restart("worker")

    run = chaos.finish(run, timeout=300)
    assert run.status == RunStatus.COMPLETED, run.error
    assert [r.accepted for r in run.rounds] == [SITES] * ROUNDS
    final = chaos.final_model(run)
    assert_same_bits(final, undisturbed_masked(app, tmp_path, size))
    # And plain FedAvg's model, within what quantizing costs each round (error_bound) and
    # one float32 rounding of the model each round, carried over the rounds.
    plain = undisturbed(app, tmp_path, size=size)
    ulp = torch.finfo(torch.float32).eps * float(plain["w"].abs().max())
    atol = ROUNDS * (error_bound(len(SITES), 1.0 + 2.0 + 3.0) + ulp)
    assert torch.allclose(final["w"].double(), plain["w"].double(), atol=atol, rtol=0)
    assert torch.equal(final["steps"], plain["steps"])
    attempts = chaos.postgres.sql(
        chaos.database,
        f"SELECT aggregation_attempts FROM jobs_round WHERE job_id = {job_id} "
        f"AND number = {killed_in}",
    )
    assert attempts == "2"  # the killed unmasking counted as a start
    # Masking stores no masked sum: the uploads are summed as the masks are removed.
    media = chaos.env.workspace / "media"
    assert not any(media.glob("**/secure/round-*-total.*"))


HOLDING_SCRIPT = textwrap.dedent(
    """
    import sys
    import time

    import client_agent.api as flare

    flare.init()
    k = int(flare.get_site_name().rsplit("-", 1)[1])
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        if model.current_round == 0 and "hold" in sys.argv[1:]:
            # Trains "for a long time": its agent has sent its keys and shares meanwhile.
            time.sleep(60)
        params = {name: value + k for name, value in model.params.items()}
        flare.send(flare.FLModel(params=params, metrics={"score": float(k)},
                                 meta={"NUM_STEPS_CURRENT_ROUND": k}))
    """
)

FOUR_SITES = [*SITES, "site-4"]


def test_a_site_killed_after_sharing_is_recovered_on_a_real_portal(
    postgres: PrivatePostgres, redis: PrivateRedis, tmp_path: Path
) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "client.py").write_text(HOLDING_SCRIPT)
    recipe = make_masked_recipe(
        app,
        min_clients=3,
        per_site_config={s: {"train_args": "hold" if s == "site-4" else ""} for s in FOUR_SITES},
    )
    # The later rounds' keys phase waits for the dead site for a phase's time: short here.
    options = {
        "clients": FOUR_SITES,
        "round_timeout": 12,
        "env": {"FEDPORTAL_SECURE_PHASE_SECONDS": "3"},
    }
    with started(postgres, redis, tmp_path, options) as chaos:
        run = chaos.submit(recipe)
        job_id = chaos.job_id(run)
        shared = (
            "SELECT count(*) FROM jobs_securemessage m JOIN sites_site s ON s.id = m.site_id "
            f"JOIN jobs_round r ON r.id = m.round_id WHERE r.job_id = {job_id} "
            "AND r.number = 0 AND m.phase = 'shares' AND s.name = 'site-4'"
        )
        wait_until(
            lambda: chaos.postgres.sql(chaos.database, shared) == "1", 120, "site-4's shares"
        )
        chaos.env.kill("agent:site-4")
        # It had not uploaded: its script holds its update back.
        assert chaos.tasks(run, 0)["site-4"] not in ("uploaded", "accepted")

        run = chaos.finish(run, timeout=240)
        protection = json.loads(
            chaos.postgres.sql(
                chaos.database,
                f"SELECT protection FROM jobs_round WHERE job_id = {job_id} AND number = 0",
            )
        )

    assert run.status == RunStatus.COMPLETED, run.error
    first = run.rounds[0]
    assert first.accepted == SITES
    assert set(first.rejected) == {"site-4"}
    assert "no update before the round closed" in first.rejected["site-4"]  # its deadline
    # site-4 was in the round's roster and shared: its masks were removed with the others'
    # shares of its key.
    assert "site-4" in protection["roster"]["sites"] and "site-4" in protection["shared"]
    assert protection["survivors"] == SITES
    # Sites 1, 2 and 3 (weights 1, 2, 3) add 7/3; site-4 would have made it 3.
    after_first = load_state_dict(run.workspace / "models" / "round-001.safetensors")
    expected = torch.linspace(-1.0, 1.0, 1000, dtype=torch.float64) + 7 / 3
    bound = error_bound(3, 6.0) + torch.finfo(torch.float32).eps * float(expected.abs().max())
    assert torch.allclose(after_first["w"].double(), expected, atol=bound, rtol=0)
    assert int(after_first["steps"]) == 2
    # The later rounds go on without the dead site, on the same three.
    assert [r.accepted for r in run.rounds[1:]] == [SITES] * (ROUNDS - 1)
    assert all("sent no keys" in r.rejected["site-4"] for r in run.rounds[1:])
    final = chaos.final_model(run)
    assert torch.allclose(final["w"].double(), by_hand()["w"].double(), atol=ROUNDS * bound)
    assert torch.equal(final["steps"], by_hand()["steps"])
