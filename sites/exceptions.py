"""The sites app's own domain errors: one-time tokens, certificate signing requests and the
authentication of signed agent requests. Their bases are in ``common.exceptions``.

Standard library only: ``sites.ca`` (pure) raises these too.
"""

from __future__ import annotations

from common.exceptions import AuthenticationError, Conflict, DomainError

# --- memberships and invitations -------------------------------------------------------


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
