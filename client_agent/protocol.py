"""The agent's WebSocket messages and their bounds: one home that both ends import.

The portal (``jobs.consumers``, ``jobs.services.telemetry``, ``jobs.models``) imports this module;
the agent never imports the portal. Standard library only.

Bounds, and why these numbers:

- :data:`MAX_MESSAGE_BYTES`: one message from an agent, as sent (compact JSON, ASCII). Half of
  Daphne's own cap (1 MiB, ``websocket_max_message_size``), so that a larger message still
  reaches the consumer, which refuses it with an acknowledgement naming the fault. A message
  over Daphne's cap is not refused but fails the connection (close code 1009); an agent that
  sent it again after every reconnect would loop for ever.
- :data:`MAX_LINE_CHARS`: one output line; the agent cuts a longer line to its start and a
  marker saying how long it was (:func:`cut_line`), and so does the portal for a sender that
  did not. The agent reads no more of a line than it keeps, however long the line.
- :data:`MAX_LINES_PER_REPORT`: output lines in one report.

The messages, as JSON objects with a ``type``; each kind is a frozen dataclass here with
``to_json()`` (what the sender encodes) and ``parse()`` (what the receiver reads):

- portal → agent: :class:`Welcome` once, on connecting; :class:`Event` for every job or task
  change that concerns the site; :class:`Ack` for each message with an ``id``;
  :class:`ErrorMessage` for a message it cannot answer otherwise, and just before a close.
- agent → portal: :class:`Heartbeat`, :class:`TaskProgress`, :class:`Report` and
  :class:`UpdateMessage` — nothing else. A round's update travels in an ``update`` message
  when the portal's welcome says it takes one that size (``update_max_bytes``: a small model,
  which costs the portal far less on the open socket than a signed HTTP request); a larger
  one, or any update while the socket is down, is uploaded over HTTP, streamed.

Round numbers count from 0 here, as in the database and the Client API; only text meant for a
person shows them from 1 (``common.rounds``).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from common.validators import is_int

MAX_MESSAGE_BYTES = 512 * 1024
# The largest update an ``update`` message can carry: base64 (4 characters for 3 bytes) and the
# rest of the message (ids, the job's uid, the digest) within MAX_MESSAGE_BYTES.
SOCKET_UPDATE_MOST_BYTES = (MAX_MESSAGE_BYTES - 1024) // 4 * 3
MAX_LINE_CHARS = 2000
MAX_LINES_PER_REPORT = 1000
# The longest a line's UTF-8 can be before it is cut: 4 bytes a character at most.
MAX_LINE_BYTES = 4 * MAX_LINE_CHARS

# The agent's socket, and the headers of its requests.
WS_PATH = "/ws/agent/"
HEADER_AGENT_VERSION = "X-FedPortal-Agent-Version"  # on the handshake and every HTTP request
# A file's SHA-256 (hex): sent with a model or app archive, and with an update, whose signature
# covers this digest rather than the body (the portal streams the body, it never reads it whole).
HEADER_CONTENT_SHA256 = "X-Content-SHA256"

# How often an agent sends a heartbeat: the portal's welcome says so, this when it does not.
HEARTBEAT_SECONDS = 15

# Message types.
WELCOME = "welcome"
EVENT = "event"
ACK = "ack"
ERROR = "error"
HEARTBEAT = "heartbeat"
TASK = "task"
REPORT = "report"
UPDATE = "update"
# "metrics" and "log" are taken as reports that hold only points, or only lines.
REPORT_TYPES = (REPORT, "metrics", "log")

# Error codes in an acknowledgement ``{"type": "ack", "id", "error": {"code", "message"}}``.
ERROR_TOO_LARGE = "too_large"  # over MAX_MESSAGE_BYTES: dropped by the agent, never resent
ERROR_SLOW_DOWN = "slow_down"  # over the site's rate: sent again after ``retry_after`` seconds
# ... and in an ``error`` message.
ERROR_BAD_MESSAGE = "bad_message"  # a binary frame, or text that is not a JSON object
ERROR_UNKNOWN_MESSAGE = "unknown_message"  # a type the portal takes no message of
ERROR_SERVER = "server_error"  # the portal failed; not the message's fault
ERROR_CONNECTION_REPLACED = "connection_replaced"  # before CLOSE_REPLACED

# WebSocket close codes. 1009: a server met a message over its own cap (RFC 6455). 4401-4409
# are the portal's own (``fedportal.sockets`` lists them with the dashboard's).
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_UNAUTHENTICATED = 4401  # the handshake's signature or certificate was refused
CLOSE_REVOKED = 4403  # the site's certificate was revoked or superseded (re-enrolment)
CLOSE_REPLACED = 4409  # a newer connection of the same site replaced this one


def encode(message: Any) -> str:
    """A message as sent: compact JSON, ASCII only, so its length is its size in bytes."""
    return json.dumps(message, separators=(",", ":"))


def cut_line(text: str, total_bytes: int | None = None) -> str:
    """``text`` if it fits in :data:`MAX_LINE_CHARS`; otherwise its start and a marker that
    says how long the whole line was (``total_bytes``, when the sender read only its start)."""
    if total_bytes is None and len(text) <= MAX_LINE_CHARS:
        return text
    if total_bytes is None:
        total_bytes = len(text.encode("utf-8", "replace"))
    marker = f" … [line cut: {total_bytes} bytes in all]"
    return text[: MAX_LINE_CHARS - len(marker)] + marker


# -- errors in what arrives ---------------------------------------------------------------------


class ProtocolError(ValueError):
    """A message the receiver cannot take; ``field`` names the part at fault, if one is."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.message = message
        self.field = field
        super().__init__(message)


class UnknownMessage(ProtocolError):
    """A type of message the portal does not take, or a task message without a round."""


class InvalidReport(ProtocolError):
    """A report whose ``points`` or ``lines`` are not lists."""


def message_id(data: Mapping[str, Any]) -> str | int | None:
    """A message's ``id``, when it has one that can be acknowledged (a string or an integer)."""
    value = data.get("id")
    if isinstance(value, str) or is_int(value):
        return value
    return None


def _float_or_none(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


# -- portal → agent -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorBody:
    """Why the portal refused a message or the socket: a ``code``, a ``message`` for people,
    the ``field`` at fault when one is, for ``slow_down`` the seconds to wait, and the HTTP
    ``status`` the API answers the same refusal with (an update's refusal then means what it
    means over HTTP: 409, the task takes nothing more; 5xx, try again later)."""

    code: str
    message: str
    field: str | None = None
    retry_after: float | None = None
    status: int | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        if self.status is not None:
            body["status"] = self.status
        return body

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> ErrorBody:
        """Leniently, as the agent reads it: a missing code is ``?``, a ``retry_after`` that is
        no number is None (the agent then waits its default)."""
        field, status = data.get("field"), data.get("status")
        return cls(
            code=str(data.get("code", "?")),
            message=str(data.get("message", "")),
            field=None if field is None else str(field),
            retry_after=_float_or_none(data.get("retry_after")),
            status=status if is_int(status) and 100 <= status <= 599 else None,
        )


@dataclass(frozen=True)
class Welcome:
    """The portal took the handshake: who the site is, how often it wants heartbeats, and the
    largest update it takes in an ``update`` message on this socket (0: none, every update
    goes over HTTP; what a portal that does not say means)."""

    site: str
    project: str
    heartbeat_seconds: float = HEARTBEAT_SECONDS
    update_max_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "type": WELCOME,
            "site": self.site,
            "project": self.project,
            "heartbeat_seconds": self.heartbeat_seconds,
            "update_max_bytes": self.update_max_bytes,
        }

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> Welcome:
        """An ``update_max_bytes`` that is no count is 0 (HTTP only), and one over what a
        message can carry is cut to :data:`SOCKET_UPDATE_MOST_BYTES`."""
        try:
            seconds = float(data.get("heartbeat_seconds") or HEARTBEAT_SECONDS)
        except TypeError as exc:
            raise ProtocolError(f"heartbeat_seconds: {exc}", field="heartbeat_seconds") from None
        most = data.get("update_max_bytes")
        return cls(
            site=str(data.get("site")),
            project=str(data.get("project")),
            heartbeat_seconds=seconds,
            update_max_bytes=min(most, SOCKET_UPDATE_MOST_BYTES)
            if is_int(most) and most > 0
            else 0,
        )


@dataclass(frozen=True)
class Event:
    """A job or task of the site changed (``jobs.events``' payload, passed through): the agent
    takes it as a sign to look for work."""

    event: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"type": EVENT, "event": self.event}

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> Event:
        event = data.get("event")
        return cls(event=event if isinstance(event, dict) else {})


@dataclass(frozen=True)
class Ack:
    """The answer to the agent's message ``id``: stored (``stored`` items, or the task's new
    ``state``), or refused with ``error``."""

    id: str | int
    error: ErrorBody | None = None
    stored: int | None = None
    state: str | None = None

    def to_json(self) -> dict[str, Any]:
        message: dict[str, Any] = {"type": ACK, "id": self.id}
        if self.error is not None:
            message["error"] = self.error.to_json()
        if self.stored is not None:
            message["stored"] = self.stored
        if self.state is not None:
            message["state"] = self.state
        return message

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> Ack:
        """An ``error`` that is no object counts as none: the message was taken."""
        error, stored, state = data.get("error"), data.get("stored"), data.get("state")
        return cls(
            id=str(data.get("id")),
            error=ErrorBody.parse(error) if isinstance(error, dict) else None,
            stored=stored if is_int(stored) else None,
            state=state if isinstance(state, str) else None,
        )


@dataclass(frozen=True)
class ErrorMessage:
    """An error the portal could not send as an acknowledgement: a refused handshake, a message
    without an id, or the reason just before it closes the socket."""

    error: ErrorBody

    def to_json(self) -> dict[str, Any]:
        return {"type": ERROR, **self.error.to_json()}

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> ErrorMessage:
        return cls(error=ErrorBody.parse(data))


PortalMessage = Welcome | Event | Ack | ErrorMessage


def parse_portal_message(text: str | bytes) -> PortalMessage | None:
    """A message from the portal; None for a type this agent does not know (a newer portal's),
    which it ignores. Raises ValueError for text that is not a JSON object."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ProtocolError("not a JSON object")
    kind = data.get("type")
    if kind == WELCOME:
        return Welcome.parse(data)
    if kind == EVENT:
        return Event.parse(data)
    if kind == ACK:
        return Ack.parse(data)
    if kind == ERROR:
        return ErrorMessage.parse(data)
    return None


# -- agent → portal -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Heartbeat:
    """The agent is alive; the portal marks the site online. No id, so no answer."""

    def to_json(self) -> dict[str, Any]:
        return {"type": HEARTBEAT}


@dataclass(frozen=True)
class TaskProgress:
    """Progress on the site's task in round ``round`` of ``job`` (e.g. ``failed``, ``reason``).

    ``job`` is the job's uid as sent: the portal looks it up, and one that is not the site's
    is the error the agent hears before any other."""

    job: object
    round: int
    state: str
    reason: str = ""
    id: str | int | None = None

    def to_json(self) -> dict[str, Any]:
        message: dict[str, Any] = {"type": TASK, "job": self.job, "round": self.round}
        message["state"] = self.state
        if self.reason:
            message["reason"] = self.reason
        if self.id is not None:
            message["id"] = self.id
        return message

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> TaskProgress:
        number = data.get("round")
        if not is_int(number):
            raise UnknownMessage("round must be an integer", field="round")
        return cls(
            job=data.get("job"),
            round=number,
            state=str(data.get("state")),
            reason=str(data.get("reason") or ""),
            id=message_id(data),
        )


@dataclass(frozen=True)
class Report:
    """``flare.log`` points and the script's output lines of ``job``, either or both.

    ``job`` is the job's uid as sent; the items are checked by the portal's services, one by
    one (``jobs.services.telemetry``). ``id`` is set when the agent queues it."""

    job: object
    points: list[Any] | None = None
    lines: list[Any] | None = None
    id: str | int | None = None

    def to_json(self) -> dict[str, Any]:
        message: dict[str, Any] = {"type": REPORT, "job": self.job}
        if self.points is not None:
            message["points"] = self.points
        if self.lines is not None:
            message["lines"] = self.lines
        if self.id is not None:
            message["id"] = self.id
        return message

    def with_id(self, new_id: str) -> Report:
        return replace(self, id=new_id)

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> Report:
        """Also a ``metrics`` or ``log`` message. Raises :class:`InvalidReport` when ``points``
        or ``lines`` are there and not lists."""
        points, lines = data.get("points"), data.get("lines")
        for name, value in (("points", points), ("lines", lines)):
            if value is not None and not isinstance(value, list):
                raise InvalidReport(f"{name} must be a list", field=name)
        return cls(job=data.get("job"), points=points, lines=lines, id=message_id(data))


class InvalidUpdate(ProtocolError):
    """An ``update`` message without a round number, a digest or base64 data."""


@dataclass(frozen=True)
class UpdateMessage:
    """The site's update for its task in round ``round`` of ``job``: the safetensors file's
    bytes (base64 in the message) and their SHA-256, which the portal checks as it checks an
    upload's ``X-Content-SHA256``. Acknowledged with the task's new ``state`` (``uploaded``,
    or ``late``), or refused with the error and HTTP status an upload would get.

    Only for an update within the welcome's ``update_max_bytes``; the socket is the signed
    handshake's, so the message carries no signature of its own."""

    job: object
    round: int
    sha256: str
    data: bytes
    id: str | int | None = None

    def to_json(self) -> dict[str, Any]:
        message: dict[str, Any] = {"type": UPDATE, "job": self.job, "round": self.round}
        message["sha256"] = self.sha256
        message["data"] = base64.b64encode(self.data).decode("ascii")
        if self.id is not None:
            message["id"] = self.id
        return message

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> UpdateMessage:
        """Raises :class:`InvalidUpdate` naming the field at fault. The digest's form is the
        upload service's to check, as it is for an upload's header."""
        number, digest, encoded = data.get("round"), data.get("sha256"), data.get("data")
        if not is_int(number):
            raise InvalidUpdate("round must be an integer", field="round")
        if not isinstance(digest, str):
            raise InvalidUpdate("sha256 must be the update's SHA-256, in hex", field="sha256")
        if not isinstance(encoded, str) or not encoded:
            raise InvalidUpdate("data must be the update's bytes, base64", field="data")
        try:
            body = base64.b64decode(encoded.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise InvalidUpdate("data: not base64", field="data") from None
        return cls(job=data.get("job"), round=number, sha256=digest, data=body, id=message_id(data))


def unknown_type(kind: Any) -> UnknownMessage:
    """The error for a message of a type the portal takes none of."""
    return UnknownMessage(
        f"unknown message type {kind!r}; send {HEARTBEAT}, {TASK}, {REPORT} or {UPDATE}"
    )
