"""SimEnv and PocEnv name their sites, refuse bad arguments and split the cores the same way."""

from __future__ import annotations

from typing import Any

import pytest

from jobs.envs import PocEnv, SimEnv
from jobs.envs.base import site_threads_env

# A python other than this one: SimEnv starts no fork server for it.
ENVS: list[Any] = [PocEnv, lambda *a, **kw: SimEnv(*a, python="python3", **kw)]


@pytest.mark.parametrize("make", ENVS, ids=["PocEnv", "SimEnv"])
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 0}, "num_clients: must be an integer of at least 1, got 0"),
        ({"num_clients": True}, "num_clients: must be an integer of at least 1, got True"),
        ({"num_clients": None}, "num_clients: must be an integer of at least 1, got None"),
        ({"clients": []}, "clients: must be a non-empty list of unique site names"),
        ({"clients": ["a", "a"]}, "clients: must be a non-empty list of unique site names"),
        ({"clients": ["a", ""]}, "clients: must be a non-empty list of unique site names"),
        ({"clients": ["a", 2]}, "clients: must be a non-empty list of unique site names"),
        ({"num_clients": 3, "clients": ["a"]}, "num_clients: 3 but clients names 1 sites"),
    ],
)
def test_bad_arguments_are_named_alike(make: Any, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


@pytest.mark.parametrize("make", ENVS, ids=["PocEnv", "SimEnv"])
def test_sites_are_numbered_unless_named(make: Any) -> None:
    assert make(3).clients == ["site-1", "site-2", "site-3"]
    assert make(clients=("alpha", "beta")).clients == ["alpha", "beta"]
    assert make(2, clients=["alpha", "beta"]).clients == ["alpha", "beta"]


@pytest.mark.parametrize("num_threads", [0, -1, True, 1.5])
def test_simenv_refuses_a_bad_thread_count(num_threads: Any) -> None:
    with pytest.raises(ValueError, match="num_threads: must be an integer of at least 1"):
        SimEnv(2, num_threads=num_threads, python="python3")


def test_simenv_runs_at_most_one_thread_per_site() -> None:
    assert SimEnv(3, python="python3").num_threads == 3
    assert SimEnv(3, num_threads=2, python="python3").num_threads == 2
    assert SimEnv(3, num_threads=8, python="python3").num_threads == 3


def test_each_site_gets_its_share_of_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert site_threads_env(3) == {"OMP_NUM_THREADS": "2"}
    assert site_threads_env(16) == {"OMP_NUM_THREADS": "1"}  # at least one
    monkeypatch.setattr("os.cpu_count", lambda: None)  # unknown: one core
    assert site_threads_env(1) == {"OMP_NUM_THREADS": "1"}
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # the caller's choice stands
    assert site_threads_env(3) == {}


def test_pocenv_gives_its_processes_the_sites_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    env = PocEnv(4)
    monkeypatch.setattr(env, "_secret", lambda name: name)  # no workspace needed
    assert env._env()["OMP_NUM_THREADS"] == "2"
