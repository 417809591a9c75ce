"""The site agent: ``python -m client_agent run``.

One asyncio loop does three things at once:

- **connection**: a WebSocket to the portal (``/ws/agent/``, signed handshake), kept open with
  heartbeats and reopened with backoff (0.5 s doubling to 30 s, with jitter) whenever the
  portal or the network goes away. What the agent must deliver — ``flare.log`` points and the
  script's output lines — waits in an outbox until the portal acknowledges it, and is sent
  again after a reconnect; the portal stores a resent item once (ids).
- **bounds**: every message fits ``client_agent.protocol.MAX_MESSAGE_BYTES`` (points and lines
  travel in separate reports, packed by size), and an output line is cut to its start and a
  marker however long it is. A report the portal refuses (an acknowledgement with an error) is
  dropped, logged and counted, never sent again, except ``slow_down``: the portal takes this
  site's output lines at a bounded rate, so line reports wait ``retry_after`` seconds (points
  go on) while the outbox's bound drops the oldest lines. A proxy that closes the socket on a
  message it finds too large (1009, or Daphne's dropped connection) halves the agent's budget
  instead of meeting the same message after every reconnect.
- **work**: whenever the portal says something changed (any event on the socket), on
  connecting, and every ``poll_seconds`` in any case, the agent lists its site's jobs over
  signed HTTP and starts what is due: a round task of an accepted, running job. Everything it
  needs to resume is on the portal, so an agent that restarts picks up the current round.
- **jobs**: one :class:`JobRunner` per job keeps the client script running for the whole job
  (the same runtime as SimEnv: a process forked from a warm fork server, Client API over a
  private Unix socket), downloads each round's global model, reports ``training``, hands the
  script its task, flushes its metrics, and uploads the update, streamed.

The agent runs only jobs its site accepted: automatically when the site's project setting
says so, otherwise after the site admin decides on the portal. What leaves the site: model
updates (the script's ``flare.send``), metrics (``flare.log`` and the update's metrics), the
script's own output lines, task states and heartbeats. Nothing else can: there is no message
for anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import shlex
import shutil
import signal
import struct
import sys
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from client_agent import __version__, forkserver
from client_agent.app_archive import BundleError, extract_app
from client_agent.portal import (
    HEADER_AGENT_VERSION,
    PortalClient,
    PortalError,
    PortalUnreachable,
    _record,
    record_outgoing,
)
from client_agent.protocol import (
    CLOSE_MESSAGE_TOO_BIG,
    ERROR_SLOW_DOWN,
    MAX_MESSAGE_BYTES,
    cut_line,
    encode,
)
from client_agent.reports import OutputTail, pack
from client_agent.runtime import ScriptFailed, ScriptProcess, Task
from client_agent.site_dir import SiteDir

log = logging.getLogger("client_agent")

AGENT_VERSION = f"fedportal-agent/{__version__}"
WS_PATH = "/ws/agent/"
JOBS_PATH = "/api/v1/agent/jobs/"
WHOAMI_PATH = "/api/v1/agent/whoami/"
CLOSE_UNAUTHENTICATED = 4401
CLOSE_REVOKED = 4403
OPEN_TASK_STATES = ("assigned", "downloaded", "training")
EXIT_REFUSED = 3
METRICS_PER_MESSAGE = 500
LOG_LINES_PER_MESSAGE = 500
FLUSH_SECONDS = 0.25
MAX_PENDING_LINES = 20_000
UPLOAD_RETRY_MAX_SECONDS = 30.0
# A server or proxy that closes on messages smaller than the agent's budget halves it, down to
# this (a cut line encodes to at most ~24 KB); a single item larger than the budget is dropped.
MIN_MESSAGE_BYTES = 64 * 1024
MAX_SLOW_DOWN_SECONDS = 60.0
# In a job's workspace: the SHA-256 of an app archive this agent refused, and why.
REJECTED_APP_FILE = "app-rejected.json"


WIRE_LOG_ENV = "FEDPORTAL_AGENT_WIRE_LOG"


class _WireLog:
    """Appends one JSON line per thing the agent sends (``--wire-log``): channel, method,
    path, size, and the body itself when it is JSON, or the tensor names and shapes when it
    is a model update. For a site admin who wants to see exactly what leaves the site."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()

    def __call__(self, channel: str, method: str, path: str, body: bytes) -> None:
        entry: dict[str, Any] = {"channel": channel, "method": method, "path": path}
        entry["bytes"] = len(body)
        if body[:1] == b"{":
            entry["json"] = json.loads(body)
        elif body:
            (length,) = struct.unpack("<Q", body[:8])
            header = json.loads(body[8 : 8 + length])
            entry["safetensors"] = {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
        with self.lock, open(self.path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")


class Refused(RuntimeError):
    """The portal will not take this site's credentials again (revoked, unknown, not
    enrolled): retrying cannot help, so the agent stops."""


def _brings_work(event: dict[str, Any]) -> bool:
    """Whether an event may mean new work: a round opened, or a job changed state (offered,
    started, ended). Task events echo what this agent itself just did, and listing the jobs
    after each would only load the portal."""
    kind = event.get("kind")
    return kind == "job.state" or (kind == "round.state" and event.get("state") == "open")


class Agent:
    def __init__(
        self,
        site_dir: SiteDir,
        *,
        poll_seconds: float = 10.0,
        reconnect_max_seconds: float = 30.0,
        python: str = sys.executable,
        say: Callable[[str], None] | None = None,
        insecure: bool = False,
    ) -> None:
        self.site_dir = site_dir
        self.identity = site_dir.identity()
        self.client = PortalClient(
            self.identity.portal,
            key=site_dir.key(),
            fingerprint=self.identity.fingerprint,
            agent_version=AGENT_VERSION,
            insecure=insecure,
        )
        self.poll_seconds = poll_seconds
        self.reconnect_max_seconds = reconnect_max_seconds
        self.python = python
        self._say = say or (lambda text: print(text, flush=True))
        self.runners: dict[str, JobRunner] = {}
        self.session = secrets.token_hex(4)
        self._seq = 0
        # Outbox: every message with an id stays in ``pending`` until acknowledged.
        self.pending: dict[str, dict[str, Any]] = {}
        self.unsent: deque[str] = deque()
        self.pending_lines = 0  # output lines queued in ``pending``
        # What never reached the portal: dropped from the outbox past its bound, refused by
        # the portal, or too large for any message.
        self.dropped_lines = 0
        self.dropped_points = 0
        self.refused_messages = 0  # refused by the portal, or too large to send
        self.message_budget = MAX_MESSAGE_BYTES
        self.in_flight: set[str] = set()  # sent on this socket, not yet acknowledged
        self.hold_lines_until = 0.0  # loop time; the portal asked for line reports to wait
        self.large_losses = 0  # sockets lost with a large message in flight, since a shrink
        self.ws: Any = None
        self.refused: str | None = None
        self._announced: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stopping = asyncio.Event()
        self.wake = asyncio.Event()
        self.outbox_ready = asyncio.Event()
        self.acked = asyncio.Condition()
        wire_log = os.environ.get(WIRE_LOG_ENV)
        if wire_log:
            record_outgoing(_WireLog(Path(wire_log)))

    # -- lifecycle --------------------------------------------------------------------------

    def say(self, text: str) -> None:
        self._say(f"[{self.identity.site}] {text}")

    async def run(self) -> int:
        """Run until SIGINT/SIGTERM (exit 0) or until the portal refuses the site (exit 3)."""
        self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            # Not on every platform, nor outside the main thread (tests): Ctrl-C still ends it.
            with contextlib.suppress(NotImplementedError, RuntimeError):
                self.loop.add_signal_handler(sig, self.stopping.set)
        # Warm the fork server beside connecting (torch imports meanwhile), so the first
        # round's script starts in a fork rather than a cold interpreter.
        warming = (
            asyncio.create_task(asyncio.to_thread(forkserver.get_server))
            if self.python == sys.executable
            else None
        )
        self.say(
            f"agent {AGENT_VERSION} for project {self.identity.project}, portal {self.client.url}"
        )
        tasks = [
            asyncio.create_task(self._connection_loop(), name="connection"),
            asyncio.create_task(self._work_loop(), name="work"),
            asyncio.create_task(self._flush_loop(), name="flush"),
        ]
        await self.stopping.wait()
        if warming is not None:
            with contextlib.suppress(Exception):  # a failed start shows when a script runs
                await warming
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._stop_runners(grace=5.0)
        if self.refused:
            self.say(f"stopped: the portal refuses this site: {self.refused}")
            return EXIT_REFUSED
        self.say("stopped")
        return 0

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the agent runs in: :meth:`run`'s, or that of its first caller. Threads
        that run a round's blocking work hand messages to it."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def stop(self) -> None:
        self.stopping.set()

    def _refuse(self, reason: str) -> None:
        self.refused = reason
        self.stopping.set()

    async def _stop_runners(self, grace: float) -> None:
        runners, self.runners = list(self.runners.values()), {}
        await asyncio.gather(*(r.finish(grace=grace) for r in runners), return_exceptions=True)

    # -- outbox -----------------------------------------------------------------------------

    def next_id(self, prefix: str) -> str:
        self._seq += 1
        return f"{prefix}:{self.session}:{self._seq}"

    def enqueue(self, message: dict[str, Any]) -> str:
        """Queue a message for the portal (loop thread only); returns its id.

        While the portal is away the outbox grows; past ``MAX_PENDING_LINES`` output lines the
        oldest reports that hold only lines are dropped (metrics never are) and the agent's log
        says how many went, so a chatty script cannot fill the site's memory.
        """
        message_id = str(message.setdefault("id", self.next_id(message["type"])))
        self.pending[message_id] = message
        self.unsent.append(message_id)
        self.pending_lines += len(message.get("lines") or ())
        if self.pending_lines > MAX_PENDING_LINES:
            self._drop_oldest_lines()
        self.outbox_ready.set()
        return message_id

    def _drop_oldest_lines(self) -> None:
        dropped = 0
        for old_id in list(self.pending):
            if self.pending_lines <= MAX_PENDING_LINES // 2:
                break
            old = self.pending[old_id]
            if old.get("type") == "report" and not old.get("points") and old.get("lines"):
                self._forget(old_id)
                dropped += len(old["lines"])
        if dropped:
            self.dropped_lines += dropped
            log.warning("the portal is away or slow: dropped %s queued output lines", dropped)

    def enqueue_report(self, job: str, key: str, items: list[Any], most: int) -> list[str]:
        """Queue ``items`` (``points`` or ``lines``) of ``job`` as reports, each message within
        the budget; returns their ids. An item too large for any message is dropped, counted
        and logged."""
        envelope = {"type": "report", "job": job}
        batches, too_large = pack(
            items, envelope=envelope, key=key, most=most, budget=self.message_budget
        )
        if too_large:
            self._count_dropped(key, len(too_large))
            log.warning(
                "job %s: %s %s too large for a message of %s bytes; dropped",
                job,
                len(too_large),
                key,
                self.message_budget,
            )
        return [self.enqueue({**envelope, key: batch}) for batch in batches]

    def _count_dropped(self, key: str, n: int) -> None:
        if key == "points":
            self.dropped_points += n
        else:
            self.dropped_lines += n

    def _forget(self, message_id: str) -> dict[str, Any] | None:
        """Take a message out of the outbox (acknowledged, or dropped)."""
        self.in_flight.discard(message_id)
        sent = self.pending.pop(message_id, None)
        if sent is not None:
            self.pending_lines -= len(sent.get("lines") or ())
        return sent

    def _connection_lost(self, code: int | None) -> None:
        """The socket closed with messages sent and not answered. A server closes on a message
        over its size cap, with code 1009 or (Daphne: autobahn's ``failByDrop``) by dropping
        the connection with no close frame at all; sending the same message after every
        reconnect would loop for ever. So: on 1009, or on the second drop with a message over
        ``MIN_MESSAGE_BYTES`` in flight, the budget goes below the largest such message and
        what waits is split to fit."""
        sizes = [len(encode(self.pending[i])) for i in self.in_flight if i in self.pending]
        largest = max(sizes, default=0)
        if code == CLOSE_MESSAGE_TOO_BIG or (code is None and largest > MIN_MESSAGE_BYTES):
            self.large_losses += 1
            if code == CLOSE_MESSAGE_TOO_BIG or self.large_losses >= 2:
                self.large_losses = 0
                self._shrink_messages(below=largest or self.message_budget)

    def _shrink_messages(self, below: int) -> None:
        """Halve the budget (and keep it under ``below`` bytes, the message that failed), then
        split every waiting report to fit. An item too large even then is dropped and counted.

        A split report gets new ids; whoever waits for the old one's acknowledgement stops
        waiting, as for a dropped one."""
        self.message_budget = max(
            MIN_MESSAGE_BYTES, min(self.message_budget // 2, below // 2, MAX_MESSAGE_BYTES)
        )
        log.warning(
            "the portal dropped the socket on a large message; messages now at most %s bytes",
            self.message_budget,
        )
        pending: dict[str, dict[str, Any]] = {}
        for message_id, message in self.pending.items():
            key = "lines" if message.get("lines") else "points"
            items = message.get(key) or []
            if not items or len(encode(message)) <= self.message_budget:
                pending[message_id] = message
                continue
            envelope = {"type": message["type"], "job": message.get("job")}
            batches, too_large = pack(
                items, envelope=envelope, key=key, most=len(items), budget=self.message_budget
            )
            self._count_dropped(key, len(too_large))
            if key == "lines":
                self.pending_lines -= len(too_large)
            for batch in batches:
                new_id = self.next_id("report")
                pending[new_id] = {**envelope, "id": new_id, key: batch}
        self.pending = pending

    async def wait_acked(self, ids: list[str], timeout: float) -> bool:
        """Wait until the portal acknowledged ``ids`` (True), or ``timeout`` passed (False)."""

        def done() -> bool:
            return not any(i in self.pending for i in ids)

        async with self.acked:
            try:
                await asyncio.wait_for(self.acked.wait_for(done), timeout)
            except TimeoutError:
                return False
        return True

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            for runner in list(self.runners.values()):
                runner.flush()

    # -- connection -------------------------------------------------------------------------

    async def _connection_loop(self) -> None:
        delay = 0.5
        while True:
            url = self.client.websocket_url(WS_PATH)
            headers = self.client.signed_headers("GET", WS_PATH)
            headers[HEADER_AGENT_VERSION] = AGENT_VERSION
            _record("ws", "GET", WS_PATH, b"")
            try:
                async with websockets.connect(
                    url,
                    additional_headers=headers,
                    open_timeout=10,
                    ping_interval=20,
                    ping_timeout=20,
                    max_size=1 << 22,
                ) as ws:
                    first = json.loads(await ws.recv())
                    if first.get("type") != "welcome":
                        await self._refused_at_handshake(first)
                        return
                    delay = 0.5
                    self.say(f"connected to {self.client.url} as site {first.get('site')}")
                    await self._session(ws, float(first.get("heartbeat_seconds") or 15))
            except asyncio.CancelledError:
                raise
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else None
                self._connection_lost(code)
                if code in (CLOSE_REVOKED, CLOSE_UNAUTHENTICATED):
                    await self._check_credentials(exc.rcvd.reason if exc.rcvd else "")
                    if self.refused:
                        return
                self.say(f"connection to the portal lost ({exc}); reconnecting")
            except (OSError, InvalidHandshake, TimeoutError, ValueError) as exc:
                self.say(
                    f"portal unreachable ({type(exc).__name__}: {exc}); retry in {delay:.1f} s"
                )
            finally:
                self.ws = None
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.reconnect_max_seconds)

    async def _refused_at_handshake(self, first: dict[str, Any]) -> None:
        code, message = first.get("code", "?"), first.get("message", "")
        if code in ("signature_expired",):
            raise ValueError(f"refused: {message} (check this machine's clock)")
        await self._check_credentials(f"{code}: {message}")
        if not self.refused:
            raise ValueError(f"refused: {code}: {message}")

    async def _check_credentials(self, hint: str) -> None:
        """Ask over HTTP why the socket was refused; stop for good if the site is refused."""
        try:
            await asyncio.to_thread(self.client.get, WHOAMI_PATH)
        except PortalError as exc:
            if exc.refused_for_good:
                self._refuse(f"{exc.code}: {exc.message}")
        except PortalUnreachable:
            pass
        if not self.refused and hint:
            log.info("socket closed by the portal: %s", hint)

    async def _session(self, ws: Any, heartbeat_seconds: float) -> None:
        self.ws = ws
        # Everything not acknowledged goes again, in order: the portal stores it once.
        self.unsent = deque(self.pending)
        self.in_flight.clear()
        self.outbox_ready.set()
        self.wake.set()
        reader = asyncio.create_task(self._reader(ws))
        writer = asyncio.create_task(self._writer(ws))
        beat = asyncio.create_task(self._heartbeat(ws, heartbeat_seconds))
        try:
            done, _ = await asyncio.wait(
                {reader, writer, beat}, return_when=asyncio.FIRST_EXCEPTION
            )
            for task in done:
                task.result()  # re-raise what ended the session
        finally:
            for task in (reader, writer, beat):
                task.cancel()
            await asyncio.gather(reader, writer, beat, return_exceptions=True)

    async def _reader(self, ws: Any) -> None:
        async for raw in ws:
            message = json.loads(raw)
            kind = message.get("type")
            if kind == "event":
                event = message.get("event") or {}
                if self._start_round_from(event):
                    continue
                if _brings_work(event):
                    self.wake.set()
            elif kind == "ack":
                self._acknowledged(str(message.get("id")), message.get("error"))
                async with self.acked:
                    self.acked.notify_all()
            elif kind == "error":
                log.info("portal says: %s", message)

    def _acknowledged(self, message_id: str, error: Any) -> None:
        """The portal answered a message: stored (no error), to be sent again later
        (``slow_down``), or refused for good: then it is dropped, counted and logged, and never
        sent again."""
        if not isinstance(error, dict):
            self._forget(message_id)
            return
        if error.get("code") == ERROR_SLOW_DOWN and message_id in self.pending:
            try:
                wait = min(float(error.get("retry_after") or 1.0), MAX_SLOW_DOWN_SECONDS)
            except (TypeError, ValueError):
                wait = 1.0
            self.hold_lines_until = max(self.hold_lines_until, self.loop.time() + wait)
            log.info("the portal asks output lines to wait %.1f s (sent too fast)", wait)
            self.in_flight.discard(message_id)
            # Back in the queue, in its place: the outbox's order is the order lines were read.
            queued = set(self.unsent) | {message_id}
            self.unsent = deque(i for i in self.pending if i in queued)
            self.outbox_ready.set()
            return
        self._drop(
            message_id, f"the portal refused it ({error.get('code')}: {error.get('message')})"
        )

    def _drop(self, message_id: str, why: str) -> None:
        """Drop a message for good: counted, and said, since what it held never arrives."""
        sent = self._forget(message_id)
        if sent is None:
            return
        self.refused_messages += 1
        for key in ("points", "lines"):
            self._count_dropped(key, len(sent.get(key) or ()))
        self.say(
            f"a {sent['type']} for job {sent.get('job')} is dropped: {why} "
            f"({self.refused_messages} dropped so far)"
        )

    def _start_round_from(self, event: dict[str, Any]) -> bool:
        """A round opened for a job this agent already runs: start its task from the event,
        without listing the jobs first (a round trip on every round's critical path).

        The event reaches only sites with a task in the round. Whatever the event lacks, the
        regular listing (wake, or the poll) finds.
        """
        runner = self.runners.get(str(event.get("job_uid")))
        task = event.get("task")
        if (
            event.get("kind") != "round.state"
            or event.get("state") != "open"
            or runner is None
            or not isinstance(task, dict)
            or not isinstance(event.get("round"), int)
        ):
            return False
        number = event["round"]
        base = f"{JOBS_PATH}{runner.uid}/rounds/{number}/"
        runner.offer(
            {
                "round": number,
                "state": "assigned",
                "task": task,
                "model_url": f"{base}model/",
                "status_url": f"{base}status/",
                "update_url": f"{base}update/",
            }
        )
        return True

    async def _writer(self, ws: Any) -> None:
        while True:
            await self.outbox_ready.wait()
            self.outbox_ready.clear()
            while self.unsent:
                message_id = self._next_to_send()
                if message_id is None:  # only output lines wait, and the portal asked to wait
                    with contextlib.suppress(TimeoutError):
                        held = self.hold_lines_until - self.loop.time()
                        await asyncio.wait_for(self.outbox_ready.wait(), held)
                    self.outbox_ready.clear()
                    continue
                message = self.pending.get(message_id)
                if message is None:
                    continue
                data = encode(message)
                if len(data) > self.message_budget:  # never made so; a last guard
                    self._drop(message_id, f"{len(data)} bytes, over {self.message_budget}")
                    continue
                _record("ws", "SEND", WS_PATH, data.encode())
                self.in_flight.add(message_id)
                await ws.send(data)

    def _next_to_send(self) -> str | None:
        """The next message to send: the oldest, or while the portal asked line reports to
        wait, the oldest other one (None if there is none)."""
        if self.loop.time() >= self.hold_lines_until:
            return self.unsent.popleft()
        for index, message_id in enumerate(self.unsent):
            message = self.pending.get(message_id)
            if message is None or not message.get("lines"):
                del self.unsent[index]
                return message_id
        return None

    async def _heartbeat(self, ws: Any, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            data = json.dumps({"type": "heartbeat"})
            _record("ws", "SEND", WS_PATH, data.encode())
            await ws.send(data)

    # -- work -------------------------------------------------------------------------------

    async def _work_loop(self) -> None:
        while True:
            # Connected, the portal says when there is work; the listing every few polls is
            # only a safety net then (50 agents polling every 10 s keep a portal busy).
            wait = self.poll_seconds * (1 if self.ws is None else 3)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), wait)
            self.wake.clear()
            try:
                await self.sync()
            except PortalUnreachable as exc:
                log.info("cannot list jobs: %s", exc)
            except PortalError as exc:
                if exc.refused_for_good:
                    self._refuse(f"{exc.code}: {exc.message}")
                    return
                self.say(f"cannot list jobs: {exc}")

    async def sync(self) -> None:
        """Start what is due: one round task per accepted running job; end finished jobs."""
        jobs = await asyncio.to_thread(self.client.get, JOBS_PATH)
        active = set()
        for job in jobs:
            uid = str(job["uid"])
            active.add(uid)
            if job["decision"] == "pending" and uid not in self._announced:
                self._announced.add(uid)
                self.say(
                    f"job {job['name']} ({uid}) offered; it runs here once the site accepts it "
                    "(automatically, if the site's setting says so, or by its admin on the portal)"
                )
            if job["decision"] != "accepted" or job["state"] != "running":
                continue
            task = job.get("current_task")
            if task and task["state"] in OPEN_TASK_STATES:
                runner = self.runners.get(uid)
                if runner is None:
                    runner = self.runners[uid] = JobRunner(self, job)
                runner.offer(task)
        for uid in [u for u in self.runners if u not in active]:
            runner = self.runners.pop(uid)
            asyncio.create_task(runner.finish(grace=10.0))


class JobRunner:
    """One job at this site: its workspace, its long-lived client script, its rounds."""

    def __init__(self, agent: Agent, job: dict[str, Any]) -> None:
        self.agent = agent
        self.uid = str(job["uid"])
        self.name = str(job["name"])
        self.num_rounds = int(job["num_rounds"])
        self.spec_url = str(job["spec_url"])
        self.bundle_url = str(job["bundle_url"])
        self.workspace = agent.site_dir.job_path(self.uid)
        self.proc: ScriptProcess | None = None
        self.current: asyncio.Task[None] | None = None
        self.current_round: int | None = None
        self.finished_round: int | None = None
        self.points: list[dict[str, Any]] = []
        self.points_lock = threading.Lock()
        self.point_seq = 0
        # The script's output: each line's id is its byte offset in the log, so lines sent
        # again after a restart are stored once.
        self.output = OutputTail(self.workspace / "log.txt")

    @property
    def client(self) -> PortalClient:
        return self.agent.client

    def offer(self, task: dict[str, Any]) -> None:
        number = int(task["round"])
        if self.current is not None and not self.current.done():
            return  # busy with a round; the portal moves on only after it answers or closes
        if number == self.finished_round:
            return  # uploaded; the portal has not yet marked it
        self.current = asyncio.create_task(self._round(task), name=f"{self.uid}:{number}")

    # -- one round --------------------------------------------------------------------------

    async def _round(self, task: dict[str, Any]) -> None:
        number = int(task["round"])
        self.current_round = number
        try:
            await asyncio.to_thread(self._prepare)
            models = self.workspace / "models"
            model_path = models / f"round-{number:03d}.safetensors"
            # The script gets its task as soon as the model is in: the portal marks the task
            # training with the download (one report fewer a round).
            model_url = task["model_url"] + "?then=training"
            await asyncio.to_thread(self.client.download, model_url, model_path)
            spec = task.get("task") or {}
            result_path = self.workspace / "updates" / f"round-{number + 1:03d}.safetensors"
            result_path.parent.mkdir(parents=True, exist_ok=True)
            script_task = Task(
                task_id=f"{self.uid}:{number}",
                task_name=str(spec.get("task_name", "train")),
                model_path=str(model_path),
                result_path=str(result_path),
                current_round=number,
                total_rounds=int(spec.get("total_rounds", self.num_rounds)),
                start_round=int(spec.get("start_round", 0)),
                meta=dict(spec.get("meta") or {}),
            )
            assert self.proc is not None
            proc = self.proc
            path = await asyncio.to_thread(proc.run_task, script_task, on_log=self._on_log)
            # Metrics first: all of the round's points are stored before its update counts.
            ids = self.flush()
            if ids and self.agent.ws is not None:
                await self.agent.wait_acked(ids, timeout=10.0)
            await self._upload(task["update_url"], path, number)
            self.finished_round = number
            self.agent.say(f"job {self.name}: round {number + 1}/{self.num_rounds} update sent")
            model_path.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
        except ScriptFailed as exc:
            await self._fail(task, f"client script {exc.reason}", exc.log_tail)
        except BundleError as exc:
            await self._fail(task, f"the job's app cannot run here: {exc}", "")
        except PortalUnreachable as exc:
            self.agent.say(
                f"job {self.name}: round {number + 1}: portal unreachable ({exc}); will retry"
            )
        except PortalError as exc:
            if exc.status == 409:  # answered already, or the round closed meanwhile
                self.agent.say(f"job {self.name}: round {number + 1}: {exc.message}")
                self.finished_round = number
            else:
                self.agent.say(f"job {self.name}: round {number + 1}: {exc}")
        except Exception as exc:
            # Anything else is a fault at this site: the round fails here, once, with the
            # reason, rather than the task being offered (and failing) again on every poll.
            log.exception("job %s: round %s", self.uid, number + 1)
            await self._fail(task, f"the agent failed: {type(exc).__name__}: {exc}", "")
        finally:
            self.flush()

    async def _upload(self, url: str, path: Path, number: int) -> None:
        """Send the round's update until the portal takes it (or refuses it for good).

        A portal that is away (restarting, unreachable) or cannot keep it now (507: its disk is
        full; 5xx; 429) gets the same file again after a pause (1 s, doubling to 30 s): the
        script's work is not redone, and the task is still open for it. A 4xx other than 429
        (409 included: answered already, or the round closed) ends the tries; the caller
        handles it. Cancelled with the round when the job ends.
        """
        pause = 1.0
        while True:
            try:
                await asyncio.to_thread(self.client.upload, url, path)
                return
            except PortalUnreachable as exc:
                why = f"portal unreachable ({exc})"
            except PortalError as exc:
                if exc.status < 500 and exc.status != 429:
                    raise
                why = str(exc)
            self.agent.say(
                f"job {self.name}: round {number + 1}: update not taken: {why}; "
                f"sending it again in {pause:.0f} s"
            )
            await asyncio.sleep(pause * random.uniform(0.8, 1.2))
            pause = min(pause * 2, UPLOAD_RETRY_MAX_SECONDS)

    async def _fail(self, task: dict[str, Any], reason: str, log_tail: str) -> None:
        self.agent.say(f"job {self.name}: round {int(task['round']) + 1} failed: {reason}")
        self._agent_line(f"round {int(task['round']) + 1} failed: {reason}")
        proc, self.proc = self.proc, None  # a new script process next round
        if proc is not None:
            await asyncio.to_thread(proc.stop, grace=0)
        with contextlib.suppress(PortalError, PortalUnreachable):
            await asyncio.to_thread(
                self.client.post, task["status_url"], {"state": "failed", "reason": reason}
            )
        self.finished_round = int(task["round"])

    def _prepare(self) -> None:
        """First round of the job here (or after a restart): fetch the app, start the script.

        An archive this agent refused (``BundleError``: it lies about its contents, or cannot
        be unpacked safely) is remembered in the job's workspace with its SHA-256, so every
        later round of the job fails at once with the same reason instead of fetching it again.
        """
        if self.proc is not None:
            return
        rejected = self.workspace / REJECTED_APP_FILE
        if rejected.exists():
            raise BundleError(json.loads(rejected.read_text())["reason"])
        app = self.workspace / "app"
        spec_path = self.workspace / "spec.json"
        if not (app.is_dir() and spec_path.exists()):
            info = self.client.get(self.spec_url)
            spec = info["spec"]
            archive = self.workspace / "app.zip"
            self.workspace.mkdir(parents=True, exist_ok=True)
            digest = self.client.download(self.bundle_url, archive)
            if info.get("app_sha256") and digest != info["app_sha256"]:
                raise PortalUnreachable("the app archive does not match its SHA-256")
            shutil.rmtree(app, ignore_errors=True)
            try:
                extract_app(archive, app, str(spec["train_script"]))
            except BundleError as exc:
                rejected.write_text(json.dumps({"sha256": digest, "reason": str(exc)}))
                raise
            finally:
                archive.unlink(missing_ok=True)
            spec_path.write_text(json.dumps(spec, indent=2))
        spec = json.loads(spec_path.read_text())
        work = self.workspace / "work"
        proc = ScriptProcess(
            script=app / spec["train_script"],
            args=shlex.split(spec.get("train_args", "")),
            site_name=self.agent.identity.site,
            job_id=self.uid,
            workdir=work,
            log_path=self.workspace / "log.txt",
            python=self.agent.python,
        )
        proc.start()
        self.proc = proc
        self.agent.say(f"job {self.name}: started {spec['train_script']} (pid {proc.pid})")
        self._agent_line(f"started {spec['train_script']} for {self.agent.identity.site}")

    # -- metrics and log lines --------------------------------------------------------------

    def _on_log(self, message: dict[str, Any]) -> None:
        """A ``flare.log`` point from the script (called in the round's thread)."""
        point = {
            "key": message.get("key"),
            "value": message.get("value"),
            "step": message.get("step"),
            "round": message.get("round", self.current_round),
        }
        with self.points_lock:
            self.point_seq += 1
            point["id"] = f"{self.agent.session}:{self.point_seq}"
            self.points.append(point)

    def _agent_line(self, text: str) -> None:
        line = {"stream": "agent", "text": cut_line(text), "round": self.current_round}
        self.agent.loop.call_soon_threadsafe(
            self.agent.enqueue, {"type": "report", "job": self.uid, "lines": [line]}
        )

    def flush(self, final: bool = False) -> list[str]:
        """Queue the points and new output lines gathered so far (loop thread); the ids of
        the reports holding points.

        Points and lines travel in separate reports: the portal may ask line reports to wait
        (``slow_down``), and a round's points must not wait behind them. ``final``: the
        script has ended, so a last line without a newline is sent too."""
        with self.points_lock:
            points, self.points = self.points, []
        ids = self.agent.enqueue_report(self.uid, "points", points, METRICS_PER_MESSAGE)
        lines = [
            {"id": f"o{start}", "stream": "script", "text": text, "round": self.current_round}
            for start, text in self.output.read(final=final)
        ]
        self.agent.enqueue_report(self.uid, "lines", lines, LOG_LINES_PER_MESSAGE)
        return ids

    async def finish(self, grace: float) -> None:
        """The job ended (or the agent stops): end the script, send its last lines."""
        if self.current is not None and not self.current.done():
            self.current.cancel()
        proc, self.proc = self.proc, None
        if proc is not None:
            await asyncio.to_thread(proc.stop, grace=grace)
            self.agent.say(f"job {self.name}: finished; script stopped")
        # All of its output, not the next read's worth: this runner reads no more after this.
        while True:
            read = self.output.offset
            self.flush(final=True)
            if self.output.offset == read:
                break
