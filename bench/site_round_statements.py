"""SQL statements per site-round: what one site's part in one round costs the database, on
the portal and in the worker.

A project of ``--sites`` enrolled sites (5) runs a FedAvg job that needs every site, for
``--rounds`` rounds (3). In each round every site does what its agent does (``client_agent``),
through the portal's own request path, and each step's statements are counted
(``django.test.utils.CaptureQueriesContext``):

1. **round event**: the round-open event reaches the agent's socket; the consumer checks the
   certificate again first (``sites.authentication.identity_check``, through the cache of
   verified certificates), as it does when its last check is older than
   ``jobs.consumers.RECHECK_SECONDS``. The event carries the task, and the agent starts it
   without listing its jobs (``client_agent.agent.Agent._start_round_from``). A model within
   ``FEDPORTAL_EVENT_MODEL_MAX_BYTES`` (the bench's is) comes with the event, and the portal
   marks the tasks of the sockets it sent it to training, together
   (``jobs.services.tasks.tasks_model_delivered``): each site counts its share;
2. **model**: ``GET …/rounds/<n>/model/?then=training``, signed, only for a model that did not
   come with the event;
3. **heartbeat**: a ``heartbeat`` message on the socket (one every
   ``client_agent.protocol.HEARTBEAT_SECONDS`` while the script trains);
4. **report**: a ``report`` message with the script's ``flare.log`` points and output lines
   (``--points``, 4, and ``--lines``, 20; none of either: no report, as from the "echo" script
   of ``bench/scale_out.py`` and of the issue's first measurements);
5. **upload**: an update within ``FEDPORTAL_SOCKET_UPDATE_MAX_BYTES`` (the bench's is) goes
   in an ``update`` message on the socket, as the agent sends it; a larger one (or with that
   setting at 0) as ``PUT …/rounds/<n>/update/``, signed, the update streamed, with the
   server's check of its sender before the body is read (``fedportal.bodylimits``: the
   signature and the task), which Daphne runs and the test client does not, and the task it
   read handed to the view in the request's scope, as ``fedportal.server`` does.

The agent's job list (``GET /api/v1/agent/jobs/``) is no step of a round: an agent lists its
jobs when it connects, when a job's state changes, when a round's event did not carry its task,
and every three polls (30 s) as a safety net. It is counted after the round, apart, and left
out of the sums; a PocEnv run of 5 agents and 6 rounds logged 15 listings in all, where its 30
site-rounds made 30 model downloads and 30 uploads.

Socket messages go through the consumer's own handler (``jobs.consumers._handle``), HTTP
requests through Django's test client. The Celery tasks those steps enqueue are collected and
run afterwards in this process, as a worker runs them, and counted as the worker's: the update
checks (one per round for the uploads of each ``FEDPORTAL_UPDATE_CHECK_GATHER_SECONDS``, as the
portal gathers them; with it at 0, one per site) and the round controller's steps
(``job_advance``: the round's close and the next one's open, per round, shared by its sites).

Time: the requests of one site-round come within a second here; a real round lasts longer.
Each site's round therefore starts with its heartbeat due (the previous round ended longer ago
than the write interval) and with the socket's certificate check due, which is what a round of
a minute or so costs; a longer round adds one heartbeat write per write interval.

Everything is the bench's own and removed at the end: a PostgreSQL database
``fedportal_bench_statements_<pid>`` (server from BENCH_POSTGRES_URL, default
postgres://postgres@127.0.0.1:5432) and a temporary media folder; the portal's cache (Redis)
under a key prefix of the bench's own.

    .venv/bin/python bench/site_round_statements.py
    .venv/bin/python bench/site_round_statements.py --sites 10 --rounds 5
    .venv/bin/python bench/site_round_statements.py --show-sql   # the last round's SQL
    .venv/bin/python bench/site_round_statements.py --sites 100 --points 0 --lines 0   # echo
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The targets: statements per site and round, on the portal alone and with the worker's share.
PORTAL_TARGET = 5
TOTAL_TARGET = 8
STEPS = ("round event", "model", "heartbeat", "report", "upload")
APART = "job list"  # counted, but no step of a round (see the docstring)
POINTS = 4  # flare.log points in a site's report
LINES = 20  # output lines in a site's report


@dataclass
class Agent:
    """One site as its agent holds it: the site, its key and certificate."""

    site: Any
    key: Any
    certificate: Any

    def headers(self, method: str, path: str, body: bytes = b"") -> dict[str, str]:
        from client_agent import signing

        return signing.sign_request(
            key=self.key,
            cert_pem_or_fingerprint=self.certificate.pem,
            method=method,
            path=path,
            body=body,
        )


@dataclass
class Seeded:
    job: Any
    agents: list[Agent]
    tmp: Path
    # What each site's script logs a round: flare.log points and output lines. None of either:
    # the agent sends no report (the "echo" script of bench/scale_out.py).
    points: int = POINTS
    lines: int = LINES


@dataclass
class RoundCount:
    """The statements of one round: per site and step on the portal, per site in the update
    checks, and the round controller's for the whole round."""

    sites: int
    portal: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STEPS})
    listing: list[int] = field(default_factory=list)
    checks: int = 0
    controller: int = 0
    # The CPU time of the worker's tasks in this process, in seconds (with the statements'
    # capture on, as for every step).
    checks_cpu: float = 0.0
    controller_cpu: float = 0.0
    # Of those: BEGIN, COMMIT, SAVEPOINT and RELEASE (round trips, but no reads or writes).
    portal_control: int = 0
    worker_control: int = 0
    # The statements of the first site's steps and of the worker's tasks, for --show-sql.
    sql: dict[str, list[str]] = field(default_factory=dict)

    def portal_per_site(self) -> float:
        return sum(sum(v) for v in self.portal.values()) / self.sites

    def worker_per_site(self) -> float:
        return (self.checks + self.controller) / self.sites


TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")


def control_statements(captured: Sequence[dict[str, Any]]) -> int:
    """How many of ``captured`` only begin or end a transaction or savepoint."""
    return sum(1 for q in captured if q["sql"].lstrip().upper().startswith(TRANSACTION_CONTROL))


class Kicks:
    """The Celery tasks enqueued while it is on, collected instead of sent to a broker, to be
    run in this process (as a worker would) when :meth:`run` is called."""

    def __init__(self) -> None:
        self.queue: list[tuple[Any, int]] = []  # (the Celery task, its argument)
        self.control = 0  # transaction control among the statements :meth:`run` counted
        self.sql: list[str] = []  # the statements :meth:`run` counted
        self.cpu = 0.0  # the CPU seconds of the tasks :meth:`run` ran last

    @contextmanager
    def collecting(self) -> Iterator[Kicks]:
        from jobs.tasks import job_advance_task, round_updates_check_task

        tasks = (job_advance_task, round_updates_check_task)
        for task in tasks:
            task.delay = self._collector(task)  # type: ignore[method-assign,assignment]
        try:
            yield self
        finally:
            for task in tasks:
                del task.delay  # back to the class's: the broker

    def _collector(self, task: Any) -> Callable[[int], None]:
        def delay(arg: int) -> None:
            self.queue.append((task, arg))

        return delay

    def run(self, name: str) -> int:
        """Run the collected tasks called ``name`` (and those they enqueue) until none is left;
        the statements they made."""
        from django.db import connection
        from django.test.utils import CaptureQueriesContext

        from jobs.services.tasks import UPDATE_CHECKS

        # The checks the portal is still gathering (jobs.services.tasks) are enqueued now, as
        # they would be a moment after the last upload.
        UPDATE_CHECKS.flush()
        statements = 0
        self.cpu = 0.0
        while mine := [k for k in self.queue if k[0].name.endswith(name)]:
            task, arg = mine[0]
            self.queue.remove(mine[0])
            with CaptureQueriesContext(connection) as captured:
                started = time.process_time()
                task(arg)
                self.cpu += time.process_time() - started
            statements += len(captured)
            self.control += control_statements(captured.captured_queries)
            self.sql += [q["sql"] for q in captured.captured_queries]
        return statements


def seed(tmp: Path, *, sites: int, rounds: int, kicks: Kicks) -> Seeded:
    """``sites`` enrolled sites that accept jobs and are online, and their job, started."""
    import torch
    from django.contrib.auth import get_user_model
    from django.utils import timezone

    from client_agent import signing
    from client_agent.wire import save_state_dict
    from jobs.bundle import build_spec
    from jobs.services.submission import job_submit
    from jobs.workflows import FedAvg
    from sites import services
    from sites.models import Certificate

    admin = get_user_model().objects.create_user("bench-admin", "admin@bench.example.org", None)
    project = services.project_create(name="Statements bench", created_by=admin)
    org = services.organization_create(project=project, name="Bench hospital", created_by=admin)
    key = signing.generate_key()  # one key for all: the bench counts statements, not crypto
    agents = []
    for index in range(sites):
        site = services.site_request(
            organization=org,
            name=f"site-{index:03d}",
            contact_email=f"ops@site-{index:03d}.example.org",
            requested_by=admin,
        )
        site, token = services.site_approve(site=site, approved_by=admin)
        services.site_enrol(token=token, csr_pem=signing.make_csr(key, site.name, project.name))
        site.refresh_from_db()
        site.auto_accept_jobs = True
        site.last_heartbeat = timezone.now()
        site.save()
        agents.append(Agent(site, key, Certificate.objects.get(site=site, revoked_at=None)))
    spec = build_spec(
        name="statements",
        workflow=FedAvg(min_clients=sites, num_rounds=rounds),
        train_script="client.py",
        train_args="",
    )
    model = tmp / "initial.safetensors"
    save_state_dict(model, {"w": torch.zeros(4)})
    app = io.BytesIO()
    with zipfile.ZipFile(app, "w") as zf:
        zf.writestr("client.py", "print('bench')\n")
    job = job_submit(
        project=project,
        submitted_by=admin,
        spec=spec,
        initial_model=io.BytesIO(model.read_bytes()),
        app_archive=io.BytesIO(app.getvalue()),
        sites=[a.site.name for a in agents],
    )
    kicks.run("job_advance_task")  # waiting, then running with round 0 open
    return Seeded(job=job, agents=agents, tmp=tmp)


def update_bytes(tmp: Path, number: int) -> bytes:
    """A site's update as its agent sends it (``client_agent.wire``)."""
    import torch

    from client_agent.fl_model import FLModel
    from client_agent.wire import write_model_file

    path = tmp / "update.safetensors"
    write_model_file(
        path,
        FLModel(
            params={"w": torch.full((4,), float(number))},
            metrics={"accuracy": 0.5},
            meta={"NUM_STEPS_CURRENT_ROUND": 1},
        ),
    )
    data = path.read_bytes()
    path.unlink()
    return data


def server_client(checked: object, **kwargs: Any) -> Any:
    """Django's ASGI test client, with the scope fedportal.server gives an upload whose
    sender it checked: what that check found (``fedportal.bodylimits.CHECKED_SENDER``)."""
    from django.test import AsyncClient

    from fedportal.bodylimits import CHECKED_SENDER

    class ServerClient(AsyncClient):
        async def request(self, **request: Any) -> Any:
            return await super().request(**request, **{CHECKED_SENDER: checked})

    return ServerClient(**kwargs)


def site_round(
    agent: Agent, seeded: Seeded, number: int, count: RoundCount, marks: float | None
) -> None:
    """Site ``agent``'s part in round ``number``, each step's statements added to ``count``;
    ``marks``: the site's share of the statements that marked the tasks training, when the
    model came with the round's event (None: it is downloaded)."""
    from asgiref.sync import async_to_sync
    from django.core.signals import request_finished, request_started
    from django.db import close_old_connections, connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from client_agent.protocol import HEARTBEAT, REPORT, UpdateMessage
    from fedportal.bodylimits import _site_check
    from jobs.api.authentication import HEADER_CONTENT_SHA256
    from jobs.consumers import _handle
    from jobs.services.tasks import socket_update_max_bytes
    from sites.authentication import SiteIdentity, identity_check
    from sites.models import Site
    from sites.signed_cache import site_heartbeat_due

    agent.site = Site.objects.get(pk=agent.site.pk)
    # The last heartbeat was written longer ago than the write interval (see the docstring).
    site_heartbeat_due(agent.site.pk)
    identity = SiteIdentity(site=agent.site, certificate=agent.certificate)
    uid = seeded.job.uid
    base = f"/api/v1/agent/jobs/{uid}/rounds/{number}/"
    client = Client(raise_request_exception=True)

    def signed(method: str, path: str, body: bytes = b"", **headers: str) -> None:
        sent = {**agent.headers(method, path, body), **headers}
        content_type = "application/octet-stream" if body else "application/json"
        if method == "PUT":
            # The server's check of an upload's sender, before it reads the body (Daphne's
            # side, which the test client skips); the server hands the view what it found.
            checked = _site_check(method=method, path=path, query=b"", headers=sent)
            through_asgi = server_client(checked, raise_request_exception=True)

            async def put() -> Any:
                return await through_asgi.generic(
                    method, path, data=body, content_type=content_type, headers=sent
                )

            response = async_to_sync(put)()
        else:
            response = client.generic(
                method, path, data=body, content_type=content_type, headers=sent
            )
        if getattr(response, "streaming", False):
            b"".join(response.streaming_content)
        if response.status_code >= 300:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.content!r}")

    def counted(step: str, call: Callable[[], object]) -> None:
        # The connection stays open through the request (Django closes it at a request's end,
        # which would drop the log).
        request_started.disconnect(close_old_connections)
        request_finished.disconnect(close_old_connections)
        try:
            with CaptureQueriesContext(connection) as captured:
                call()
            if agent is seeded.agents[0]:
                count.sql[step] = [q["sql"] for q in captured.captured_queries]
            if step == APART:
                count.listing.append(len(captured))
                return
            count.portal[step].append(len(captured))
            count.portal_control += control_statements(captured.captured_queries)
        finally:
            request_started.connect(close_old_connections)
            request_finished.connect(close_old_connections)

    held = [identity]

    def socket(content: dict[str, Any]) -> None:
        held[0], _ack = _handle(held[0], content, False)

    data = update_bytes(seeded.tmp, number)
    report = {
        "type": REPORT,
        "id": f"{agent.site.name}-{number}",
        "job": str(uid),
        "points": [
            {
                "key": "loss",
                "value": 1.0 / (i + 1),
                "step": i,
                "round": number,
                "id": f"p{number}-{i}",
            }
            for i in range(seeded.points)
        ],
        "lines": [
            {"text": f"epoch {i}: loss {1.0 / (i + 1)}", "round": number, "id": f"l{number}-{i}"}
            for i in range(seeded.lines)
        ],
    }
    if marks is not None:
        # The model came with the event; the sites' tasks were marked training together
        # (rounds_counted): this site's share of that.
        counted("round event", lambda: identity_check(held[0]))
        count.portal["round event"][-1] += marks
        counted("model", lambda: None)
    else:
        counted("round event", lambda: identity_check(held[0]))
        counted("model", lambda: signed("GET", f"{base}model/?then=training"))
    counted("heartbeat", lambda: socket({"type": HEARTBEAT}))
    if seeded.points or seeded.lines:
        counted("report", lambda: socket(report))
    else:
        counted("report", lambda: None)
    digest = hashlib.sha256(data).hexdigest()
    if len(data) <= socket_update_max_bytes():
        # As the agent sends it when the welcome takes an update this size: on the socket.
        update = UpdateMessage(job=str(uid), round=number, sha256=digest, data=data, id="u")
        counted("upload", lambda: socket(update.to_json()))
    else:
        counted(
            "upload",
            lambda: signed("PUT", f"{base}update/", data, **{HEADER_CONTENT_SHA256: digest}),
        )
    counted(APART, lambda: signed("GET", "/api/v1/agent/jobs/"))


def training_marks(seeded: Seeded, number: int, count: RoundCount) -> float | None:
    """As the worker decides when round ``number`` opens: the model goes with the event when it
    is small enough, and the portal marks the tasks of the sockets it sent the event to in one
    transaction (``jobs.consumers``; here all of them, as one portal process); each site's
    share of its statements. None when the model is too large: each site downloads it."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from jobs.models import ModelVersion
    from jobs.services.rounds import event_model
    from jobs.services.tasks import tasks_model_delivered

    start = ModelVersion.objects.get(job=seeded.job, round_number=number)
    if event_model(start) is None:
        return None
    event = {"job_id": seeded.job.pk, "project_id": seeded.job.project_id, "round": number}
    with CaptureQueriesContext(connection) as captured:
        moved = tasks_model_delivered([(event, a.site.pk, a.site.name) for a in seeded.agents])
    if moved != len(seeded.agents):
        raise RuntimeError(f"round {number}: {moved} of {len(seeded.agents)} tasks marked")
    count.sql["portal: training marks (the round's, all sites)"] = [
        q["sql"] for q in captured.captured_queries
    ]
    count.portal_control += control_statements(captured.captured_queries)
    return len(captured) / len(seeded.agents)


def rounds_counted(seeded: Seeded, rounds: int, kicks: Kicks) -> list[RoundCount]:
    """Every site's part in each of ``rounds`` rounds, then the worker's tasks; counted."""
    counts = []
    for number in range(rounds):
        count = RoundCount(sites=len(seeded.agents))
        marks = training_marks(seeded, number, count)
        for agent in seeded.agents:
            site_round(agent, seeded, number, count, marks)
        kicks.control = 0
        kicks.sql = []
        count.checks = kicks.run("round_updates_check_task")
        count.checks_cpu = kicks.cpu
        count.sql["worker: update checks"] = kicks.sql
        kicks.sql = []
        count.controller = kicks.run("job_advance_task")
        count.controller_cpu = kicks.cpu
        count.sql["worker: round controller"] = kicks.sql
        count.worker_control = kicks.control
        counts.append(count)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--points", type=int, default=POINTS, help="flare.log points a site reports a round"
    )
    parser.add_argument(
        "--lines", type=int, default=LINES, help="output lines a site reports a round"
    )
    parser.add_argument(
        "--show-sql",
        action="store_true",
        help="print the last round's statements: the first site's steps and the worker's tasks",
    )
    args = parser.parse_args(argv)
    import benchlib
    from benchlib import md_table
    from benchlib.portal import scratch_portal

    benchlib.print_header(
        "SQL statements per site-round (bench/site_round_statements.py)",
        f"{args.sites} sites, {args.rounds} rounds of FedAvg, a script that logs {args.points} "
        f"points and prints {args.lines} lines a round; each step of a site's round "
        "through the portal's request path, then the worker's tasks, on PostgreSQL; target "
        f"at most {PORTAL_TARGET} statements on the portal and {TOTAL_TARGET} in all per "
        "site and round.",
    )
    print(f"date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC\n", flush=True)
    with scratch_portal("statements") as tmp:
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        kicks = Kicks()
        with kicks.collecting():
            seeded = seed(tmp, sites=args.sites, rounds=args.rounds, kicks=kicks)
            seeded.points, seeded.lines = args.points, args.lines
            counts = rounds_counted(seeded, args.rounds, kicks)
    rows = []
    for step in STEPS:
        per_round = [sum(c.portal[step]) / c.sites for c in counts]
        rows.append([f"portal: {step}", *(f"{v:.1f}" for v in per_round)])
    rows.append(["**portal, per site**", *(f"**{c.portal_per_site():.1f}**" for c in counts)])
    rows.append(
        [
            f"(apart: {APART}, not in the sums)",
            *(f"{sum(c.listing) / c.sites:.1f}" for c in counts),
        ]
    )
    rows.append(
        [
            "… of which BEGIN/COMMIT/SAVEPOINT",
            *(f"{c.portal_control / c.sites:.1f}" for c in counts),
        ]
    )
    rows.append(["worker: update check", *(f"{c.checks / c.sites:.1f}" for c in counts)])
    rows.append(
        ["worker: round controller ÷ sites", *(f"{c.controller / c.sites:.1f}" for c in counts)]
    )
    rows.append(["**worker, per site**", *(f"**{c.worker_per_site():.1f}**" for c in counts)])
    rows.append(
        [
            "… of which BEGIN/COMMIT/SAVEPOINT",
            *(f"{c.worker_control / c.sites:.1f}" for c in counts),
        ]
    )
    rows.append(
        [
            "**in all, per site-round**",
            *(f"**{c.portal_per_site() + c.worker_per_site():.1f}**" for c in counts),
        ]
    )
    print(md_table(["statements", *(f"round {c + 1}" for c in range(args.rounds))], rows))
    cpu_rows = [
        ["worker: update checks", *(f"{1000 * c.checks_cpu / c.sites:.2f}" for c in counts)],
        [
            "worker: round controller ÷ sites",
            *(f"{1000 * c.controller_cpu / c.sites:.2f}" for c in counts),
        ],
    ]
    print(
        "\nThe worker's CPU time per site-round, in ms (this process; each round's uploads "
        "checked by one gathered check):\n"
    )
    print(md_table(["CPU ms", *(f"round {c + 1}" for c in range(args.rounds))], cpu_rows))
    if args.show_sql:
        for step, statements in counts[-1].sql.items():
            print(f"\n### {step}: {len(statements)}\n")
            for sql in statements:
                print(f"- `{sql[:400]}`")
    worst = max(c.portal_per_site() for c in counts[1:] or counts)
    worst_all = max(c.portal_per_site() + c.worker_per_site() for c in counts[1:] or counts)
    print(
        f"\nrounds after the first: portal at most {worst:.1f} per site-round "
        f"(target {PORTAL_TARGET}), portal and worker at most {worst_all:.1f} "
        f"(target {TOTAL_TARGET})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
