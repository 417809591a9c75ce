"""The site agent: ``python -m client_agent run``.

One asyncio loop does three things at once:

- **connection**: a WebSocket to the portal (``/ws/agent/``, signed handshake), kept open with
  heartbeats and reopened with backoff (:func:`reconnect_delay`: full jitter, the window
  1 s doubling to 30 s) whenever the
  portal or the network goes away. What the agent must deliver — ``flare.log`` points and the
  script's output lines — waits in an outbox (``client_agent.outbox``) until the portal
  acknowledges it, and is sent again after a reconnect; the portal stores a resent item once
  (ids). The messages themselves are typed in ``client_agent.protocol``.
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
  private Unix socket), takes the model of each round's task from the round's event when it
  came with it (a small global model, checked against its SHA-256) or else downloads it (the
  global model, or the checkpoint the round's plan names) with ``training`` reported by the
  download, hands the script its task (train, validate or submit_model, with its round counts
  and meta), flushes its metrics, and sends the script's answer (for validate, metrics
  alone): on the socket when the portal's welcome takes an update that size (a small model;
  no signed HTTP request to check), otherwise, or when the socket goes before the portal
  answers, uploaded over HTTP, streamed.

The agent runs only jobs its site accepted: automatically when the site's project setting
says so, otherwise after the site admin decides on the portal. What leaves the site: model
updates (the script's ``flare.send``), metrics (``flare.log`` and the update's metrics), the
script's own output lines, task states and heartbeats, and the site's privacy policy with its
spending. Nothing else can: there is no message for anything else.

**privacy**: the site's own policy (``privacy.toml``, read at start with the ledger of what it
has spent; a bad one stops the agent before it connects) rules every round. A round of a job
the policy refuses, or one whose release would pass a budget, is declined before the script
sees it (the portal is told why, with the spend so far). Otherwise the script's answer is
released through :func:`client_agent.privacy.release.release_result` (counted, clipped,
noised, excluded tensors dropped, size checked) and only that file is uploaded, the same bytes
on every try and after a restart. With ``send_lines = false`` the script's output lines stay
in its log at the site, and a failure's reason carries nothing the script wrote.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import ssl
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from client_agent import __version__, forkserver
from client_agent.app_archive import BundleError, extract_app
from client_agent.outbox import Outbox
from client_agent.portal import (
    AppArchiveMismatch,
    PortalClient,
    PortalError,
    PortalUnreachable,
    RoundClosed,
    WireRecorder,
)
from client_agent.privacy.enforce import PrivacyRefusal
from client_agent.privacy.ledger import PrivacyLedger
from client_agent.privacy.policy import PrivacyPolicy
from client_agent.privacy.release import (
    enforced_path,
    json_report,
    policy_summary,
    release_result,
    round_refusal,
)
from client_agent.protocol import (
    CLOSE_REVOKED,
    CLOSE_UNAUTHENTICATED,
    ERROR_TOO_LARGE,
    HEADER_AGENT_VERSION,
    WS_PATH,
    Ack,
    ErrorBody,
    ErrorMessage,
    Event,
    Heartbeat,
    PortalMessage,
    Report,
    UpdateMessage,
    Welcome,
    cut_line,
    encode,
    parse_portal_message,
)
from client_agent.reports import OutputTail
from client_agent.runtime import ScriptFailed, ScriptProcess, Task
from client_agent.secagg.session import ProtocolError
from client_agent.secagg.vector import UpdateShapeError
from client_agent.secure_round import SecureRound, SecureRoundOut, secure_kind
from client_agent.site_dir import SiteDir
from common.rounds import round_for_people

log = logging.getLogger("client_agent")

AGENT_VERSION = f"fedportal-agent/{__version__}"
JOBS_PATH = "/api/v1/agent/jobs/"
WHOAMI_PATH = "/api/v1/agent/whoami/"
PRIVACY_POLICY_PATH = "/api/v1/agent/privacy-policy/"
OPEN_TASK_STATES = ("assigned", "downloaded", "training")
EXIT_REFUSED = 3
METRICS_PER_MESSAGE = 500
LOG_LINES_PER_MESSAGE = 500
FLUSH_SECONDS = 0.25
UPLOAD_RETRY_MAX_SECONDS = 30.0
# How long an update sent on the socket waits for the portal's answer before it goes over HTTP
# instead (the portal stores one update per task: if the first did arrive, HTTP hears so).
UPDATE_ANSWER_SECONDS = 30.0
# In a job's workspace: the SHA-256 of an app archive this agent refused, and why.
REJECTED_APP_FILE = "app-rejected.json"


def _without_script_text(reason: str) -> str:
    """A script failure's reason without anything the script itself wrote (an exception's
    text, a name it chose), for a site whose privacy policy keeps script output here."""
    return re.sub(r"'[^']*'|\"[^\"]*\"", "…", reason.split(":", 1)[0])


# The agent's wait for the portal's WebSocket handshake: the portal's own limit, Daphne's
# --websocket_connect_timeout as fedportal.server sets it.
HANDSHAKE_TIMEOUT_SECONDS = 30.0


def event_model_write(model: dict[str, Any], dest: Path) -> str | None:
    """Write the model a round's event brought (``{"sha256", "size", "data"}``, the bytes in
    base64) to ``dest``, replaced only when complete; None when written, else why not (the
    caller then downloads it): what came must have the size and SHA-256 it names."""
    try:
        data = base64.b64decode(str(model.get("data", "")), validate=True)
    except (binascii.Error, ValueError) as exc:
        return f"the model in the round's event is not base64 ({exc})"
    if len(data) != model.get("size"):
        return (
            f"the model in the round's event has {len(data)} bytes where it names "
            f"{model.get('size')!r}"
        )
    if hashlib.sha256(data).hexdigest() != str(model.get("sha256", "")).lower():
        return "the model in the round's event does not match its SHA-256"
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    partial.write_bytes(data)
    os.replace(partial, dest)
    return None


def _read_if_at_most(path: Path, most: int) -> bytes | None:
    """The file's bytes if it holds at most ``most``; None otherwise (read no further)."""
    with open(path, "rb") as fh:
        data = fh.read(most + 1)
    return data if len(data) <= most else None


def reconnect_delay(
    attempt: int, *, base: float = 1.0, cap: float = 30.0, rng: random.Random | None = None
) -> float:
    """Seconds to wait before reconnecting after ``attempt`` failed tries in a row (0: the
    connection was just lost): uniform in ``[0, min(cap, base * 2**attempt)]``, "full jitter".

    When a portal restarts, every agent it served loses its socket at the same moment. With
    a fixed delay and a little jitter they all came back within a few tenths of a second,
    hundreds of signed handshakes at once; spread over the whole window they arrive at an
    even rate, and the window doubles while the portal stays away.
    """
    window = min(cap, base * 2 ** min(attempt, 32))
    return (rng or random).uniform(0.0, window)


def jittered(seconds: float, *, rng: random.Random | None = None) -> float:
    """``seconds``, give or take a fifth at random: for what an agent does every so often
    (heartbeats, the safety listing, a retry). Agents that connected together (after a
    portal restart, or at a job's start) would otherwise send it together each time: a
    hundred listings in the same tenth of a second, every 30 s, in the middle of a round."""
    return seconds * (rng or random).uniform(0.8, 1.2)


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
        wire: WireRecorder | None = None,
    ) -> None:
        """``wire``: shown everything the agent sends (``run --wire-log``, tests).

        Reads the site's privacy policy and ledger first: a policy that cannot be enforced
        (:class:`~client_agent.privacy.policy.PolicyError`) or a damaged ledger
        (:class:`~client_agent.privacy.ledger.LedgerDamaged`) stops the agent before it
        connects."""
        self.site_dir = site_dir
        self.policy = PrivacyPolicy.in_folder(site_dir.path)
        self.ledger = PrivacyLedger.in_folder(site_dir.path)
        self.identity = site_dir.identity()
        self.client = PortalClient(
            self.identity.portal,
            key=site_dir.key(),
            fingerprint=self.identity.fingerprint,
            agent_version=AGENT_VERSION,
            insecure=insecure,
            wire=wire,
            ca_file=site_dir.tls_ca_file(),
        )
        self.poll_seconds = poll_seconds
        self.reconnect_max_seconds = reconnect_max_seconds
        self.python = python
        self._say = say or (lambda text: print(text, flush=True))
        self.runners: dict[str, JobRunner] = {}
        self.session = secrets.token_hex(4)
        self.outbox = Outbox(session=self.session, say=self.say)
        self.ws: Any = None
        # The largest update the portal takes on this connection's socket (its welcome; 0:
        # every update over HTTP), and the updates sent there that wait for its answer.
        self.update_max_bytes = 0
        self.update_answers: dict[str, asyncio.Future[Ack | None]] = {}
        self.refused: str | None = None
        self._announced: set[str] = set()
        # Whether this connection's first listing was followed by the policy's report: the
        # portal learns the policy (and the project's spend) after every (re)connection.
        self._policy_reported = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stopping = asyncio.Event()
        self.wake = asyncio.Event()
        self.outbox_ready = asyncio.Event()
        self.acked = asyncio.Condition()

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
        trust = f" (TLS verified with {self.client.trust_source})" if self.client.tls else ""
        self.say(
            f"agent {AGENT_VERSION} for project {self.identity.project}, portal "
            f"{self.client.url}{trust}"
        )
        self.say(policy_summary(self.policy))
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

    def enqueue(self, report: Report) -> str:
        """Queue a report for the portal (loop thread only); returns its id."""
        report_id = self.outbox.enqueue(report)
        self.outbox_ready.set()
        return report_id

    def enqueue_report(self, job: str, key: str, items: list[Any], most: int) -> list[str]:
        """Queue ``items`` (``points`` or ``lines``) of ``job`` as reports within the message
        budget (:meth:`Outbox.enqueue_items`); returns their ids."""
        ids = self.outbox.enqueue_items(job, key, items, most)
        if ids:
            self.outbox_ready.set()
        return ids

    async def wait_acked(self, ids: list[str], timeout: float) -> bool:
        """Wait until the portal acknowledged ``ids`` (True), or ``timeout`` passed (False)."""
        async with self.acked:
            try:
                await asyncio.wait_for(
                    self.acked.wait_for(lambda: self.outbox.delivered(ids)), timeout
                )
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
        attempt = 0
        while True:
            delay = reconnect_delay(attempt, cap=self.reconnect_max_seconds)
            url = self.client.websocket_url(WS_PATH)
            headers = self.client.signed_headers("GET", WS_PATH)
            headers[HEADER_AGENT_VERSION] = AGENT_VERSION
            self.client.record("ws", "GET", WS_PATH, b"")
            try:
                # The same verification as every HTTPS request (PortalClient.tls).
                async with websockets.connect(
                    url,
                    ssl=self.client.tls,
                    additional_headers=headers,
                    # As long as the portal gives a handshake (fedportal.server): when hundreds
                    # of agents arrive at once, a slow handshake that completes beats one given
                    # up at 10 s and tried again, which only adds to the portal's queue.
                    open_timeout=HANDSHAKE_TIMEOUT_SECONDS,
                    ping_interval=20,
                    ping_timeout=20,
                    max_size=1 << 22,
                ) as ws:
                    first = parse_portal_message(await ws.recv())
                    if not isinstance(first, Welcome):
                        await self._refused_at_handshake(first)
                        return
                    attempt = 0  # connected: the next loss starts from the first window
                    delay = reconnect_delay(attempt, cap=self.reconnect_max_seconds)
                    self.say(f"connected to {self.client.url} as site {first.site}")
                    self.update_max_bytes = first.update_max_bytes
                    await self._session(ws, first.heartbeat_seconds)
                    self.say("the portal closed the connection; reconnecting")
            except asyncio.CancelledError:
                raise
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else None
                self.outbox.connection_lost(code)
                if code in (CLOSE_REVOKED, CLOSE_UNAUTHENTICATED):
                    await self._check_credentials(exc.rcvd.reason if exc.rcvd else "")
                    if self.refused:
                        return
                self.say(f"connection to the portal lost ({exc}); reconnecting")
            except ssl.SSLCertVerificationError as exc:
                self.say(f"{self.client.untrusted(exc)}; retry in {delay:.1f} s")
            except (OSError, InvalidHandshake, TimeoutError, ValueError) as exc:
                self.say(
                    f"portal unreachable ({type(exc).__name__}: {exc}); retry in {delay:.1f} s"
                )
            finally:
                self.ws = None
                self.update_max_bytes = 0
                self._updates_unanswered()
            await asyncio.sleep(delay)
            attempt += 1

    async def _refused_at_handshake(self, first: PortalMessage | None) -> None:
        error = first.error if isinstance(first, ErrorMessage) else ErrorBody("?", "")
        code, message = error.code, error.message
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
        self._policy_reported = False
        # Everything not acknowledged goes again, in order: the portal stores it once.
        self.outbox.resend_all()
        self.outbox_ready.set()
        self.wake.set()
        reader = asyncio.create_task(self._reader(ws))
        writer = asyncio.create_task(self._writer(ws))
        beat = asyncio.create_task(self._heartbeat(ws, heartbeat_seconds))
        try:
            # The reader ends without an error when the socket closes cleanly (1000, 1001: a
            # portal that shuts down): that ends the session too, not the next heartbeat that
            # fails up to HEARTBEAT_SECONDS later, and with it the wait of the updates sent on
            # the socket (they go over HTTP at once).
            done, _ = await asyncio.wait(
                {reader, writer, beat}, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                task.result()  # re-raise what ended the session
        finally:
            for task in (reader, writer, beat):
                task.cancel()
            await asyncio.gather(reader, writer, beat, return_exceptions=True)

    async def _reader(self, ws: Any) -> None:
        async for raw in ws:
            message = parse_portal_message(raw)
            if isinstance(message, Event):
                if self._start_round_from(message.event):
                    continue
                if _brings_work(message.event):
                    self.wake.set()
            elif isinstance(message, Ack):
                waiting = self.update_answers.pop(str(message.id), None)
                if waiting is not None:
                    if not waiting.done():
                        waiting.set_result(message)
                    continue
                if self.outbox.acknowledged(message):
                    self.outbox_ready.set()  # back in the queue
                async with self.acked:
                    self.acked.notify_all()
            elif isinstance(message, ErrorMessage):
                log.info("portal says: %s", message.to_json())

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
        offered = {
            "round": number,
            "state": "assigned",
            "task": task,
            "model_url": f"{base}model/",
            "status_url": f"{base}status/",
            "update_url": f"{base}update/",
        }
        if isinstance(event.get("model"), dict):
            offered["model"] = event["model"]  # a small model came with the event
        runner.offer(offered)
        return True

    async def _writer(self, ws: Any) -> None:
        while True:
            await self.outbox_ready.wait()
            self.outbox_ready.clear()
            while self.outbox.unsent:
                report_id = self.outbox.next_to_send()
                if report_id is None:  # only output lines wait, and the portal asked to wait
                    with contextlib.suppress(TimeoutError):
                        held = self.outbox.lines_held_for()
                        await asyncio.wait_for(self.outbox_ready.wait(), held)
                    self.outbox_ready.clear()
                    continue
                data = self.outbox.send(report_id)
                if data is None:
                    continue
                self.client.record("ws", "SEND", WS_PATH, data.encode())
                await ws.send(data)

    async def send_update(self, job: str, number: int, path: Path) -> Ack | None:
        """Send round ``number``'s update of ``job`` on the socket and wait for the portal's
        answer (its acknowledgement: taken, or refused with the reason and HTTP status an
        upload would get). None when it did not go that way: no socket, a portal that takes
        none this large (the welcome's ``update_max_bytes``), or no answer before the
        connection went or :data:`UPDATE_ANSWER_SECONDS` passed. The caller then uploads it
        over HTTP, which the portal refuses (409) if this one did arrive."""
        ws, most = self.ws, self.update_max_bytes
        if ws is None or most <= 0:
            return None
        data = await asyncio.to_thread(_read_if_at_most, path, most)
        if data is None:
            return None
        message_id = f"update-{self.session}-{secrets.token_hex(6)}"
        answer: asyncio.Future[Ack | None] = self.loop.create_future()
        self.update_answers[message_id] = answer
        message = UpdateMessage(
            job=job,
            round=number,
            sha256=hashlib.sha256(data).hexdigest(),
            data=data,
            id=message_id,
        )
        try:
            # What the wire log shows of it is the update file's tensors, as for an upload.
            self.client.record("ws", "UPDATE", WS_PATH, data)
            await ws.send(encode(message.to_json()))
            return await asyncio.wait_for(answer, UPDATE_ANSWER_SECONDS)
        except (ConnectionClosed, TimeoutError):
            return None
        finally:
            self.update_answers.pop(message_id, None)

    def _updates_unanswered(self) -> None:
        """The socket went: the updates sent on it that wait for an answer will hear none."""
        answers, self.update_answers = self.update_answers, {}
        for answer in answers.values():
            if not answer.done():
                answer.set_result(None)

    async def _heartbeat(self, ws: Any, seconds: float) -> None:
        while True:
            await asyncio.sleep(jittered(seconds))
            data = json.dumps(Heartbeat().to_json())
            self.client.record("ws", "SEND", WS_PATH, data.encode())
            await ws.send(data)

    # -- work -------------------------------------------------------------------------------

    async def _work_loop(self) -> None:
        while True:
            # Connected, the portal says when there is work; the listing every few polls is
            # only a safety net then (50 agents polling every 10 s keep a portal busy).
            wait = jittered(self.poll_seconds * (1 if self.ws is None else 3))
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

    def policy_report(self) -> dict[str, Any]:
        """What the portal is told of this site's privacy: the policy, and the project's
        spend here (Opacus's history entries and ε at the policy's δ)."""
        history, spent = self.ledger.project_spend(self.policy)
        return json_report(
            {"policy": self.policy.to_json(), "project_history": history, "project_epsilon": spent}
        )

    async def _report_policy(self) -> None:
        """Tell the portal the policy; tried again at the next listing if it did not take it
        (a portal without the endpoint is told nothing more this connection)."""
        try:
            await asyncio.to_thread(self.client.post, PRIVACY_POLICY_PATH, self.policy_report())
        except PortalUnreachable as exc:
            log.info("cannot report the privacy policy: %s", exc)
            return
        except PortalError as exc:
            self.say(f"the portal did not take the privacy policy: {exc}")
            if exc.transient:
                return
        self._policy_reported = True

    async def sync(self) -> None:
        """Start what is due: one round task per accepted running job; end finished jobs."""
        jobs = await asyncio.to_thread(self.client.get, JOBS_PATH)
        if not self._policy_reported:
            await self._report_policy()
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
        # Who submitted the job, for the privacy policy's job rule; a portal that does not say
        # leaves it unknown, which a policy naming its submitters refuses.
        submitter = job.get("submitter")
        self.submitter = str(submitter) if submitter else None
        self.workspace = agent.site_dir.job_path(self.uid)
        self.proc: ScriptProcess | None = None
        self.current: asyncio.Task[None] | None = None
        self.current_round: int | None = None
        self.finished_round: int | None = None
        # The round whose script work is done and whose update is being sent (tried again
        # while the portal is away): the one round a newer offer may cancel.
        self.sending_round: int | None = None
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
            if self.sending_round is None or number <= self.sending_round:
                return  # busy with a round; the portal moves on only after it answers or closes
            # The portal offers a later round: the one whose update is still waiting to go
            # closed without it (this site was cut off past its deadline). Sending it would
            # only be refused, after a pause of up to 30 s that could make this site miss
            # the new round too.
            self.agent.say(
                f"job {self.name}: round {round_for_people(self.sending_round)} closed before "
                f"its update could be sent; round {round_for_people(number)} starts"
            )
            self.current.cancel()
        if number == self.finished_round:
            return  # uploaded; the portal has not yet marked it
        self.current = asyncio.create_task(self._round(task), name=f"{self.uid}:{number}")

    # -- one round --------------------------------------------------------------------------

    async def _round(self, task: dict[str, Any]) -> None:
        """One round's task, step by step: the app and script (first round), the model, the
        script's work, its points, the update. What ends it early decides what follows: a fault
        at this site fails the round here, once, with the reason; a portal that is away is
        tried again on the next offer; a round that closed meanwhile is over for this site."""
        number = int(task["round"])
        shown = round_for_people(number)
        self.current_round = number
        policy = self.agent.policy
        update_path: Path | None = None
        secure: SecureRound | None = None
        try:
            update_path = enforced_path(self._result_path(number))
            if update_path.exists() and secure_kind(task):
                # The round's keys were in the memory of the agent that stopped: for the
                # protocol this site dropped out; its update must not leave unprotected.
                update_path.unlink(missing_ok=True)
                raise SecureRoundOut("the agent restarted mid-round; its round keys are gone")
            if update_path.exists():
                # Enforced before a restart (or a try the portal did not take): these bytes
                # again, never a second noisy view of one update.
                model_path = None
                self.agent.say(
                    f"job {self.name}: round {shown}: sending the update made before, as it is"
                )
            else:
                await asyncio.to_thread(self._forget_older_updates, number)
                task_name = str((task.get("task") or {}).get("task_name", "train"))
                declined = round_refusal(
                    policy,
                    self.agent.ledger,
                    job=self.uid,
                    task_name=task_name,
                    project=self.agent.identity.project,
                    submitter=self.submitter,
                )
                if declined:
                    await self._decline(task, declined)
                    return
                protected = secure_kind(task)
                secure = SecureRound(self, task, protected) if protected else None
                # Under secure aggregation the keys and shares go, and the masks are drawn,
                # while the script trains.
                setup = asyncio.create_task(secure.setup()) if secure is not None else None
                try:
                    await asyncio.to_thread(self._prepare)
                    model_path = await self._fetch_model(task, number)
                    result_path = await self._train(task, number, model_path)
                    update_path = await asyncio.to_thread(
                        self._release, result_path, model_path, number
                    )
                    if secure is not None and setup is not None:
                        await setup
                        update_path = await secure.protected_file(update_path, model_path)
                finally:
                    if setup is not None and not setup.done():
                        setup.cancel()
            self.sending_round = number
            await self._deliver_points()
            await self._upload(task["update_url"], update_path, number)
            self.finished_round = number
            self.agent.say(f"job {self.name}: round {shown}/{self.num_rounds} update sent")
            if secure is not None:
                await secure.finish()
                enforced_path(self._result_path(number)).unlink(missing_ok=True)
            if model_path is not None:
                model_path.unlink(missing_ok=True)
            update_path.unlink(missing_ok=True)
        except ScriptFailed as exc:
            reason = exc.reason if policy.send_lines else _without_script_text(exc.reason)
            await self._fail(task, f"client script {reason}", exc.log_tail)
        except PrivacyRefusal as exc:
            await self._fail(task, exc.reason, "", privacy=True)
        except SecureRoundOut as exc:
            self.agent.say(f"job {self.name}: round {shown}: secure aggregation: {exc}")
            self.finished_round = number
        except (ProtocolError, UpdateShapeError) as exc:
            await self._fail(task, f"secure aggregation: {exc}", "")
        except BundleError as exc:
            await self._fail(task, f"the job's app cannot run here: {exc}", "")
        except AppArchiveMismatch as exc:
            # Fetching it again brings the same bytes: the round fails here, it is not retried.
            await self._fail(task, f"the job's app arrived damaged: {exc}", "")
        except PortalUnreachable as exc:
            self.agent.say(
                f"job {self.name}: round {shown}: portal unreachable ({exc}); will retry"
            )
        except RoundClosed as exc:  # answered already, or the round closed meanwhile
            self.agent.say(f"job {self.name}: round {shown}: {exc.message}")
            self.finished_round = number
            if update_path is not None:
                update_path.unlink(missing_ok=True)
        except PortalError as exc:
            self.agent.say(f"job {self.name}: round {shown}: {exc}")
        except Exception as exc:
            # Anything else is a fault at this site: the round fails here, once, with the
            # reason, rather than the task being offered (and failing) again on every poll.
            log.exception("job %s: round %s", self.uid, shown)
            await self._fail(task, f"the agent failed: {type(exc).__name__}: {exc}", "")
        finally:
            if self.sending_round == number:
                self.sending_round = None
            self.flush()

    def _result_path(self, number: int) -> Path:
        return self.workspace / "updates" / f"round-{number:03d}.safetensors"

    def _forget_older_updates(self, number: int) -> None:
        """Updates left by rounds that ended while this agent was away (a crash mid-round):
        an enforced one can no longer be sent, and a script's raw one must not stay on disk
        longer than its round."""
        folder = self.workspace / "updates"
        keep = enforced_path(self._result_path(number))
        for path in folder.glob("round-*.safetensors") if folder.is_dir() else ():
            if path != keep:
                path.unlink(missing_ok=True)

    def _release(self, result_path: Path, model_path: Path, number: int) -> Path:
        """The file of round ``number`` that may leave, under the site's privacy policy."""
        released = release_result(
            result_path,
            model_path,
            policy=self.agent.policy,
            ledger=self.agent.ledger,
            job=self.uid,
            round=number,
        )
        done, report = released.enforcement, released.report
        if done is not None and (done.clipped or done.noise_std or done.excluded):
            spent = ""
            if report and report.get("epsilon") is not None:
                cap = report.get("max_epsilon")
                spent = f"; ε {report['epsilon']:.3g}" + (f" of {cap:g}" if cap else "")
            self.agent.say(
                f"job {self.name}: round {round_for_people(number)}: privacy policy applied "
                f"(norm {done.norm:.3g}{', clipped' if done.clipped else ''}, noise std "
                f"{done.noise_std:.3g}, {len(done.excluded)} tensor(s) kept here, "
                f"{done.seconds:.2f} s{spent})"
            )
        return released.path

    async def _decline(self, task: dict[str, Any], reason: str) -> None:
        """The site's privacy policy declines this round: the script is not given it, the
        portal is told why, with the spend so far; the round is over for this site."""
        number = int(task["round"])
        self.agent.say(f"job {self.name}: round {round_for_people(number)} declined: {reason}")
        self._agent_line(f"round {round_for_people(number)} declined: {reason}")
        await self._post_failed(task, reason, privacy=True)
        self.finished_round = number

    async def _fetch_model(self, task: dict[str, Any], number: int) -> Path:
        """The model round ``number`` starts from, in the workspace. The portal marks the task
        training with the download (one report fewer a round): the script gets its task as
        soon as the model is in."""
        model_path = self.workspace / "models" / f"round-{number:03d}.safetensors"
        sent = task.get("model")
        if isinstance(sent, dict):
            why_not = await asyncio.to_thread(event_model_write, sent, model_path)
            if why_not is None:
                return model_path  # the portal marked the task training as it sent the event
            log.warning("job %s: round %s: %s; downloading it", self.uid, number, why_not)
        model_url = task["model_url"] + "?then=training"
        await asyncio.to_thread(self.client.round_model, model_url, model_path)
        return model_path

    async def _train(self, task: dict[str, Any], number: int, model_path: Path) -> Path:
        """Hand the script its task (train, validate, submit_model) as the round's plan gave it
        to this site; the file it answered with (an update, a submitted model, or metrics
        alone for validate), which the site's privacy policy then rules. ``current_round`` is
        the workflow's (a relay counts its passes, not the portal's rounds); the portal's round
        number where a portal sends no spec."""
        spec = task.get("task") or {}
        result_path = self._result_path(number)
        result_path.parent.mkdir(parents=True, exist_ok=True)
        script_task = Task(
            task_id=f"{self.uid}:{number}",
            task_name=str(spec.get("task_name", "train")),
            model_path=str(model_path),
            result_path=str(result_path),
            current_round=int(spec.get("current_round", number)),
            total_rounds=int(spec.get("total_rounds", self.num_rounds)),
            start_round=int(spec.get("start_round", 0)),
            meta=dict(spec.get("meta") or {}),
        )
        assert self.proc is not None  # _prepare started it
        proc = self.proc
        return await asyncio.to_thread(proc.run_task, script_task, on_log=self._on_log)

    async def _deliver_points(self) -> None:
        """Metrics first: all of the round's points are stored before its update counts."""
        ids = self.flush()
        if ids and self.agent.ws is not None:
            await self.agent.wait_acked(ids, timeout=10.0)

    async def _upload(self, url: str, path: Path, number: int) -> None:
        """Send the round's update until the portal takes it (or refuses it for good).

        A portal that is away (restarting, unreachable) or cannot keep it now (507: its disk is
        full; 5xx; 429) gets the same file again after a pause (1 s, doubling to 30 s): the
        script's work is not redone, and the task is still open for it. Any other refusal
        (:class:`RoundClosed` included: answered already, or the round closed) ends the tries;
        the caller handles it. Cancelled with the round when the job ends.
        """
        pause = 1.0
        while True:
            try:
                if not await self._upload_on_socket(path, number):
                    await asyncio.to_thread(self.client.round_update, url, path)
                return
            except PortalUnreachable as exc:
                why = f"portal unreachable ({exc})"
            except PortalError as exc:
                if not exc.transient:
                    raise
                why = str(exc)
            self.agent.say(
                f"job {self.name}: round {round_for_people(number)}: update not taken: {why}; "
                f"sending it again in {pause:.0f} s"
            )
            await asyncio.sleep(jittered(pause))
            pause = min(pause * 2, UPLOAD_RETRY_MAX_SECONDS)

    async def _upload_on_socket(self, path: Path, number: int) -> bool:
        """Send the update on the agent's socket if the portal takes one this size there
        (:meth:`Agent.send_update`): True when it was taken. A refusal raises what the same
        refusal over HTTP raises (:class:`RoundClosed` for 409), except ``too_large``: False,
        as for no answer at all; the update then goes over HTTP."""
        ack = await self.agent.send_update(self.uid, number, path)
        if ack is None:
            return False
        error = ack.error
        if error is None:
            return True
        if error.code == ERROR_TOO_LARGE:
            return False
        status = error.status or 400
        refused = RoundClosed if status == 409 else PortalError
        raise refused(status, error.code, error.message, error.field)

    async def _fail(
        self, task: dict[str, Any], reason: str, log_tail: str, *, privacy: bool = False
    ) -> None:
        number = int(task["round"])
        self.agent.say(f"job {self.name}: round {round_for_people(number)} failed: {reason}")
        self._agent_line(f"round {round_for_people(number)} failed: {reason}")
        proc, self.proc = self.proc, None  # a new script process next round
        if proc is not None:
            await asyncio.to_thread(proc.stop, grace=0)
        enforced_path(self._result_path(number)).unlink(missing_ok=True)
        await self._post_failed(task, reason, privacy=privacy)
        self.finished_round = number

    async def _post_failed(self, task: dict[str, Any], reason: str, *, privacy: bool) -> None:
        """Tell the portal the round failed here; ``privacy``: with the ledger's report (the
        policy declined or refused it)."""
        body: dict[str, Any] = {"state": "failed", "reason": reason}
        if privacy:
            body["privacy"] = json_report(self.agent.ledger.report(self.uid, self.agent.policy))
        with contextlib.suppress(PortalError, PortalUnreachable):
            await asyncio.to_thread(self.client.post, task["status_url"], body)

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
            refused = json.loads(rejected.read_text())
            raise BundleError(refused.get("field", "app"), refused["reason"])
        app = self.workspace / "app"
        spec_path = self.workspace / "spec.json"
        if not (app.is_dir() and spec_path.exists()):
            info = self.client.get(self.spec_url)
            spec = info["spec"]
            archive = self.workspace / "app.zip"
            self.workspace.mkdir(parents=True, exist_ok=True)
            digest = self.client.download_app(
                self.bundle_url, archive, sha256=str(info.get("app_sha256") or "")
            )
            shutil.rmtree(app, ignore_errors=True)
            try:
                extract_app(archive, app, str(spec["train_script"]))
            except BundleError as exc:
                record = {"sha256": digest, "field": exc.field, "reason": exc.reason}
                rejected.write_text(json.dumps(record))
                raise
            finally:
                archive.unlink(missing_ok=True)
            spec_path.write_text(json.dumps(spec, indent=2))
        spec = json.loads(spec_path.read_text())
        work = self.workspace / "work"
        proc = ScriptProcess(
            script=app / spec["train_script"],
            # per_site_config: this site's own arguments, else the job's.
            args=shlex.split(
                (spec.get("site_args") or {}).get(
                    self.agent.identity.site, spec.get("train_args", "")
                )
            ),
            client_config=spec.get("client_config") or {},
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
        """A ``flare.log`` record from the script (called in the round's thread): its numbers
        are queued as metric points. TEXT, PARAMETER(S) and TAG(S) records stay at the site:
        the portal keeps numbers only."""
        with self.points_lock:
            for key, value in message["points"]:
                self.point_seq += 1
                self.points.append(
                    {
                        "key": key,
                        "value": value,
                        "step": message.get("step"),
                        "round": message.get("round", self.current_round),
                        "id": f"{self.agent.session}:{self.point_seq}",
                    }
                )

    def _agent_line(self, text: str) -> None:
        line = {"stream": "agent", "text": cut_line(text), "round": self.current_round}
        self.agent.loop.call_soon_threadsafe(self.agent.enqueue, Report(job=self.uid, lines=[line]))

    def flush(self, final: bool = False) -> list[str]:
        """Queue the points and new output lines gathered so far (loop thread); the ids of
        the reports holding points.

        Points and lines travel in separate reports: the portal may ask line reports to wait
        (``slow_down``), and a round's points must not wait behind them. ``final``: the
        script has ended, so a last line without a newline is sent too."""
        with self.points_lock:
            points, self.points = self.points, []
        ids = self.agent.enqueue_report(self.uid, "points", points, METRICS_PER_MESSAGE)
        if not self.agent.policy.send_lines:
            return ids  # the site's privacy policy keeps the script's output here
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
