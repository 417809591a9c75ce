"""The agent's command line refuses to send tokens in clear text: plain HTTP to a portal on
another machine needs ``--insecure``. Nothing here reaches a portal: a refused command sends
nothing, and an allowed one meets a closed port."""

from __future__ import annotations

from pathlib import Path

import pytest

from client_agent import cli
from client_agent.agent import Agent
from client_agent.portal import InsecurePortal, PortalClient, record_outgoing
from client_agent.site_dir import SiteDir
from tests.site_folders import enrolled_folder

# Not loopback, yet connecting to it fails at once (the kernel treats it as this host).
REMOTE_HTTP = "http://0.0.0.0:9"


@pytest.fixture
def sent() -> list[tuple[str, str, str]]:
    calls: list[tuple[str, str, str]] = []
    record_outgoing(lambda channel, method, path, body: calls.append((channel, method, path)))
    yield calls
    record_outgoing(None)


def enrolled_at(path: Path, portal: str) -> SiteDir:
    return enrolled_folder(path, portal)


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8000", "http://127.8.9.10", "http://localhost:8000", "http://[::1]:8000"],
)
def test_plain_http_to_this_machine_needs_no_flag(url: str) -> None:
    assert PortalClient(url).url == url


@pytest.mark.parametrize("url", ["http://fl.example.org", "http://10.0.0.5:8000", REMOTE_HTTP])
def test_plain_http_to_another_machine_is_refused_unless_insecure(url: str) -> None:
    with pytest.raises(InsecurePortal, match="clear text.*--insecure"):
        PortalClient(url)
    assert PortalClient(url, insecure=True).url == url
    assert PortalClient(url.replace("http://", "https://")).scheme == "https"


def test_enrol_refuses_before_sending_the_token(
    tmp_path: Path, sent: list, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "site"
    code = cli.main(["enrol", "--portal", REMOTE_HTTP, "--token", "fpe_x", "--dir", str(folder)])

    assert code == 1
    assert "--insecure" in capsys.readouterr().err
    assert sent == [] and not folder.exists()

    allowed = cli.main(
        ["enrol", "--portal", REMOTE_HTTP, "--token", "fpe_x", "--dir", str(folder), "--insecure"]
    )
    assert allowed == 1 and "cannot be reached" in capsys.readouterr().err
    assert [path for _, _, path in sent] == [cli.ENROL_CHECK_PATH]


@pytest.mark.parametrize("command", ["status", "doctor", "run"])
def test_every_command_on_an_http_site_folder_needs_the_flag(
    tmp_path: Path, sent: list, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    folder = enrolled_at(tmp_path / "site", REMOTE_HTTP)

    code = cli.main([command, "--dir", str(folder.path)])

    assert code == 1
    out = capsys.readouterr()
    assert "--insecure" in out.err + out.out
    assert sent == []


def test_the_agent_takes_the_flag(tmp_path: Path) -> None:
    folder = enrolled_at(tmp_path / "site", REMOTE_HTTP)
    with pytest.raises(InsecurePortal):
        Agent(folder)
    assert Agent(folder, insecure=True).client.insecure


@pytest.mark.parametrize("command", ["status", "doctor"])
def test_status_and_doctor_with_the_flag_try_the_portal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    folder = enrolled_at(tmp_path / "site", REMOTE_HTTP)

    code = cli.main([command, "--dir", str(folder.path), "--insecure"])

    out = capsys.readouterr()
    assert code == 1 and "--insecure" not in out.err + out.out
    assert "Connection refused" in out.err + out.out
