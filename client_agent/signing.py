"""Request signing: the site side of the primitive every agent call to the portal uses.

The site's private key is made here, at the site, and never leaves it: the agent sends a
certificate signing request (:func:`make_csr`) with its one-time enrolment token and gets back a
certificate signed by the project's CA. From then on every HTTP request and WebSocket handshake
carries four headers (:func:`sign_request`):

``X-FedPortal-Cert-Fingerprint``
    SHA-256 of the certificate's DER bytes, lowercase hex. The portal looks the certificate up
    by it; the certificate itself is never re-sent.
``X-FedPortal-Timestamp``
    Integer Unix seconds. The portal refuses a request outside ± its window (default 300 s).
``X-FedPortal-Nonce``
    128 random bits, lowercase hex. The portal refuses a nonce it has seen for this certificate.
``X-FedPortal-Signature``
    Base64 of the signature, by the site's key, over :func:`canonical_string`::

        FEDPORTAL-V1\\n{METHOD}\\n{path}\\n{timestamp}\\n{nonce}\\n{sha256 hex of body}

``path`` is the request target exactly as sent: the path (percent-encoded where needed, as
Django's ``escape_uri_path`` would) plus ``?query`` when there is one. The host is not signed:
one portal may be reached under several names, and TLS already binds the connection to it.

Signature algorithms follow the key: ECDSA with SHA-256 for EC keys (the default, P-256),
Ed25519 as is, RSA-PSS with SHA-256 (MGF1-SHA-256, salt length 32) for RSA keys. The portal
verifies with :func:`verify_signature`, so both sides share one definition.

Nothing here imports Django; the portal imports this module, never the other way round.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

SCHEME = "FEDPORTAL-V1"
HEADER_FINGERPRINT = "X-FedPortal-Cert-Fingerprint"
HEADER_TIMESTAMP = "X-FedPortal-Timestamp"
HEADER_NONCE = "X-FedPortal-Nonce"
HEADER_SIGNATURE = "X-FedPortal-Signature"
SIGNATURE_HEADERS = (HEADER_FINGERPRINT, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE)

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
_PRIVATE_KEY_TYPES = (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, rsa.RSAPrivateKey)

# PSS with a fixed salt length, so that a signature's length and verification do not depend on
# the key size and both sides agree without negotiating.
_RSA_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


class SigningError(ValueError):
    """A key, certificate or argument that cannot be used to sign a request."""


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A new ECDSA P-256 private key: small, fast and accepted everywhere."""
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: PrivateKey, site_name: str, project_name: str) -> str:
    """A PEM certificate signing request with subject ``CN=<site_name>, O=<project_name>``.

    The portal refuses a CSR whose CN is not the approved site's name or whose O is not the
    project's name, and builds the certificate's subject itself; the CSR only proves that the
    requester holds the key.
    """
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, site_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, project_name),
        ]
    )
    # Ed25519 signs the message itself, with no separate hash algorithm.
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, algorithm)
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def save_key(path: str | os.PathLike[str], key: PrivateKey) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM readable by its owner only (mode 0600).

    The file is written under a temporary name with mode 0600 from the start and then renamed
    over ``path``, so that no other user ever sees the key, even for a moment, and a crash
    never leaves half a key behind.
    """
    target = Path(path)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # mkstemp creates the file with mode 0600.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_key(path: str | os.PathLike[str]) -> PrivateKey:
    """Read a private key written by :func:`save_key` (or any unencrypted PEM key we accept)."""
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, _PRIVATE_KEY_TYPES):
        raise SigningError(f"{path}: unsupported key type {type(key).__name__}")
    return key


def certificate_fingerprint(cert_pem: str | bytes) -> str:
    """SHA-256 of the certificate's DER encoding, lowercase hex (64 characters)."""
    data = cert_pem.encode("ascii") if isinstance(cert_pem, str) else cert_pem
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise SigningError(f"not a PEM certificate: {exc}") from exc
    return cert.fingerprint(hashes.SHA256()).hex()


def body_sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def canonical_string(
    *, method: str, path: str, timestamp: int, nonce: str, body: bytes, digest: str | None = None
) -> bytes:
    """The bytes that are signed: scheme, upper-case method, path, timestamp, nonce, body digest.

    One line each, joined by ``\\n``. The body enters only as its SHA-256, so the signed string
    stays small whatever the body's size; ``digest``, when given, is that SHA-256 (hex) of a
    body streamed from a file rather than held in memory.
    """
    lines = (SCHEME, method.upper(), path, str(int(timestamp)), nonce, digest or body_sha256(body))
    return "\n".join(lines).encode("utf-8")


def _looks_like_fingerprint(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def sign_request(
    *,
    key: PrivateKey,
    cert_pem_or_fingerprint: str | bytes,
    method: str,
    path: str,
    body: bytes = b"",
    body_digest: str | None = None,
    timestamp: int | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """The four ``X-FedPortal-*`` headers that authenticate one request.

    ``path`` must be exactly the request target sent (path plus ``?query``). ``timestamp`` and
    ``nonce`` default to now and 128 fresh random bits; pass them only in tests. A nonce may be
    used once: never reuse the headers for a second request, even a retry. ``body_digest``
    (SHA-256 hex) stands in for ``body`` when the body is streamed from a file.
    """
    if not path.startswith("/"):
        raise SigningError(f"path must start with '/', got {path!r}")
    if isinstance(cert_pem_or_fingerprint, bytes) or "BEGIN CERTIFICATE" in cert_pem_or_fingerprint:
        fingerprint = certificate_fingerprint(cert_pem_or_fingerprint)
    else:
        fingerprint = cert_pem_or_fingerprint.strip().lower()
        if not _looks_like_fingerprint(fingerprint):
            raise SigningError("expected a PEM certificate or a 64-hex-digit SHA-256 fingerprint")
    ts = int(time.time()) if timestamp is None else int(timestamp)
    nonce = secrets.token_hex(16) if nonce is None else nonce
    message = canonical_string(
        method=method, path=path, timestamp=ts, nonce=nonce, body=body, digest=body_digest
    )
    signature = sign_bytes(key, message)
    return {
        HEADER_FINGERPRINT: fingerprint,
        HEADER_TIMESTAMP: str(ts),
        HEADER_NONCE: nonce,
        HEADER_SIGNATURE: base64.b64encode(signature).decode("ascii"),
    }


def sign_bytes(key: PrivateKey, message: bytes) -> bytes:
    """Sign ``message`` with the algorithm that goes with ``key`` (see the module docstring)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, _RSA_PSS, hashes.SHA256())
    raise SigningError(f"unsupported key type {type(key).__name__}")


def verify_signature(public_key: object, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is ``public_key``'s signature over ``message``; never raises.

    An unsupported key type is simply not valid: the portal only issues certificates for the
    key types :func:`sign_bytes` handles.
    """
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, message)
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, message, _RSA_PSS, hashes.SHA256())
        else:
            return False
    except InvalidSignature:
        return False
    return True
