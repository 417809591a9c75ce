"""TLS to the portal: which certificates the agent trusts, and what it says when the portal's
certificate is refused.

One function, :func:`client_context`, makes the SSL context for a site; the agent's HTTPS
requests (:class:`client_agent.portal.PortalClient`) and its WebSocket (``wss://``) both use
it. Certificate verification and host name checking are always on: nothing turns them off
(``--insecure`` is about plain ``http://`` only, where there is no certificate to check).

What verifies the portal's certificate, first found wins:

1. ``$FEDPORTAL_TLS_CA_FILE``: a PEM bundle named in the environment (an override, e.g. for
   ``ProdEnv``, which has no site folder);
2. the site's own bundle, ``tls-ca.pem`` in its folder, copied there by ``enrol --ca-file``;
3. the system's trust store (what the operating system and ``openssl`` trust).

A bundle replaces the system's trust store rather than adding to it: a site enrolled with its
portal's private CA trusts that CA only.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

TLS_CA_FILE_ENV = "FEDPORTAL_TLS_CA_FILE"
SYSTEM_TRUST = "the system's trust store"
# OpenSSL's X509_V_ERR_* codes that mean "a good certificate, for another name".
_NAME_MISMATCH = {62, 63, 64}  # host name, e-mail address, IP address
_EXPIRED = 10  # X509_V_ERR_CERT_HAS_EXPIRED
_NOT_YET_VALID = 9  # X509_V_ERR_CERT_NOT_YET_VALID


class BadCABundle(ValueError):
    """A CA bundle that cannot verify a portal: unreadable, no PEM certificate in it, a
    certificate that does not parse, a private key in it, or every certificate expired."""


def read_ca_bundle(path: Path) -> str:
    """The certificates of the PEM bundle at ``path``, as clean PEM (comments and other blocks
    dropped), checked the way OpenSSL will load them; :class:`BadCABundle` names the file and
    the fault otherwise."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadCABundle(f"{path} cannot be read: {exc.strerror or exc}") from None
    if b"PRIVATE KEY-----" in data:
        raise BadCABundle(
            f"{path} holds a private key: give only the CA's certificate(s), and keep the key "
            "where it is"
        )
    if b"-----BEGIN CERTIFICATE-----" not in data:
        hint = (
            " (it looks like DER: convert it with `openssl x509 -inform der -in FILE -out "
            "FILE.pem`)"
            if data[:1] == b"\x30"
            else ""
        )
        raise BadCABundle(
            f"{path} holds no PEM certificate (a block starting -----BEGIN CERTIFICATE-----)" + hint
        )
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise BadCABundle(f"{path}: a certificate in it cannot be parsed ({exc})") from None
    now = dt.datetime.now(dt.UTC)
    latest = max(cert.not_valid_after_utc for cert in certificates)
    if latest < now:
        raise BadCABundle(
            f"{path}: every certificate in it has expired (the last on {latest:%Y-%m-%d})"
        )
    pem = "".join(cert.public_bytes(Encoding.PEM).decode("ascii") for cert in certificates)
    try:
        ssl.create_default_context(cadata=pem)
    except ssl.SSLError as exc:
        raise BadCABundle(f"{path}: OpenSSL refuses it ({exc})") from None
    return pem


def trust_source(ca_file: Path | None) -> tuple[Path | None, str]:
    """The file that verifies the portal (None: the system's trust store) and its name for
    messages, with the precedence of the module's docstring."""
    override = os.environ.get(TLS_CA_FILE_ENV, "").strip()
    if override:
        return Path(override), f"${TLS_CA_FILE_ENV} ({override})"
    if ca_file is not None:
        return ca_file, f"the site's CA bundle ({ca_file})"
    return None, SYSTEM_TRUST


def client_context(ca_file: Path | None) -> ssl.SSLContext:
    """The SSL context for a site's connections to its portal: certificates verified against
    :func:`trust_source`, host names checked, TLS 1.2 at least."""
    path, source = trust_source(ca_file)
    try:
        context = ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise BadCABundle(f"{source} cannot be loaded: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def untrusted_reason(exc: ssl.SSLCertVerificationError, *, host: str, source: str) -> str:
    """What a site admin reads when the portal's certificate is refused, and what to do."""
    detail = f"certificate verify failed: {exc.verify_message}" if exc.verify_message else str(exc)
    code = exc.verify_code
    if code in _NAME_MISMATCH:
        return (
            f"the portal's certificate is not valid for {host} ({detail}): it must name the "
            "address the site uses (its subjectAltName); use the portal's address as its "
            "certificate names it"
        )
    if code in (_EXPIRED, _NOT_YET_VALID):
        return (
            f"the portal's certificate is out of its dates ({detail}): the portal's operator "
            "must renew it, or this machine's clock is wrong"
        )
    return (
        f"the portal's certificate is not trusted ({detail}); it was checked against "
        f"{source}. If the portal's certificate comes from a private CA, enrol with "
        f"--ca-file CA.pem (that CA's certificate), or set ${TLS_CA_FILE_ENV}"
    )
