"""Signed agent requests whose body is streamed, not read: model updates.

``SiteSignatureAuthentication`` verifies the signature over the SHA-256 of ``request.body``,
which reads the whole body into memory (and Django refuses bodies over
``DATA_UPLOAD_MAX_MEMORY_SIZE`` there). An update may be gigabytes, so the upload endpoint
uses :class:`StreamedBodySignatureAuthentication` instead:

- the agent signs the request exactly as any other (``client_agent.signing.sign_request``):
  the canonical string's last line is the body's SHA-256, and it sends that same digest in
  ``X-Content-SHA256``;
- the portal verifies the signature against the *claimed* digest, without reading the body
  (``verify_signed_request(body_sha256=…)``), so the signature proves who claims it;
- the upload service hashes the body as it streams it to storage in chunks and keeps nothing
  unless the hash equals the claim (``jobs.services.tasks.update_upload``).

A body altered in transit therefore fails the checksum (400, nothing stored) instead of the
signature (401); either way it is refused. The signed string is the same as for a body that is
read whole, so an agent needs no second signing scheme.

The portal's server verifies an upload's headers before it reads the body
(``fedportal.bodylimits.sender_check``, which records nothing). The view then records that
check (the nonce claimed, the heartbeat) instead of verifying the same headers again, unless
a certificate, site or project changed meanwhile (``checked_request_record``): then it
verifies them again, and a certificate revoked while its body streamed is refused.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from django.contrib.auth.models import AnonymousUser
from rest_framework import exceptions
from rest_framework.request import Request

from client_agent.protocol import HEADER_CONTENT_SHA256 as HEADER_CONTENT_SHA256
from client_agent.signing import HEADER_FINGERPRINT, HEADER_SIGNATURE, SIGNATURE_HEADERS
from common.exceptions import AuthenticationError
from fedportal import bodylimits
from sites.authentication import (
    SiteIdentity,
    SiteSignatureAuthentication,
    checked_request_record,
    verify_signed_request,
)
from sites.exceptions import SignatureMalformed, SignatureMissing

logger = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def streamed_upload_verify(
    *, method: str, path: str, headers: Mapping[str, str], record: bool = True
) -> SiteIdentity:
    """:func:`~sites.authentication.verify_signed_request` for a streamed upload: over the
    digest in ``X-Content-SHA256``, which must be there. ``record=False``: the server's check
    before it reads the body (``fedportal.bodylimits``)."""
    lowered = {str(name).lower(): str(value) for name, value in headers.items()}
    missing = [name for name in SIGNATURE_HEADERS if name.lower() not in lowered]
    if missing:
        raise SignatureMissing(f"the request lacks the header(s) {', '.join(missing)}")
    digest = lowered.get(HEADER_CONTENT_SHA256.lower(), "").strip().lower()
    if not _SHA256.fullmatch(digest):
        raise SignatureMalformed(
            f"a streamed upload is signed over its {HEADER_CONTENT_SHA256} header "
            "(the body's SHA-256, 64 hexadecimal digits), which is missing or malformed"
        )
    return verify_signed_request(
        method=method, path=path, headers=lowered, body_sha256=digest, record=record
    )


class StreamedBodySignatureAuthentication(SiteSignatureAuthentication):
    """A site agent's signed request, verified over ``X-Content-SHA256``, never the body."""

    def authenticate(self, request: Request) -> tuple[AnonymousUser, SiteIdentity] | None:
        headers = request.headers
        if HEADER_SIGNATURE not in headers and HEADER_FINGERPRINT not in headers:
            return None
        checked = bodylimits.checked_identity(getattr(request._request, "scope", None))
        try:
            if checked is not None and checked_request_record(checked, headers=headers):
                return AnonymousUser(), checked
            identity = streamed_upload_verify(
                method=request.method or "PUT", path=request.get_full_path(), headers=headers
            )
        except AuthenticationError as exc:
            logger.info("signed upload refused: %s %s: %s", request.method, request.path, exc)
            raise exceptions.AuthenticationFailed(detail=exc.message, code=exc.code) from exc
        return AnonymousUser(), identity
