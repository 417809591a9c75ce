"""How large a request body may be on each route, and who must be known before it is read.

One table, used twice:

- by the server (``fedportal.server``, Daphne's HTTP parser), which answers 413 as soon as
  the headers announce a body over the route's limit, counts a chunked body as it arrives, and
  on an upload route checks the sender's credentials from the headers alone *before* it reads
  a byte of the body; nothing over a limit, and nothing from an unknown sender on an upload
  route, is ever written to disk;
- by :class:`BodyLimitMiddleware` around the Django HTTP application, so that any other ASGI
  server (and the tests) is bounded too.

Routes are matched on the method and the decoded path (no query). Anything not in the table
gets ``FEDPORTAL_MAX_REQUEST_BYTES`` (1 MiB): every JSON and form endpoint fits in it.

- ``PUT /api/v1/agent/jobs/<uid>/rounds/<n>/update/``: ``FEDPORTAL_MAX_MODEL_BYTES``; the
  sender must be a site (its request signature, over ``X-Content-SHA256``);
- ``POST /api/v1/projects/<project>/jobs/`` and the dashboard's ``POST
  /projects/<slug>/jobs/new/``: the model and app archive limits plus 1.06 MiB; the sender
  must be a person (an API token or a signed-in session);
- ``POST /login/``, ``/admin/login/``: 16 KiB;
- ``POST /api/v1/enrol/``, ``/api/v1/enrol/check/``: 64 KiB;
- anything else: ``FEDPORTAL_MAX_REQUEST_BYTES``.

"Known first" checks that the credentials are valid (the view still checks the role, and
records the signature's nonce), and for a site's update that the site has a task in that round
which can take it: it keeps anonymous gigabytes, and a site's gigabytes that would be refused,
off the disk; it is not the permission check.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from django.conf import settings

ASGIApp = Callable[..., Awaitable[None]]
Message = MutableMapping[str, Any]

# The key under which fedportal.server offers the stored body, with its first chunk, to an
# application that can take it as a file (fedportal.asgi.PortalASGIHandler).
STORED_BODY = "fedportal.stored_body"
# The scope key under which fedportal.server hands the view what the check of an update's
# sender found (a :class:`CheckedSender`), so that the view need not find it again.
CHECKED_SENDER = "fedportal.checked_sender"

SIGN_IN_MAX_BYTES = 16 * 1024
ENROL_MAX_BYTES = 64 * 1024
# A job submission carries, besides its two files, job.json (at most 1 MiB,
# jobs.api.serializers.SPEC_MAX_BYTES) and a few small form fields.
SUBMISSION_OVERHEAD_BYTES = 1024 * 1024 + 64 * 1024

_UUID = r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"


class Sender(Enum):
    """Who must be known, from the headers, before an upload's body is read."""

    ANYONE = "anyone"
    SITE = "site"  # a site agent's signature (sites.authentication), over X-Content-SHA256
    PERSON = "person"  # an API token, or a signed-in session


def submission_max_bytes() -> int:
    """A job bundle: the initial model, the app archive and the overhead, at most."""
    return (
        int(settings.FEDPORTAL_MAX_MODEL_BYTES)
        + int(settings.FEDPORTAL_MAX_APP_ARCHIVE_BYTES)
        + SUBMISSION_OVERHEAD_BYTES
    )


@dataclass(frozen=True)
class BodyRule:
    name: str
    methods: frozenset[str]
    pattern: re.Pattern[str]
    limit: Callable[[], int]
    sender: Sender = Sender.ANYONE

    @property
    def is_upload(self) -> bool:
        """An upload's body may be large and slow: it is paced by a minimum rate instead of a
        whole-body deadline (``fedportal.server``)."""
        return self.sender is not Sender.ANYONE


def _default_limit() -> int:
    return int(settings.FEDPORTAL_MAX_REQUEST_BYTES)


_UPDATE_PATH = re.compile(
    rf"^/api/v1/agent/jobs/(?P<uid>{_UUID})/rounds/(?P<round>[0-9]{{1,9}})/update/$"
)

_SECURE_PATH = re.compile(
    rf"^/api/v1/agent/jobs/(?P<uid>{_UUID})/rounds/(?P<round>[0-9]{{1,9}})/secure/"
    r"(keys|shares|finish)/$"
)

RULES: tuple[BodyRule, ...] = (
    BodyRule(
        # Under homomorphic encryption a share carries the round's sealed context for every
        # site, and a finish answer the decrypted sum (base64): up to a model's size.
        "a site's secure aggregation message",
        frozenset({"POST"}),
        _SECURE_PATH,
        lambda: 2 * int(settings.FEDPORTAL_MAX_MODEL_BYTES),
        Sender.SITE,
    ),
    BodyRule(
        "a site's update",
        frozenset({"PUT"}),
        _UPDATE_PATH,
        lambda: int(settings.FEDPORTAL_MAX_MODEL_BYTES),
        Sender.SITE,
    ),
    BodyRule(
        "a job submission",
        frozenset({"POST"}),
        re.compile(r"^/api/v1/projects/[^/]+/jobs/$"),
        submission_max_bytes,
        Sender.PERSON,
    ),
    BodyRule(
        "a job submission",
        frozenset({"POST"}),
        re.compile(r"^/projects/[^/]+/jobs/(new|upload)/$"),
        submission_max_bytes,
        Sender.PERSON,
    ),
    BodyRule(
        "a sign-in",
        frozenset({"POST"}),
        re.compile(r"^/(admin/)?login/$"),
        lambda: SIGN_IN_MAX_BYTES,
    ),
    BodyRule(
        "an enrolment",
        frozenset({"POST"}),
        re.compile(r"^/api/v1/enrol/(check/)?$"),
        lambda: ENROL_MAX_BYTES,
    ),
)
DEFAULT_RULE = BodyRule("a request", frozenset(), re.compile(""), _default_limit)


def rule_for(method: str, path: str) -> BodyRule:
    """The rule for a request: ``method`` as sent (any case), ``path`` decoded, no query."""
    method = method.upper()
    for rule in RULES:
        if method in rule.methods and rule.pattern.match(path):
            return rule
    return DEFAULT_RULE


def too_large_body(limit: int, rule: BodyRule, length: int | None = None) -> dict[str, str]:
    """The API's error body for a request over its route's limit (HTTP 413)."""
    size = f"{length} bytes" if length is not None else "more than that"
    return {
        "code": "too_large",
        "field": "body",
        "message": f"the body of {rule.name} may be at most {limit} bytes; this one is {size}",
    }


def json_bytes(body: dict[str, str]) -> bytes:
    return json.dumps(body).encode()


class BodyLimitMiddleware:
    """ASGI middleware around an HTTP application: a request whose ``Content-Length`` is over
    its route's limit is answered 413 before the application runs; a body that grows past the
    limit as it streams is answered 413 and the application sees the client disconnect."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rule = rule_for(scope.get("method", "GET"), scope.get("path", "/"))
        limit = rule.limit()
        length = _content_length(scope)
        if length is not None and length > limit:
            await _send_413(send, too_large_body(limit, rule, length))
            return

        received = 0
        refused = False
        started = False

        async def bounded_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not started:
                        await _send_413(send, too_large_body(limit, rule))
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 was the answer; the application's is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, bounded_receive, guarded_send)


@dataclass(frozen=True)
class CheckedSender:
    """What the check of an upload's sender found from its headers: the site's identity
    (verified, nothing recorded: ``sites.authentication.checked_request_record`` records it)
    and the task its update is for."""

    identity: Any  # sites.authentication.SiteIdentity
    task: Any  # jobs.models.SiteTask


class SenderUnknown(Exception):
    """An upload refused from its headers alone: its sender could not be told (HTTP 401), its
    address sent too many wrong credentials (429), or a known site sends an update that no task
    of its can take (404: not its job or round; 409: already sent, or the round is over)."""

    def __init__(self, code: str, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


async def sender_check(
    sender: Sender,
    *,
    method: str,
    path: str,
    query: bytes,
    headers: Mapping[str, str],
    address: str | None = None,
) -> Any:
    """Check, from the headers alone, that an upload comes from a known sender; raise
    :class:`SenderUnknown` otherwise. ``path`` is decoded, ``query`` raw, as in the request;
    ``address`` is the client's. Records nothing (no nonce, no heartbeat, no session change)
    but a wrong API token, which counts against the address as it would in the view: once the
    body is in, the view authenticates a person's request again, fully, and records a site's
    (``sites.authentication.checked_request_record``; again fully if a certificate, site or
    project changed meanwhile).

    Returns what it found of a site's update (else None): the server hands it to the view
    under :data:`CHECKED_SENDER` (:func:`checked_task`, :func:`checked_identity`)."""
    from channels.db import database_sync_to_async  # Django is set up by now

    if sender is Sender.SITE:
        return await database_sync_to_async(_site_check)(
            method=method, path=path, query=query, headers=headers
        )
    if sender is Sender.PERSON:
        await database_sync_to_async(_person_check)(headers=headers, address=address)
    return None


def checked_task(
    scope: Mapping[str, Any] | None, *, site_id: int, job_uid: object, round_number: int
) -> Any:
    """The task the check of this update's sender read (:func:`sender_check`), if it is the
    one the view asks for: of site ``site_id``, in round ``round_number`` of the job with
    ``job_uid``; else None, and the view reads the task itself (a request that did not come
    through fedportal.server, as in tests). Its state may be older than the body's arrival;
    an upload's writes test the task's state in the database, not this copy's."""
    checked = (scope or {}).get(CHECKED_SENDER)
    if checked is None:
        return None
    task = checked.task
    same = (
        task.site_id == site_id
        and task.round.number == round_number
        and str(task.round.job.uid) == str(job_uid)
    )
    return task if same else None


def checked_identity(scope: Mapping[str, Any] | None) -> Any:
    """The site identity the check of this request's sender verified from its headers
    (:func:`sender_check`; a ``sites.authentication.SiteIdentity``, not yet recorded), or
    None: a request that did not come through fedportal.server's check."""
    checked = (scope or {}).get(CHECKED_SENDER)
    return None if checked is None else checked.identity


def _site_check(
    *, method: str, path: str, query: bytes, headers: Mapping[str, str]
) -> CheckedSender | None:
    """The signature, and then the task: an enrolled site, too, may fill the disk only with an
    update the portal will keep (one for an open task of its own), not with gigabytes for a job
    it is not in, or for a task it has already answered, which the view would refuse after
    reading them. Returns the identity and the task (None for a path that names no update)."""
    from common.exceptions import AuthenticationError, DomainError
    from jobs.api.authentication import streamed_upload_verify
    from jobs.selectors import task_of_site, task_takes_update
    from sites.authentication import signed_target

    try:
        identity = streamed_upload_verify(
            method=method, path=signed_target(path, query), headers=headers, record=False
        )
    except AuthenticationError as exc:
        raise SenderUnknown(exc.code, exc.message) from None
    match = _UPDATE_PATH.match(path)
    if match is None:
        return None
    try:
        task = task_of_site(
            job_uid=match["uid"], site=identity.site, round_number=int(match["round"])
        )
    except DomainError as exc:
        raise SenderUnknown(exc.code, exc.message, status=exc.status) from None
    if not task_takes_update(task):
        raise SenderUnknown("conflict", f"this task is already {task.state}", status=409)
    return CheckedSender(identity=identity, task=task)


def _person_check(*, headers: Mapping[str, str], address: str | None) -> None:
    from importlib import import_module
    from types import SimpleNamespace

    from django.contrib.auth import get_user
    from django.http.cookie import parse_cookie
    from rest_framework.exceptions import Throttled

    from common.exceptions import AuthenticationError
    from fedportal.throttling import CredentialFailures
    from sites.authentication import api_token_authenticate
    from sites.secret_tokens import API_TOKEN_PREFIX

    lowered = {name.lower(): value for name, value in headers.items()}
    parts = lowered.get("authorization", "").split()
    bearer = len(parts) == 2 and parts[0].lower() in {"bearer", "token"}
    if bearer and parts[1].startswith(API_TOKEN_PREFIX):
        client = SimpleNamespace(META={"REMOTE_ADDR": address})
        failures = CredentialFailures()
        try:
            failures.refuse_if_over(client)  # type: ignore[arg-type]
        except Throttled as exc:
            # DRF sets Throttled.wait (seconds, or None); its stubs do not declare it.
            wait = int(exc.wait or 0) + 1  # type: ignore[attr-defined]
            raise SenderUnknown(
                "throttled", f"{exc.detail} Try again in {wait} s.", status=429
            ) from None
        try:
            api_token_authenticate(parts[1])
        except AuthenticationError as exc:
            failures.record(client)  # type: ignore[arg-type]
            raise SenderUnknown(exc.code, exc.message) from None
        return
    session_key = parse_cookie(lowered.get("cookie", "")).get(settings.SESSION_COOKIE_NAME)
    if session_key:
        engine = import_module(settings.SESSION_ENGINE)
        # django.contrib.auth.get_user reads only request.session (and checks the session's
        # password hash, as the view's authentication will).
        user = get_user(SimpleNamespace(session=engine.SessionStore(session_key)))  # type: ignore[arg-type]
        if user.is_authenticated:
            return
    raise SenderUnknown(
        "not_authenticated",
        "an upload needs an API token (Authorization: Bearer fpt_…) or a signed-in session, "
        "sent with its headers",
    )


def _content_length(scope: MutableMapping[str, Any]) -> int | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            raw = value.strip()
            return int(raw) if raw.isdigit() else None
    return None


async def _send_413(send: Callable[[Message], Awaitable[None]], body: dict[str, str]) -> None:
    payload = json_bytes(body)
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
