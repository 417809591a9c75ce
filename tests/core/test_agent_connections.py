"""``client_agent.portal.PortalClient`` keeps its connections: requests after the first go on
the same connection; one the portal closed meanwhile is sent again on a new connection,
signed anew; one idle too long, or that the portal said it will close, is not used again."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from client_agent import portal as portal_module
from client_agent import signing
from client_agent.portal import PortalClient


class CountingServer(ThreadingHTTPServer):
    """An HTTP/1.1 server that counts the connections it accepted, keeps what each request
    sent, and closes every kept connection when asked (as a portal does once one is idle)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.accepted = 0
        self.requests: list[dict[str, str]] = []
        self.open: list[socket.socket] = []
        self.close_after_answer = False

    def get_request(self) -> tuple[socket.socket, object]:
        sock, address = super().get_request()
        self.accepted += 1
        self.open.append(sock)
        return sock, address

    def drop_connections(self) -> None:
        for sock in self.open:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.open.clear()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Daphne
    server: CountingServer

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.requests.append({**dict(self.headers), "body": body.decode()})
        payload = json.dumps({"seen": len(self.server.requests)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if self.server.close_after_answer:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_PUT = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[CountingServer]:
    httpd = CountingServer()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def client(server: CountingServer) -> Iterator[PortalClient]:
    key = signing.generate_key()
    made = PortalClient(server.url, key=key, fingerprint="ab" * 32)
    try:
        yield made
    finally:
        made.close()


def test_requests_after_the_first_go_on_the_same_connection(
    server: CountingServer, client: PortalClient, tmp_path: Path
) -> None:
    update = tmp_path / "update.safetensors"
    update.write_bytes(b"x" * 1000)
    assert client.get("/api/v1/agent/jobs/") == {"seen": 1}
    assert client.post("/api/v1/agent/jobs/x/decision/", {"accept": True}) == {"seen": 2}
    assert client.upload("/api/v1/agent/jobs/x/rounds/0/update/", update) == {"seen": 3}
    client.download("/api/v1/agent/jobs/x/rounds/0/model/", tmp_path / "model")
    assert server.accepted == 1
    assert len(server.requests) == 4
    # Each request is signed on its own: four nonces.
    assert len({r[signing.HEADER_NONCE] for r in server.requests}) == 4


def test_a_connection_the_portal_closed_meanwhile_is_replaced_and_the_request_signed_anew(
    server: CountingServer, client: PortalClient, tmp_path: Path
) -> None:
    update = tmp_path / "update.safetensors"
    update.write_bytes(b"u" * 5000)
    client.get("/api/v1/agent/jobs/")
    server.drop_connections()  # the portal restarted, or found the connection idle
    assert client.upload("/api/v1/agent/jobs/x/rounds/0/update/", update) == {"seen": 2}
    assert server.accepted == 2
    first, second = server.requests
    assert second["body"] == "u" * 5000
    assert first[signing.HEADER_NONCE] != second[signing.HEADER_NONCE]


def test_after_a_restart_the_request_is_sent_again_once_whatever_was_kept(
    server: CountingServer, client: PortalClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two requests at once leave two kept connections.
    first, first_response = client._send("GET", "/a/")
    second, second_response = client._send("GET", "/b/")
    first_response.read()
    second_response.read()
    client._release(first, first_response)
    client._release(second, second_response)
    assert server.accepted == 2
    server.drop_connections()  # the portal restarted
    signed = client._headers
    attempts: list[str] = []

    def counted(method: str, target: str, *args: Any) -> dict[str, str]:
        attempts.append(target)
        return signed(method, target, *args)

    monkeypatch.setattr(client, "_headers", counted)
    assert client.get("/c/") == {"seen": 3}
    # One attempt on a kept connection, then one on a new connection: the other kept one is
    # closed, not tried.
    assert attempts == ["/c/", "/c/"]
    assert server.accepted == 3


def test_a_connection_idle_too_long_is_not_used_again(
    server: CountingServer, client: PortalClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    client.get("/a/")
    client.get("/b/")
    assert server.accepted == 1
    monkeypatch.setattr(portal_module, "IDLE_REUSE_SECONDS", 0.0)
    client.get("/c/")
    assert server.accepted == 2


def test_a_connection_the_portal_will_close_is_not_kept(
    server: CountingServer, client: PortalClient
) -> None:
    server.close_after_answer = True
    client.get("/a/")
    client.get("/b/")
    assert server.accepted == 2


def test_a_portal_that_is_gone_is_unreachable_after_one_new_attempt(
    server: CountingServer, client: PortalClient
) -> None:
    client.get("/a/")
    server.drop_connections()
    server.shutdown()
    server.server_close()
    with pytest.raises(portal_module.PortalUnreachable):
        client.get("/b/")
    assert len(server.requests) == 1
