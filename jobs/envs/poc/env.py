"""``PocEnv``: the whole platform on this machine — portal, Celery worker, one agent per site.

``recipe.execute(PocEnv(num_clients=3))`` starts, in order:

1. a SQLite database in the workspace holding what ``manage.py poc_setup`` makes: a
   superuser, a project, and the sites, approved, accepting jobs automatically, with
   one-time enrolment tokens and an API token (made with ``migrate`` and ``poc_setup`` once
   a day per list of sites, then copied from ``~/.cache/fedportal``);
2. one fork server for all the sites' scripts (torch imported once), the portal (Daphne,
   ASGI: HTTP and WebSockets) on a free port, and a Celery worker; both use the Redis at
   ``REDIS_URL`` (default ``redis://127.0.0.1:6379``), database ``redis_db``;
3. per site, enrolment with its one-time token (``python -m client_agent enrol``'s code: a new
   key, a CSR) and ``python -m client_agent run``, each with its own folder;

then submits the job over the REST API exactly as ``ProdEnv`` does and returns its
:class:`~jobs.envs.portal.PortalRun`. ``stop()`` ends exactly the processes it started (each
in its own process group). With ``keep_running=True`` the portal stays up after the job (the
URL and the sign-in are printed) until ``stop()`` or the end of the Python process.

``database_url`` puts the portal on a database of yours (PostgreSQL) instead of a SQLite file
in the workspace; it is migrated and set up in place.

Workspace (default ``<tmp>/fedportal-poc-<time>-<random>``): ``db.sqlite3``, ``media/``,
``logs/`` (portal, worker, one per agent), ``sites/<site>/`` (each agent's folder),
``runs/<job>/``, ``credentials.json`` (portal URL, API token, project, user and password: a
``ProdEnv`` credentials file). ``wire_log=True`` makes each agent log everything it sends to
``sites/<site>/wire.jsonl`` (``client_agent run --wire-log``).

The workspace holds a superuser's password, an API token, enrolment tokens, the portal's
secret keys and the sites' private keys, so it is private: its default name cannot be guessed
(and is created, never reused), the folder is 0700, and every file PocEnv writes is 0600 from
the moment it exists. The processes it starts run with umask 077, so what they write (the
database, logs, media, the agents' folders) is private too.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from client_agent.privacy.policy import POLICY_FILE
from client_agent.site_dir import write_private
from common.validators import is_int
from jobs.envs.base import (
    PolicyArg,
    check_workspace_alias,
    site_names,
    site_policies,
    site_threads_env,
)
from jobs.envs.poc.proxy import nginx_binary, write_nginx_config
from jobs.envs.poc.supervisor import PRIVATE_UMASK, Supervisor
from jobs.envs.poc.template import SetupTemplate
from jobs.envs.portal import PortalRun, ProdEnv

if TYPE_CHECKING:
    from jobs.recipes import Recipe

PROJECT_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_REDIS = "redis://127.0.0.1:6379"


def _check_gpu_ids(gpu_ids: Sequence[int] | None) -> list[int]:
    """``gpu_ids`` as a list, each a GPU this machine has; else a ValueError naming it."""
    if gpu_ids is None:
        return []
    ids = list(gpu_ids)
    if not all(is_int(i) and i >= 0 for i in ids):
        raise ValueError(f"gpu_ids: expected a list of GPU numbers, got {gpu_ids!r}")
    if ids:
        count = torch.cuda.device_count()
        missing = [i for i in ids if i >= count]
        if missing:
            raise ValueError(
                f"gpu_ids: GPU {missing[0]} asked for, but this machine has {count} CUDA GPU(s)"
            )
    return ids


class PocEnvError(RuntimeError):
    """PocEnv could not start something; the message says what and where its log is."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    """The portal at ``url`` answers its health check."""
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _numbered(kind: str, count: int, argument: str) -> list[str]:
    """``kind``, ``kind-2``, … ``count`` process names; ``argument`` names a bad count."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{argument}: expected a whole number >= 1, got {count!r}")
    return [kind, *(f"{kind}-{n}" for n in range(2, count + 1))]


def _redis_answers(url: str, timeout: float = 1.0) -> bool:
    parts = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or 6379), timeout
        ) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


DEFAULT_POC_CLIENTS = 2
"""NVFlare's PocEnv default."""
DEFAULT_ADMIN_USER = "admin@nvidia.com"
"""NVFlare's PocEnv default ``username``."""
DEFAULT_STUDY = "default"
STUDY_NAME = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


class PocEnv:
    """A proof of concept on this machine with real processes; see the module docstring.

    NVFlare's PocEnv arguments are accepted with its defaults and meanings where they have one
    here:

    - ``num_clients=2`` sites ``site-1`` … ``site-N``, unless ``clients`` names them; with
      ``clients`` a ``num_clients`` left at its default is ignored (as NVFlare's docstring
      says), any other must match.
    - ``gpu_ids``: the GPUs the sites' scripts see (``CUDA_VISIBLE_DEVICES``, every site the
      whole list; NVFlare hands them to the clients in turn). A GPU this machine lacks is a
      ValueError.
    - ``use_he``: accepted, with nothing to do. NVFlare provisions a TenSEAL context into the
      startup kits for it; here a job that encrypts (``FedAvgRecipeWithHE``) makes its
      contexts at the sites, round by round, with no provisioning. As in NVFlare, it does
      not make a plain job encrypt.
    - ``docker_image`` is refused (ValueError): there is no Docker launch here, and running
      without it while the job.py asks for it would be a quiet lie about the software the
      sites run.
    - ``project_conf_path``: refused unless empty (the sites come from ``clients``).
    - ``username`` and ``study`` are checked (``study`` as NVFlare does: lower-case letters,
      digits, hyphens) and kept; they change nothing: the job is submitted by this PocEnv's own
      admin into its own project.
    - ``extra``: kept (``self.extra``); it changes nothing.
    - ``workspace_root``: accepted as another name for ``workspace`` (not both).

    Ours besides: ``privacy_policy``, each site's privacy policy in SimEnv's forms (one
    :class:`~client_agent.privacy.policy.PrivacyPolicy` or ``privacy.toml`` path for every
    site, or a dict by site name). It is written as ``privacy.toml`` into each site's folder
    before its agent starts, and the agent enforces it as at a real site.

    ``num_workers`` (default 1): Celery workers, ``worker``, ``worker-2``, … (the first also
    runs the beat). With more than one, a worker killed in the middle of a round's aggregation
    is replaced by another within seconds (``jobs.services.claims``), as in a deployment.

    ``num_portals`` (default 1): portal processes, ``portal``, ``portal-2``, …. With more than
    one they sit behind a reverse proxy (Debian's nginx, process ``proxy``;
    :mod:`jobs.envs.poc.proxy`) at ``port``, which spreads the agents over them and leaves out
    one that died; the agents of a killed portal reconnect through the proxy to another.
    """

    def __init__(
        self,
        num_clients: int | None = DEFAULT_POC_CLIENTS,
        *,
        clients: Sequence[str] | None = None,
        gpu_ids: Sequence[int] | None = None,
        use_he: bool = False,
        docker_image: str | None = None,
        project_conf_path: str = "",
        username: str = DEFAULT_ADMIN_USER,
        study: str = DEFAULT_STUDY,
        extra: dict[str, Any] | None = None,
        workspace: str | Path | None = None,
        workspace_root: str | Path | None = None,
        redis_url: str | None = None,
        redis_db: int = 2,
        port: int | None = None,
        keep_running: bool = False,
        show_progress: bool = True,
        round_timeout_seconds: int | None = None,
        python: str = sys.executable,
        extra_env: dict[str, str] | None = None,
        wire_log: bool = False,
        privacy_policy: PolicyArg | dict[str, PolicyArg] | None = None,
        database_url: str | None = None,
        num_workers: int = 1,
        num_portals: int = 1,
    ) -> None:
        self.workers = _numbered("worker", num_workers, "num_workers")
        self.portals = _numbered("portal", num_portals, "num_portals")
        self.nginx = nginx_binary() if num_portals > 1 else None
        if num_portals > 1 and self.nginx is None:
            raise ValueError(
                f"num_portals={num_portals}: several portals need a reverse proxy in front, "
                "and nginx is not installed here (Debian: apt-get install nginx)"
            )
        self.portal_ports: list[int] = []
        if clients is not None and num_clients == DEFAULT_POC_CLIENTS:
            num_clients = None
        self.clients = site_names(num_clients, clients)
        self.gpu_ids = _check_gpu_ids(gpu_ids)
        self.use_he = bool(use_he)  # nothing to provision: see the docstring
        if docker_image is not None:
            raise ValueError(
                f"docker_image: PocEnv runs the sites as processes on this machine, not in "
                f"Docker; got {docker_image!r}"
            )
        if project_conf_path:
            raise ValueError(
                "project_conf_path: PocEnv takes its sites from num_clients or clients, not a "
                f"project file; got {project_conf_path!r}"
            )
        if not isinstance(username, str) or not username:
            raise ValueError(f"username: must be a non-empty string, got {username!r}")
        if not isinstance(study, str) or not STUDY_NAME.fullmatch(study):
            raise ValueError(
                f"study: use only lower-case letters, digits and hyphens, got {study!r}"
            )
        if extra is not None and not isinstance(extra, dict):
            raise ValueError(f"extra: expected a dict, got {extra!r}")
        self.username = username
        self.study = study
        self.extra = dict(extra or {})
        workspace = check_workspace_alias(workspace, workspace_root)
        self._workspace_given = workspace is not None
        self.workspace = (
            Path(workspace).resolve()
            if workspace is not None
            else Path(tempfile.gettempdir())
            / f"fedportal-poc-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(8)}"
        )
        base = (redis_url or os.environ.get("REDIS_URL") or DEFAULT_REDIS).rstrip("/")
        parts = urllib.parse.urlsplit(base)
        self.redis_url = f"{parts.scheme}://{parts.netloc}/{redis_db}"
        self.port = port
        self.keep_running = keep_running
        self.show_progress = show_progress
        self.round_timeout_seconds = round_timeout_seconds
        self.python = python
        self.extra_env = dict(extra_env or {})
        self.wire_log = wire_log
        self.privacy_policies = site_policies(privacy_policy, self.clients)
        self.database_url = database_url
        self.supervisor = Supervisor(
            cwd=PROJECT_ROOT, logs=self.workspace / "logs", environ=self._env, say=self._say
        )
        # Its own Celery queue and channel-layer prefix: PocEnvs sharing a Redis database (a
        # test run beside a demo) never take each other's tasks, and groups left behind by an
        # earlier run's portal are not this run's.
        self.run_tag = f"poc-{secrets.token_hex(4)}"
        self.fork_server_socket = ""
        self._socket_dir = ""
        self.url = ""
        self.credentials: dict[str, Any] = {}

    @property
    def processes(self) -> dict[str, subprocess.Popen[bytes]]:
        """The running processes by name: ``portal``, ``worker``, ``agent:<site>``, …"""
        return self.supervisor.processes

    # -- the env protocol -------------------------------------------------------------------

    def run(self, recipe: Recipe) -> PortalRun:
        if recipe.min_clients > len(self.clients):
            raise ValueError(
                f"min_clients: the recipe needs {recipe.min_clients} sites but PocEnv has "
                f"{len(self.clients)}"
            )
        self.start()
        try:
            env = ProdEnv(
                self.url,
                token=self.credentials["api_token"],
                project=self.credentials["project"],
                sites=self.clients,
                round_timeout_seconds=self.round_timeout_seconds,
                show_progress=self.show_progress,
                workspace=self.workspace / "runs",
                wait=True,
            )
            run = env.run(recipe)
        finally:
            if not self.keep_running:
                self.stop()
        if self.keep_running:
            self._say(
                f"the portal stays up at {self.url} (user {self.credentials['username']}, "
                f"password {self.credentials['password']}); job page {run.url}"
            )
        return run

    # -- start ------------------------------------------------------------------------------

    def _say(self, text: str) -> None:
        if self.show_progress:
            print(f"[poc] {text}", flush=True)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "fedportal.settings.base",
                "FEDPORTAL_DATA_DIR": str(self.workspace),
                "DATABASE_URL": self.database_url or f"sqlite:///{self.workspace / 'db.sqlite3'}",
                "REDIS_URL": self.redis_url,
                "CELERY_BROKER_URL": self.redis_url,
                "FEDPORTAL_CELERY_QUEUE": self.run_tag,
                "FEDPORTAL_CHANNELS_PREFIX": self.run_tag,
                "FEDPORTAL_CA_KEY_ENCRYPTION_KEY": self._secret("ca-key"),
                "DJANGO_SECRET_KEY": self._secret("secret-key"),
                "FEDPORTAL_PUBLIC_URL": self.url,
                "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
                # Development mode (plain HTTP on 127.0.0.1: cookies not Secure; the portal
                # serves its static files), with the secrets above, but no debug bookkeeping
                # (every SQL query kept) in a portal that runs a job.
                "FEDPORTAL_DEV": "1",
                "DJANGO_DEBUG": "false",
                # Every site enrols from this machine's address, a hundred sites at once.
                "FEDPORTAL_THROTTLE_ENROL": "10000/minute",
                "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join(
                    p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p
                ),
            }
        )
        if self.database_url is None:
            # The connection to SQLite is kept rather than opened for every request;
            # PostgreSQL's connections come from each process's pool (settings).
            env["DATABASE_CONN_MAX_AGE"] = "600"
        if self.fork_server_socket:
            env["FEDPORTAL_FORKSERVER_SOCKET"] = self.fork_server_socket
        env.update(site_threads_env(len(self.clients)))  # every site trains at once
        if self.gpu_ids:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in self.gpu_ids)
        env.update(self.extra_env)
        return env

    def _secret(self, name: str) -> str:
        path = self.workspace / f".{name}"
        if not path.exists():
            write_private(path, secrets.token_urlsafe(32).encode())
        return path.read_text()

    def _make_workspace(self) -> None:
        """The private workspace (0700). The default one is new: a folder already at its
        (unguessable) name is not ours, and is refused rather than used."""
        if self._workspace_given:
            self.workspace.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.workspace.chmod(0o700)
        else:
            try:
                self.workspace.mkdir(mode=0o700)
            except FileExistsError:
                raise PocEnvError(f"{self.workspace} exists already; not using it") from None
            self._workspace_given = True  # ours now: a later start() uses it again
        for folder in ("logs", "sites", "runs"):
            (self.workspace / folder).mkdir(mode=0o700, exist_ok=True)

    def _spawn(
        self, name: str, args: list[str], log_name: str | None = None
    ) -> subprocess.Popen[bytes]:
        return self.supervisor.spawn(name, args, log_name)

    def _manage(self, *args: str) -> str:
        result = subprocess.run(
            [self.python, "manage.py", *args],
            cwd=PROJECT_ROOT,
            env=self._env(),
            capture_output=True,
            text=True,
            umask=PRIVATE_UMASK,
        )
        if result.returncode != 0:
            raise PocEnvError(f"manage.py {args[0]} failed:\n{result.stderr[-3000:]}")
        return result.stdout

    def start(self) -> PocEnv:
        """Start portal, worker and agents (once); returns self. Raises PocEnvError."""
        if self.processes:
            return self
        if not _redis_answers(self.redis_url):
            raise PocEnvError(
                f"no Redis answers at {self.redis_url}: PocEnv needs one for the Celery broker "
                "and the WebSocket channel layer. Start one with `redis-server --daemonize yes` "
                "(Debian: apt-get install redis-server) or `docker run -p 6379:6379 redis`, or "
                "point REDIS_URL at yours."
            )
        started = time.perf_counter()
        self._make_workspace()
        self.port = self.port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # One portal listens on the PoC's port itself; several on ports of their own.
        self.portal_ports = (
            [self.port] if len(self.portals) == 1 else [_free_port() for _ in self.portals]
        )
        atexit.register(self.stop)
        try:
            setup = self._database_and_setup()
            self._start_fork_server()
            self._launch_services()
            self.credentials = {"portal": self.url, "token": setup["api_token"], **setup}
            write_private(
                self.workspace / "credentials.json", json.dumps(self.credentials, indent=2).encode()
            )
            self._wait_for_portal()
            self._start_agents(setup["enrolment_tokens"])
        except BaseException:
            self.stop()
            raise
        # A worker that exits on its own is started again, as a service manager (systemd, the
        # compose file's restart policy) does in a deployment. A Celery worker on Redis can exit
        # when the broker goes away: kombu fails while it gives back its unacknowledged tasks
        # (``Unrecoverable error: AttributeError … 'hostname'``). Every task is safe to run
        # again and a starting worker resumes every active job, so starting it loses nothing.
        self.supervisor.watch(self.workers, self.restart)
        self._say(
            f"portal {self.url}, worker and {len(self.clients)} agents up in "
            f"{time.perf_counter() - started:.1f} s; workspace {self.workspace}"
        )
        return self

    def _start_fork_server(self) -> None:
        """One fork server for every agent here: torch is imported once for all the sites'
        scripts, not once per site (client_agent.forkserver). Agents elsewhere run their own."""
        if self.python != sys.executable:
            return
        # Unix socket paths are short (~108 bytes): a private folder in /tmp, not the workspace.
        self._socket_dir = tempfile.mkdtemp(prefix="fedportal-poc-")
        self.fork_server_socket = os.path.join(self._socket_dir, "forkserver.sock")
        self._spawn(
            "forkserver",
            [self.python, "-m", "client_agent.forkserver", "--listen", self.fork_server_socket],
        )
        deadline = time.monotonic() + 30
        while not os.path.exists(self.fork_server_socket):
            if self.processes["forkserver"].poll() is not None or time.monotonic() > deadline:
                raise PocEnvError("the fork server did not start; see logs/forkserver.log")
            time.sleep(0.01)

    def _database_and_setup(self) -> dict[str, Any]:
        """A migrated database holding the PoC's project and approved sites, and what
        ``poc_setup`` printed (API token, password, one-time enrolment tokens).

        On SQLite, made once a day per list of sites and cached: later starts copy it
        (:mod:`jobs.envs.poc.template`).
        """
        setup_file = self.workspace / "poc_setup.json"
        if setup_file.exists() and (self.database_url or (self.workspace / "db.sqlite3").exists()):
            return dict(json.loads(setup_file.read_text()))  # started before: the same PoC
        if self.database_url:
            # A database of the caller's (PostgreSQL): set up in place, nothing cached.
            self._manage("migrate", "--noinput")
            setup = self._manage("poc_setup", "--sites", ",".join(self.clients))
            write_private(setup_file, setup.encode())
            return dict(json.loads(setup))
        template = SetupTemplate(project_root=PROJECT_ROOT, clients=self.clients)
        if template.fresh():
            template.copy_to(self.workspace)
        else:
            self._say("preparing the database and the project (kept for a day)")
            self._manage("migrate", "--noinput")
            setup = self._manage("poc_setup", "--sites", ",".join(self.clients))
            write_private(setup_file, setup.encode())
            template.keep_from(self.workspace)
        return dict(json.loads(setup_file.read_text()))

    def _launch_services(self) -> None:
        py = self.python
        # The portal's server (Daphne with bounded bodies): HTTP, WebSockets and, in
        # development mode, the dashboard's static files. Several portals listen on ports of
        # their own behind the proxy, which listens on the PoC's port, and trust its
        # X-Forwarded-For.
        behind_proxy = len(self.portals) > 1
        for name, port in zip(self.portals, self.portal_ports, strict=True):
            serve = [py, "-m", "fedportal.serve", "-b", "127.0.0.1", "-p", str(port)]
            self._spawn(name, [*serve, *(["--proxy-headers"] if behind_proxy else [])])
        if behind_proxy:
            assert self.nginx is not None  # checked in __init__
            prefix = self.workspace / "proxy"
            config = write_nginx_config(prefix, self.port or 0, self.portal_ports)
            self._spawn("proxy", [self.nginx, "-p", str(prefix), "-c", str(config)])
        # Solo workers: one process each, no pool to fork; the round work is short and serial.
        # They need not wait to meet each other (mingle) at start: the database says who holds
        # what. The first runs the periodic resume (-B: beat in a child process), the safety net
        # for round kicks and deadline countdowns lost with the broker.
        for number, name in enumerate(self.workers):
            self._spawn(name, self.worker_args(beat=number == 0, name=name))

    def worker_args(self, *, beat: bool = False, name: str = "worker") -> list[str]:
        """The command of a Celery worker for this PoC (``beat``: with the periodic resume;
        one worker only should run it). ``name`` makes its Celery node name."""
        schedule = ["-B", "--schedule", str(self.workspace / "celerybeat-schedule")]
        return [
            *(self.python, "-m", "celery", "-A", "fedportal", "worker", "-P", "solo"),
            *("-n", f"{name}@%h", "--without-mingle", "--without-gossip", "--loglevel=INFO"),
            *(schedule if beat else []),
        ]

    def _proxy(self) -> list[str]:
        """The proxy's process name, when there is one."""
        return ["proxy"] if len(self.portals) > 1 else []

    def _wait_for_portal(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name in (*self.portals, *self.workers, *self._proxy()):
                if self.processes[name].poll() is not None:
                    raise PocEnvError(
                        f"the {name} exited at start; see {self.workspace / 'logs' / name}.log"
                    )
            if all(_answers(f"http://127.0.0.1:{port}") for port in self.portal_ports) and (
                len(self.portals) == 1 or _answers(self.url)
            ):
                return
            time.sleep(0.05)
        raise PocEnvError(f"the portal did not answer within {timeout:.0f} s; see logs/portal.log")

    def _start_agents(self, tokens: dict[str, str]) -> None:
        """Enrol every site as ``python -m client_agent enrol`` does (the same function, run
        here in threads rather than as one more Python start per site), then start its agent."""
        from client_agent import cli
        from client_agent.site_dir import SiteDir

        def enrol(site: str) -> None:
            folder = SiteDir(self.site_dir(site))
            if folder.is_enrolled():
                return  # this PoC was started before: the site keeps its identity
            try:
                cli.enrol(folder, portal=self.url, token=tokens[site], say=lambda _: None)
            except Exception as exc:
                raise PocEnvError(f"{site} could not enrol: {exc}") from exc

        with ThreadPoolExecutor(max_workers=len(self.clients)) as pool:
            list(pool.map(enrol, self.clients))
        for site in self.clients:
            self._write_policy(site)
            self.start_agent(site)

    def _write_policy(self, site: str) -> None:
        """``site``'s privacy policy into its folder, where its agent reads it at start: the
        file it was read from, as it is, or the policy written as TOML."""
        policy = self.privacy_policies.get(site)
        if policy is None:
            return
        target = self.site_dir(site) / POLICY_FILE
        if policy.path:
            shutil.copyfile(policy.path, target)
        else:
            target.write_text(policy.to_toml())

    def site_dir(self, site: str) -> Path:
        return self.workspace / "sites" / site

    def start_agent(self, site: str) -> subprocess.Popen[bytes]:
        """Start (or start again) ``site``'s agent."""
        return self._spawn(
            f"agent:{site}",
            [
                self.python,
                "-m",
                "client_agent",
                "run",
                "--dir",
                str(self.site_dir(site)),
                "-v",
                *(["--wire-log", str(self.site_dir(site) / "wire.jsonl")] if self.wire_log else []),
            ],
            log_name=f"agent-{site}",
        )

    def serve_until_interrupted(self) -> None:
        """Keep the portal, worker and agents up until Ctrl-C, then stop them."""
        self._say(f"open {self.url} (Ctrl-C stops the portal, worker and agents)")

        def interrupt(*_: object) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, interrupt)  # `kill` too, not only Ctrl-C
        try:
            while any(p.poll() is None for n, p in self.processes.items() if n in self.portals):
                time.sleep(0.5)
            self._say("the portal exited")
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    # -- stop -------------------------------------------------------------------------------

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a started process's group: ``portal``, ``worker``, ``agent:<site>``."""
        self.supervisor.kill(name, sig)

    def restart(self, name: str) -> None:
        """Start one stopped process again, as it was first started."""
        if name.startswith("agent:"):
            self.supervisor.forget_stopped(name)
            self.start_agent(name.split(":", 1)[1])
        elif name in self.portals or name in self.workers or name in self._proxy():
            self.supervisor.respawn(name)
        else:
            raise ValueError(f"no process named {name!r}")

    def stop(self, grace: float = 10.0) -> None:
        """End every process this env started: agents first, then worker and portal."""
        self.supervisor.stop(grace)
        if self._socket_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = self.fork_server_socket = ""

    def __enter__(self) -> PocEnv:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
