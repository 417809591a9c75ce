"""What verifies the portal's TLS certificate, and a CA bundle checked before it is used:
``enrol --ca-file`` refuses a bad file, naming it and its fault, and then writes and sends
nothing. Nothing here reaches a portal (the live side: tests/portal/client_agent/test_agent_tls).
"""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from client_agent import cli, tls
from client_agent.portal import PortalClient
from client_agent.site_dir import SiteDir
from tests.site_folders import enrolled_folder, identity
from tests.tls_proxy import ThrowawayCA

PORTAL = "https://127.0.0.1:9"


class Sent(list[tuple[str, str, str]]):
    def __call__(self, channel: str, method: str, path: str, body: bytes) -> None:
        self.append((channel, method, path))


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> ThrowawayCA:
    return ThrowawayCA.make(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tls.TLS_CA_FILE_ENV, raising=False)


def trusted(context: ssl.SSLContext) -> list[str]:
    """The common names of the CAs ``context`` trusts (loaded from a file)."""
    return [
        dict(rdn[0] for rdn in cert["subject"]).get("commonName", "")  # type: ignore[misc]
        for cert in context.get_ca_certs()
    ]


def bad_bundles(folder: Path, ca: ThrowawayCA) -> dict[str, tuple[Path, str]]:
    """Files that are no CA bundle, and the fault each must be refused for."""
    folder.mkdir(exist_ok=True)
    der = folder / "ca.der"
    der.write_bytes(ca.certificate.public_bytes(Encoding.DER))
    text = folder / "notes.txt"
    text.write_text("the portal's CA is on the wiki\n")
    with_key = folder / "with-key.pem"
    server = ca.issue("leaf", ["portal.example.org"])
    with_key.write_text(ca.pem + server.key.read_text())
    damaged = folder / "damaged.pem"
    lines = ca.pem.splitlines()
    damaged.write_text("\n".join([lines[0], lines[1][:20] + "!!" + lines[1][22:], *lines[2:]]))
    expired = ca.issue("expired", ["x"], start=dt.datetime.now(dt.UTC) - dt.timedelta(days=30))
    return {
        "missing": (folder / "absent.pem", "cannot be read: No such file"),
        "text": (text, "holds no PEM certificate"),
        "der": (der, "looks like DER"),
        "key": (with_key, "holds a private key"),
        "damaged": (damaged, "cannot be parsed"),
        "expired": (expired.cert, "every certificate in it has expired"),
    }


@pytest.mark.parametrize("case", ["missing", "text", "der", "key", "damaged", "expired"])
def test_enrol_refuses_a_bad_ca_file_naming_it_and_writes_and_sends_nothing(
    tmp_path: Path, ca: ThrowawayCA, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    path, fault = bad_bundles(tmp_path / "files", ca)[case]
    folder = tmp_path / "site"
    sent = Sent()

    code = cli.main(
        ["enrol", "--portal", PORTAL, "--token", "fpe_x", "--dir", str(folder)]
        + ["--ca-file", str(path)],
        wire=sent,
    )

    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"error: --ca-file: {path}") and fault in err, err
    assert sent == [] and not folder.exists()


def test_a_ca_file_is_for_https_only(
    tmp_path: Path, ca: ThrowawayCA, capsys: pytest.CaptureFixture[str]
) -> None:
    for portal in ("http://127.0.0.1:9", "http://fl.example.org"):
        code = cli.main(
            ["enrol", "--portal", portal, "--token", "fpe_x", "--dir", str(tmp_path / "s")]
            + ["--ca-file", str(ca.path), "--insecure"]
        )
        assert code == 1 and "verifies an https:// portal" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_the_root_certificates_spelling_is_the_same_option(ca: ThrowawayCA) -> None:
    parser = cli.build_parser()
    args = ["enrol", "--portal", PORTAL, "--token", "t"]
    assert parser.parse_args([*args, "--root-certificates", str(ca.path)]).ca_file == ca.path
    assert parser.parse_args([*args, "--ca-file", str(ca.path)]).ca_file == ca.path


def test_a_bundle_is_kept_as_clean_pem(tmp_path: Path, ca: ThrowawayCA) -> None:
    other = ThrowawayCA.make(tmp_path / "other", name="Second CA")
    messy = tmp_path / "bundle.pem"
    messy.write_text(f"Bag Attributes: from a browser export\n{ca.pem}\n# and\n{other.pem}")

    pem = tls.read_ca_bundle(messy)

    loaded = x509.load_pem_x509_certificates(pem.encode())
    assert [c.subject for c in loaded] == [ca.certificate.subject, other.certificate.subject]
    assert "Bag Attributes" not in pem and "#" not in pem


@pytest.mark.usefixtures("no_override")
def test_what_verifies_the_portal_site_bundle_then_system(ca: ThrowawayCA) -> None:
    with_bundle = PortalClient(PORTAL, ca_file=ca.path)
    assert with_bundle.tls is not None
    assert trusted(with_bundle.tls) == ["FedPortal test CA"]
    assert with_bundle.trust_source == f"the site's CA bundle ({ca.path})"

    system = PortalClient(PORTAL)
    assert system.tls is not None and system.trust_source == tls.SYSTEM_TRUST
    assert "FedPortal test CA" not in trusted(system.tls)
    # Plain HTTP has no certificate, so no context.
    assert PortalClient("http://127.0.0.1:9", ca_file=ca.path).tls is None
    for client in (with_bundle, system):
        assert client.tls is not None
        assert client.tls.verify_mode == ssl.CERT_REQUIRED and client.tls.check_hostname


def test_the_environment_overrides_the_site_bundle(
    tmp_path: Path, ca: ThrowawayCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = ThrowawayCA.make(tmp_path / "other", name="Override CA")
    monkeypatch.setenv(tls.TLS_CA_FILE_ENV, str(other.path))

    client = PortalClient(PORTAL, ca_file=ca.path)

    assert client.tls is not None
    assert trusted(client.tls) == ["Override CA"]
    assert client.trust_source == f"${tls.TLS_CA_FILE_ENV} ({other.path})"


def test_a_bundle_that_cannot_load_stops_the_command_with_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = enrolled_folder(tmp_path / "site", PORTAL)
    folder.tls_ca_path.write_text("not a certificate\n")
    monkeypatch.delenv(tls.TLS_CA_FILE_ENV, raising=False)

    for command in ("status", "doctor"):
        code = cli.main([command, "--dir", str(folder.path)])
        out = capsys.readouterr()
        assert code == 1
        assert f"the site's CA bundle ({folder.tls_ca_path}) cannot be loaded" in out.out + out.err


def test_the_site_folder_keeps_its_bundle_private_and_drops_it_on_a_new_enrolment(
    tmp_path: Path, ca: ThrowawayCA
) -> None:
    from client_agent import signing

    folder = SiteDir(tmp_path / "site")
    key = signing.generate_key()
    folder.save(identity(PORTAL), key=key, cert_pem="c", ca_pem="a", tls_ca_pem=ca.pem)
    assert folder.tls_ca_file() == folder.tls_ca_path
    assert folder.tls_ca_path.read_text() == ca.pem
    assert folder.tls_ca_path.stat().st_mode & 0o777 == 0o600

    folder.save(identity(PORTAL), key=key, cert_pem="c", ca_pem="a")  # enrolled again, without
    assert folder.tls_ca_file() is None
