"""The site side of request signing (``client_agent.signing``): pure, no Django, no database
(the import contracts in pyproject.toml keep it so)."""

from __future__ import annotations

import base64
import hashlib
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from client_agent import signing
from sites import ca


def test_generated_key_and_csr() -> None:
    key = signing.generate_key()
    csr = x509.load_pem_x509_csr(signing.make_csr(key, "site-a", "Oncology").encode())

    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "site-a"
    assert csr.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Oncology"


def test_saved_key_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    path.write_text("old contents")
    path.chmod(0o644)
    key = signing.generate_key()

    signing.save_key(path, key)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = signing.load_key(path)
    assert loaded.private_numbers() == key.private_numbers()  # type: ignore[union-attr]
    assert [p.name for p in tmp_path.iterdir()] == ["site.key"]  # no temporary file left


def test_canonical_string_is_exactly_the_documented_lines() -> None:
    body = b'{"a": 1}'
    got = signing.canonical_string(
        method="post", path="/api/v1/x?y=1", timestamp=1700000000, nonce="ab" * 16, body=body
    )

    assert (
        got
        == (
            "FEDPORTAL-V1\nPOST\n/api/v1/x?y=1\n1700000000\n"
            + "ab" * 16
            + "\n"
            + hashlib.sha256(body).hexdigest()
        ).encode()
    )


@pytest.mark.parametrize(
    "key",
    [
        signing.generate_key(),
        ed25519.Ed25519PrivateKey.generate(),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
    ],
    ids=["p256", "ed25519", "rsa"],
)
def test_sign_request_headers_verify_with_the_public_key(key: signing.PrivateKey) -> None:
    authority = ca.create_ca(project_name="P", validity_days=1)
    cert_pem = ca.sign_csr(
        csr_pem=signing.make_csr(key, "site-a", "P"),
        ca_certificate_pem=authority.certificate_pem,
        ca_private_key_pem=authority.private_key_pem,
        site_name="site-a",
        project_name="P",
        organization_name="O",
        validity_days=1,
    ).pem

    headers = signing.sign_request(
        key=key, cert_pem_or_fingerprint=cert_pem, method="PUT", path="/u", body=b"weights"
    )

    assert set(headers) == set(signing.SIGNATURE_HEADERS)
    assert headers[signing.HEADER_FINGERPRINT] == signing.certificate_fingerprint(cert_pem)
    assert len(headers[signing.HEADER_NONCE]) == 32
    signed = signing.canonical_string(
        method="PUT",
        path="/u",
        timestamp=int(headers[signing.HEADER_TIMESTAMP]),
        nonce=headers[signing.HEADER_NONCE],
        body=b"weights",
    )
    signature = base64.b64decode(headers[signing.HEADER_SIGNATURE])
    public = key.public_key()
    assert signing.verify_signature(public, signature, signed)
    assert not signing.verify_signature(public, signature, signed + b"!")
    assert not signing.verify_signature(signing.generate_key().public_key(), signature, signed)
    assert not signing.verify_signature(object(), signature, signed)


def test_fresh_nonce_for_every_request() -> None:
    key = signing.generate_key()
    kwargs = dict(key=key, cert_pem_or_fingerprint="0" * 64, method="GET", path="/")
    nonces = {signing.sign_request(**kwargs)[signing.HEADER_NONCE] for _ in range(50)}  # type: ignore[arg-type]

    assert len(nonces) == 50


def test_bad_arguments_are_refused() -> None:
    key = signing.generate_key()
    with pytest.raises(signing.SigningError, match="fingerprint"):
        signing.sign_request(key=key, cert_pem_or_fingerprint="abc", method="GET", path="/")
    with pytest.raises(signing.SigningError, match="must start with '/'"):
        signing.sign_request(key=key, cert_pem_or_fingerprint="0" * 64, method="GET", path="x")
