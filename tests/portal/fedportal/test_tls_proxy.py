"""The compose deployment's TLS proxy: the compose file's layout (two portals behind nginx, two
workers, one beat, the schema migrated once), ``nginx -t`` on docker/nginx/fedportal.conf, and
that configuration serving the test portal (``tests.tls_proxy``): uploads streamed through
(the portal answers before the body is sent) within the portal's own bounds, and the portal
knowing the request's scheme, host and client address from the proxy, not from the client."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from client_agent import tls
from fedportal import bodylimits
from jobs.envs.poc.env import _redis_answers
from sites import services
from sites.models import AuditEvent
from tests import daphne_portal, tls_proxy
from tests.portal.factories import SiteFactory, creator_of
from tests.tls_proxy import (
    NGINX,
    NGINX_CONF,
    ServerCertificate,
    ThrowawayCA,
    TlsPortal,
    compose,
    compose_default,
    nginx_check,
    nginx_config,
    nginx_in_front,
)

media_root = daphne_portal.media_root
tls_portal = tls_proxy.tls_portal

needs_nginx = pytest.mark.skipif(not Path(NGINX).exists(), reason=f"needs nginx ({NGINX})")
F = TypeVar("F", bound=Callable[..., None])


def live(test: F) -> F:
    """A test against the portal behind the proxy: PostgreSQL, Redis and nginx."""
    for mark in (
        needs_nginx,
        pytest.mark.django_db(transaction=True),
        pytest.mark.skipif(
            not _redis_answers(daphne_portal.REDIS_URL),
            reason=f"needs Redis at {daphne_portal.REDIS_URL}",
        ),
    ):
        test = mark(test)
    return test


UID = "0b6a3c9e-55f4-4f3e-9d7a-3f1f2c1a9b10"


def services_running(command_word: str) -> list[str]:
    return [
        name
        for name, service in compose()["services"].items()
        if command_word in " ".join(service.get("command") or [])
    ]


def test_compose_runs_two_portals_behind_the_tls_proxy_two_workers_and_one_beat() -> None:
    services_ = compose()["services"]
    portals = services_running("fedportal.serve")
    assert sorted(portals) == ["portal-1", "portal-2"]
    assert sorted(services_running("worker")) == ["worker-1", "worker-2"]
    assert services_running(" beat ") == ["beat"]
    for name in portals:
        assert "ports" not in services_[name], f"{name} must be reached through nginx only"
    # The schema is migrated once, before any portal or worker starts.
    assert services_running("migrate --noinput") == ["migrate"]
    for name in [*portals, "worker-1", "worker-2", "beat"]:
        after = services_[name]["depends_on"]["migrate"]
        assert after == {"condition": "service_completed_successfully"}
        assert "data:/data" in services_[name]["volumes"]

    nginx = services_["nginx"]
    assert any(port.endswith(":443") for port in nginx["ports"])
    # source:target[:ro], where the source may be ${NAME:-default}.
    parts = (re.fullmatch(r"(.+):(/[^:]*)(?::ro)?", volume) for volume in nginx["volumes"])
    mounts = {match.group(2): match.group(1) for match in parts if match}
    config = Path(tls_proxy.COMPOSE_FILE.parent / mounts["/etc/nginx/conf.d/default.conf"])
    assert config.resolve() == NGINX_CONF
    assert compose_default(mounts["/etc/nginx/certs"]) == "./certs"
    # Every portal of compose is in nginx's upstream, on the port the portals listen on.
    upstream = [
        line.split()[1]
        for line in NGINX_CONF.read_text().splitlines()
        if line.strip().startswith("server ") and ":8000" in line
    ]
    assert sorted(upstream) == sorted(f"{name}:8000;" for name in portals)
    # The portals trust the proxy's headers: the scheme, and the client's address.
    env = compose()["x-fedportal"]["environment"]
    assert compose_default(env["DJANGO_SECURE_PROXY_SSL_HEADER"]) == "X-Forwarded-Proto"
    assert "--proxy-headers" in compose_default(env["FEDPORTAL_SERVE_ARGS"]).split()


@needs_nginx
def test_nginx_accepts_the_configuration(tmp_path: Path) -> None:
    ca = ThrowawayCA.make(tmp_path / "ca")
    server = ca.issue("portal", ["localhost"])
    main = nginx_config(
        tmp_path / "nginx", upstream="127.0.0.1:9", tls_port=9443, http_port=9080, server=server
    )

    checked = nginx_check(main)

    assert checked.returncode == 0, checked.stderr
    # And refuses one it cannot load: the check is real.
    server.key.write_text("not a key\n")
    assert nginx_check(main).returncode != 0


@needs_nginx
@pytest.mark.skipif(not shutil.which("openssl"), reason="needs openssl")
def test_the_readmes_throwaway_ca_makes_a_certificate_the_agent_and_nginx_take(
    tmp_path: Path,
) -> None:
    readme = (tls_proxy.COMPOSE_FILE.parent / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```sh\n(.*?)```", readme, re.S) if "openssl req -x509" in b]
    script = block.replace("mkdir -p docker/certs && cd docker/certs\n", "")
    assert "docker/certs" not in script  # it runs here, in a temporary folder
    run = subprocess.run(
        ["bash", "-e", "-c", script.replace("fl.example.org", "localhost")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert tls.read_ca_bundle(tmp_path / "ca.pem")  # what enrol --ca-file checks

    server = ServerCertificate(tmp_path / "fullchain.pem", tmp_path / "privkey.pem")
    with nginx_in_front(tmp_path / "nginx", "127.0.0.1:9", server) as proxy:
        trusting = tls.client_context(tmp_path / "ca.pem")
        with (
            socket.create_connection(("127.0.0.1", proxy.tls_port), timeout=10) as raw,
            trusting.wrap_socket(raw, server_hostname="localhost") as secured,
        ):
            assert secured.version() in ("TLSv1.2", "TLSv1.3")
            # No portal behind this proxy: it says so in the portal's error format.
            secured.sendall(
                b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
            answer = b""
            while chunk := secured.recv(65536):
                answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    assert json.loads(body)["code"] == "unavailable"


def context(portal: TlsPortal) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=portal.ca.path)


def headers_only(
    portal: TlsPortal, method: str, path: str, length: int, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """Send a request's headers announcing ``length`` bytes of body, and none of the body:
    the answer comes only from whoever decides on the headers alone."""
    connection = http.client.HTTPSConnection(
        "127.0.0.1", portal.proxy.tls_port, timeout=15, context=context(portal)
    )
    try:
        connection.putrequest(method, path)
        for name, value in {"Content-Length": str(length), **(headers or {})}.items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


UPLOADS = [
    ("PUT", f"/api/v1/agent/jobs/{UID}/rounds/0/update/"),
    ("POST", f"/api/v1/agent/jobs/{UID}/rounds/0/secure/shares/"),
    ("POST", "/api/v1/projects/p/jobs/"),
    ("POST", "/projects/p/jobs/new/"),
]


@live
@pytest.mark.parametrize(("method", "path"), UPLOADS)
def test_an_upload_streams_through_to_the_portal_within_its_bound(
    tls_portal: TlsPortal, method: str, path: str
) -> None:
    limit = bodylimits.rule_for(method, path).limit()
    assert limit > 1024**3  # an upload route, not the 1 MiB default

    # At the portal's bound, the portal itself answers before a byte of the body is sent
    # (here: nobody it knows sent it): nginx passed the request on unbuffered.
    status, body = headers_only(tls_portal, method, path, limit)
    assert status == 401, body
    # Over it, refused at once, with the portal's error format.
    status, body = headers_only(tls_portal, method, path, limit + 1)
    assert (status, body["code"]) == (413, "too_large")


@live
def test_any_other_route_takes_the_portals_default_bound_and_no_more(
    tls_portal: TlsPortal,
) -> None:
    status, body = headers_only(
        tls_portal, "POST", "/api/v1/enrol/check/", bodylimits.DEFAULT_RULE.limit() + 1
    )
    assert (status, body["code"]) == (413, "too_large")


@live
def test_the_portal_knows_the_scheme_host_and_client_address_from_the_proxy(
    tls_portal: TlsPortal,
) -> None:
    site = SiteFactory.create()
    project = site.project
    _, token = services.api_token_create(user=creator_of(project), name="tls")
    # From another loopback address than nginx's own, with a forged X-Forwarded-For.
    connection = http.client.HTTPSConnection(
        "127.0.0.1",
        tls_portal.proxy.tls_port,
        timeout=15,
        context=context(tls_portal),
        source_address=("127.0.0.2", 0),
    )
    try:
        connection.request(
            "POST",
            f"/api/v1/projects/{project.slug}/sites/{site.pk}/approve/",
            headers={"Authorization": f"Bearer {token}", "X-Forwarded-For": "203.0.113.7"},
        )
        response = connection.getresponse()
        body = json.loads(response.read())
    finally:
        connection.close()

    assert response.status == 200, body
    # The enrol command names the portal as the site reaches it: https, host and port.
    assert f"--portal {tls_portal.url} " in body["enrolment"]["command"]
    approved = AuditEvent.objects.filter(action="site.approved").latest("pk")
    assert approved.source_address == "127.0.0.2"
