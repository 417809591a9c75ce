"""The agent's command line refuses to send tokens in clear text: plain HTTP to a portal on
another machine needs ``--insecure``. Nothing here reaches a portal: a refused command sends
nothing, and an allowed one meets a closed port."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from client_agent import cli
from client_agent.agent import WHOAMI_PATH, Agent
from client_agent.portal import InsecurePortal, PortalClient, WireLog
from client_agent.site_dir import SiteDir
from tests.site_folders import enrolled_folder

# Not loopback, yet connecting to it fails at once (the kernel treats it as this host).
REMOTE_HTTP = "http://0.0.0.0:9"


class Sent(list[tuple[str, str, str]]):
    """A wire recorder: what a command sends, as (channel, method, path)."""

    def __call__(self, channel: str, method: str, path: str, body: bytes) -> None:
        self.append((channel, method, path))


@pytest.fixture
def sent() -> Sent:
    return Sent()


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
    tmp_path: Path, sent: Sent, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "site"
    code = cli.main(
        ["enrol", "--portal", REMOTE_HTTP, "--token", "fpe_x", "--dir", str(folder)], wire=sent
    )

    assert code == 1
    assert "--insecure" in capsys.readouterr().err
    assert sent == [] and not folder.exists()

    allowed = cli.main(
        ["enrol", "--portal", REMOTE_HTTP, "--token", "fpe_x", "--dir", str(folder), "--insecure"],
        wire=sent,
    )
    assert allowed == 1 and "cannot be reached" in capsys.readouterr().err
    assert [path for _, _, path in sent] == [cli.ENROL_CHECK_PATH]


@pytest.mark.parametrize("command", ["status", "doctor", "run"])
def test_every_command_on_an_http_site_folder_needs_the_flag(
    tmp_path: Path, sent: Sent, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    folder = enrolled_at(tmp_path / "site", REMOTE_HTTP)

    code = cli.main([command, "--dir", str(folder.path)], wire=sent)

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
    tmp_path: Path, sent: Sent, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    folder = enrolled_at(tmp_path / "site", REMOTE_HTTP)

    code = cli.main([command, "--dir", str(folder.path), "--insecure"], wire=sent)

    out = capsys.readouterr()
    assert code == 1 and "--insecure" not in out.err + out.out
    assert "Connection refused" in out.err + out.out
    # status asks who the site is; doctor stops at the health check, which carries nothing.
    assert sent == ([("http", "GET", WHOAMI_PATH)] if command == "status" else [])


def test_the_wire_log_holds_json_bodies_and_only_the_names_and_shapes_of_tensors(
    tmp_path: Path,
) -> None:
    wire = WireLog(tmp_path / "wire.jsonl")
    # What PortalClient.upload hands over of an update: its safetensors header.
    header = {
        "__metadata__": {"format": "pt"},
        "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    }
    raw = json.dumps(header).encode()
    head = struct.pack("<Q", len(raw)) + raw

    wire("ws", "SEND", "/ws/agent/", b'{"type":"report","job":"j","lines":[]}')
    wire("http", "PUT", "/update/", head)

    first, second = (json.loads(line) for line in wire.path.read_text().splitlines())
    assert first["json"] == {"type": "report", "job": "j", "lines": []}
    assert second == {
        "channel": "http",
        "method": "PUT",
        "path": "/update/",
        "bytes": len(head),
        "safetensors": {"w": [2, 3]},
    }
