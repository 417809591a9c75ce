"""Portal round turnaround and worker memory, 8 sites × a 25M float32 model, beside SimEnv.

On the portal, for a FedAvg job of 3 rounds run by a real Celery worker
process (``celery -A fedportal worker --pool=solo``) on PostgreSQL and Redis:

* **turnaround**: from the moment the last site's update is committed (``update_upload``
  returned) to the moment the next round's ``Round`` row exists, seen by polling the database
  every 5 ms from this process; broken down with the worker log's task times, the new model
  file's birth and modification times, and ``Round.closed_at`` / ``Round.opened_at``;
* **worker memory**: the worker's VmRSS sampled every 20 ms, and its VmHWM (reset through
  ``/proc/<pid>/clear_refs`` just before the last update of the round), both as MB above the
  worker's idle RSS (measured before the job) and as a multiple of the model size.

Updates are uploaded through ``jobs.services.tasks.update_upload`` called in this process, not
over HTTP. Before the last update of a round the bench waits until the worker has checked the
other seven (as when sites finish at different times), so a round's figure is the cost of its
last update alone. Then the worker's own functions are replayed in this process on the job's
files (``check_update``, ``FedAvg.aggregate``, ``save_state_dict``, ``_file_digest``) to give
each a cost of its own.

Beside them, the same job in ``SimEnv`` with echo clients (each site sends the received model
straight back), in a child process so that its memory is its own: from the last site's
``flare.send()`` returning to the first site having the next round's task, and the SimEnv
process's peak RSS above its idle size.

Everything is the bench's own and removed at the end: a PostgreSQL database
``fedportal_bench_<pid>`` (server from BENCH_POSTGRES_URL, default
postgres://postgres@127.0.0.1:5432), Redis database 14 (flushed before and after), a temporary
folder for the media root and the update files, the worker process.

    .venv/bin/python bench/portal_round.py
    .venv/bin/python bench/portal_round.py --worker-threads 1   # OMP_NUM_THREADS=1 for the worker
    .venv/bin/python bench/portal_round.py --keep-worker-log /tmp/worker.log
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import benchlib
from benchlib import md_table, median

NUM_SITES = 8
NUM_ROUNDS = 3
SHAPES = benchlib.TRANSFORMER_25M_SHAPES
MODEL_BYTES = benchlib.numel(SHAPES) * 4
MODEL_MB = MODEL_BYTES / 1e6
POSTGRES = os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432")
REDIS_URL = "redis://127.0.0.1:6379/14"
POLL_SECONDS = 0.005
SAMPLE_SECONDS = 0.02
REPLAY_REPEATS = 3
MARKS_FILE = "bench_marks.jsonl"
NAN = float("nan")

ECHO_CLIENT = textwrap.dedent(
    f'''\
    """Echo client: sends the received global model straight back, and notes the times."""

    import json
    import time

    import client_agent.api as flare

    flare.init()
    with open({MARKS_FILE!r}, "a", buffering=1) as marks:
        while flare.is_running():
            task_arrived = time.time()  # is_running() returns once the task frame is in
            model = flare.receive()
            flare.send(flare.FLModel(params=model.params, metrics={{"accuracy": 0.5}}))
            sent = time.time()
            marks.write(
                json.dumps({{"round": model.current_round, "task": task_arrived, "sent": sent}})
                + "\\n"
            )
    '''
)


def mb(kib: float) -> float:
    return kib * 1024 / 1e6


def fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"


# --------------------------------------------------------------------------------------------
# The worker process and its log
# --------------------------------------------------------------------------------------------


class Worker:
    """A ``celery worker`` process for the bench's database and Redis database."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        with open(self.log, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "fedportal",
                    "worker",
                    "--pool=solo",
                    "--concurrency=1",
                    "--without-mingle",
                    "--without-gossip",
                    "--without-heartbeat",
                    "--loglevel=INFO",
                    f"--hostname=bench-{os.getpid()}@%h",
                ],
                cwd=benchlib.REPO_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # warm shutdown: it is idle by now
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): \w+/[^\]]+\] (.*)$")
SUCCEEDED = re.compile(r"^Task ([\w.]+)\[([0-9a-f-]+)\] succeeded in ([0-9.e-]+)s: (.*)$")
RECEIVED = re.compile(r"^Task ([\w.]+)\[([0-9a-f-]+)\] received$")


@dataclass
class TaskRun:
    """One task the worker ran, from its log: ``end`` is when Celery logged its success
    (millisecond resolution), ``start`` that minus the runtime Celery measured."""

    name: str
    received: float
    start: float
    end: float
    value: str


def parse_worker_log(text: str) -> list[TaskRun]:
    received: dict[str, float] = {}
    runs: list[TaskRun] = []
    for line in text.splitlines():
        match = LOG_LINE.match(line)
        if not match:
            continue
        # Celery writes local time; datetime.timestamp() reads a naive time as local too.
        at = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        message = match[2]
        if got := RECEIVED.match(message):
            received[got[2]] = at
        elif got := SUCCEEDED.match(message):
            runtime = float(got[3])
            runs.append(
                TaskRun(
                    name=got[1].rsplit(".", 1)[-1],
                    received=received.get(got[2], NAN),
                    start=at - runtime,
                    end=at,
                    value=got[4].strip().strip("'\""),
                )
            )
    return runs


# --------------------------------------------------------------------------------------------
# The portal job
# --------------------------------------------------------------------------------------------


@dataclass
class Transition:
    """The end of one round on the portal; times are wall clock (``time.time()``)."""

    number: int  # the round that closes, from 0
    before_last: float  # the last upload starts
    t0: float  # the last update_upload returned: the update is committed
    t1: float  # the next round's row was seen (the job completed, after the last round)
    rss_before_kib: int  # the worker's RSS just before the last upload
    hwm_kib: int  # the worker's VmHWM at t1, reset just before the last upload
    cpu_user: float  # CPU seconds the worker used from before_last to t1
    cpu_sys: float
    closed_at: float = NAN
    opened_at: float = NAN
    model_birth: float = NAN
    model_mtime: float = NAN
    check: TaskRun | None = None
    aggregate: TaskRun | None = None
    follow: TaskRun | None = None  # the job_advance that opened the next round or completed

    @property
    def last(self) -> bool:
        return self.number == NUM_ROUNDS - 1


@dataclass
class PortalResult:
    idle_kib: float
    transitions: list[Transition]
    samples: benchlib.RssSampler
    upload_seconds: list[float]
    replay: list[tuple[str, str, float, float]]
    storage: str
    job_seconds: float
    setup_seconds: float


def wait_until(what: str, check: Callable[[], object], worker: Worker, timeout: float) -> float:
    """Poll ``check`` every 5 ms; the wall time at which it first held."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return time.time()
        if not worker.alive():
            raise RuntimeError(f"the worker exited while waiting for {what}:\n{worker.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}; worker log:\n{worker.tail()}")
        time.sleep(POLL_SECONDS)


def portal_env(tmp: Path, db_name: str) -> dict[str, str]:
    return {
        "DJANGO_SETTINGS_MODULE": "fedportal.settings.base",
        "DATABASE_URL": f"{POSTGRES}/{db_name}",
        # REDIS_URL also points the channel layer (events) and the cache here.
        "REDIS_URL": REDIS_URL,
        "CELERY_BROKER_URL": REDIS_URL,
        "DJANGO_MEDIA_ROOT": str(tmp / "media"),
        "FEDPORTAL_DATA_DIR": str(tmp / "data"),
        "DJANGO_SECRET_KEY": "bench-only-secret-key-" + "b" * 40,
        "FEDPORTAL_CA_KEY_ENCRYPTION_KEY": "bench-only-ca-key-encryption-key",
        "DJANGO_DEBUG": "false",
    }


def enrol_sites() -> tuple[Any, Any, list[Any]]:
    """A project with NUM_SITES enrolled sites that accept jobs and are online."""
    from django.contrib.auth import get_user_model
    from django.utils import timezone

    from client_agent import signing
    from sites import services
    from sites.models import Site

    user = get_user_model().objects.create_user("bench-admin", "bench@example.org", None)
    project = services.project_create(name="Portal round bench", created_by=user)
    organization = services.organization_create(
        project=project, name="Bench hospital", created_by=user
    )
    for index in range(1, NUM_SITES + 1):
        requested = services.site_request(
            organization=organization,
            name=f"site-{index}",
            contact_email=f"ops@site-{index}.example.org",
            requested_by=user,
        )
        site, token = services.site_approve(site=requested, approved_by=user)
        key = signing.generate_key()
        services.site_enrol(token=token, csr_pem=signing.make_csr(key, site.name, project.name))
    Site.objects.filter(project=project).update(
        auto_accept_jobs=True, last_heartbeat=timezone.now()
    )
    return user, project, list(Site.objects.filter(project=project).order_by("name"))


def write_updates(folder: Path) -> list[tuple[Path, str, int]]:
    """One update file per site (its own random weights), with its sha256 and size."""
    from client_agent.fl_model import FLModel
    from client_agent.wire import write_model_file

    folder.mkdir()
    files = []
    for index in range(1, NUM_SITES + 1):
        params = benchlib.random_params(SHAPES, seed=index)
        path = folder / f"site-{index}.safetensors"
        write_model_file(
            path,
            FLModel(
                params=params,
                metrics={"accuracy": index / 10},
                meta={"NUM_STEPS_CURRENT_ROUND": 1},
            ),
        )
        del params
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        files.append((path, digest.hexdigest(), path.stat().st_size))
    return files


def submit(tmp: Path, project: Any, user: Any) -> Any:
    from jobs.bundle import pack_app
    from jobs.recipes import FedAvgRecipe
    from jobs.services.submission import job_submit

    app = tmp / "app"
    app.mkdir()
    (app / "client.py").write_text("print('the portal bench uploads updates itself')\n")
    recipe = FedAvgRecipe(
        name="bench-portal-round",
        min_clients=NUM_SITES,
        num_rounds=NUM_ROUNDS,
        model=benchlib.random_params(SHAPES),
        train_script=str(app / "client.py"),
    )
    bundle = recipe.export(tmp / "bundle")
    archive = pack_app(bundle / "app", tmp / "app.zip")
    with open(bundle / "initial_model.safetensors", "rb") as m, open(archive, "rb") as a:
        return job_submit(
            project=project,
            submitted_by=user,
            spec=recipe.spec(),
            initial_model=m,
            app_archive=a,
        )


def upload(job: Any, site: Any, number: int, update: tuple[Path, str, int]) -> float:
    """One site's update through the service, in this process; returns the seconds it took."""
    from jobs.selectors import task_for_site
    from jobs.services.tasks import update_upload

    path, sha, size = update
    started = time.perf_counter()
    task = task_for_site(job=job, site=site, round_number=number)
    with open(path, "rb") as body:
        update_upload(task=task, stream=body, sha256=sha, length=size)
    return time.perf_counter() - started


def run_job(
    tmp: Path, worker: Worker, user: Any, project: Any, sites: list[Any], started: float
) -> PortalResult:
    from jobs.models import Job, JobState, ModelVersion, Round, RoundState, SiteTask, TaskState

    updates = write_updates(tmp / "updates")
    pid = worker.pid
    # Idle: the worker is ready, has run its start-up task, and has nothing to do.
    wait_until(
        "the worker's start-up task",
        lambda: any(r.name == "jobs_resume_task" for r in parse_worker_log(worker.text())),
        worker,
        timeout=60,
    )
    time.sleep(1.0)
    sampler = benchlib.RssSampler(pid, SAMPLE_SECONDS).start()
    idle_from = time.time()
    time.sleep(1.0)
    idle_kib = sampler.median_kib(idle_from, time.time())

    job_started = time.perf_counter()
    setup_seconds = job_started - started
    job = submit(tmp, project, user)
    transitions: list[Transition] = []
    upload_seconds: list[float] = []
    for number in range(NUM_ROUNDS):

        def round_open(n: int = number) -> bool:
            return Round.objects.filter(job=job, number=n, state=RoundState.OPEN).exists()

        wait_until(f"round {number + 1} to open", round_open, worker, timeout=120)
        for site, update in zip(sites[:-1], updates[:-1], strict=True):
            upload_seconds.append(upload(job, site, number, update))

        def others_checked(n: int = number) -> bool:
            tasks = SiteTask.objects.filter(round__job=job, round__number=n)
            bad = tasks.filter(state=TaskState.REJECTED).values_list("site__name", "reason")
            if bad:
                raise RuntimeError(f"updates rejected: {list(bad)}")
            return tasks.filter(state=TaskState.ACCEPTED).count() >= NUM_SITES - 1

        wait_until("the worker to check the other sites' updates", others_checked, worker, 60)

        # ... and to run the job_advance that the last of those checks enqueued.
        def advanced(n: int = number) -> bool:
            runs = parse_worker_log(worker.text())
            return sum(r.value == "waiting for 1 site(s)" for r in runs) > n

        wait_until("the worker's job_advance after the 7th update", advanced, worker, timeout=30)
        time.sleep(0.1)
        rss_before = benchlib.proc_status_kib("VmRSS", pid)
        benchlib.reset_peak_rss(pid)
        user0, sys0 = benchlib.cpu_seconds(pid)
        before_last = time.time()
        upload_seconds.append(upload(job, sites[-1], number, updates[-1]))
        t0 = time.time()
        if number + 1 < NUM_ROUNDS:

            def next_round(n: int = number) -> bool:
                return Round.objects.filter(job=job, number=n + 1).exists()

            t1 = wait_until(f"round {number + 2} to open", next_round, worker, timeout=120)
        else:
            t1 = wait_until(
                "the job to finish",
                lambda: Job.objects.get(pk=job.pk).state != JobState.RUNNING,
                worker,
                timeout=120,
            )
        hwm = benchlib.proc_status_kib("VmHWM", pid)
        user1, sys1 = benchlib.cpu_seconds(pid)
        transitions.append(
            Transition(number, before_last, t0, t1, rss_before, hwm, user1 - user0, sys1 - sys0)
        )
    job_seconds = time.perf_counter() - job_started
    job.refresh_from_db()
    if job.state != JobState.COMPLETED:
        raise RuntimeError(f"the job ended {job.state}: {job.failure_reason}")
    # The task that completed the job goes on after its commit (events): let it end before
    # the replay below takes the cores.
    wait_until(
        "the worker to finish the job's last task",
        lambda: any(r.value == "completed" for r in parse_worker_log(worker.text())),
        worker,
        timeout=30,
    )
    time.sleep(0.2)
    sampler.stop()

    runs = parse_worker_log(worker.text())
    for tr in transitions:
        closed_at = Round.objects.get(job=job, number=tr.number).closed_at
        if closed_at is None:
            raise RuntimeError(f"round {tr.number} of a completed job has no closing time")
        tr.closed_at = closed_at.timestamp()
        opening = Round.objects.filter(job=job, number=tr.number + 1).first()
        tr.opened_at = opening.opened_at.timestamp() if opening else NAN
        model = Path(ModelVersion.objects.get(job=job, round_number=tr.number + 1).file.path)
        tr.model_birth = benchlib.birth_time(model)
        tr.model_mtime = model.stat().st_mtime_ns / 1e9
        checks = [r for r in runs if r.name == "update_check_task" and r.end >= tr.before_last]
        tr.check = min(checks, key=lambda r: r.end, default=None)
        closed = f"closed round {tr.number + 1}"
        tr.aggregate = next((r for r in runs if r.value == closed), None)
        follow = "completed" if tr.last else f"opened round {tr.number + 2}"
        tr.follow = next((r for r in runs if r.value == follow), None)
    replay = replay_worker_functions(tmp, job)
    return PortalResult(
        idle_kib=idle_kib,
        transitions=transitions,
        samples=sampler,
        upload_seconds=upload_seconds,
        replay=replay,
        storage=benchlib.filesystem(tmp),
        job_seconds=job_seconds,
        setup_seconds=setup_seconds,
    )


def measure(call: Callable[[], object]) -> tuple[float, float]:
    """Median seconds of REPLAY_REPEATS calls, and the largest peak RSS above the RSS before
    a call (MB; VmHWM reset first, glibc's free heap returned first so that it hides
    nothing)."""
    seconds, extra = [], 0
    for _ in range(REPLAY_REPEATS):
        gc.collect()
        benchlib.release_free_heap()
        before = benchlib.proc_status_kib("VmRSS")
        benchlib.reset_peak_rss()
        started = time.perf_counter()
        result = call()
        seconds.append(time.perf_counter() - started)
        extra = max(extra, benchlib.proc_status_kib("VmHWM") - before)
        del result
    return median(seconds), mb(extra)


def replay_worker_functions(tmp: Path, job: Any) -> list[tuple[str, str, float, float]]:
    """The worker's steps for the last round, called here on the job's own files, one by one.

    Rows: (function, where, median seconds, peak MB above the RSS before the call).
    """
    import torch

    from client_agent.wire import save_state_dict
    from jobs.aggregation import SiteUpdate, check_update
    from jobs.aggregation.sources import FileTensorSource
    from jobs.models import ModelVersion, SiteTask, TaskState
    from jobs.services import rounds
    from jobs.workflows import ServerState, TrainResult, workflow_from_spec

    number = NUM_ROUNDS - 1
    tasks = (
        SiteTask.objects.filter(round__job=job, round__number=number, state=TaskState.ACCEPTED)
        .select_related("site")
        .order_by("site__name")
    )
    files = [(t.site.name, Path(t.update.path)) for t in tasks]
    global_path = Path(ModelVersion.objects.get(job=job, round_number=number).file.path)
    workflow = workflow_from_spec(job.workflow, job.params)

    def check_one() -> None:
        update = SiteUpdate.from_file(*files[-1])
        source = FileTensorSource(global_path)
        try:
            check_update(source.specs(), update)
        finally:
            update.source.close()
            source.close()

    def aggregate() -> Any:
        updates = [SiteUpdate.from_file(name, path) for name, path in files]
        source = FileTensorSource(global_path)
        try:
            sites = [u.site for u in updates]
            plan = workflow.plan(number, sites, ServerState())
            results = [TrainResult(u.site, u) for u in updates]
            return workflow.close(number, plan, source, results, ServerState())
        finally:
            for update in updates:
                update.source.close()
            source.close()

    def read_all() -> int:
        buffer = bytearray(4 << 20)
        total = 0
        for path in [global_path, *(path for _, path in files)]:
            with open(path, "rb", buffering=0) as fh:
                while got := fh.readinto(buffer):
                    total += got
        return total

    kept = {"new global": aggregate().global_params}
    out_path = tmp / "replay-model.safetensors"

    def save() -> None:
        save_state_dict(out_path, kept["new global"])

    def one_thread(call: Callable[[], object]) -> Callable[[], object]:
        def wrapped() -> object:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return call()
            finally:
                torch.set_num_threads(threads)

        return wrapped

    threads = f"torch {torch.get_num_threads()} threads"
    digest = getattr(rounds, "_file_digest", None)
    rows = [
        (
            f"`check_update` of one update (+ `SiteUpdate.from_file`), {threads}",
            "jobs/aggregation/validation.py",
            *measure(check_one),
        ),
        (
            "  the same, torch 1 thread",
            "jobs/aggregation/validation.py",
            *measure(one_thread(check_one)),
        ),
        (
            f"read the global model + {len(files)} update files, 4 MiB `readinto` (floor)",
            "(plain file reads)",
            *measure(read_all),
        ),
        (
            f"`FedAvg.aggregate` → `fedavg` over {len(files)} update files, {threads}",
            "jobs/workflows/fedavg.py, jobs/aggregation/fedavg.py",
            *measure(aggregate),
        ),
        (
            "  the same, torch 1 thread",
            "jobs/workflows/fedavg.py, jobs/aggregation/fedavg.py",
            *measure(one_thread(aggregate)),
        ),
        (
            "`save_state_dict` of the new global model",
            "client_agent/wire.py (safetensors `save_file`)",
            *measure(save),
        ),
    ]
    if digest is not None:
        rows.append(
            (
                "`_file_digest` (sha256 of the new model file)",
                "jobs/services/rounds.py",
                *measure(lambda: digest(out_path)),
            )
        )
    kept.clear()
    out_path.unlink(missing_ok=True)
    return rows


def run_portal(
    started: float, *, worker_threads: int | None, keep_log: Path | None
) -> PortalResult:
    """The portal job in the bench's own database, Redis database and folder; all removed.

    ``worker_threads`` sets OMP_NUM_THREADS (torch's thread count) for the worker; None leaves
    torch's default (one per core). ``keep_log`` gets a copy of the worker's log.
    """
    import psycopg
    import redis

    tmp = Path(tempfile.mkdtemp(prefix="fedportal-bench-portal-"))
    db_name = f"fedportal_bench_{os.getpid()}"
    env = portal_env(tmp, db_name)
    os.environ.update(env)  # before django.setup(): the settings read the environment
    broker = redis.Redis.from_url(REDIS_URL)
    admin = psycopg.connect(f"{POSTGRES}/postgres", autocommit=True)
    worker: Worker | None = None
    try:
        admin.execute(f'CREATE DATABASE "{db_name}"')
        broker.flushdb()
        import django

        django.setup()
        # The services log every enrolment at INFO; the worker keeps its own INFO log.
        logging.getLogger().setLevel(logging.WARNING)
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        user, project, sites = enrol_sites()
        worker_env = {**os.environ, "PYTHONPATH": str(benchlib.REPO_ROOT)}
        if worker_threads is not None:
            worker_env["OMP_NUM_THREADS"] = str(worker_threads)
        worker = Worker(worker_env, tmp / "worker.log")
        worker.start()
        wait_until("the worker to be ready", lambda: " ready." in worker.text(), worker, 90)
        return run_job(tmp, worker, user, project, sites, started)
    except BaseException:
        if worker is not None:
            print(f"worker log (last lines):\n{worker.tail()}", file=sys.stderr)
        raise
    finally:
        if worker is not None:
            worker.stop()
            if keep_log is not None:
                shutil.copyfile(worker.log, keep_log)
        if "django" in sys.modules:
            from django.db import connections

            connections.close_all()
        admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        admin.close()
        broker.flushdb()
        broker.close()
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# SimEnv, in a child process
# --------------------------------------------------------------------------------------------


def simenv_child(out: Path) -> None:
    """Run the echo job in SimEnv and write the raw times and memory samples to ``out``."""
    import jobs.envs
    from jobs.envs import RunStatus, SimEnv
    from jobs.recipes import FedAvgRecipe
    from jobs.workflows.fedavg import FedAvg

    spans: dict[str, list[tuple[float, float]]] = {}
    round_hwm: list[tuple[float, int]] = []
    lock = threading.Lock()

    def wrap(owner: Any, attr: str, label: str, before: Callable[[], None] | None = None) -> None:
        original = getattr(owner, attr, None)
        if original is None:  # the core renamed it: that row stays n/a
            return
        record = spans.setdefault(label, [])

        def timed(*args: Any, **kwargs: Any) -> Any:
            if before is not None:
                before()
            start = time.time()
            try:
                return original(*args, **kwargs)
            finally:
                with lock:
                    record.append((start, time.time()))

        setattr(owner, attr, timed)

    def round_starts() -> None:
        # The previous round's peak, then a fresh one for this round.
        round_hwm.append((time.time(), benchlib.proc_status_kib("VmHWM")))
        benchlib.reset_peak_rss()

    with tempfile.TemporaryDirectory(prefix="fedportal-bench-sim-") as tmp:
        app = Path(tmp, "app")
        app.mkdir()
        (app / "echo_client.py").write_text(ECHO_CLIENT)
        recipe = FedAvgRecipe(
            name="bench-echo",
            min_clients=NUM_SITES,
            num_rounds=NUM_ROUNDS,
            model=benchlib.random_params(SHAPES),
            train_script=app / "echo_client.py",
        )
        env = SimEnv(num_clients=NUM_SITES, workspace=Path(tmp, "ws"), show_progress=False)
        wrap(jobs.envs, "check_update", "check")
        wrap(jobs.envs, "load_state_dict", "load_global")
        wrap(jobs.envs, "save_state_dict", "save_global")
        wrap(FedAvg, "close", "aggregate")
        wrap(getattr(jobs.envs, "_Simulation", None), "_collect", "collect", round_starts)
        gc.collect()
        benchlib.release_free_heap()
        sampler = benchlib.RssSampler("self", SAMPLE_SECONDS).start()
        time.sleep(0.5)
        idle_from = time.time()
        time.sleep(0.5)
        idle_kib = sampler.median_kib(idle_from, time.time())
        started = time.time()
        run = recipe.execute(env)
        finished = time.time()
        round_hwm.append((finished, benchlib.proc_status_kib("VmHWM")))
        sampler.stop()
        if run.status != RunStatus.COMPLETED:
            raise SystemExit(f"the echo job did not complete: {run.status.value}: {run.error}")
        marks = [
            json.loads(line)
            for path in sorted(run.workspace.glob(f"sites/*/{MARKS_FILE}"))
            for line in path.read_text().splitlines()
        ]
        result = {
            "idle_kib": idle_kib,
            "started": started,
            "finished": finished,
            "samples": sampler.samples,
            "spans": spans,
            "round_hwm": round_hwm[1:],  # the first entry is the start of round 1
            "round_seconds": [r.seconds for r in run.rounds],
            "marks": marks,
        }
    out.write_text(json.dumps(result))


@dataclass
class SimRound:
    number: int
    t0: float  # the last site's send() returned
    t1: float  # the first site has the next round's task (the final save, for the last round)
    last_check_end: float
    check_seconds: float
    load_seconds: float
    aggregate_seconds: float
    save_start: float
    save_end: float
    peak_sampled_kib: int
    hwm_kib: int
    round_seconds: float


@dataclass
class SimResult:
    idle_kib: float
    rounds: list[SimRound] = field(default_factory=list)


def run_simenv(clean_env: dict[str, str]) -> SimResult:
    with tempfile.TemporaryDirectory(prefix="fedportal-bench-simout-") as tmp:
        out = Path(tmp, "simenv.json")
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--simenv-child", str(out)],
            cwd=benchlib.REPO_ROOT,
            env=clean_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            raise RuntimeError(f"the SimEnv child failed:\n{done.stdout}\n{done.stderr}")
        raw = json.loads(out.read_text())
    samples = [(at, kib) for at, kib in raw["samples"]]
    spans = {label: [tuple(s) for s in items] for label, items in raw["spans"].items()}
    saves = sorted(spans.get("save_global", []))
    result = SimResult(idle_kib=raw["idle_kib"])
    for number in range(NUM_ROUNDS):
        marks = [m for m in raw["marks"] if m["round"] == number]
        nxt = [m for m in raw["marks"] if m["round"] == number + 1]
        lo = saves[number - 1][1] if number else raw["started"]
        save_start, save_end = saves[number] if number < len(saves) else (NAN, NAN)

        def inside(label: str, lo: float = lo, hi: float = save_end) -> list[tuple[float, float]]:
            return [s for s in spans.get(label, []) if lo <= s[0] <= hi]

        checks = inside("check")
        t0 = max(m["sent"] for m in marks)
        t1 = min(m["task"] for m in nxt) if nxt else save_end
        hwm = raw["round_hwm"][number][1] if number < len(raw["round_hwm"]) else 0
        result.rounds.append(
            SimRound(
                number=number,
                t0=t0,
                t1=t1,
                last_check_end=max((end for _, end in checks), default=NAN),
                check_seconds=median([end - start for start, end in checks]),
                load_seconds=sum(end - start for start, end in inside("load_global")),
                aggregate_seconds=sum(end - start for start, end in inside("aggregate")),
                save_start=save_start,
                save_end=save_end,
                peak_sampled_kib=max((k for at, k in samples if t0 <= at <= t1), default=0),
                hwm_kib=hwm,
                round_seconds=raw["round_seconds"][number],
            )
        )
    return result


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def span(a: float, b: float) -> float:
    return b - a


def run_seconds(run: TaskRun | None) -> float:
    return run.end - run.start if run else NAN


def run_start(run: TaskRun | None) -> float:
    return run.start if run else NAN


def run_end(run: TaskRun | None) -> float:
    return run.end if run else NAN


@dataclass
class Row:
    """One line of a per-round table: a value per round (the last is the round that ends
    the job), and where its times come from."""

    label: str
    values: list[float]
    source: str = ""
    digits: int = 3


P_TURN = "**last update committed → next round's row seen (job done, round 3)**"
P_HWM = "**worker peak RSS above idle, MB (VmHWM, reset before the last update)**"
P_SAMPLED = "worker peak RSS above idle, MB (sampled every 20 ms)"
S_TURN = "**last `send()` → next round's task (final save, round 3)**"
S_HWM = "**process peak RSS above idle, MB (VmHWM of the whole round)**"
S_SAMPLED = "process peak RSS above idle, MB (sampled every 20 ms, last send → next task)"


def portal_rows(portal: PortalResult) -> list[Row]:
    idle = portal.idle_kib
    trs = portal.transitions

    def each(fn: Callable[[Transition], float]) -> list[float]:
        return [fn(tr) for tr in trs]

    return [
        Row(
            "last update committed → worker starts its check",
            each(lambda t: span(t.t0, run_start(t.check))),
            "log",
        ),
        Row(
            "`update_check_task` of the last update (reads all of it)",
            each(lambda t: run_seconds(t.check)),
            "log",
        ),
        Row(
            "check done → `job_advance_task` (aggregation) starts",
            each(lambda t: span(run_end(t.check), run_start(t.aggregate))),
            "log",
        ),
        Row(
            "`job_advance_task` that closes the round, in all",
            each(lambda t: run_seconds(t.aggregate)),
            "log",
        ),
        Row(
            "  claim, read and fold 8 updates (`FedAvg.aggregate`)",
            each(lambda t: span(run_start(t.aggregate), t.model_birth)),
            "log, btime",
        ),
        Row(
            "  write the new model (`save_state_dict`)",
            each(lambda t: span(t.model_birth, t.model_mtime)),
            "btime, mtime",
        ),
        Row(
            "  sha256 of it (`_file_digest`), DB writes → `Round.closed_at`",
            each(lambda t: span(t.model_mtime, t.closed_at)),
            "mtime, DB",
        ),
        Row(
            "  `closed_at` → task returns (commit, events, enqueue)",
            each(lambda t: span(t.closed_at, run_end(t.aggregate))),
            "DB, log",
        ),
        Row(
            "aggregation done → next `job_advance_task` starts",
            each(lambda t: span(run_end(t.aggregate), run_start(t.follow))),
            "log",
        ),
        Row(
            "next `job_advance_task` (opens the round / completes the job)",
            each(lambda t: run_seconds(t.follow)),
            "log",
        ),
        Row(
            "`Round.closed_at` → next `Round.opened_at`",
            each(lambda t: span(t.closed_at, t.opened_at)),
            "DB",
        ),
        Row(
            "next `Round.opened_at` → the bench sees the row (commit, poll)",
            each(lambda t: span(t.opened_at, t.t1)),
            "DB, poll",
        ),
        Row(P_TURN, each(lambda t: span(t.t0, t.t1)), "poll"),
        Row(
            "worker RSS just before the last update, MB above idle",
            each(lambda t: mb(t.rss_before_kib - idle)),
            "/proc",
            0,
        ),
        Row(
            "worker CPU, last upload starts → next round seen, user s",
            each(lambda t: t.cpu_user),
            "/proc",
        ),
        Row("  … system s", each(lambda t: t.cpu_sys), "/proc"),
        Row(P_HWM, each(lambda t: mb(t.hwm_kib - idle)), "/proc", 0),
        Row(
            P_SAMPLED,
            each(lambda t: mb(portal.samples.peak_kib(t.before_last, t.t1) - idle)),
            "/proc",
            0,
        ),
    ]


def sim_rows(sim: SimResult) -> list[Row]:
    idle = sim.idle_kib
    rs = sim.rounds

    def each(fn: Callable[[SimRound], float]) -> list[float]:
        return [fn(r) for r in rs]

    return [
        Row(
            "last site's `send()` returned → its `check_update` done",
            each(lambda r: span(r.t0, r.last_check_end)),
        ),
        Row(
            "`check_update` of one update (median of the round's 8)",
            each(lambda r: r.check_seconds),
        ),
        Row("`load_state_dict(global)`", each(lambda r: r.load_seconds)),
        Row(
            "`FedAvg.aggregate` (fedavg over the 8 update files)",
            each(lambda r: r.aggregate_seconds),
        ),
        Row("`save_state_dict(new global)`", each(lambda r: span(r.save_start, r.save_end))),
        Row("model saved → first site has the next task", each(lambda r: span(r.save_end, r.t1))),
        Row(S_TURN, each(lambda r: span(r.t0, r.t1))),
        Row("whole round (`RoundRecord.seconds`)", each(lambda r: r.round_seconds)),
        Row(S_HWM, each(lambda r: mb(r.hwm_kib - idle)), digits=0),
        Row(S_SAMPLED, each(lambda r: mb(r.peak_sampled_kib - idle)), digits=0),
    ]


def opening(values: list[float]) -> list[float]:
    """The values of the rounds after which a next round opens."""
    return values[: NUM_ROUNDS - 1]


def per_round_table(rows: list[Row], *, sources: bool) -> str:
    """Columns: rounds 1→2 …, the median of those, and the round that ends the job."""
    heads = [f"round {n + 1}→{n + 2}" for n in range(NUM_ROUNDS - 1)]
    headers = ["phase (s, unless MB)", *heads, "**median**", f"round {NUM_ROUNDS} → end"]
    table = []
    for row in rows:
        cells = [fmt(v, row.digits) for v in opening(row.values)]
        cells += [fmt(median(opening(row.values)), row.digits), fmt(row.values[-1], row.digits)]
        table.append((row.label, *cells, *([row.source] if sources else [])))
    return md_table([*headers, *(["times from"] if sources else [])], table)


def report(portal: PortalResult, sim: SimResult) -> None:
    p_rows, s_rows = portal_rows(portal), sim_rows(sim)
    p = {row.label: row.values for row in p_rows}
    s = {row.label: row.values for row in s_rows}
    p_turn, s_turn = median(opening(p[P_TURN])), median(opening(s[S_TURN]))
    p_hwm, s_hwm = max(p[P_HWM]), max(s[S_HWM])
    p_sampled, s_sampled = max(p[P_SAMPLED]), max(s[S_SAMPLED])
    print(
        f"### {NUM_SITES} sites × {benchlib.numel(SHAPES):,} float32 parameters "
        f"({MODEL_MB:.0f} MB), FedAvg, {NUM_ROUNDS} rounds\n"
    )
    print(
        md_table(
            ["figure", "portal (Celery worker)", "SimEnv (echo clients)", "target"],
            [
                (
                    "**last update in → next round open, s** (median of rounds 1→2, 2→3)",
                    f"**{fmt(p_turn)}**",
                    f"**{fmt(s_turn)}**",
                    "≤ 1.5",
                ),
                (
                    "**peak RSS above idle, MB** (VmHWM; highest of the 3 rounds)",
                    f"**{fmt(p_hwm, 0)}**",
                    f"**{fmt(s_hwm, 0)}**",
                    "≤ 300",
                ),
                (
                    "  … as a multiple of the model size",
                    f"{fmt(p_hwm / MODEL_MB, 2)} ×",
                    f"{fmt(s_hwm / MODEL_MB, 2)} ×",
                    "≤ 3 ×",
                ),
                (
                    "peak RSS above idle, MB (sampled every 20 ms; highest of the 3 rounds)",
                    fmt(p_sampled, 0),
                    fmt(s_sampled, 0),
                    "",
                ),
                (
                    "idle RSS, MB (before the job)",
                    fmt(mb(portal.idle_kib), 0),
                    fmt(mb(sim.idle_kib), 0),
                    "",
                ),
            ],
        )
    )
    print()
    print(
        "Portal: the worker's VmHWM is reset just before the round's last update is uploaded "
        "and read when the next round's row is seen, so it covers the check of that update, "
        "the aggregation, the model write and the next round's opening. SimEnv: the process's "
        "VmHWM over each whole round (all 8 checks, aggregation, save); its idle size includes "
        "the recipe's own copy of the model. Model size: "
        f"{MODEL_BYTES:,} bytes; MB = 10^6 bytes.\n"
    )
    print("#### Portal: where the time goes\n")
    print(per_round_table(p_rows, sources=True))
    print()
    print(
        "Times from the worker log are Celery's: a task's end is when it logged its success "
        "(ms resolution, so a span near 0 may read -0.00x), its start that minus the runtime "
        "it reports. 'btime' is the new "
        "model file's birth time (its temporary file, created when `save_state_dict` starts "
        "writing), 'mtime' its last write. Round 3 has no next round: its 'next' task is the "
        f"one that completes the job. The job took {portal.job_seconds:.1f} s from submission "
        f"to completion; one `update_upload` of a {MODEL_MB:.0f} MB update in this process "
        f"took {fmt(median(portal.upload_seconds))} s (median of {len(portal.upload_seconds)}), "
        "not counted above.\n"
    )
    print("#### SimEnv: where the time goes\n")
    print(per_round_table(s_rows, sources=False))
    print()
    print("#### The worker's functions, replayed one by one in the bench process\n")
    print(
        md_table(
            ["function", "file", f"median s of {REPLAY_REPEATS}", "peak MB above RSS before"],
            [(f, w, fmt(sec), fmt(extra, 0)) for f, w, sec, extra in portal.replay],
        )
    )
    print()
    print(
        f"On the last round's files of the portal job, page cache warm, storage on "
        f"{portal.storage}, the worker idle.\n"
    )
    print(
        "Notes: the updates are uploaded through `jobs.services.tasks.update_upload` called "
        "in the bench process, not over HTTP (no request parsing, signature check or "
        "network in these figures); before the last update of a round the bench waits until "
        "the worker has checked the other 7. Every file is in the page cache (just written), "
        "so 'reading 8 updates from storage' runs at memory speed, not disk speed. Set-up "
        f"(database, migrations, {NUM_SITES} sites enrolled, worker start, update files) took "
        f"{portal.setup_seconds:.1f} s of this run."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--worker-threads",
        type=int,
        help="OMP_NUM_THREADS for the Celery worker (default: unset; the worker then uses "
        "FEDPORTAL_WORKER_TORCH_THREADS, default 1)",
    )
    parser.add_argument("--keep-worker-log", type=Path, help="copy the worker's log here")
    parser.add_argument("--simenv-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.simenv_child:
        simenv_child(args.simenv_child)
        return
    started = time.perf_counter()
    clean_env = dict(os.environ)
    benchlib.print_header(
        "Portal round turnaround and worker memory, beside SimEnv",
        f"A FedAvg job of {NUM_ROUNDS} rounds, {NUM_SITES} enrolled sites × a "
        f"{benchlib.numel(SHAPES):,}-parameter float32 model shaped like a one-block "
        "transformer, run by a real Celery worker process (`celery -A fedportal worker "
        "--pool=solo`) on PostgreSQL and Redis. Updates are uploaded through the service "
        "`update_upload` in the bench process, **not over HTTP**. Beside it, the same job in "
        "SimEnv with echo clients.",
    )
    threads = args.worker_threads
    default_threads = "FEDPORTAL_WORKER_TORCH_THREADS (default 1)"
    print(
        f"worker threads: {'OMP_NUM_THREADS=' + str(threads) if threads else default_threads}; "
        f"load average at start {benchlib.load_average()} (other work on this machine)\n",
        flush=True,
    )
    portal = run_portal(started, worker_threads=threads, keep_log=args.keep_worker_log)
    sim = run_simenv(clean_env)
    report(portal, sim)
    print(f"\nload average at the end: {benchlib.load_average()}")
    print(f"\n(whole bench: {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
