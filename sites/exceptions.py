"""Domain exceptions of the sites app: one class per reason a write or a signed request fails.

Every exception carries a machine-readable ``code``, a human ``message`` that names the cause,
an HTTP ``status`` and, for bad input, the ``field`` at fault. The API layer maps the whole
hierarchy to a response in one place::

    except DomainError as exc:
        return Response(exc.as_dict(), status=exc.status)

so a view never needs to know which subclass it caught. Services raise these *inside* their
transaction, so a raised ``DomainError`` always means nothing was written.

This module imports nothing from Django: ``sites.ca`` (pure) raises these too.
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Base of every domain failure. Subclasses set ``code``, ``status`` and a default message."""

    code: str = "error"
    status: int = 400
    default_message: str = "the request could not be completed"

    def __init__(
        self,
        message: str | None = None,
        *,
        code: str | None = None,
        status: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message or self.default_message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.field = field
        super().__init__(self.message)

    def as_dict(self) -> dict[str, Any]:
        """The JSON error body: ``{"code", "message"}`` plus ``"field"`` when one is at fault."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


# --- bad input and conflicts ----------------------------------------------------------------


class ValidationFailed(DomainError):
    """A field's value is not acceptable; ``field`` names it."""

    code = "invalid"
    status = 400
    default_message = "invalid input"


class NotFound(DomainError):
    code = "not_found"
    status = 404
    default_message = "not found"


class Conflict(DomainError):
    code = "conflict"
    status = 409
    default_message = "the request conflicts with the current state"


class AlreadyExists(Conflict):
    """A name (project, organisation, site) or a membership is already taken."""

    code = "already_exists"


class InvalidTransition(Conflict):
    """A status change that the state machine does not allow (e.g. approving a denied site)."""

    code = "invalid_transition"


class LastProjectAdmin(Conflict):
    """Removing or demoting this membership would leave the project without an admin."""

    code = "last_project_admin"


class InvitationNotForYou(DomainError):
    """The invitation names another email address or username than the accepting user's."""

    code = "invitation_not_for_you"
    status = 403


# --- one-time tokens (enrolment, invitation) ------------------------------------------------


class TokenInvalid(DomainError):
    """No such token, or a token that was withdrawn (superseded, revoked, site denied)."""

    code = "token_invalid"
    status = 400
    default_message = "the token is not valid"


class TokenExpired(DomainError):
    code = "token_expired"
    status = 410
    default_message = "the token has expired"


class TokenAlreadyUsed(DomainError):
    code = "token_used"
    status = 410
    default_message = "the token has already been used"


class WrongProject(DomainError):
    """An enrolment token presented to another project than the one it was issued for."""

    code = "wrong_project"
    status = 400


class SiteNotApproved(Conflict):
    """Enrolment for a site that is not (or no longer) approved: requested, denied, revoked."""

    code = "site_not_approved"


# --- certificate signing requests -----------------------------------------------------------


class CSRError(DomainError):
    """Base of every reason a CSR is refused."""

    code = "invalid_csr"
    status = 400
    default_message = "the certificate signing request is not acceptable"


class InvalidCSR(CSRError):
    """Not a PEM-encoded PKCS#10 request at all (garbage, truncated, a certificate, too big)."""

    code = "invalid_csr"


class CSRSignatureInvalid(CSRError):
    """The CSR is not signed by the key it carries: it was altered or assembled by hand."""

    code = "csr_signature_invalid"


class SubjectMismatch(CSRError):
    """The CSR's subject does not name the approved site (CN) or its project (O)."""

    code = "subject_mismatch"


class WeakKey(CSRError):
    code = "weak_key"


class UnsupportedKeyType(CSRError):
    code = "unsupported_key_type"


class CAKeyUnavailable(DomainError):
    """The project CA's private key cannot be decrypted: the encryption key setting is wrong.

    A server-side configuration fault, hence 500; the message never includes key material.
    """

    code = "ca_key_unavailable"
    status = 500
    default_message = "the project CA key cannot be decrypted with the configured key"


# --- authentication of signed agent requests and API tokens ---------------------------------


class AuthenticationError(DomainError):
    """Base of every reason a signed request or an API token is refused (HTTP 401)."""

    code = "authentication_failed"
    status = 401
    default_message = "authentication failed"


class SignatureMissing(AuthenticationError):
    code = "signature_missing"


class SignatureMalformed(AuthenticationError):
    code = "signature_malformed"


class SignatureExpired(AuthenticationError):
    """The request's timestamp is outside the portal's window (clock skew or a stale replay)."""

    code = "signature_expired"


class SignatureInvalid(AuthenticationError):
    """The signature does not verify over method, path, timestamp, nonce and body digest."""

    code = "signature_invalid"


class ReplayDetected(AuthenticationError):
    code = "replay_detected"


class UnknownCertificate(AuthenticationError):
    code = "unknown_certificate"


class CertificateRevoked(AuthenticationError):
    code = "certificate_revoked"


class CertificateExpired(AuthenticationError):
    """Outside the certificate's validity period (not yet valid, or expired)."""

    code = "certificate_expired"


class CertificateUntrusted(AuthenticationError):
    """The certificate does not chain to its project's CA (or does not match its record)."""

    code = "certificate_untrusted"


class SiteNotEnrolled(AuthenticationError):
    code = "site_not_enrolled"


class ApiTokenInvalid(AuthenticationError):
    code = "api_token_invalid"
