"""TLS for tests: a throwaway certificate authority and server certificates (``cryptography``),
and Debian's nginx (``/usr/sbin/nginx``, run as this user under a temporary prefix) serving
the deployment's own proxy configuration, ``docker/nginx/fedportal.conf``, in front of a test
portal. Only the addresses and file paths of the configuration are changed, and each change
must find what it replaces: the proxy the tests talk to is the one compose runs.

``tls_portal`` is the test portal (``tests.daphne_portal``) started with the proxy settings
compose gives the portals, behind that nginx, with a certificate for 127.0.0.1 and localhost
from the module's CA: a module takes it by naming it at its top, like ``daphne_portal``'s.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[1]
NGINX_CONF = ROOT / "docker" / "nginx" / "fedportal.conf"
COMPOSE_FILE = ROOT / "docker" / "docker-compose.yml"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


@dataclass(frozen=True)
class ServerCertificate:
    cert: Path  # the server's certificate (its chain: the CA signed it directly)
    key: Path


@dataclass
class ThrowawayCA:
    """A certificate authority made for one test session: its certificate is ``pem``."""

    folder: Path
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @classmethod
    def make(cls, folder: Path, name: str = "FedPortal test CA") -> ThrowawayCA:
        folder.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
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
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        ca = cls(folder, key, certificate)
        ca.path.write_text(ca.pem)
        return ca

    @property
    def pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def path(self) -> Path:
        """The CA's certificate, PEM: what a site gives ``enrol --ca-file``."""
        return self.folder / "ca.pem"

    def issue(
        self,
        stem: str,
        names: list[str],
        *,
        days: float = 1,
        start: dt.datetime | None = None,
    ) -> ServerCertificate:
        """A server certificate for ``names`` (DNS names or IP addresses), as nginx wants it:
        ``<stem>.crt`` (full chain) and ``<stem>.key``."""
        key = ec.generate_private_key(ec.SECP256R1())
        alt: list[x509.GeneralName] = []
        for name in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        begin = start or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(begin)
            .not_valid_after(begin + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        server = ServerCertificate(self.folder / f"{stem}.crt", self.folder / f"{stem}.key")
        server.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        _write_key(server.key, key)
        return server


def _replace(text: str, old: str, new: str) -> str:
    count = text.count(old)
    assert count >= 1, f"{NGINX_CONF.name} no longer holds {old!r}: update tests/tls_proxy.py"
    return text.replace(old, new)


def nginx_config(
    prefix: Path, *, upstream: str, tls_port: int, http_port: int, server: ServerCertificate
) -> Path:
    """The deployment's proxy configuration for an unprivileged nginx under ``prefix``: the
    portals replaced by ``upstream`` (host:port), the ports by free ones on 127.0.0.1, the
    certificate by ``server``'s; the main file around it as the nginx image's, with its files
    (pid, logs, temporary bodies) under ``prefix``. Returns the main file."""
    prefix.mkdir(parents=True, exist_ok=True)
    text = NGINX_CONF.read_text()
    text = _replace(text, "server portal-1:8000;", f"server {upstream};")
    text = _replace(text, "server portal-2:8000;", f"server {upstream};")
    text = _replace(text, "listen 443 ssl;", f"listen 127.0.0.1:{tls_port} ssl;")
    text = _replace(text, "listen 80;", f"listen 127.0.0.1:{http_port};")
    text = _replace(text, "/etc/nginx/certs/fullchain.pem", str(server.cert))
    text = _replace(text, "/etc/nginx/certs/privkey.pem", str(server.key))
    text = _replace(text, "alias /data/static/;", f"alias {prefix / 'static'}/;")
    (prefix / "fedportal.conf").write_text(text)
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = prefix / "nginx.conf"
    main.write_text(
        f"""daemon off;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} info;
events {{
    worker_connections 256;
}}
http {{
    default_type application/octet-stream;
    access_log {prefix / "access.log"};
{temp}
    include {prefix / "fedportal.conf"};
}}
"""
    )
    return main


def nginx_check(main: Path) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` on ``main``: the configuration's syntax, and that its files load."""
    return subprocess.run(
        [
            NGINX,
            "-t",
            "-q",
            "-p",
            str(main.parent),
            "-e",
            str(main.parent / "error.log"),
            "-c",
            str(main),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


@dataclass(frozen=True)
class Proxy:
    url: str  # https://127.0.0.1:<port>
    tls_port: int
    http_port: int
    log: Path


@contextlib.contextmanager
def nginx_in_front(prefix: Path, upstream: str, server: ServerCertificate) -> Iterator[Proxy]:
    """nginx with the deployment's configuration, in front of ``upstream``, until the block
    ends; its error log is raised with the error when it does not start."""
    tls_port, http_port = _free_port(), _free_port()
    main = nginx_config(
        prefix, upstream=upstream, tls_port=tls_port, http_port=http_port, server=server
    )
    checked = nginx_check(main)
    assert checked.returncode == 0, f"nginx -t refuses the configuration:\n{checked.stderr}"
    log = prefix / "error.log"
    proc = subprocess.Popen(
        [NGINX, "-p", str(prefix), "-e", str(log), "-c", str(main)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", tls_port), timeout=0.5),
            ):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        yield Proxy(f"https://127.0.0.1:{tls_port}", tls_port, http_port, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def compose() -> dict[str, Any]:
    """``docker/docker-compose.yml``, parsed."""
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def compose_default(value: str) -> str:
    """What compose makes of ``${NAME:-default}`` when NAME is not set: the default."""
    match = re.fullmatch(r"\$\{[A-Z_]+:-(.*)\}", value)
    return match.group(1) if match else value


def compose_portal_proxy_settings() -> tuple[dict[str, str], list[str]]:
    """The environment that makes compose's portals trust the proxy's headers, and the
    server options they are started with (``FEDPORTAL_SERVE_ARGS``), at compose's defaults."""
    env = compose()["x-fedportal"]["environment"]
    header = compose_default(env["DJANGO_SECURE_PROXY_SSL_HEADER"])
    args = compose_default(env["FEDPORTAL_SERVE_ARGS"]).split()
    return {"DJANGO_SECURE_PROXY_SSL_HEADER": header}, args


@dataclass(frozen=True)
class TlsPortal:
    ca: ThrowawayCA
    proxy: Proxy
    upstream: str  # the portal itself, plain http on 127.0.0.1

    @property
    def url(self) -> str:
        return self.proxy.url

    @property
    def upstream_address(self) -> str:
        """host:port of the portal, for another proxy in front of it."""
        return self.upstream.removeprefix("http://")


@pytest.fixture(scope="module")
def tls_portal(
    django_db_setup: None, media_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsPortal]:
    """The test portal with compose's proxy settings, behind the deployment's nginx."""
    from tests import daphne_portal

    if not Path(NGINX).exists():
        pytest.skip(f"needs nginx ({NGINX})")
    folder = tmp_path_factory.mktemp("tls")
    ca = ThrowawayCA.make(folder / "ca")
    server = ca.issue("portal", ["127.0.0.1", "localhost"])
    proxy_env, args = compose_portal_proxy_settings()
    env = {**daphne_portal.portal_env(media_root), **proxy_env}
    with (
        daphne_portal.served(env, media_root.parent / "daphne.log", args) as (url, port, _),
        nginx_in_front(folder / "nginx", f"127.0.0.1:{port}", server) as proxy,
    ):
        yield TlsPortal(ca, proxy, url)
