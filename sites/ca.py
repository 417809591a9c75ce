"""The project certificate authority: pure functions over ``cryptography``, no ORM, no settings.

Each project has its own CA (ECDSA P-256, SHA-256). The CA signs each site's certificate
signing request; the site's private key is made at the site and never seen here. Callers
(``sites.services``) pass validity periods and the at-rest encryption keys in from settings
(``sites.conf``), which keeps these functions testable without Django.

What a site certificate says, whatever the CSR asked for: subject ``CN=<site>, O=<project>,
OU=<organisation>``; issuer the project CA's subject; ``BasicConstraints(ca=False)``,
``KeyUsage(digitalSignature)``, ``ExtendedKeyUsage(clientAuth)``, authority and subject key
identifiers; a random 159-bit serial; valid from five minutes ago (clock skew between portal
and site) for the configured number of days, but never past the CA's own expiry. Extensions in
the CSR are ignored, so a CSR cannot ask for ``ca=True``.

At rest the CA private key is a Fernet token (AES-128-CBC + HMAC-SHA256) under a key derived
with HKDF-SHA256 from a secret in the environment. Several secrets may be given: the first
encrypts, all are tried to decrypt, so the secret can be rotated without downtime.

Every refusal raises a :mod:`sites.exceptions` error whose message names the cause.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sites.exceptions import (
    CAKeyUnavailable,
    CSRSignatureInvalid,
    InvalidCSR,
    SubjectMismatch,
    UnsupportedKeyType,
    WeakKey,
)

CA_COMMON_NAME = "FedPortal project CA"
MAX_CSR_BYTES = 16 * 1024
MIN_RSA_BITS = 2048
# NIST curves only: every TLS stack and HSM handles them; exotic curves buy nothing here.
ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
# A certificate is valid from a little before it was signed, so that a site whose clock runs a
# few minutes behind the portal's can use it at once.
BACKDATE = dt.timedelta(minutes=5)
_HKDF_INFO = b"fedportal/ca-private-key/v1"


@dataclass(frozen=True)
class NewCA:
    """A freshly made CA. ``private_key_pem`` is plaintext: encrypt it before storing it."""

    certificate_pem: str
    private_key_pem: bytes
    fingerprint: str


@dataclass(frozen=True)
class IssuedCertificate:
    pem: str
    serial: str  # lowercase hex, no 0x
    fingerprint: str  # SHA-256 of the DER bytes, lowercase hex
    subject_cn: str
    not_before: dt.datetime
    not_after: dt.datetime


def _now(now: dt.datetime | None) -> dt.datetime:
    return now if now is not None else dt.datetime.now(dt.UTC)


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def subject_common_names(cert: x509.Certificate) -> list[str]:
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def load_certificate(pem: str | bytes) -> x509.Certificate:
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    return x509.load_pem_x509_certificate(data)


def create_ca(*, project_name: str, validity_days: int, now: dt.datetime | None = None) -> NewCA:
    """A self-signed CA certificate and its private key for one project.

    Subject ``CN=FedPortal project CA, O=<project_name>``; ``path_length=0`` because it signs
    site certificates only, never another CA.
    """
    now = _now(now)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, project_name),
        ]
    )
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return NewCA(
        certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        private_key_pem=key_pem,
        fingerprint=fingerprint(cert),
    )


# --- the CA private key at rest -------------------------------------------------------------


def _fernet(secret: str) -> Fernet:
    # HKDF turns any secret string (a passphrase, a random token) into a uniform 32-byte
    # Fernet key; the fixed info string keeps this key apart from any other use of the secret.
    raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(
        secret.encode("utf-8")
    )
    return Fernet(base64.urlsafe_b64encode(raw))


def encrypt_private_key(private_key_pem: bytes, *, keys: Sequence[str]) -> str:
    """Encrypt a PEM private key with the first of ``keys``; returns ASCII safe to store."""
    if not keys:
        raise CAKeyUnavailable("no CA key encryption key is configured")
    return _fernet(keys[0]).encrypt(private_key_pem).decode("ascii")


def decrypt_private_key(ciphertext: str, *, keys: Sequence[str]) -> bytes:
    """The PEM private key from :func:`encrypt_private_key`'s output, trying every key."""
    if not keys:
        raise CAKeyUnavailable("no CA key encryption key is configured")
    try:
        return MultiFernet([_fernet(k) for k in keys]).decrypt(ciphertext.encode("ascii"))
    except (InvalidToken, UnicodeEncodeError) as exc:
        raise CAKeyUnavailable(
            "the project CA key cannot be decrypted with FEDPORTAL_CA_KEY_ENCRYPTION_KEY; "
            "was the key changed without keeping the old one in the list?"
        ) from exc


def load_ca_private_key(
    private_key_pem: bytes, *, ca_certificate_pem: str
) -> ec.EllipticCurvePrivateKey:
    """Load the CA key and check it belongs to the CA certificate.

    The check means a stored key swapped between two projects' rows is refused rather than
    used to sign certificates that would not chain to the project's CA.
    """
    key = serialization.load_pem_private_key(private_key_pem, password=None)
    cert = load_certificate(ca_certificate_pem)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or _spki(key.public_key()) != _spki(
        cert.public_key()
    ):
        raise CAKeyUnavailable("the stored CA private key does not match the CA certificate")
    return key


def _spki(public_key: object) -> bytes:
    assert isinstance(
        public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
    )
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --- certificate signing requests -----------------------------------------------------------


def load_csr(csr_pem: str | bytes) -> x509.CertificateSigningRequest:
    """Parse a PEM CSR and check that it is signed by the key it carries."""
    data = csr_pem.encode("utf-8") if isinstance(csr_pem, str) else csr_pem
    if not data.strip():
        raise InvalidCSR("the CSR is empty", field="csr_pem")
    if len(data) > MAX_CSR_BYTES:
        raise InvalidCSR(f"the CSR is larger than {MAX_CSR_BYTES} bytes", field="csr_pem")
    if b"-----BEGIN CERTIFICATE REQUEST-----" not in data:
        raise InvalidCSR(
            "the CSR is not a PEM 'CERTIFICATE REQUEST' (PKCS#10) block", field="csr_pem"
        )
    try:
        csr = x509.load_pem_x509_csr(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidCSR(f"the CSR cannot be parsed: {exc}", field="csr_pem") from exc
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm, InvalidSignature) as exc:
        raise CSRSignatureInvalid(f"the CSR's signature cannot be checked: {exc}") from exc
    if not valid:
        raise CSRSignatureInvalid(
            "the CSR's signature does not match its public key: it was altered after signing",
            field="csr_pem",
        )
    return csr


def check_csr_key(csr: x509.CertificateSigningRequest) -> None:
    """Accept EC keys on NIST P-256/384/521, Ed25519, and RSA of at least 2048 bits."""
    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise UnsupportedKeyType(
            f"the CSR's public key type is not supported: {exc}", field="csr_pem"
        ) from exc
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise WeakKey(
                f"the CSR's RSA key has {key.key_size} bits; at least {MIN_RSA_BITS} are required",
                field="csr_pem",
            )
        return
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ALLOWED_CURVES):
            raise UnsupportedKeyType(
                f"the CSR's EC key is on curve {key.curve.name}; use P-256, P-384 or P-521",
                field="csr_pem",
            )
        return
    if isinstance(key, ed25519.Ed25519PublicKey):
        return
    raise UnsupportedKeyType(
        f"the CSR's {type(key).__name__.removesuffix('PublicKey') or 'public'} key is not "
        "supported; use ECDSA P-256 (the agent's default), Ed25519 or RSA ≥ 2048 bits",
        field="csr_pem",
    )


def check_csr_subject(
    csr: x509.CertificateSigningRequest, *, site_name: str, project_name: str
) -> None:
    """The CSR must name the approved site as its only CN; an O, if given, must be the project."""
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns:
        raise SubjectMismatch(
            f"the CSR's subject has no common name; expected CN={site_name}", field="csr_pem"
        )
    values = [str(a.value) for a in cns]
    if values != [site_name]:
        raise SubjectMismatch(
            f"the CSR's subject is CN={', CN='.join(values)}; this token is for site "
            f"'{site_name}', so the CSR must say CN={site_name}",
            field="csr_pem",
        )
    orgs = [str(a.value) for a in csr.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    if orgs and orgs != [project_name]:
        raise SubjectMismatch(
            f"the CSR's subject says O={', O='.join(orgs)}; the site belongs to project "
            f"'{project_name}'",
            field="csr_pem",
        )


def sign_csr(
    *,
    csr_pem: str | bytes,
    ca_certificate_pem: str,
    ca_private_key_pem: bytes,
    site_name: str,
    project_name: str,
    organization_name: str,
    validity_days: int,
    now: dt.datetime | None = None,
) -> IssuedCertificate:
    """Check a site's CSR and issue its client certificate from the project CA.

    Raises :class:`InvalidCSR`, :class:`CSRSignatureInvalid`, :class:`WeakKey`,
    :class:`UnsupportedKeyType` or :class:`SubjectMismatch`, in that order of checking.
    """
    now = _now(now)
    csr = load_csr(csr_pem)
    check_csr_key(csr)
    check_csr_subject(csr, site_name=site_name, project_name=project_name)
    ca_cert = load_certificate(ca_certificate_pem)
    ca_key = load_ca_private_key(ca_private_key_pem, ca_certificate_pem=ca_certificate_pem)

    not_before = now - BACKDATE
    not_after = min(now + dt.timedelta(days=validity_days), ca_cert.not_valid_after_utc)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, site_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, project_name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, organization_name),
        ]
    )
    public = csr.public_key()
    assert isinstance(
        public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
    )
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return IssuedCertificate(
        pem=cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        serial=serial_hex(cert),
        fingerprint=fingerprint(cert),
        subject_cn=site_name,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )


def is_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """True when ``ca_cert``'s subject is ``cert``'s issuer and its key signed ``cert``."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
