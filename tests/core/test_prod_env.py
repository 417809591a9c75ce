"""ProdEnv's configuration: arguments, then FEDPORTAL_* variables, then a credentials file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.envs import ProdEnv


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


def test_plain_http_to_another_machine_needs_insecure(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="clear text.*insecure=True .or set FEDPORTAL_INSECURE=1"):
        ProdEnv("http://fl.example.org", token="fpt_x", project="p")

    assert ProdEnv("http://fl.example.org", token="fpt_x", project="p", insecure=True)
    monkeypatch.setenv("FEDPORTAL_INSECURE", "1")
    assert ProdEnv("http://fl.example.org", token="fpt_x", project="p").client.insecure
    assert not ProdEnv(
        "http://127.0.0.1:8000", token="fpt_x", project="p", insecure=False
    ).client.insecure
