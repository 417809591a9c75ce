"""The project CA: made with the project, its key encrypted at rest, and CSR signing with each
way a CSR is refused."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pytest_django.fixtures import Settings as SettingsWrapper

from client_agent import signing
from sites import ca, conf
from sites.exceptions import (
    CAKeyUnavailable,
    CSRSignatureInvalid,
    InvalidCSR,
    SubjectMismatch,
    UnsupportedKeyType,
    WeakKey,
)
from sites.models import Project
from tests.portal.factories import ProjectFactory

KEYS = ["first-secret"]


@pytest.fixture(scope="module")
def authority() -> ca.NewCA:
    return ca.create_ca(project_name="Oncology", validity_days=3650)


def sign(authority: ca.NewCA, csr_pem: str | bytes, **overrides: object) -> ca.IssuedCertificate:
    kwargs: dict[str, object] = {
        "csr_pem": csr_pem,
        "ca_certificate_pem": authority.certificate_pem,
        "ca_private_key_pem": authority.private_key_pem,
        "site_name": "site-a",
        "project_name": "Oncology",
        "organization_name": "Hospital A",
        "validity_days": 365,
    } | overrides
    return ca.sign_csr(**kwargs)  # type: ignore[arg-type]


def csr_with(key: object, subject: list[x509.NameAttribute]) -> str:
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(subject))
        .sign(key, algorithm)  # type: ignore[arg-type]
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


CN_A = x509.NameAttribute(NameOID.COMMON_NAME, "site-a")


# --- the CA itself --------------------------------------------------------------------------


def test_ca_certificate_is_a_self_signed_p256_ca(authority: ca.NewCA) -> None:
    cert = ca.load_certificate(authority.certificate_pem)

    assert cert.issuer == cert.subject
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Oncology"
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca is True and constraints.path_length == 0
    assert ca.is_issued_by(cert, cert)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=3650) <= lifetime <= dt.timedelta(days=3650, minutes=6)
    assert authority.fingerprint == cert.fingerprint(hashes.SHA256()).hex()


def test_private_key_round_trips_through_encryption(authority: ca.NewCA) -> None:
    token = ca.encrypt_private_key(authority.private_key_pem, keys=KEYS)

    assert b"PRIVATE KEY" not in token.encode()
    assert ca.decrypt_private_key(token, keys=KEYS) == authority.private_key_pem


def test_wrong_encryption_key_is_refused_without_leaking(authority: ca.NewCA) -> None:
    token = ca.encrypt_private_key(authority.private_key_pem, keys=KEYS)

    with pytest.raises(CAKeyUnavailable, match="cannot be decrypted"):
        ca.decrypt_private_key(token, keys=["another-secret"])


def test_encryption_key_can_be_rotated(authority: ca.NewCA) -> None:
    old = ca.encrypt_private_key(authority.private_key_pem, keys=["old"])

    # The new key first; the old one still decrypts what it encrypted.
    assert ca.decrypt_private_key(old, keys=["new", "old"]) == authority.private_key_pem
    new = ca.encrypt_private_key(authority.private_key_pem, keys=["new", "old"])
    assert ca.decrypt_private_key(new, keys=["new"]) == authority.private_key_pem


def test_ca_key_from_another_ca_is_refused(authority: ca.NewCA) -> None:
    other = ca.create_ca(project_name="Other", validity_days=10)
    csr = signing.make_csr(signing.generate_key(), "site-a", "Oncology")

    with pytest.raises(CAKeyUnavailable, match="does not match"):
        sign(authority, csr, ca_private_key_pem=other.private_key_pem)


@pytest.mark.django_db
def test_project_stores_its_ca_key_encrypted_at_rest() -> None:
    project = ProjectFactory.create(name="Cardiology")
    stored = Project.objects.values_list("ca_private_key_encrypted", flat=True).get()
    key_pem = ca.decrypt_private_key(stored, keys=conf.ca_key_encryption_keys())
    key = serialization.load_pem_private_key(key_pem, password=None)
    key_body = b"".join(key_pem.splitlines()[1:-1])

    assert b"PRIVATE KEY" not in stored.encode()
    assert key_body.decode() not in stored
    assert key_body[:40].decode() not in stored
    assert key.public_key().public_numbers() == (  # type: ignore[union-attr]
        ca.load_certificate(project.ca_certificate_pem).public_key().public_numbers()  # type: ignore[union-attr]
    )
    assert project.ca_fingerprint == ca.fingerprint(ca.load_certificate(project.ca_certificate_pem))


@pytest.mark.django_db
def test_no_encryption_key_outside_development_refuses_a_project(
    settings: SettingsWrapper,
) -> None:
    settings.FEDPORTAL_CA_KEY_ENCRYPTION_KEY = ""
    settings.FEDPORTAL_DEV = False
    settings.DEBUG = True  # DEBUG alone is no development mode

    with pytest.raises(CAKeyUnavailable, match="FEDPORTAL_CA_KEY_ENCRYPTION_KEY is not set"):
        ProjectFactory.create()
    assert Project.objects.count() == 0


def test_no_encryption_key_in_development_mode_uses_secret_key(
    settings: SettingsWrapper,
) -> None:
    settings.FEDPORTAL_CA_KEY_ENCRYPTION_KEY = ""
    settings.FEDPORTAL_DEV = True
    settings.SECRET_KEY = "s3cret"

    assert conf.ca_key_encryption_keys() == ["django-secret-key:s3cret"]


# --- signing a CSR --------------------------------------------------------------------------


def test_signed_certificate_says_what_the_ca_decides(authority: ca.NewCA) -> None:
    key = signing.generate_key()
    issued = sign(authority, signing.make_csr(key, "site-a", "Oncology"))
    cert = ca.load_certificate(issued.pem)
    ca_cert = ca.load_certificate(authority.certificate_pem)

    def subject(oid: x509.ObjectIdentifier) -> str:
        return str(cert.subject.get_attributes_for_oid(oid)[0].value)

    assert (subject(NameOID.COMMON_NAME), subject(NameOID.ORGANIZATION_NAME)) == (
        "site-a",
        "Oncology",
    )
    assert subject(NameOID.ORGANIZATIONAL_UNIT_NAME) == "Hospital A"
    assert cert.issuer == ca_cert.subject
    assert ca.is_issued_by(cert, ca_cert)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    assert issued.serial == format(cert.serial_number, "x")
    assert issued.fingerprint == signing.certificate_fingerprint(issued.pem)
    assert issued.not_after - issued.not_before == dt.timedelta(days=365, minutes=5)


def test_certificate_never_outlives_its_ca() -> None:
    short = ca.create_ca(project_name="Oncology", validity_days=30)
    issued = sign(short, signing.make_csr(signing.generate_key(), "site-a", "Oncology"))

    assert issued.not_after == ca.load_certificate(short.certificate_pem).not_valid_after_utc


def test_csr_asking_to_be_a_ca_still_gets_a_leaf_certificate(authority: ca.NewCA) -> None:
    key = signing.generate_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([CN_A]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    issued = sign(authority, csr.public_bytes(serialization.Encoding.PEM))

    cert = ca.load_certificate(issued.pem)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ed25519.Ed25519PrivateKey.generate,
        lambda: ec.generate_private_key(ec.SECP384R1()),
    ],
    ids=["rsa-2048", "ed25519", "p-384"],
)
def test_other_strong_key_types_are_accepted(authority: ca.NewCA, make_key: object) -> None:
    key = make_key()  # type: ignore[operator]
    issued = sign(authority, signing.make_csr(key, "site-a", "Oncology"))

    assert ca.is_issued_by(
        ca.load_certificate(issued.pem), ca.load_certificate(authority.certificate_pem)
    )


@pytest.mark.parametrize(
    ("csr", "message"),
    [
        ("", "empty"),
        ("hello", "not a PEM 'CERTIFICATE REQUEST'"),
        (
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "cannot be parsed",
        ),
        ("-----BEGIN CERTIFICATE REQUEST-----\n" + "A" * 20000, "larger than"),
    ],
    ids=["empty", "garbage", "bad-der", "too-big"],
)
def test_malformed_csr_is_refused(authority: ca.NewCA, csr: str, message: str) -> None:
    with pytest.raises(InvalidCSR, match=message) as caught:
        sign(authority, csr)
    assert caught.value.code == "invalid_csr"
    assert caught.value.field == "csr_pem"


def test_a_certificate_is_not_a_csr(authority: ca.NewCA) -> None:
    with pytest.raises(InvalidCSR, match="CERTIFICATE REQUEST"):
        sign(authority, authority.certificate_pem)


def test_csr_with_a_bad_signature_is_refused(authority: ca.NewCA) -> None:
    csr = x509.load_pem_x509_csr(
        signing.make_csr(signing.generate_key(), "site-a", "Oncology").encode()
    )
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    # Swap the signed subject's CN for another of the same length: the DER stays well formed,
    # the signature no longer matches.
    at = der.index(b"site-a")
    der[at : at + 6] = b"site-b"
    tampered = x509.load_der_x509_csr(bytes(der))
    pem = tampered.public_bytes(serialization.Encoding.PEM)

    with pytest.raises(CSRSignatureInvalid, match="signature does not match") as caught:
        sign(authority, pem, site_name="site-b")
    assert caught.value.code == "csr_signature_invalid"


@pytest.mark.parametrize(
    ("subject", "message"),
    [
        ([x509.NameAttribute(NameOID.COMMON_NAME, "site-b")], "CN=site-b.*CN=site-a"),
        ([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Oncology")], "no common name"),
        (
            [CN_A, x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Cardiology")],
            "O=Cardiology.*project 'Oncology'",
        ),
        ([CN_A, x509.NameAttribute(NameOID.COMMON_NAME, "site-b")], "CN=site-a, CN=site-b"),
    ],
    ids=["other-cn", "no-cn", "other-project", "two-cns"],
)
def test_csr_subject_must_name_the_site_and_project(
    authority: ca.NewCA, subject: list[x509.NameAttribute], message: str
) -> None:
    with pytest.raises(SubjectMismatch, match=message):
        sign(authority, csr_with(signing.generate_key(), subject))


def test_weak_rsa_key_is_refused(authority: ca.NewCA) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)

    with pytest.raises(WeakKey, match="1024 bits; at least 2048"):
        sign(authority, csr_with(key, [CN_A]))


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: dsa.generate_private_key(key_size=2048),
        lambda: ec.generate_private_key(ec.SECP256K1()),
    ],
    ids=["dsa", "secp256k1"],
)
def test_unsupported_key_types_are_refused(authority: ca.NewCA, make_key: object) -> None:
    with pytest.raises(UnsupportedKeyType, match="not supported|curve secp256k1"):
        sign(authority, csr_with(make_key(), [CN_A]))  # type: ignore[operator]
