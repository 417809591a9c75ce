"""The portal's HTTP server: Daphne, with request bodies bounded before they are read and
clients that send too slowly cut off.

Daphne (through Twisted's HTTP parser) writes every request body of 100 kB or more to a
temporary file before the application runs, and then queues all of it in memory for the
application, which spools it once more; an ASGI middleware comes too late to help. This
module changes the parser's request and connection (``python -m fedportal.serve`` starts
Daphne with them):

- **Body limits** (``fedportal.bodylimits``): when the headers are in, a ``Content-Length``
  over the route's limit is answered 413 (JSON) at once, and a chunked body is counted as it
  arrives and answered 413 when it passes the limit. Nothing of a refused body is stored.
- **Sender first**: on an upload route the sender's credentials (a site's signature over
  ``X-Content-SHA256``, or a person's API token or session) are checked from the headers while
  the connection is paused, before any of the body is stored; an unknown sender gets 401.
  ``Expect: 100-continue`` is answered only after that.
- **Header timeout**: the request line and headers must be complete within
  ``FEDPORTAL_HTTP_HEADER_TIMEOUT_SECONDS`` of the connection opening or of the previous
  response (Twisted's own idle timeout starts again with every byte, so a client sending one
  byte a second held a connection forever); the connection is then closed.
- **Body pace**: a body must be complete within ``FEDPORTAL_HTTP_BODY_TIMEOUT_SECONDS`` of its
  headers; an upload's deadline grows by one second for every ``FEDPORTAL_HTTP_UPLOAD_MIN_RATE``
  bytes received (Apache's mod_reqtimeout ``body=…,MinRate=…``). Past it: 408, and closed.
- **Streamed to the application**: the stored body is handed to the application in chunks as
  it reads them, rather than queued whole in memory, and Twisted does not parse a form body
  itself (it read a multipart body whole into memory to fill ``request.args``, which Daphne
  never uses): an upload costs the server a bounded amount of memory. The portal's Django
  handler (``fedportal.asgi``) takes the stored file itself instead of copying it into a
  second temporary file, so an accepted upload is written to disk once.

A refused request is answered, then the connection stops sending and reads (discarding)
what the client still sends for up to ``LINGER_SECONDS`` before it is closed, so that the
client reads the answer instead of a reset (what nginx calls a lingering close).

HTTP/2 (Twisted's, only with TLS and the ``h2`` package) is not used by the portal: a TLS
proxy in front speaks HTTP/1.1 to it.
"""

from __future__ import annotations

# daphne.server installs Twisted's asyncio reactor; it must be imported before anything that
# imports twisted.internet.reactor.
from daphne.server import Server  # isort: skip

import asyncio
import contextvars
import gc
import logging
from collections.abc import Mapping
from functools import partial
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from daphne.cli import CommandLineInterface
from daphne.http_protocol import HTTPFactory, WebRequest
from daphne.utils import parse_x_forwarded_for
from twisted.internet import defer
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http

from fedportal import bodylimits

log = logging.getLogger(__name__)

LINGER_SECONDS = 5.0
_REASONS = {
    401: b"Unauthorized",
    404: b"Not Found",
    409: b"Conflict",
    429: b"Too Many Requests",
    408: b"Request Timeout",
    413: b"Content Too Large",
    503: b"Service Unavailable",
}


def in_fresh_context(coroutine: Any) -> asyncio.Future[Any]:
    """A task for ``coroutine`` on this thread's event loop, started from an empty context, as
    on a connection of its own.

    A task takes a copy of the context it is created in, and so does every callback asyncio
    runs for Twisted. While a request is answered its context holds what its handler set,
    asgiref's thread-sensitive context among them (``fedportal.asgi``), and callbacks
    scheduled then can carry it to what they start next on a kept-alive connection: the next
    request, or the check of its sender. Once the handler has left that context, asgiref
    refuses every thread-sensitive call made in it: behind PocEnv's nginx (which keeps its
    connections to the portals alive) every upload's sender check failed and was answered
    503, until the server's tasks started from a fresh context.
    """
    return contextvars.Context().run(
        asyncio.ensure_future, coroutine, loop=asyncio.get_event_loop()
    )


def _target_path(target: bytes) -> tuple[str, bytes]:
    """The decoded path and the raw query of a request target (origin or absolute form)."""
    if not target.startswith(b"/"):
        parts = urlsplit(target)
        target = (parts.path or b"/") + (b"?" + parts.query if parts.query else b"")
    raw_path, _, query = target.partition(b"?")
    return unquote(raw_path.decode("latin-1")), query


class GuardedRequest(WebRequest):
    """Daphne's request, bounded by its route's rule (see the module docstring)."""

    _rule: bodylimits.BodyRule = bodylimits.DEFAULT_RULE
    _limit = 0
    _length: int | None = None
    _received = 0
    _refused = False
    # Set while the sender of an upload is being checked: the body bytes that came with the
    # headers, and the parser's "request complete" call, held until the check is done.
    _held: list[bytes] | None = None
    _held_request: tuple[bytes, bytes, bytes] | None = None
    _expect_continue = False
    # What the check of an upload's sender found (bodylimits.sender_check), for the view.
    _checked_sender: Any = None
    # Twisted's file of the body (BytesIO or a temporary file), until process() swaps in a
    # _BodyHandle.
    content: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parsePOSTFormSubmission = False

    # -- called by the HTTP channel ------------------------------------------------------------

    def gotLength(self, length: int | None) -> None:
        channel = self.channel
        method = channel._command.decode("latin-1")
        path, query = _target_path(channel._path)
        self._rule = bodylimits.rule_for(method, path)
        self._limit = self._rule.limit()
        self._length = length
        if length is not None and length > self._limit:
            self.refuse(413, bodylimits.too_large_body(self._limit, self._rule, length))
            return
        if self._rule.sender is not bodylimits.Sender.ANYONE and length != 0:
            self._check_sender(method, path, query)
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._limit:
            self.refuse(413, bodylimits.too_large_body(self._limit, self._rule))
            return
        self.channel.body_progress(self._rule)
        if self._held is not None:
            self._held.append(data)
            return
        self.content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        if self._held is not None:
            self._held_request = (command, path, version)
            return
        super().requestReceived(command, path, version)

    def process(self) -> Any:
        # WebRequest.process reads the whole body into the application's queue at once; hand
        # it an empty stand-in and let the queue (PortalServer.create_application) read the
        # stored body in chunks as the application asks for them.
        self.stored_body = self.content
        self.content = _BodyHandle(self.stored_body)
        return super().process()

    # -- refusing ------------------------------------------------------------------------------

    def refuse(self, status: int, body: Mapping[str, str]) -> None:
        """Answer ``status`` with the JSON ``body`` and close; the rest of the request is
        read and dropped for a moment (a lingering close), never stored."""
        if self._refused:
            return
        self._refused = True
        self._held = None
        if self.content is not None:
            self.content.close()  # what was stored of the body goes now, not at the close
        channel = self.channel
        if channel is None or channel.transport is None:
            return
        channel.stop_reading_requests()
        payload = bodylimits.json_bytes(dict(body))
        head = (
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % (status, _REASONS.get(status, b"Error"), len(payload))
        )
        peer = self.getClientAddress()
        log.info(
            "refused %s from %s: %d %s",
            self._rule.name,
            getattr(peer, "host", peer),
            status,
            body.get("code", ""),
        )
        channel.transport.write(head + payload)
        channel.linger_close()

    # -- the sender of an upload ---------------------------------------------------------------

    def _check_sender(self, method: str, path: str, query: bytes) -> None:
        channel = self.channel
        channel.pause_reading()
        self._held = []
        expect = self.requestHeaders.getRawHeaders(b"expect")
        if expect and expect[0].lower() == b"100-continue":
            # Twisted would promise to read the body right after this returns: not yet.
            self.requestHeaders.removeHeader(b"expect")
            self._expect_continue = channel._version == b"HTTP/1.1"
        headers = {
            name.decode("latin-1"): b",".join(values).decode("latin-1")
            for name, values in self.requestHeaders.getAllRawHeaders()
        }
        check = bodylimits.sender_check(
            self._rule.sender,
            method=method,
            path=path,
            query=query,
            headers=headers,
            address=self._client_address(),
        )
        deferred = defer.Deferred.fromFuture(in_fresh_context(check))
        deferred.addCallbacks(self._sender_known, self._sender_refused)

    def _client_address(self) -> str | None:
        """The client's address as the application will see it (Daphne works it out only
        later, in ``process``): the peer's, or the proxy's X-Forwarded-For with
        ``--proxy-headers``."""
        peer = self.getClientAddress()
        address = [str(getattr(peer, "host", "")), getattr(peer, "port", 0)]
        if self.server.proxy_forwarded_address_header:
            address, _ = parse_x_forwarded_for(
                self.requestHeaders,
                self.server.proxy_forwarded_address_header,
                self.server.proxy_forwarded_port_header,
                self.server.proxy_forwarded_proto_header,
                address,
                None,
            )
        return str(address[0]) if address and address[0] else None

    def _sender_known(self, checked_sender: object) -> None:
        if self._refused or self.channel is None or self._disconnected:
            return
        self._checked_sender = checked_sender
        held, self._held = self._held or [], None
        super().gotLength(self._length)
        for data in held:
            self.content.write(data)
        if self._held_request is not None:
            # The whole body came with the headers: the request is complete.
            command, path, version = self._held_request
            self._held_request = None
            super().requestReceived(command, path, version)
            return
        if self._expect_continue:
            self.channel.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.channel.resume_reading()

    def _sender_refused(self, failure: Any) -> None:
        exc = failure.value
        if isinstance(exc, bodylimits.SenderUnknown):
            self.refuse(exc.status, exc.as_dict())
            return
        log.error(
            "checking an upload's sender failed",
            exc_info=(failure.type, exc, failure.getTracebackObject()),
        )
        self.refuse(
            503,
            {
                "code": "unavailable",
                "message": "the portal could not check who sent this upload; try again later",
            },
        )


class _BodyHandle:
    """What WebRequest.process sees as the body (empty), owning the stored one (closed with
    the request)."""

    closed = False

    def __init__(self, stored: Any) -> None:
        self.stored = stored

    def seek(self, *args: Any) -> int:
        return 0

    def read(self, size: int = -1) -> bytes:
        return b""

    def close(self) -> None:
        self.closed = True
        if self.stored is not None:
            self.stored.close()


class StoredBody:
    """The stored body, offered to the application with its first chunk: an application that
    can read a file (``fedportal.asgi``'s Django handler) takes it instead of copying it chunk
    by chunk into a second temporary file; any other reads the chunks."""

    def __init__(self, queue: BodyQueue, stored: Any) -> None:
        self.queue = queue
        self.stored = stored

    def take(self) -> Any:
        """The whole body as a file at its start; the queue sends no more of it."""
        self.queue.body_done = True
        self.stored.seek(0)
        return self.stored


class BodyQueue(asyncio.Queue):  # type: ignore[type-arg]
    """The application's receive queue: the body is read from the stored file, a chunk per
    ``get()``, instead of being queued whole (WebRequest.process's ``http.request`` messages
    are empty and dropped); other messages (``http.disconnect``) follow it."""

    def __init__(self, request: Any, chunk_size: int) -> None:
        super().__init__()
        self.request = request
        self.chunk_size = chunk_size
        self.body_done = False
        self.offered = False

    def put_nowait(self, item: Any) -> None:
        if item.get("type") == "http.request":
            return
        super().put_nowait(item)

    async def get(self) -> Any:
        if not self.body_done:
            stored = getattr(self.request, "stored_body", None)
            if stored is None or stored.closed:
                self.body_done = True
                if stored is None:
                    return {"type": "http.request", "body": b"", "more_body": False}
                return await super().get()  # closed: the client went away
            chunk = stored.read(self.chunk_size)
            more = len(chunk) == self.chunk_size
            self.body_done = not more
            message = {"type": "http.request", "body": chunk, "more_body": more}
            if more and not self.offered:
                self.offered = True
                message[bodylimits.STORED_BODY] = StoredBody(self, stored)
            return message
        return await super().get()


class GuardedChannel(http.HTTPChannel):
    """Twisted's HTTP/1.1 connection with a header deadline and a body pace."""

    header_timeout = 10.0
    body_timeout = 30.0
    upload_min_rate = 64 * 1024
    _header_call: Any = None
    _body_call: Any = None
    _linger_call: Any = None
    _body_started = 0.0
    _body_bytes = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm_header_timer()

    def allHeadersReceived(self) -> None:
        self._cancel("_header_call")
        super().allHeadersReceived()
        request = self.requests[-1] if self.requests else None
        if self.length != 0 and request is not None and not request._refused:
            self._body_started = self._now()
            self._body_bytes = 0
            self._body_call = self.callLater(self.body_timeout, self._body_timed_out)

    def allContentReceived(self) -> None:
        self._cancel("_body_call")
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        # Armed first: a pipelined request already buffered is parsed inside requestDone.
        if self.persistent:
            self._arm_header_timer()
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel("_header_call")
        self._cancel("_body_call")
        self._cancel("_linger_call")
        super().connectionLost(reason)

    # -- used by GuardedRequest ----------------------------------------------------------------

    def body_progress(self, rule: bodylimits.BodyRule) -> None:
        if self._body_call is None or not rule.is_upload:
            return
        self._body_bytes = self.requests[-1]._received if self.requests else 0
        deadline = self._body_started + self.body_timeout + self._body_bytes / self.upload_min_rate
        if self._body_call.active():
            self._body_call.reset(max(0.0, deadline - self._now()))

    def pause_reading(self) -> None:
        self._networkProducer.pauseProducing()

    def resume_reading(self) -> None:
        self._networkProducer.resumeProducing()

    def stop_reading_requests(self) -> None:
        """Parse nothing more from this connection: what arrives is read and dropped."""
        self._cancel("_header_call")
        self._cancel("_body_call")
        self.setTimeout(None)

        def discard(data: bytes) -> None:
            return None

        self.dataReceived = discard  # type: ignore[method-assign]
        self.lineReceived = discard  # type: ignore[method-assign]
        self.rawDataReceived = discard  # type: ignore[method-assign]

    def _connection(self) -> ITCPTransport:
        """The transport: set from connectionMade until connectionLost, which cancels the
        timers that call this; a TCP (or TLS) connection, which can be aborted."""
        return cast(ITCPTransport, self.transport)

    def linger_close(self) -> None:
        transport = self._connection()
        self._networkProducer.resumeProducing()
        lose_write = getattr(transport, "loseWriteConnection", None)
        if lose_write is not None:
            lose_write()
        else:
            transport.loseConnection()
        self._linger_call = self.callLater(LINGER_SECONDS, transport.abortConnection)

    # -- timers --------------------------------------------------------------------------------

    def _now(self) -> float:
        from twisted.internet import reactor

        return float(reactor.seconds())

    def _cancel(self, name: str) -> None:
        call = getattr(self, name)
        if call is not None and call.active():
            call.cancel()
        setattr(self, name, None)

    def _arm_header_timer(self) -> None:
        self._cancel("_header_call")
        self._header_call = self.callLater(self.header_timeout, self._header_timed_out)

    def _header_timed_out(self) -> None:
        self._header_call = None
        log.info("closed a connection whose request headers did not arrive in time")
        self.stop_reading_requests()
        self._connection().loseConnection()

    def _body_timed_out(self) -> None:
        self._body_call = None
        request = self.requests[-1] if self.requests else None
        if request is None:
            self._connection().loseConnection()
            return
        request.refuse(
            408,
            {
                "code": "request_timeout",
                "field": "body",
                "message": "the body did not arrive in time: at most "
                f"{self.body_timeout:g} s, and for an upload at least "
                f"{self.upload_min_rate} bytes a second after that",
            },
        )


def _guarded_channel(factory: Any) -> Any:
    channel = GuardedChannel()
    channel.header_timeout = factory.header_timeout
    channel.body_timeout = factory.body_timeout
    channel.upload_min_rate = factory.upload_min_rate
    return http._GenericHTTPChannelProtocol(channel)


class GuardedHTTPFactory(HTTPFactory):
    """Daphne's HTTP factory, making :class:`GuardedChannel` and :class:`GuardedRequest`."""

    protocol = _guarded_channel

    def __init__(self, server: Any) -> None:
        from django.conf import settings

        super().__init__(server)
        self.header_timeout = float(settings.FEDPORTAL_HTTP_HEADER_TIMEOUT_SECONDS)
        self.body_timeout = float(settings.FEDPORTAL_HTTP_BODY_TIMEOUT_SECONDS)
        self.upload_min_rate = max(1, int(settings.FEDPORTAL_HTTP_UPLOAD_MIN_RATE))

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        protocol.requestFactory = GuardedRequest
        return protocol


# Connections the kernel holds for the portal before it accepts them. Twisted's default is 50:
# when a portal restarts, a few hundred agents reconnect within a second, and SYNs past the
# queue are dropped and retried by the clients after 1, 3, 7 s. 2048 is gunicorn's and
# uvicorn's default; Linux caps it at net.core.somaxconn (4096 on current kernels).
DEFAULT_LISTEN_BACKLOG = 2048
# Seconds a WebSocket may take from its TCP connection to the end of its handshake. Daphne's 5
# was too short for a portal process that a hundred agents reach at once: each handshake
# checks a signature and the site's certificate, and handshakes past 5 s were cut.
DEFAULT_WEBSOCKET_CONNECT_TIMEOUT = 30


def with_backlog(endpoint: str, backlog: int) -> str:
    """A Twisted server endpoint description with ``backlog`` (TCP and Unix sockets; one that
    names its own backlog, or another kind, unchanged)."""
    kind = endpoint.split(":", 1)[0]
    if kind not in ("tcp", "tcp6", "unix") or ":backlog=" in endpoint:
        return endpoint
    return f"{endpoint}:backlog={backlog}"


def freeze_long_lived_objects() -> int:
    """Set aside, from every later pass of Python's garbage collector, the objects alive once
    the portal has loaded (its modules, Django's apps and models, every view: the URL
    patterns are loaded now rather than at the first request), and return how many.

    They live as long as the process, yet each full collection walked all of them: about
    210,000 objects, 170 to 370 ms every few seconds under a hundred agents, during which the
    portal answered nobody (``gc.callbacks`` timings in a 100-agent ``bench/scale_out.py``
    run). A collection now walks only what was made since. ``gc.freeze`` is what CPython
    offers servers for this; what is frozen is never freed, which suits what lives as long as
    the process anyway.
    """
    from django.urls import get_resolver

    get_resolver().url_patterns  # noqa: B018 (imports every view and serializer)
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class PortalServer(Server):
    """Daphne's server with :class:`GuardedHTTPFactory` (``Server.run`` assigns its own
    ``HTTPFactory`` to ``http_factory``; this server keeps the guarded one instead), listening
    with a backlog of ``listen_backlog`` connections."""

    _http_factory: Any = None
    endpoints: list[str]
    # Set from ``--backlog`` by the command line, before it makes the (one) server.
    listen_backlog = DEFAULT_LISTEN_BACKLOG

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.endpoints = [with_backlog(e, self.listen_backlog) for e in self.endpoints]

    @property
    def http_factory(self) -> Any:
        return self._http_factory

    @http_factory.setter
    def http_factory(self, factory: Any) -> None:
        self._http_factory = (
            factory if isinstance(factory, GuardedHTTPFactory) else GuardedHTTPFactory(self)
        )

    def run(self) -> None:
        freeze_long_lived_objects()
        super().run()

    def create_application(self, protocol: Any, scope: dict[str, Any]) -> Any:
        if not isinstance(protocol, GuardedRequest):
            # Daphne's own (a WebSocket's), its task started from a fresh context too.
            return contextvars.Context().run(super().create_application, protocol, scope)
        # Server.create_application, with the body read from its file as the app asks.
        assert "application_instance" not in self.connections[protocol]
        queue = BodyQueue(protocol, self.request_buffer_size)
        scope.setdefault("asgi", {"version": "3.0"})
        if protocol._checked_sender is not None:
            scope[bodylimits.CHECKED_SENDER] = protocol._checked_sender
        instance = self.application(
            scope=scope,
            receive=queue.get,
            send=partial(self.handle_reply, protocol),
        )
        if protocol not in self.connections:
            return None
        self.connections[protocol]["application_instance"] = in_fresh_context(instance)
        return queue


class PortalCommandLine(CommandLineInterface):
    """Daphne's command line with :class:`PortalServer`; the application defaults to the
    portal's (``fedportal.asgi:application``)."""

    server_class = PortalServer
    description = "FedPortal's HTTP and WebSocket server (Daphne)"

    def __init__(self) -> None:
        super().__init__()
        for action in self.parser._actions:
            if action.dest == "application":
                action.nargs = "?"
                action.default = "fedportal.asgi:application"
        self.parser.add_argument(
            "--backlog",
            type=int,
            default=DEFAULT_LISTEN_BACKLOG,
            help="connections the kernel queues before the portal accepts them "
            f"(default {DEFAULT_LISTEN_BACKLOG})",
        )
        self.parser.set_defaults(websocket_connect_timeout=DEFAULT_WEBSOCKET_CONNECT_TIMEOUT)

    def run(self, args: list[str]) -> None:
        # Daphne's run parses the arguments and builds the server; the backlog is ours.
        known, _ = self.parser.parse_known_args(args)
        if known.backlog < 1:
            self.parser.error(f"--backlog must be at least 1, got {known.backlog}")
        PortalServer.listen_backlog = known.backlog
        super().run(args)
