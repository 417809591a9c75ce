"""The portal's real server (``python -m fedportal.serve``) against what an attacker sends:
bodies over a route's limit, uploads from unknown senders, headers and bodies sent too slowly.

The server runs in a subprocess on the test database, with its own TMPDIR: a refused body must
leave nothing there, neither a file nor an open unnamed one (Twisted's temporary files are
unlinked at once, so the test also looks at the process's open files)."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import socket
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from jobs.api.authentication import HEADER_CONTENT_SHA256
from jobs.models import Job, SiteTask, TaskState
from tests.daphne_portal import served, shared_test_database_url
from tests.portal.jobs_api_world import (
    INITIAL,
    LEAD,
    SITE_IN,
    TRAIN_SCRIPT,
    build_world,
    make_bundle,
    update_bytes,
    zip_bytes,
)

# Every test needs the test database set up (the server uses it); the ones that create
# objects for the server to see commit them (transaction=True).
pytestmark = pytest.mark.django_db

TIMEOUT = 2  # the server's header and body timeouts in these tests, in seconds


@dataclass
class Portal:
    url: str
    port: int
    pid: int
    tmpdir: Path
    media: Path
    log: Path

    def connect(self, timeout: float = 15) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def files_in_tmpdir(self) -> list[str]:
        """Files in the server's TMPDIR, and the server's open files inside it (an unnamed
        temporary file shows only there)."""
        found = [str(p) for p in self.tmpdir.rglob("*")]
        for fd in Path(f"/proc/{self.pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(str(self.tmpdir)):
                found.append(target)
        return found


@contextlib.contextmanager
def running_portal(base: Path) -> Iterator[Portal]:
    """The portal's server on a free port, on the test database, with TMPDIR and media
    folders under ``base``; its log is printed when it fails to start."""
    tmpdir, media = base / "tmp", base / "media"
    base.mkdir(exist_ok=True)
    tmpdir.mkdir()
    media.mkdir()
    env = {
        "DJANGO_SETTINGS_MODULE": "fedportal.settings.test",
        "DATABASE_URL": shared_test_database_url(),
        "DJANGO_MEDIA_ROOT": str(media),
        "TMPDIR": str(tmpdir),
        "FEDPORTAL_HTTP_HEADER_TIMEOUT_SECONDS": str(TIMEOUT),
        "FEDPORTAL_HTTP_BODY_TIMEOUT_SECONDS": str(TIMEOUT),
    }
    log = base / "server.log"
    with served(env, log) as (url, port, pid):
        yield Portal(url=url, port=port, pid=pid, tmpdir=tmpdir, media=media, log=log)


@pytest.fixture(scope="module")
def portal(
    django_db_setup: None, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Portal]:
    with django_db_blocker.unblock(), running_portal(tmp_path_factory.mktemp("server")) as running:
        yield running


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response from a raw socket: status, headers (lowercase names), body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response; got {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed the connection (an orderly close or a reset)."""
    try:
        while True:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# --- bodies over the route's limit -------------------------------------------------------------


def test_an_anonymous_300_mb_body_is_refused_from_its_headers_and_nothing_is_stored(
    portal: Portal,
) -> None:
    with portal.connect() as sock:
        sock.sendall(
            b"POST /api/v1/projects/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 300000000\r\n\r\n"
        )
        sock.sendall(b"x" * 1_000_000)  # the start of the body: read and dropped, not stored
        status, headers, body = read_response(sock)
        assert status == 413
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["code"] == "too_large"
        assert json.loads(body)["field"] == "body"
        assert portal.files_in_tmpdir() == []
        assert closed_by_server(sock)


def test_a_chunked_body_is_refused_when_it_passes_the_limit(portal: Portal) -> None:
    with portal.connect() as sock:
        sock.sendall(
            b"POST /api/v1/enrol/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"%x\r\n%s\r\n" % (8192, b" " * 8192)
        try:
            for _ in range(64):  # 512 KiB, past the enrolment endpoints' 64 KiB
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, _, body = read_response(sock)
        assert status == 413
        assert json.loads(body)["code"] == "too_large"
    assert portal.files_in_tmpdir() == []


def test_a_body_within_the_limit_still_reaches_the_application(portal: Portal) -> None:
    request = urllib.request.Request(
        f"{portal.url}/api/v1/enrol/check/",
        data=json.dumps({"token": "fpe_" + "x" * 40}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 400
    assert json.loads(refused.value.read())["code"] == "token_invalid"


# --- uploads: the sender is known before the body is read --------------------------------------


def upload_head(path: str, length: int, headers: dict[str, str]) -> bytes:
    lines = [f"PUT {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {length}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


UPDATE_PATH = "/api/v1/agent/jobs/7d0d6f9b-2a36-4a43-8f0c-0c1f3e1d2a11/rounds/0/update/"


def test_an_unsigned_upload_is_refused_before_any_of_its_body_is_sent(portal: Portal) -> None:
    with portal.connect() as sock:
        # Only the headers: the answer comes without a byte of the 100 MB body.
        sock.sendall(upload_head(UPDATE_PATH, 100_000_000, {}))
        status, _, body = read_response(sock)
        assert status == 401
        assert json.loads(body)["code"] == "signature_missing"
    assert portal.files_in_tmpdir() == []


@pytest.mark.django_db(transaction=True)
def test_a_badly_signed_upload_is_refused_before_its_body_is_stored(
    portal: Portal, tmp_path: Path, eager_celery: None
) -> None:
    world = build_world(tmp_path)
    assert world.job is not None
    path = f"/api/v1/agent/jobs/{world.job.uid}/rounds/0/update/"
    site = world.agents[SITE_IN]
    claimed = hashlib.sha256(b"what was signed").hexdigest()
    headers = site.headers("PUT", path, b"what was signed")
    headers["X-FedPortal-Signature"] = site.headers("PUT", path, b"other")["X-FedPortal-Signature"]
    headers[HEADER_CONTENT_SHA256] = claimed
    with portal.connect() as sock:
        sock.sendall(upload_head(path, 50_000_000, headers) + b"x" * 500_000)
        status, _, body = read_response(sock)
        assert status == 401
        assert json.loads(body)["code"] == "signature_invalid"
        assert portal.files_in_tmpdir() == []
    task = SiteTask.objects.get(round__job=world.job, site=site.site)
    assert task.state != TaskState.UPLOADED


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("target", "status", "code"),
    [
        ("a job it is not in", 404, "not_found"),
        ("a round it has no task in", 404, "not_found"),
        ("a task it has answered", 409, "conflict"),
    ],
)
def test_a_known_sites_update_no_task_can_take_is_refused_before_its_body_is_read(
    portal: Portal, tmp_path: Path, eager_celery: None, target: str, status: int, code: str
) -> None:
    """The signature is right, but the view would refuse the update after reading it: the
    server refuses it from its headers instead, so an enrolled site cannot spool gigabytes to
    the portal's disk for nothing (found by bench/attacks.py)."""
    world = build_world(tmp_path)
    assert world.job is not None
    site = world.agents[SITE_IN]
    uid, number = world.job.uid, 0
    if target == "a job it is not in":
        uid = uuid.uuid4()
    elif target == "a round it has no task in":
        number = 7
    else:
        SiteTask.objects.filter(round__job=world.job, site=site.site).update(
            state=TaskState.ACCEPTED
        )
    path = f"/api/v1/agent/jobs/{uid}/rounds/{number}/update/"
    signed = b"an update"
    headers = site.headers("PUT", path, signed)
    headers[HEADER_CONTENT_SHA256] = hashlib.sha256(signed).hexdigest()
    with portal.connect() as sock:
        sock.sendall(upload_head(path, 300_000_000, headers))  # the headers alone
        answer, _, body = read_response(sock)
    assert (answer, json.loads(body)["code"]) == (status, code), body
    assert portal.files_in_tmpdir() == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("expect_continue", "large"),
    [(False, False), (True, False), (False, True)],
    ids=["small", "expect-continue", "large"],
)
def test_a_correctly_signed_upload_is_stored(
    portal: Portal,
    tmp_path: Path,
    settings: Any,
    eager_celery: None,
    expect_continue: bool,
    large: bool,
) -> None:
    settings.MEDIA_ROOT = portal.media
    world = build_world(tmp_path)
    assert world.job is not None
    path = f"/api/v1/agent/jobs/{world.job.uid}/rounds/0/update/"
    site = world.agents[SITE_IN]
    # Large: stored in a file by the server, which Django's handler then reads in place.
    params = {"w": torch.arange(300_000, dtype=torch.float32)} if large else INITIAL
    data = update_bytes(params, tmp_path)
    headers = site.headers("PUT", path, data)
    headers[HEADER_CONTENT_SHA256] = hashlib.sha256(data).hexdigest()
    headers["Content-Type"] = "application/octet-stream"
    if expect_continue:
        headers["Expect"] = "100-continue"
    with portal.connect() as sock:
        sock.sendall(upload_head(path, len(data), headers))
        if expect_continue:
            status, _, _ = read_response(sock)
            assert status == 100  # promised only once the signature was checked
        sock.sendall(data)
        status, _, body = read_response(sock)
    assert status == 202, body
    task = SiteTask.objects.get(round__job=world.job, site=site.site)
    assert task.update_sha256 == hashlib.sha256(data).hexdigest()
    assert task.update_size == len(data)


@pytest.mark.django_db(transaction=True)
def test_a_job_submission_needs_a_known_person_before_its_body_is_read(
    portal: Portal, tmp_path: Path
) -> None:
    world = build_world(tmp_path, submit=False)
    path = f"/api/v1/projects/{world.project.slug}/jobs/"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000000\r\n"
        "Content-Type: multipart/form-data; boundary=x\r\n"
    )
    with portal.connect() as sock:
        sock.sendall((head + "\r\n").encode())
        status, _, body = read_response(sock)
        assert status == 401
        assert json.loads(body)["code"] == "not_authenticated"
    with portal.connect() as sock:
        sock.sendall((head + "Authorization: Bearer fpt_not-a-token\r\n\r\n").encode())
        status, _, body = read_response(sock)
        assert status == 401
        assert json.loads(body)["code"] == "api_token_invalid"
    # A known person's submission is read and answered by the view.
    connection = http.client.HTTPConnection("127.0.0.1", portal.port, timeout=15)
    connection.request(
        "POST",
        path,
        body=b"--x--\r\n",
        headers={
            "Authorization": f"Bearer {world.keys[LEAD]}",
            "Content-Type": "multipart/form-data; boundary=x",
        },
    )
    answer = connection.getresponse()
    assert answer.status == 400
    assert json.loads(answer.read())["code"] == "invalid"
    assert portal.files_in_tmpdir() == []


@pytest.mark.django_db(transaction=True)
def test_a_large_job_bundle_from_a_known_person_is_submitted(
    portal: Portal, tmp_path: Path, settings: Any
) -> None:
    settings.MEDIA_ROOT = portal.media
    world = build_world(tmp_path, submit=False)
    bundle = make_bundle(tmp_path)
    bundle.app = zip_bytes({TRAIN_SCRIPT: b"print(1)\n", "data.bin": os.urandom(400_000)})
    fields = {name: (value.name, value.read()) for name, value in bundle.form().items()}
    boundary = "fedportal-test-boundary"
    body = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
            + data
            + b"\r\n"
            for name, (filename, data) in fields.items()
        )
        + f"--{boundary}--\r\n".encode()
    )
    connection = http.client.HTTPConnection("127.0.0.1", portal.port, timeout=30)
    connection.request(
        "POST",
        f"/api/v1/projects/{world.project.slug}/jobs/",
        body=body,
        headers={
            "Authorization": f"Bearer {world.keys[LEAD]}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
        },
    )
    answer = connection.getresponse()
    assert answer.status == 201, answer.read()
    job = Job.objects.get(uid=json.loads(answer.read())["uid"])
    assert job.app_sha256 == hashlib.sha256(bundle.app).hexdigest()


# --- slow clients ------------------------------------------------------------------------------


def test_headers_sent_too_slowly_get_the_connection_closed(portal: Portal) -> None:
    with portal.connect(timeout=TIMEOUT * 5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        closed = False
        for index in range(TIMEOUT * 20):
            try:
                sock.sendall(b"X-Slow-%d: 1\r\n" % index)  # a byte now and then, never the end
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.25)
        assert closed or closed_by_server(sock)


def test_an_idle_kept_alive_connection_is_closed_too(portal: Portal) -> None:
    with portal.connect(timeout=TIMEOUT * 5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, _, _ = read_response(sock)
        assert status == 200
        assert closed_by_server(sock)  # no next request within the header timeout


def test_a_body_sent_too_slowly_is_answered_408(portal: Portal) -> None:
    with portal.connect(timeout=TIMEOUT * 5) as sock:
        sock.sendall(
            b"POST /api/v1/enrol/check/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        )
        status, _, body = read_response(sock)
        assert status == 408
        assert json.loads(body)["code"] == "request_timeout"


@pytest.mark.django_db(transaction=True)
def test_wrong_api_tokens_on_the_upload_route_count_against_the_address(tmp_path: Path) -> None:
    world = build_world(tmp_path, submit=False)
    path = f"/api/v1/projects/{world.project.slug}/jobs/"
    # A server of its own: this test leaves its address throttled.
    with running_portal(tmp_path / "own-server") as portal:

        def answer(token: str) -> tuple[int, dict[str, Any]]:
            with portal.connect() as sock:
                sock.sendall(
                    (
                        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        "Content-Length: 100000000\r\n"
                        "Content-Type: multipart/form-data; boundary=x\r\n"
                        f"Authorization: Bearer {token}\r\n\r\n"
                    ).encode()
                )
                status, _, body = read_response(sock)
                return status, json.loads(body)

        statuses = [answer(f"fpt_guess-{index}")[0] for index in range(21)]
        # The same limit as the API's: 20 wrong tokens in 10 minutes.
        assert statuses == [401] * 20 + [429]
        status, body = answer(world.keys[LEAD])
        assert status == 429  # from this address, even the right token, for a while
        assert body["code"] == "throttled"
        assert "Try again in" in body["message"]
