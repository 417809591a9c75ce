"""ProdEnv's configuration: arguments, then FEDPORTAL_* variables, then a credentials file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client_agent.portal import PortalError, PortalUnreachable
from jobs.envs import ProdEnv, RunStatus
from jobs.envs.portal import PortalRun


@pytest.fixture(autouse=True)
def no_ambient_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("FEDPORTAL_URL", "FEDPORTAL_TOKEN", "FEDPORTAL_PROJECT", "FEDPORTAL_INSECURE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_a_missing_setting_is_named_with_where_it_may_come_from() -> None:
    with pytest.raises(ValueError, match="token: not given; pass it, set FEDPORTAL_TOKEN"):
        ProdEnv("https://fl.example.org", project="oncology")


def test_settings_come_from_arguments_then_the_environment_then_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    credentials = tmp_path / "credentials.json"
    credentials.write_text(
        json.dumps({"portal": "https://file.example", "token": "fpt_file", "project": "p-file"})
    )
    monkeypatch.setenv("FEDPORTAL_TOKEN", "fpt_env")

    env = ProdEnv(project="p-arg", credentials=credentials)

    assert (env.portal_url, env.token, env.project) == ("https://file.example", "fpt_env", "p-arg")
    assert env.client.api_token == "fpt_env"


def test_an_unreadable_credentials_file_is_an_error_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "credentials.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=f"credentials: cannot read {bad}"):
        ProdEnv(credentials=bad)


def test_a_portal_url_that_is_not_http_is_refused() -> None:
    with pytest.raises(ValueError, match="portal URL must look like https://"):
        ProdEnv("fl.example.org", token="fpt_x", project="p")


class FlakyPortal:
    """A portal that is away (connection refused, then a proxy's 503) before it answers."""

    url = "https://portal.example"

    def __init__(self, outages: list[Exception], final_state: str = "completed") -> None:
        self.outages = list(outages)
        self.final_state = final_state

    def get(self, path: str) -> dict[str, object]:
        if self.outages:
            raise self.outages.pop(0)
        if path.endswith("/cross-site/"):
            return {"models": [], "sites": [], "matrix": {}}
        return {"uid": "u-1", "name": "job", "num_rounds": 1, "state": self.final_state}

    def get_all(self, path: str) -> list[object]:
        return []


def running_job_on(portal: FlakyPortal, tmp_path: Path) -> PortalRun:
    """A one-round job's run, followed through ``portal``, polling every 10 ms."""
    return PortalRun(
        client=portal,  # type: ignore[arg-type]
        job={"uid": "u-1", "name": "job", "num_rounds": 1, "state": "running"},
        workspace=tmp_path,
        show_progress=False,
        poll_seconds=0.01,
    )


def test_waiting_rides_out_a_portal_that_is_restarted(tmp_path: Path) -> None:
    portal = FlakyPortal(
        [PortalUnreachable("connection refused"), PortalError(503, "unavailable", "restarting")]
    )
    run = running_job_on(portal, tmp_path)

    assert run.wait(timeout=30).status == RunStatus.COMPLETED
    assert portal.outages == []


def test_waiting_stops_at_an_error_that_is_not_the_portal_being_away(tmp_path: Path) -> None:
    portal = FlakyPortal([PortalError(403, "permission_denied", "not yours")])
    run = running_job_on(portal, tmp_path)

    with pytest.raises(PortalError, match="not yours"):
        run.wait(timeout=30)


def test_plain_http_to_another_machine_needs_insecure(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="clear text.*insecure=True .or set FEDPORTAL_INSECURE=1"):
        ProdEnv("http://fl.example.org", token="fpt_x", project="p")

    assert ProdEnv("http://fl.example.org", token="fpt_x", project="p", insecure=True)
    monkeypatch.setenv("FEDPORTAL_INSECURE", "1")
    assert ProdEnv("http://fl.example.org", token="fpt_x", project="p").client.insecure
    assert not ProdEnv(
        "http://127.0.0.1:8000", token="fpt_x", project="p", insecure=False
    ).client.insecure
