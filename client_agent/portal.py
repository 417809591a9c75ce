"""The agent's HTTP side: signed requests to the portal, with files streamed both ways.

Standard library only (``http.client``), so a site needs nothing but the agent extra. Every
request is signed afresh (a nonce may be used once), so retrying means calling again. Errors
from the portal arrive as ``{"code", "message", "field"}`` and are raised as
:class:`PortalError` with those; a portal that cannot be reached raises
:class:`PortalUnreachable` (:class:`PortalUntrusted` when its TLS certificate is refused). A
round's calls raise :class:`RoundClosed` when the round's task
takes nothing more, and an app archive that is not what the portal said raises
:class:`AppArchiveMismatch`: the caller decides on kinds of failure, not HTTP statuses.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import os
import ssl
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from client_agent import signing, tls
from client_agent.protocol import HEADER_AGENT_VERSION, HEADER_CONTENT_SHA256

CHUNK = 1 << 20
# An idle connection is used again for the next request only within this long: well under the
# portal's own limit for an idle kept-alive connection (10 s, FEDPORTAL_HTTP_HEADER_TIMEOUT_
# SECONDS; nginx's is 75 s), so that the portal seldom closes one as a request sets out on it.
IDLE_REUSE_SECONDS = 4.0
# Idle connections kept at most: an agent makes one request at a time, now and then two.
IDLE_KEPT = 2
# What a request on a kept connection meets when the portal closed it meanwhile (idle, or
# restarted): the request is sent again, once, on a new connection.
STALE_CONNECTION_ERRORS = (
    http.client.RemoteDisconnected,
    BrokenPipeError,
    ConnectionResetError,
    ConnectionAbortedError,
)

# Every byte the agent sends goes through PortalClient or the WebSocket. Given a recorder,
# PortalClient (and the agent, for its socket) calls ``recorder(channel, method, path, body)``
# for everything it sends: ``channel`` is ``http`` or ``ws``, and a streamed update is passed
# as its safetensors header (the tensor names, dtypes and shapes), not its whole body.
WireRecorder = Callable[[str, str, str, bytes], None]


class WireLog:
    """A :data:`WireRecorder` that appends one JSON line per thing sent to a file
    (``run --wire-log``): channel, method, path, size, and the body itself when it is JSON, or
    the tensor names and shapes when it is a model update. For a site admin who wants to see
    exactly what leaves the site."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()  # the socket's loop and a round's thread both send

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


class PortalUnreachable(ConnectionError):
    """No answer from the portal (down, restarting, or the network is away)."""


class PortalUntrusted(PortalUnreachable):
    """The portal's TLS certificate was refused (untrusted, for another name, out of its
    dates); the message says which and what to do. Verification is never skipped."""


class PortalError(RuntimeError):
    """The portal answered with an error; ``code`` and ``message`` say why."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        where = f" ({field})" if field else ""
        super().__init__(f"HTTP {status} {code}{where}: {message}")

    @property
    def transient(self) -> bool:
        """The portal cannot take it now (5xx: restarting, its disk full; 429: throttled): the
        same request may succeed later."""
        return self.status >= 500 or self.status == 429

    @property
    def refused_for_good(self) -> bool:
        """The site's credentials will not work again: revoked, unknown or not enrolled."""
        return self.code in {
            "certificate_revoked",
            "certificate_expired",
            "unknown_certificate",
            "certificate_untrusted",
            "site_not_enrolled",
        }


class RoundClosed(PortalError):
    """A round's task takes nothing more (HTTP 409): answered already, or the round closed
    meanwhile. Nothing to retry; the portal moves on without this site's answer."""


class AppArchiveMismatch(Exception):
    """The app archive that arrived is not the one the job was submitted with: its SHA-256
    differs from the job's. Corruption, not a network hiccup: fetching it again brings the
    same bytes."""


@contextmanager
def _round_call() -> Iterator[None]:
    """A call about a round's task: its 409 becomes :class:`RoundClosed`."""
    try:
        yield
    except PortalError as exc:
        if exc.status == 409 and not isinstance(exc, RoundClosed):
            raise RoundClosed(exc.status, exc.code, exc.message, exc.field) from exc
        raise


class InsecurePortal(ValueError):
    """Plain HTTP to a portal that is not on this machine: refused unless asked for."""


def is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1: traffic that never leaves this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_secure_transport(url: str, *, insecure: bool, flag: str = "--insecure") -> None:
    """Refuse plain HTTP to a non-loopback portal unless ``insecure``: enrolment tokens, API
    tokens and signed requests would cross the network in clear text (a TLS proxy in front of
    the portal does not help a client that talks HTTP to it). ``flag`` is how the caller's user
    says "insecure", named in the error."""
    scheme, host, _, _ = split_url(url)
    if scheme == "http" and not insecure and not is_loopback(host):
        raise InsecurePortal(
            f"{url} is plain HTTP to another machine: tokens and requests would cross the "
            f"network in clear text. Use https://, or pass {flag} if the network between here "
            "and the portal is trusted"
        )


def split_url(url: str) -> tuple[str, str, int, str]:
    """``(scheme, host, port, base path)`` of a portal URL; raises ValueError naming the fault."""
    parsed = urllib.parse.urlsplit(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"portal URL must look like https://portal.example.org, got {url!r}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return parsed.scheme, parsed.hostname, port, parsed.path.rstrip("/")


def _error_from(status: int, body: bytes) -> PortalError:
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and "code" in data:
        return PortalError(
            status, str(data["code"]), str(data.get("message", "")), data.get("field")
        )
    if isinstance(data, dict) and "detail" in data:
        return PortalError(status, str(data.get("code", "error")), str(data["detail"]))
    text = body[:300].decode("utf-8", "replace").strip()
    return PortalError(status, "http_error", text or http.client.responses.get(status, ""))


class PortalClient:
    """Requests to one portal, signed with the site's key when ``key`` is given, or as a
    person with ``api_token`` (``Authorization: Bearer``; what ``ProdEnv`` uses).

    A connection whose answer was read whole is kept (HTTP keep-alive) and used again by a
    request within :data:`IDLE_REUSE_SECONDS`: an agent makes a request or two a round, and
    a new connection for each cost the portal an accepted socket and a protocol set up and
    torn down every time. A request that finds its kept connection closed by the portal
    (idle, or restarted) is sent again on a new one, signed anew. Plain HTTP is refused
    (:class:`InsecurePortal`) unless the portal is on this machine or ``insecure`` is set.
    HTTPS is verified with :func:`client_agent.tls.client_context` (``ca_file``: the site's
    CA bundle; :class:`~client_agent.tls.BadCABundle` here when it cannot be loaded), and
    :attr:`tls` is that context, for the WebSocket too.
    """

    def __init__(
        self,
        portal_url: str,
        *,
        key: signing.PrivateKey | None = None,
        fingerprint: str | None = None,
        agent_version: str = "",
        api_token: str | None = None,
        timeout: float = 60.0,
        insecure: bool = False,
        insecure_flag: str = "--insecure",
        wire: WireRecorder | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.url = portal_url.rstrip("/")
        self.scheme, self.host, self.port, self.base = split_url(portal_url)
        require_secure_transport(self.url, insecure=insecure, flag=insecure_flag)
        self.insecure = insecure
        self.key = key
        self.fingerprint = fingerprint
        self.agent_version = agent_version
        self.api_token = api_token
        self.timeout = timeout
        self.wire = wire
        _, self.trust_source = tls.trust_source(ca_file)
        self.tls = tls.client_context(ca_file) if self.scheme == "https" else None
        # Kept connections, each with the moment it fell idle (time.monotonic()); requests
        # may come from several threads (the agent runs them off its event loop).
        self._idle: list[tuple[http.client.HTTPConnection, float]] = []
        self._idle_lock = threading.Lock()

    def record(self, channel: str, method: str, path: str, body: bytes) -> None:
        """Show ``body``, about to be sent, to the wire recorder, if there is one."""
        if self.wire is not None:
            self.wire(channel, method, path, body)

    # -- plumbing ---------------------------------------------------------------------------

    def untrusted(self, exc: ssl.SSLCertVerificationError) -> str:
        """Why the portal's certificate was refused, and what to do, in words."""
        return tls.untrusted_reason(exc, host=self.host, source=self.trust_source)

    def _connection(self) -> http.client.HTTPConnection:
        if self.tls is not None:
            return http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout, context=self.tls
            )
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _take_connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """A kept connection idle for less than :data:`IDLE_REUSE_SECONDS` (True: kept),
        else a new one (False); older kept ones are closed."""
        now = time.monotonic()
        stale: list[http.client.HTTPConnection] = []
        taken: http.client.HTTPConnection | None = None
        with self._idle_lock:
            while self._idle and taken is None:
                connection, since = self._idle.pop()
                if now - since < IDLE_REUSE_SECONDS:
                    taken = connection
                else:
                    stale.append(connection)
        for connection in stale:
            connection.close()
        if taken is not None:
            return taken, True
        return self._connection(), False

    def _release(
        self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse
    ) -> None:
        """Keep ``connection`` for a later request if its ``response`` was read whole and the
        portal keeps it open; close it otherwise."""
        if not response.will_close and response.isclosed():
            with self._idle_lock:
                if len(self._idle) < IDLE_KEPT:
                    self._idle.append((connection, time.monotonic()))
                    return
        connection.close()

    def close(self) -> None:
        """Close the kept connections (the client stays usable: it opens new ones)."""
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for connection, _since in idle:
            connection.close()

    def _headers(
        self, method: str, target: str, body: bytes = b"", digest: str | None = None
    ) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.agent_version:
            headers[HEADER_AGENT_VERSION] = self.agent_version
        if self.api_token:
            headers["Authorization"] = f"Bearer {self.api_token}"
        if self.key is not None and self.fingerprint is not None:
            headers.update(
                signing.sign_request(
                    key=self.key,
                    cert_pem_or_fingerprint=self.fingerprint,
                    method=method,
                    path=target,
                    body=body,
                    body_digest=digest,
                )
            )
        return headers

    def target(self, path: str) -> str:
        """The request target for an API path: the portal URL's own path, then ``path``."""
        return path if path.startswith(self.base + "/") and self.base else self.base + path

    def _send(
        self,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        file: Path | None = None,
        digest: str | None = None,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send the request; the connection it went on and the answer, whose body the caller
        reads and then hands both to :meth:`_release` (or closes the connection)."""
        target = self.target(path)
        while True:
            connection, kept = self._take_connection()
            # Signed for each attempt: a signature's nonce is accepted once.
            all_headers = self._headers(method, target, body, digest)
            all_headers.update(headers or {})
            try:
                if file is not None:
                    size = file.stat().st_size
                    all_headers["Content-Length"] = str(size)
                    connection.putrequest(method, target, skip_accept_encoding=True)
                    for name, value in all_headers.items():
                        connection.putheader(name, value)
                    connection.endheaders()
                    with open(file, "rb") as fh:
                        while chunk := fh.read(CHUNK):
                            connection.send(chunk)
                else:
                    connection.request(method, target, body=body or None, headers=all_headers)
                response = connection.getresponse()
            except ssl.SSLCertVerificationError as exc:
                connection.close()
                raise PortalUntrusted(f"{self.url}: {self.untrusted(exc)}") from exc
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                if kept and isinstance(exc, STALE_CONNECTION_ERRORS):
                    # Closed by the portal meanwhile, and so, likely, every other kept one
                    # (a restart): once more, on a new connection.
                    self.close()
                    continue
                raise PortalUnreachable(f"{method} {self.url}{path}: {exc}") from exc
            return connection, response

    def _json_call(self, method: str, path: str, payload: Any = None) -> Any:
        body = b"" if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        self.record("http", method, path, body)
        connection, response = self._send(method, path, body=body, headers=headers)
        return self._json_reply(method, path, connection, response)

    def _json_reply(
        self,
        method: str,
        path: str,
        connection: http.client.HTTPConnection,
        response: http.client.HTTPResponse,
    ) -> Any:
        """Read a JSON answer whole (the connection kept for the next request, or closed); a
        4xx/5xx becomes PortalError."""
        try:
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise PortalUnreachable(f"{method} {self.url}{path}: {exc}") from exc
        self._release(connection, response)
        if response.status >= 400:
            raise _error_from(response.status, data)
        return json.loads(data) if data else None

    # -- calls ------------------------------------------------------------------------------

    def get(self, path: str) -> Any:
        return self._json_call("GET", path)

    def post(self, path: str, payload: Any) -> Any:
        return self._json_call("POST", path, payload)

    def download(self, path: str, dest: Path) -> str:
        """Stream ``path`` into ``dest`` (replaced only when complete); returns its SHA-256.

        The portal's X-Content-SHA256, when sent, must match what arrived.
        """
        self.record("http", "GET", path, b"")
        connection, response = self._send("GET", path)
        partial = dest.with_name(dest.name + ".part")
        digest = hashlib.sha256()
        try:
            if response.status >= 400:
                raise _error_from(response.status, response.read())
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as out:
                while chunk := response.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
        except (OSError, http.client.HTTPException) as exc:
            partial.unlink(missing_ok=True)
            connection.close()
            raise PortalUnreachable(f"GET {self.url}{path}: {exc}") from exc
        except BaseException:
            connection.close()
            raise
        self._release(connection, response)
        expected = (response.getheader(HEADER_CONTENT_SHA256) or "").strip().lower()
        if expected and expected != digest.hexdigest():
            partial.unlink(missing_ok=True)
            raise PortalUnreachable(f"GET {self.url}{path}: the download was cut short or damaged")
        os.replace(partial, dest)
        return digest.hexdigest()

    def download_app(self, path: str, dest: Path, *, sha256: str) -> str:
        """:meth:`download` a job's app archive, which must hash to ``sha256`` (the job's; no
        check when empty); otherwise it is deleted and :class:`AppArchiveMismatch` raised."""
        digest = self.download(path, dest)
        if sha256 and digest != sha256:
            dest.unlink(missing_ok=True)
            raise AppArchiveMismatch(
                f"the app archive does not match its SHA-256: the job's is {sha256}, "
                f"the portal sent {digest}"
            )
        return digest

    def round_model(self, path: str, dest: Path) -> str:
        """:meth:`download` the model a round starts from; :class:`RoundClosed` when the
        round's task takes nothing more."""
        with _round_call():
            return self.download(path, dest)

    def round_update(self, path: str, file: Path) -> Any:
        """:meth:`upload` a round's update; :class:`RoundClosed` when the round's task takes
        nothing more (answered already, or the round closed)."""
        with _round_call():
            return self.upload(path, file)

    def post_signed(self, path: str, payload: Any) -> Any:
        """POST ``payload`` as JSON, signed over its SHA-256 (``X-Content-SHA256``) like an
        upload: the portal checks who sent it before it reads a large body."""
        body = json.dumps(payload).encode()
        digest = hashlib.sha256(body).hexdigest()
        self.record("http", "POST", path, body)
        with _round_call():
            connection, response = self._send(
                "POST",
                path,
                body=body,
                headers={"Content-Type": "application/json", HEADER_CONTENT_SHA256: digest},
                digest=digest,
            )
            return self._json_reply("POST", path, connection, response)

    def post_file(self, path: str, file: Path, content_type: str) -> Any:
        """POST ``file`` as the body (a multipart form written to disk), streamed."""
        connection, response = self._send(
            "POST", path, headers={"Content-Type": content_type}, file=file
        )
        return self._json_reply("POST", path, connection, response)

    def get_all(self, path: str) -> list[Any]:
        """Every item of a paginated list (``{"results", "next"}``), following ``next``."""
        items: list[Any] = []
        next_path: str | None = path
        while next_path:
            page = self.get(next_path)
            if isinstance(page, list):
                return page
            items.extend(page["results"])
            following = page.get("next")
            if following:
                parts = urllib.parse.urlsplit(following)
                next_path = parts.path + (f"?{parts.query}" if parts.query else "")
            else:
                next_path = None
        return items

    def upload(self, path: str, file: Path) -> Any:
        """PUT ``file`` as the raw body, streamed, signed over its SHA-256."""
        digest = hashlib.sha256()
        with open(file, "rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
        hexdigest = digest.hexdigest()
        if self.wire is not None:
            with open(file, "rb") as fh:  # the safetensors header: what the tensors are
                head = fh.read(8)
                head += fh.read(int.from_bytes(head, "little"))
            self.record("http", "PUT", path, head)
        connection, response = self._send(
            "PUT",
            path,
            headers={"Content-Type": "application/octet-stream", HEADER_CONTENT_SHA256: hexdigest},
            file=file,
            digest=hexdigest,
        )
        return self._json_reply("PUT", path, connection, response)

    def websocket_url(self, path: str) -> str:
        scheme = "wss" if self.scheme == "https" else "ws"
        default = 443 if self.scheme == "https" else 80
        port = "" if self.port == default else f":{self.port}"
        return f"{scheme}://{self.host}{port}{self.target(path)}"

    def signed_headers(self, method: str, path: str) -> dict[str, str]:
        """Headers for a request made by another library (the WebSocket handshake)."""
        return self._headers(method, self.target(path))
