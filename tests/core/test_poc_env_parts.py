"""PocEnv's parts on their own: the process supervisor and the cached set-up."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.envs import PocEnv
from jobs.envs.poc import PROJECT_ROOT
from jobs.envs.poc import env as poc_env
from jobs.envs.poc.proxy import nginx_binary, write_nginx_config
from jobs.envs.poc.supervisor import Supervisor
from jobs.envs.poc.template import FILES, SetupTemplate, migrations_digest

# Starts a child that outlives its parent unless its process group is ended.
PARENT_AND_CHILD = (
    "import subprocess, sys, time; "
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
    "print(child.pid, flush=True); time.sleep(60)"
)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose: it only waits for its parent to reap it.
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def said() -> list[str]:
    return []


@pytest.fixture
def supervisor(tmp_path: Path, said: list[str]):
    sup = Supervisor(cwd=tmp_path, logs=tmp_path, environ=lambda: dict(os.environ), say=said.append)
    yield sup
    sup.stop(grace=1)


def test_stop_ends_each_process_and_its_children(supervisor: Supervisor, tmp_path: Path) -> None:
    proc = supervisor.spawn("svc", [sys.executable, "-c", PARENT_AND_CHILD])
    log = tmp_path / "svc.log"
    child = int(wait_for(lambda: log.read_text().strip(), 30, "the child's pid"))
    assert stat.S_IMODE(log.stat().st_mode) == 0o600

    supervisor.stop(grace=5)

    assert proc.poll() is not None
    wait_for(lambda: not alive(child), 10, "the child to end")
    assert supervisor.processes == {}


def test_a_watched_process_that_exits_is_started_again_but_not_one_killed(
    supervisor: Supervisor, said: list[str]
) -> None:
    args = [sys.executable, "-c", "import sys, time; time.sleep(float(sys.argv[1]))"]
    first = supervisor.spawn("worker", [*args, "0"])
    other = supervisor.spawn("other", [*args, "0"])
    first.wait()
    other.wait()
    supervisor.watch(["worker"], supervisor.respawn)

    def restarted() -> subprocess.Popen[bytes] | None:
        current = supervisor.processes.get("worker")  # absent for a moment while restarted
        return current if current is not None and current is not first else None

    again = wait_for(restarted, 30, "the worker to start again")
    assert again.args == first.args  # the same command
    assert supervisor.processes["other"] is other  # not watched: left as it ended
    assert any(line.startswith("the worker exited (code 0)") for line in said)

    supervisor.stop()  # the watcher first, then the processes
    supervisor.spawn("worker", [*args, "60"])
    supervisor.watch(["worker"], supervisor.respawn)
    killed = supervisor.processes["worker"]
    supervisor.kill("worker")
    time.sleep(1.0)  # two rounds of the watcher
    assert supervisor.processes["worker"] is killed  # on purpose: not started again


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "fedportal"


def made_setup(folder: Path) -> Path:
    folder.mkdir()
    for name in FILES:
        (folder / name).write_text(f"the {name}")
    return folder


def test_a_kept_setup_is_copied_private_and_only_while_fresh(cache: Path, tmp_path: Path) -> None:
    template = SetupTemplate(project_root=PROJECT_ROOT, clients=["site-1", "site-2"])
    assert not template.fresh()

    template.keep_from(made_setup(tmp_path / "first"))

    assert template.path.parent == cache and stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert template.fresh()
    later = tmp_path / "later"
    later.mkdir()
    template.copy_to(later)
    for name in FILES:
        assert (later / name).read_text() == f"the {name}"
        assert stat.S_IMODE((later / name).stat().st_mode) == 0o600
    day_old = time.time() - 24 * 3600 - 1
    os.utime(template.path / "made", (day_old, day_old))
    assert not template.fresh()  # its enrolment tokens would soon expire


def test_each_list_of_sites_and_each_migration_has_its_own_setup(
    cache: Path, tmp_path: Path
) -> None:
    def path(clients: list[str], root: Path = PROJECT_ROOT) -> Path:
        return SetupTemplate(project_root=root, clients=clients).path

    assert path(["site-1", "site-2"]) == path(["site-1", "site-2"])
    assert path(["site-1", "site-2"]) != path(["site-1", "site-3"])

    (tmp_path / "app" / "migrations").mkdir(parents=True)
    migration = tmp_path / "app" / "migrations" / "0001_initial.py"
    migration.write_text("operations = []\n")
    before = migrations_digest(tmp_path)
    migration.write_text("operations = ['a field']\n")
    assert migrations_digest(tmp_path) != before


# --- several portals behind a proxy ----------------------------------------------------------


@pytest.mark.skipif(nginx_binary() is None, reason="needs nginx (Debian: apt-get install nginx)")
def test_the_proxy_configuration_is_one_nginx_accepts(tmp_path: Path) -> None:
    config = write_nginx_config(tmp_path / "proxy", 18080, [18081, 18082])
    nginx = nginx_binary()
    assert nginx is not None
    checked = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path / "proxy"), "-c", str(config)],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stderr
    text = config.read_text()
    assert "server 127.0.0.1:18081" in text and "server 127.0.0.1:18082" in text
    # Updates stream through to the portal, which bounds them itself.
    assert "proxy_request_buffering off;" in text and "client_max_body_size 0;" in text
    # nginx closes an idle connection to a portal before the portal does (10 s by default).
    assert "keepalive_timeout 5000ms;" in text


def test_the_proxy_lets_go_of_idle_portal_connections_before_the_portals_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A request sent on a connection the portal had just closed was answered 502 (a POST
    # is never sent again): the proxy must close first, whatever the portals' idle limit.
    for portal_idle, proxy_idle in (
        ("10", "5000ms"),
        ("4", "2000ms"),
        ("1", "500ms"),
        ("x", "5000ms"),
    ):
        monkeypatch.setenv("FEDPORTAL_HTTP_HEADER_TIMEOUT_SECONDS", portal_idle)
        config = write_nginx_config(tmp_path / portal_idle, 18080, [18081]).read_text()
        assert f"keepalive_timeout {proxy_idle};" in config


@pytest.mark.parametrize("count", [0, -1, 1.5, True, "2"])
def test_a_count_of_portals_or_workers_that_makes_no_sense_is_refused(count: object) -> None:
    with pytest.raises(ValueError, match=r"num_portals: expected a whole number >= 1, got "):
        PocEnv(num_portals=count)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"num_workers: expected a whole number >= 1, got "):
        PocEnv(num_workers=count)  # type: ignore[arg-type]


def test_several_portals_without_nginx_are_refused_saying_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(poc_env, "nginx_binary", lambda: None)
    with pytest.raises(ValueError, match=r"num_portals=2: .* apt-get install nginx"):
        PocEnv(num_portals=2)
    PocEnv(num_portals=1)  # one portal needs no proxy
