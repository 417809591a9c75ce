"""The agent against the portal behind the deployment's TLS proxy (nginx with
docker/nginx/fedportal.conf, a certificate from a throwaway CA; ``tests.tls_proxy``): a site
enrolled with that CA's certificate (``--ca-file``) enrols, signs requests, opens its
WebSocket over wss and runs a round; without it, or against a certificate for another name,
every connection is refused with the reason, over HTTPS and over wss alike."""

from __future__ import annotations

import asyncio
import hashlib
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from client_agent import cli, tls
from client_agent.agent import Agent
from client_agent.site_dir import SiteDir, write_private
from jobs.envs.poc.env import _redis_answers
from jobs.models import SiteTask, TaskState
from sites.models import Site, SiteState
from tests import daphne_portal, tls_proxy
from tests.portal import jobs_api_world as jw
from tests.portal.client_agent.test_agent_live import one_sync
from tests.portal.factories import approved_site, enrolled_site
from tests.site_folders import site_folder
from tests.tls_proxy import TlsPortal, nginx_in_front

if TYPE_CHECKING:
    from pytest_django.fixtures import Settings

media_root = daphne_portal.media_root
tls_portal = tls_proxy.tls_portal

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not _redis_answers(daphne_portal.REDIS_URL),
        reason=f"needs Redis at {daphne_portal.REDIS_URL}",
    ),
]

# Trains: moves w by one; what the agent uploads through the proxy.
CLIENT = """
import client_agent.api as flare

flare.init()
while flare.is_running():
    model = flare.receive()
    if model is None:
        break
    params = {"w": model.params["w"] + 1.0, "n": model.params["n"]}
    flare.send(flare.FLModel(params=params, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
"""


class Sent(list[tuple[str, str, str]]):
    def __call__(self, channel: str, method: str, path: str, body: bytes) -> None:
        self.append((channel, method, path))


def with_ca(folder: SiteDir, ca_path: Path) -> SiteDir:
    """The folder as ``enrol --ca-file`` leaves it: the bundle copied in."""
    write_private(folder.tls_ca_path, tls.read_ca_bundle(ca_path).encode())
    return folder


async def socket_until(agent: Agent, done: Callable[[], bool], timeout: float = 30) -> None:
    """Run the agent's connection loop until ``done()`` (what it said shows it), then stop."""
    connection = asyncio.create_task(agent._connection_loop())
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while not done():
            assert not connection.done(), connection
            assert asyncio.get_running_loop().time() < deadline, "nothing came of the socket"
            await asyncio.sleep(0.05)
    finally:
        connection.cancel()
        await asyncio.gather(connection, return_exceptions=True)


def socket_says(folder: SiteDir, words: str) -> list[str]:
    """What the agent says over its WebSocket's first attempts, until it says ``words``."""
    said: list[str] = []
    agent = Agent(folder, say=said.append)
    asyncio.run(socket_until(agent, lambda: any(words in s for s in said)))
    return said


def test_a_site_enrolled_with_its_ca_file_enrols_signs_and_connects_over_wss(
    tls_portal: TlsPortal, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site, token = approved_site()
    folder = tmp_path / "site"

    code = cli.main(
        ["enrol", "--portal", tls_portal.url, "--token", token, "--dir", str(folder)]
        + ["--ca-file", str(tls_portal.ca.path)]
    )

    out = capsys.readouterr().out
    assert code == 0, out
    site_dir = SiteDir(folder)
    assert site_dir.tls_ca_path.read_text() == tls_portal.ca.pem
    assert "portal TLS" in out and str(site_dir.tls_ca_path) in out
    site.refresh_from_db()
    assert site.state == SiteState.ENROLLED

    # Every later command uses the folder's bundle: signed requests over HTTPS.
    assert cli.main(["status", "--dir", str(folder)]) == 0
    assert f"site {site.name}" in capsys.readouterr().out
    assert cli.main(["doctor", "--dir", str(folder)]) == 0
    report = capsys.readouterr().out
    assert "[ok] portal certificate: valid for 127.0.0.1, verified with the site's CA" in report
    assert "[ok] certificate accepted" in report

    said = socket_says(site_dir, "connected to")
    assert f"connected to {tls_portal.url} as site {site.name}" in said[-1]
    assert not any("not trusted" in s for s in said)


@pytest.fixture
def trained_world(
    settings: Settings, media_root: Path, tmp_path: Path, eager_celery: None
) -> jw.World:
    """The jobs world with its files where the portal process reads them, and a client
    script that trains."""
    settings.MEDIA_ROOT = str(media_root)
    world = jw.build_world(tmp_path)
    job = world.job
    assert job is not None
    app = jw.zip_bytes({jw.TRAIN_SCRIPT: textwrap.dedent(CLIENT).encode()})
    with open(job.app_archive.path, "wb") as fh:
        fh.write(app)
    job.app_sha256 = hashlib.sha256(app).hexdigest()
    job.save(update_fields=["app_sha256"])
    return world


def test_a_round_through_the_proxy_downloads_and_streams_the_update_up(
    tls_portal: TlsPortal, trained_world: jw.World, tmp_path: Path
) -> None:
    site = trained_world.sites[0]
    folder = with_ca(site_folder(tmp_path / "site-1", site, tls_portal.url), tls_portal.ca.path)
    sent = Sent()

    agent = Agent(folder, python=sys.executable, say=lambda _: None, wire=sent)

    async def one_round() -> None:
        assert agent.loop is asyncio.get_running_loop()  # as run() does: round threads use it
        await one_sync(agent)
        for runner in agent.runners.values():
            await runner.finish(grace=5.0)

    asyncio.run(one_round())

    task = SiteTask.objects.get(site=site.site, round__number=0)
    assert task.state in (TaskState.UPLOADED, TaskState.ACCEPTED), task.reason
    assert ("http", "PUT", f"{trained_world.a}/rounds/0/update/") in sent
    assert task.update and Path(task.update.path).stat().st_size > 0


def test_without_the_ca_every_connection_is_refused_with_the_reason(
    tls_portal: TlsPortal,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(tls.TLS_CA_FILE_ENV, raising=False)
    site, token = approved_site()
    folder = tmp_path / "new-site"

    code = cli.main(["enrol", "--portal", tls_portal.url, "--token", token, "--dir", str(folder)])

    err = capsys.readouterr().err
    assert code == 1
    assert "the portal's certificate is not trusted (" in err
    assert "checked against the system's trust store" in err and "--ca-file" in err
    assert not folder.exists()
    site.refresh_from_db()
    assert site.state == SiteState.APPROVED  # the token was never sent

    # A site folder without the bundle: status, doctor, and the socket.
    enrolled = site_folder(tmp_path / "site", enrolled_site(), tls_portal.url)
    assert cli.main(["status", "--dir", str(enrolled.path)]) == 1
    assert "error: " + tls_portal.url + ": the portal's certificate is not trusted" in (
        capsys.readouterr().err
    )
    assert cli.main(["doctor", "--dir", str(enrolled.path)]) == 1
    assert "[FAIL] portal certificate: " in capsys.readouterr().out
    said = socket_says(enrolled, "not trusted")
    assert not any("connected to" in s for s in said)
    assert "certificate verify failed" in said[-1] and "--ca-file" in said[-1]

    # The environment's bundle stands in for the site's.
    monkeypatch.setenv(tls.TLS_CA_FILE_ENV, str(tls_portal.ca.path))
    assert cli.main(["status", "--dir", str(enrolled.path)]) == 0


def test_a_certificate_for_another_name_is_refused_over_https_and_wss(
    tls_portal: TlsPortal, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Signed by the CA the site trusts, for another name than the address the site uses.
    elsewhere = tls_portal.ca.issue("elsewhere", ["portal.example.org"])
    site, token = approved_site()
    with nginx_in_front(tmp_path / "nginx", tls_portal.upstream_address, elsewhere) as proxy:
        folder = tmp_path / "new-site"
        code = cli.main(
            ["enrol", "--portal", proxy.url, "--token", token, "--dir", str(folder)]
            + ["--ca-file", str(tls_portal.ca.path)]
        )
        err = capsys.readouterr().err
        assert code == 1 and "the portal's certificate is not valid for 127.0.0.1" in err
        assert not folder.exists()

        enrolled = with_ca(
            site_folder(tmp_path / "site", enrolled_site(), proxy.url), tls_portal.ca.path
        )
        said = socket_says(enrolled, "not valid for")
        assert not any("connected to" in s for s in said)
        assert "IP address mismatch" in said[-1]
    assert Site.objects.get(pk=site.pk).state == SiteState.APPROVED
