"""Attacks on a running deployment, class by class: which still get in.

Starts a deployment as production runs it, on this machine: the portal's own server
(``python -m fedportal.serve``) **without** ``FEDPORTAL_DEV`` (DEBUG off, secrets required,
Secure cookies, production throttles), PostgreSQL (database ``bench_attacks``, made afresh),
Redis (database 14, a prefix of its own), a Celery worker with its beat, and real site
agents (``site-1``, ``site-2``, and ``rel``, started as a new user would: ``--dir`` relative).
PocEnv starts it, with ``FEDPORTAL_DEV=0``. Then it attacks it as an outsider, a member, an
organisation admin and a hostile enrolled site (``evil``: a real key and certificate, with
its own code instead of the agent), class by class, these 12:

 1. a site wedges a job (its numbers)          7. a quadratic job page
 2. anonymous disk filling (request bodies)    8. secrets in predictable places
 3. access that outlives its grant (sockets)   9. fail-open defaults
 4. sign-in throttling                        10. 500s on bad input
 5. agent reports over the socket's cap       11. the smaller ones
 6. unbounded log ingestion                   12. bugs a new user hit

Every attack prints HELD (refused, or harmless, as it should be) or GOT THROUGH, with what
it saw; a class holds when all of its attacks do. The last line: ``classes that hold: N of 12``.
The exit status is 1 when anything got through.

People and sites come from the address they would: every attacker connects from its own
loopback address (127.0.0.x), so that one attack's throttling is not another's.

What this does not replay, and where it is checked instead: the copy button and a stale
progress bar are browser behaviour (``tests/browser``); faults mid-round are ``make chaos``.

    .venv/bin/python bench/attacks.py [--database-url postgres://postgres@127.0.0.1:5432/bench_attacks]

Settings the bench changes from production's defaults, to keep it short (each says why):
``FEDPORTAL_LOG_MAX_LINES_PER_SITE=2000`` (the quota is met with 10,000 lines, not 100,000),
``FEDPORTAL_LOG_GRACE_SECONDS=3`` (a finished job's lines are refused after 3 s, not 60 s).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import http.cookies
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import urllib.parse
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchlib
import psycopg
import torch
import upload_flood
from safetensors.torch import save_file
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

from client_agent import cli, signing
from client_agent.portal import PortalClient, PortalError
from client_agent.site_dir import SiteDir
from client_agent.wire import METADATA_KEY, load_state_dict, save_state_dict
from jobs.bundle import build_spec
from jobs.envs import PocEnv, ProdEnv
from jobs.recipes import FedAvgRecipe
from jobs.workflows import FedAvg
from sites.secret_tokens import API_TOKEN_PREFIX

ROOT = benchlib.REPO_ROOT
# The attacks keep sockets open across their steps, which websockets' sync client would have
# written as `with connect(...)`; it warns about every other use.
warnings.filterwarnings("ignore", r"connect\(\) must be used as a context manager")
DEFAULT_DATABASE = "postgres://postgres@127.0.0.1:5432/bench_attacks"
REDIS_DB = 14
MIB = 1 << 20
OPEN_TASK_STATES = ("assigned", "downloaded", "training")
FINISHED = ("completed", "failed", "aborted")

CLASSES = {
    1: "a site wedges a job (its numbers)",
    2: "anonymous disk filling (request bodies)",
    3: "access that outlives its grant",
    4: "sign-in and token throttling",
    5: "agent reports over the socket's cap",
    6: "unbounded log ingestion",
    7: "quadratic job page",
    8: "secrets in predictable places",
    9: "fail-open defaults",
    10: "500s on bad input",
    11: "the smaller ones",
    12: "bugs a new user hit",
}

# The real sites' script: site k (site-1, site-2; rel is 3) adds k to every weight and
# reports weight k. In its first round it also prints one 3 MiB line and 1500 short ones
# (the agent must cut the first and split the lot into reports under the socket's cap).
SCRIPT = textwrap.dedent(
    """
    import client_agent.api as flare

    flare.init()
    name = flare.get_site_name()
    k = 3 if name == "rel" else int(name.rsplit("-", 1)[1])
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        if model.current_round == 0:
            print("x" * (3 * 1024 * 1024), flush=True)
            for i in range(1500):
                print(f"line {i} of round 0", flush=True)
        flare.log("score", float(k), step=model.current_round)
        print(f"round {model.current_round}: adding {k}", flush=True)
        params = {n: v + k for n, v in model.params.items()}
        flare.send(flare.FLModel(params=params, metrics={"score": float(k)},
                                 meta={"NUM_STEPS_CURRENT_ROUND": k}))
    """
)


# --- what an attack returns, and the list of them ------------------------------------------------


@dataclass
class Outcome:
    held: bool
    seen: str


@dataclass
class Attack:
    klass: int
    title: str
    run: Callable[[World], Outcome]
    outcome: Outcome | None = None


ATTACKS: list[Attack] = []


def attack(klass: int, title: str) -> Callable[[Callable[[World], Outcome]], Any]:
    def register(func: Callable[[World], Outcome]) -> Callable[[World], Outcome]:
        ATTACKS.append(Attack(klass, title, func))
        return func

    return register


def held_if(condition: bool, seen: str) -> Outcome:
    return Outcome(bool(condition), seen)


# --- HTTP and WebSocket clients ------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    seconds: float

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str:
        return str(self.headers.get(name, ""))

    def is_json_error(self) -> bool:
        if not self.header("Content-Type").startswith("application/json"):
            return False
        try:
            body = self.json()
        except ValueError:
            return False
        return isinstance(body, dict) and "code" in body and "message" in body

    def short(self) -> str:
        text = self.body[:160].decode("utf-8", "replace").replace("\n", " ")
        return f"{self.status} {text}"


_next_address = iter(range(10, 250))


def new_address() -> str:
    """A loopback address of its own for one attacker (Linux answers all of 127/8)."""
    return f"127.0.0.{next(_next_address)}"


class Http:
    """A person's, a stranger's or a site's HTTP client, from its own loopback address.

    Keeps cookies whatever their Secure flag says: the deployment here has no TLS terminator
    in front of it, and an attacker's client obeys no flag anyway.
    """

    def __init__(self, port: int, *, token: str | None = None, address: str | None = None):
        self.port = port
        self.token = token
        self.address = address or new_address()
        self.cookies: dict[str, str] = {}

    def connection(self, timeout: float = 60.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(
            "127.0.0.1", self.port, timeout=timeout, source_address=(self.address, 0)
        )

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Host": f"127.0.0.1:{self.port}", "Accept": "application/json, text/html"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        headers.update(extra or {})
        return headers

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str = b"",
        headers: dict[str, str] | None = None,
        *,
        json_body: Any = None,
        timeout: float = 60.0,
    ) -> Reply:
        extra = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body)
            extra.setdefault("Content-Type", "application/json")
        if isinstance(body, str):
            body = body.encode()
        if method in ("POST", "PUT", "PATCH", "DELETE") and "csrftoken" in self.cookies:
            extra.setdefault("X-CSRFToken", self.cookies["csrftoken"])
            extra.setdefault("Referer", f"http://127.0.0.1:{self.port}/")
        started = time.monotonic()
        conn = self.connection(timeout)
        try:
            conn.request(method, path, body=body or None, headers=self.headers(extra))
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        for value in response.headers.get_all("Set-Cookie") or []:
            jar = http.cookies.SimpleCookie()
            jar.load(value)
            for name, morsel in jar.items():
                if morsel["max-age"] == "0" or not morsel.value:
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        return Reply(response.status, response.headers, data, time.monotonic() - started)

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, json_body: Any = None, **kwargs: Any) -> Reply:
        return self.request("POST", path, json_body=json_body, **kwargs)

    def sign_in(self, username: str, password: str, path: str = "/login/") -> Reply:
        self.get(path)  # the CSRF cookie
        form = urllib.parse.urlencode(
            {
                "username": username,
                "password": password,
                "csrfmiddlewaretoken": self.cookies.get("csrftoken", ""),
                "next": "/",
            }
        )
        return self.request(
            "POST",
            path,
            form,
            {
                "Content-Type": "application/x-www-form-urlencoded",
                "Referer": f"http://127.0.0.1:{self.port}{path}",
            },
        )

    def socket(self, path: str) -> ClientConnection:
        """A dashboard WebSocket with this person's session, from the portal's own page."""
        return connect(
            f"ws://127.0.0.1:{self.port}{path}",
            additional_headers={"Cookie": self.headers()["Cookie"]} if self.cookies else {},
            origin=Origin(f"http://127.0.0.1:{self.port}"),
            open_timeout=10,
            max_size=None,
        )


def multipart(
    fields: dict[str, bytes | str], files: dict[str, tuple[str, bytes]]
) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        data = value.encode() if isinstance(value, str) else value
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(data + b"\r\n")
    for name, (filename, data) in files.items():
        out.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
        )
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def close_code(ws: ClientConnection, seconds: float) -> int | None:
    """The close code the portal sends within ``seconds`` (1006: the connection dropped);
    None if the socket is still open then. Messages meanwhile are read and dropped."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            ws.recv(timeout=left)
        except TimeoutError:
            return None
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd is not None else 1006


def messages_until(
    ws: ClientConnection, seconds: float, want: Callable[[dict[str, Any]], bool]
) -> dict[str, Any] | None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            message = json.loads(ws.recv(timeout=left))
        except (TimeoutError, ConnectionClosed):
            return None
        if isinstance(message, dict) and want(message):
            return message
    return None


# --- a hostile site -----------------------------------------------------------------------------


class HostileSite:
    """An enrolled site with a real key and certificate, and its own code instead of the agent."""

    def __init__(self, url: str, folder: Path) -> None:
        site_dir = SiteDir(folder)
        self.folder = folder
        self.identity = site_dir.identity()
        self.key = site_dir.key()
        self.client = PortalClient(url, key=self.key, fingerprint=self.identity.fingerprint)
        self.http = Http(int(urllib.parse.urlsplit(url).port or 80))

    def signed(self, method: str, path: str, body: bytes = b"") -> dict[str, str]:
        return signing.sign_request(
            key=self.key,
            cert_pem_or_fingerprint=self.identity.fingerprint,
            method=method,
            path=path,
            body=body,
        )

    def raw(
        self, method: str, path: str, body: bytes = b"", content_type: str = "application/json"
    ) -> Reply:
        headers = self.signed(method, path, body)
        if body:
            headers["Content-Type"] = content_type
        return self.http.request(method, path, body, headers)

    def socket(self) -> ClientConnection:
        ws = connect(
            f"ws://127.0.0.1:{self.http.port}/ws/agent/",
            additional_headers=self.signed("GET", "/ws/agent/"),
            open_timeout=10,
            max_size=None,
        )
        hello = json.loads(ws.recv(timeout=10))
        if hello.get("type") != "welcome":
            raise RuntimeError(f"the agent socket said {hello}")
        return ws

    def jobs(self) -> list[dict[str, Any]]:
        return list(self.client.get("/api/v1/agent/jobs/"))

    def job(self, uid: str) -> dict[str, Any] | None:
        return next((j for j in self.jobs() if str(j["uid"]) == uid), None)


def update_file(path: Path, tensors: dict[str, torch.Tensor], header: str) -> Path:
    """A safetensors update whose metadata is ``header`` as written (NaN and all)."""
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={METADATA_KEY: header}
    )
    return path


def fields_json(weight: Any, metrics: Any) -> str:
    return json.dumps(
        {"params_type": "FULL", "metrics": metrics, "meta": {"NUM_STEPS_CURRENT_ROUND": weight}}
    )


# --- the deployment -----------------------------------------------------------------------------


def fresh_database(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    name = parts.path.lstrip("/")
    admin = parts._replace(path="/postgres").geturl()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


SETUP = textwrap.dedent(
    """
    import json, secrets
    from django.contrib.auth import get_user_model
    from sites import services
    from sites.models import Organization, Project, Role
    User = get_user_model()
    admin = User.objects.get(username="admin")
    project = Project.objects.get(slug="poc")
    poc = Organization.objects.get(project=project, name="PoC sites")
    other = services.organization_create(project=project, name="Org B", created_by=admin)
    out = {"users": {}, "tokens": {}, "org_b": other.pk}
    def person(name, org, role):
        password = secrets.token_urlsafe(12)
        user = User.objects.create_user(username=name, password=password)
        if org is not None:
            services.membership_add(organization=org, user=user, role=role, added_by=admin)
        _, token = services.api_token_create(user=user, name="bench")
        out["users"][name] = {"password": password, "token": token}
    person("mallory", None, None)
    person("member", poc, Role.MEMBER)
    person("leaver", poc, Role.MEMBER)
    person("demoted", poc, Role.LEAD)
    person("orgadmin", other, Role.ORG_ADMIN)
    for name in ("victim", "victim2", "victim3", "bystander"):
        person(name, poc, Role.MEMBER)
    for name, auto in (("evil", False), ("rel", True)):
        site = services.site_request(organization=poc, name=name,
                                     contact_email=f"admin@{name}.invalid", requested_by=admin)
        site, token = services.site_approve(site=site, approved_by=admin)
        site.auto_accept_jobs = auto
        site.save(update_fields=["auto_accept_jobs"])
        out["tokens"][name] = token
    print("BENCH-SETUP " + json.dumps(out))
    """
)


@dataclass
class World:
    """The running deployment and everyone in it."""

    env: PocEnv
    port: int
    url: str
    work: Path
    admin: Http  # the project admin's API token
    admin_password: str
    people: dict[str, dict[str, str]]
    org_b: int
    evil: HostileSite
    started: list[subprocess.Popen[bytes]]
    rel_agent: subprocess.Popen[bytes] | None = None
    jobs: dict[str, str] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def api(self, who: str) -> Http:
        return Http(self.port, token=self.people[who]["token"])

    def browser(self, who: str) -> Http:
        person = Http(self.port)
        reply = person.sign_in(who, self.people[who]["password"])
        if "sessionid" not in person.cookies:
            raise RuntimeError(f"{who} could not sign in: {reply.short()}")
        return person

    def browser_admin(self) -> Http:
        """The project admin signed in (one session, kept)."""
        if "admin_session" not in self.notes:
            person = Http(self.port, address="127.0.0.1")
            person.sign_in("admin", self.admin_password)
            if "sessionid" not in person.cookies:
                raise RuntimeError("the admin could not sign in")
            self.notes["admin_session"] = person
        return self.notes["admin_session"]  # type: ignore[no-any-return]

    def job_points(self, uid: str) -> int:
        return int(self.admin.get(f"/api/v1/jobs/{uid}/metrics/?limit=1").json()["count"])

    def decide(self, uid: str, site: str) -> None:
        """The site's admin (here the project admin) accepts the job for ``site``: evil does
        not accept jobs automatically, so its agent may not."""
        reply = self.admin.post(f"/api/v1/jobs/{uid}/sites/{site}/decision/", {"accept": True})
        if reply.status >= 400:
            raise RuntimeError(f"the decision for {site} was refused: {reply.short()}")

    def job(self, uid: str) -> dict[str, Any]:
        return dict(self.admin.get(f"/api/v1/jobs/{uid}/").json())

    def job_sites(self, uid: str) -> dict[str, dict[str, Any]]:
        rows = self.admin.get(f"/api/v1/jobs/{uid}/sites/").json()
        rows = rows["results"] if isinstance(rows, dict) else rows
        return {row["site"]: row for row in rows}

    def wait_job(self, uid: str, states: tuple[str, ...], seconds: float) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        while True:
            job = self.job(uid)
            if job["state"] in states or time.monotonic() > deadline:
                return job
            time.sleep(0.3)

    def submit(
        self, name: str, sites: list[str], *, min_clients: int, num_rounds: int, timeout: int
    ) -> str:
        recipe = FedAvgRecipe(
            name=name,
            min_clients=min_clients,
            num_rounds=num_rounds,
            model={"w": torch.linspace(-1.0, 1.0, 1000)},
            train_script=str(self.work / "app" / "client.py"),
            key_metric="score",
        )
        env = ProdEnv(
            self.url,
            token=self.env.credentials["api_token"],
            project="poc",
            sites=sites,
            round_timeout_seconds=timeout,
            show_progress=False,
            workspace=self.work / "runs",
            wait=False,
        )
        run = env.run(recipe)
        self.jobs[name] = run.job_id
        return run.job_id


@contextlib.contextmanager
def deployment(database_url: str) -> Iterator[World]:
    fresh_database(database_url)
    work = Path(tempfile.mkdtemp(prefix="fedportal-attacks-"))
    (work / "app").mkdir()
    (work / "app" / "client.py").write_text(SCRIPT)
    tmp = work / "portal-tmp"
    tmp.mkdir()
    env = PocEnv(
        clients=["site-1", "site-2"],
        workspace=work / "poc",
        database_url=database_url,
        redis_db=REDIS_DB,
        show_progress=False,
        extra_env={
            # Production mode: DEBUG off, Secure cookies, production throttles.
            "FEDPORTAL_DEV": "0",
            "DJANGO_DEBUG": "",
            "FEDPORTAL_THROTTLE_ENROL": "120/minute",
            "FEDPORTAL_LOG_MAX_LINES_PER_SITE": "2000",
            "FEDPORTAL_LOG_GRACE_SECONDS": "3",
            "TMPDIR": str(tmp),
        },
    )
    started: list[subprocess.Popen[bytes]] = []  # processes the attacks start (rel's agent)
    env.start()
    try:
        port = int(env.port or 0)
        admin = Http(port, token=env.credentials["api_token"], address="127.0.0.1")
        setup = env._manage("shell", "-c", SETUP)
        data = json.loads(setup.split("BENCH-SETUP ", 1)[1])
        # evil enrols as the agent would (the same function), and then acts on its own.
        evil_dir = SiteDir(work / "evil")
        cli.enrol(evil_dir, portal=env.url, token=data["tokens"]["evil"], say=lambda _: None)
        world = World(
            env=env,
            port=port,
            url=env.url,
            work=work,
            admin=admin,
            admin_password=env.credentials["password"],
            people=data["users"],
            org_b=data["org_b"],
            evil=HostileSite(env.url, work / "evil"),
            started=started,
        )
        world.notes["tmpdir"] = tmp
        world.notes["database_url"] = database_url
        world.notes["rel_token"] = data["tokens"]["rel"]
        yield world
    finally:
        for proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        env.stop()
        shutil.rmtree(work, ignore_errors=True)


def start_relative_agent(world: World) -> None:
    """``rel``: enrolled and run exactly as the enrol command prints it, ``--dir`` relative,
    from a folder of its own."""
    home = world.work / "rel-home"
    home.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.pop("FEDPORTAL_FORKSERVER_SOCKET", None)
    enrol = subprocess.run(
        [
            sys.executable,
            "-m",
            "client_agent",
            "enrol",
            "--portal",
            world.url,
            "--token",
            world.notes["rel_token"],
            "--dir",
            "rel-site",
        ],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if enrol.returncode != 0:
        raise RuntimeError(f"rel could not enrol: {enrol.stderr[-2000:]}")
    log = open(world.work / "rel-agent.log", "wb")  # noqa: SIM115 - the agent's, while it runs
    world.rel_agent = subprocess.Popen(
        [sys.executable, "-m", "client_agent", "run", "--dir", "rel-site", "-v"],
        cwd=home,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    world.started.append(world.rel_agent)


# === 8. secrets in predictable places ============================================================


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@attack(8, "the PoC workspace (CA keys, passwords, tokens) is private to its owner")
def workspace_private(world: World) -> Outcome:
    m = mode(world.env.workspace)
    return held_if(m == 0o700, f"{world.env.workspace.name}: mode {m:o}")


@attack(8, "credentials.json (the superuser's password, an API token) is 0600")
def credentials_private(world: World) -> Outcome:
    m = mode(world.env.workspace / "credentials.json")
    return held_if(m == 0o600, f"mode {m:o}")


@attack(8, "nothing in the workspace is readable by group or others (logs, keys, secrets)")
def nothing_readable(world: World) -> Outcome:
    exposed = [
        f"{p.relative_to(world.env.workspace)} {mode(p):o}"
        for p in world.env.workspace.rglob("*")
        if not p.is_symlink() and p.exists() and mode(p) & 0o077 and not p.is_socket()
    ]
    count = sum(1 for _ in world.env.workspace.rglob("*"))
    return held_if(not exposed, f"{count} files checked; exposed: {exposed[:5] or 'none'}")


@attack(8, "a site's private key and folder are its owner's only")
def site_key_private(world: World) -> Outcome:
    folder = world.env.site_dir("site-1")
    key, fmode = mode(folder / "site.key"), mode(folder)
    return held_if(key == 0o600 and fmode == 0o700, f"site.key {key:o}, folder {fmode:o}")


@attack(8, "the default workspace's name cannot be guessed (make demo's)")
def workspace_unguessable(world: World) -> Outcome:
    names = {PocEnv(1).workspace.name for _ in range(3)}
    suffixes = {n.rsplit("-", 1)[-1] for n in names}
    ok = len(names) == 3 and all(len(s) >= 16 for s in suffixes)
    return held_if(ok, f"e.g. {sorted(names)[0]}")


@attack(8, "a folder planted at the workspace's name beforehand is refused, not used")
def planted_workspace_refused(world: World) -> Outcome:
    poc = PocEnv(1, redis_db=REDIS_DB, show_progress=False)
    poc.workspace.mkdir(mode=0o777)
    try:
        poc.start()
    except Exception as exc:  # what it raises is what we report
        return held_if("exists already" in str(exc), f"{type(exc).__name__}: {exc}")
    finally:
        with contextlib.suppress(Exception):
            poc.stop()
        with contextlib.suppress(OSError):
            poc.workspace.rmdir()
    return Outcome(False, "PocEnv started in a folder someone else made")


# === 9. fail-open defaults =====================================================================


def start_portal_bare(env_extra: dict[str, str]) -> tuple[int | None, str]:
    """``python -m fedportal.serve`` with none of the deployment's settings but ``env_extra``."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", ""),
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": "sqlite:///:memory:",
        **env_extra,
    }
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedportal.serve", "-b", "127.0.0.1", "-p", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        out, _ = proc.communicate(timeout=45)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return None, out.decode(errors="replace")
    return proc.returncode, out.decode(errors="replace")


@attack(9, "a portal started with no environment refuses to run (no public secret key)")
def no_env_refused(world: World) -> Outcome:
    code, out = start_portal_bare({})
    last = out.strip().splitlines()[-1] if out.strip() else ""
    return held_if(
        code not in (None, 0) and "DJANGO_SECRET_KEY" in out, f"exit {code}: {last[:150]}"
    )


@attack(9, "a portal without the CA key-encryption key refuses to run")
def no_ca_key_refused(world: World) -> Outcome:
    code, out = start_portal_bare({"DJANGO_SECRET_KEY": secrets.token_urlsafe(40)})
    last = out.strip().splitlines()[-1] if out.strip() else ""
    return held_if(
        code not in (None, 0) and "FEDPORTAL_CA_KEY_ENCRYPTION_KEY" in out,
        f"exit {code}: {last[:150]}",
    )


@attack(9, "DEBUG is off: an unknown page shows no URL list or traceback")
def debug_off(world: World) -> Outcome:
    reply = Http(world.port).get("/no-such-page/admin/../")
    leaked = any(
        s in reply.body for s in (b"URLconf", b"Django tried", b"Traceback", b"DEBUG = True")
    )
    return held_if(reply.status == 404 and not leaked, f"{reply.status}, debug page: {leaked}")


@attack(9, "pages carry CSP, frame, sniffing and referrer headers")
def security_headers(world: World) -> Outcome:
    reply = Http(world.port).get("/login/")
    csp = reply.header("Content-Security-Policy")
    ok = (
        "default-src 'self'" in csp
        and "frame-ancestors 'none'" in csp
        and reply.header("X-Frame-Options") == "DENY"
        and reply.header("X-Content-Type-Options") == "nosniff"
        and reply.header("Referrer-Policy") == "same-origin"
    )
    return held_if(ok, f"CSP {csp[:60]!r}…, X-Frame-Options {reply.header('X-Frame-Options')}")


@attack(9, "the session and CSRF cookies are Secure, HttpOnly (session) and SameSite")
def cookie_flags(world: World) -> Outcome:
    person = Http(world.port)
    first = person.get("/login/")
    reply = person.sign_in("bystander", world.people["bystander"]["password"])
    cookies = (first.headers.get_all("Set-Cookie") or []) + (
        reply.headers.get_all("Set-Cookie") or []
    )
    session = next((c for c in cookies if c.startswith("sessionid=")), "")
    csrf = next((c for c in cookies if c.startswith("csrftoken=")), "")
    ok = (
        bool(session)
        and "Secure" in session
        and "HttpOnly" in session
        and "SameSite=Lax" in session
        and "Secure" in csrf
    )
    flags = "; ".join(p.strip() for p in session.split(";")[1:] if "=" not in p or "SameSite" in p)
    return held_if(ok, f"sessionid: {flags}")


@attack(9, "the agent refuses to send its token over plain HTTP to another machine")
def agent_refuses_plain_http(world: World) -> Outcome:
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "client_agent",
            "enrol",
            "--portal",
            "http://192.0.2.10:8000",
            "--token",
            "not-a-real-token",
            "--dir",
            str(world.work / "never"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    seconds = time.monotonic() - started
    out = (result.stderr + result.stdout).strip().splitlines()
    ok = result.returncode != 0 and "--insecure" in result.stderr + result.stdout and seconds < 30
    return held_if(ok, f"exit {result.returncode} in {seconds:.1f} s: {(out or [''])[-1][:120]}")


@attack(9, "the compose file passes the CA key-encryption key (creating a project works)")
def compose_passes_ca_key(world: World) -> Outcome:
    files = sorted((ROOT / "docker").glob("*compose*.y*ml")) + sorted(ROOT.glob("*compose*.y*ml"))
    text = "".join(f.read_text() for f in files)
    ok = bool(files) and "FEDPORTAL_CA_KEY_ENCRYPTION_KEY" in text
    return held_if(ok, f"{[f.name for f in files]}: key {'passed' if ok else 'missing'}")


@attack(9, "creating a project in production mode works (the CA key is encrypted with the KEK)")
def project_created(world: World) -> Outcome:
    reply = world.admin.post("/api/v1/projects/", {"name": "bench-project"})
    return held_if(reply.status == 201, reply.short()[:100])


# === 10. 500s on bad input =====================================================================

DEEP = b"[" * 100_000 + b"]" * 100_000


def json_error(reply: Reply, status: int, field_name: str | None = None) -> bool:
    if reply.status != status or not reply.is_json_error():
        return False
    return field_name is None or reply.json().get("field") == field_name


@attack(10, "deeply nested JSON from a person is a 400 naming the body")
def deep_json_person(world: World) -> Outcome:
    reply = world.admin.request(
        "POST", "/api/v1/projects/", DEEP, {"Content-Type": "application/json"}
    )
    return held_if(json_error(reply, 400, "body"), reply.short()[:120])


@attack(10, "deeply nested JSON on the anonymous enrol endpoint is a 400")
def deep_json_enrol(world: World) -> Outcome:
    # Under the enrolment's 64 KiB bound: the parser must refuse it, not the size limit.
    deep = b"[" * 30_000 + b"]" * 30_000
    reply = Http(world.port).request(
        "POST", "/api/v1/enrol/", deep, {"Content-Type": "application/json"}
    )
    return held_if(json_error(reply, 400, "body"), reply.short()[:120])


def job_bundle(
    *, model: bytes | None = None, app: bytes | None = None, **params: Any
) -> tuple[bytes, str]:
    workflow_params = {"min_clients": 1, "num_rounds": 1, **params}
    spec = build_spec(
        name="bad-input",
        workflow=FedAvg(min_clients=1, num_rounds=1),
        train_script="client.py",
        train_args="",
    )
    spec["params"].update(workflow_params)
    if model is None:
        path = Path(tempfile.mkstemp(suffix=".safetensors")[1])
        save_state_dict(path, {"w": torch.zeros(4)})
        model = path.read_bytes()
        path.unlink()
    if app is None:
        app = zip_of({"client.py": b"print('hello')\n"})
    return multipart(
        {},
        {
            "spec": ("job.json", json.dumps(spec).encode()),
            "initial_model": ("initial_model.safetensors", model),
            "app": ("app.zip", app),
        },
    )


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def submit_raw(world: World, body: bytes, content_type: str) -> Reply:
    return world.admin.request(
        "POST", "/api/v1/projects/poc/jobs/", body, {"Content-Type": content_type}
    )


@attack(10, "num_rounds=10**20 through the API is a 400 naming spec.num_rounds")
def huge_rounds_api(world: World) -> Outcome:
    reply = submit_raw(world, *job_bundle(num_rounds=10**20))
    return held_if(json_error(reply, 400, "spec.num_rounds"), reply.short()[:120])


@attack(10, "num_rounds=10**20 in the submission form is a form error, not a 500")
def huge_rounds_form(world: World) -> Outcome:
    person = Http(world.port)
    person.sign_in("admin", world.admin_password)
    page = "/projects/poc/jobs/new/"
    person.get(page)
    path = Path(tempfile.mkstemp(suffix=".safetensors")[1])
    save_state_dict(path, {"w": torch.zeros(4)})
    body, ctype = multipart(
        {
            "csrfmiddlewaretoken": person.cookies.get("csrftoken", ""),
            "name": "big",
            "workflow": "fedavg",
            "fedavg__min_clients": "1",
            "fedavg__num_rounds": str(10**20),
            "train_script": "client.py",
        },
        {
            "app": ("app.zip", zip_of({"client.py": b"x = 1\n"})),
            "initial_model": ("m.safetensors", path.read_bytes()),
        },
    )
    path.unlink()
    reply = person.request(
        "POST",
        page,
        body,
        {"Content-Type": ctype, "Referer": f"http://127.0.0.1:{world.port}{page}"},
    )
    field_error = b'class="field has-error" id="field-fedavg__num_rounds"' in reply.body
    ok = reply.status == 200 and field_error
    return held_if(ok, f"{reply.status}, the form again with the error beside num_rounds: {ok}")


@attack(10, "an unknown WebSocket path is refused (4404), and the server carries on")
def unknown_socket_path(world: World) -> Outcome:
    try:
        ws = connect(f"ws://127.0.0.1:{world.port}/ws/nothing/here/", open_timeout=10)
    except InvalidStatus as exc:
        code: int | None = exc.response.status_code
    else:
        code = close_code(ws, 5)
    alive = Http(world.port).get("/healthz").status == 200
    return held_if(
        code in (4404, 403, 404) and alive, f"close/status {code}; /healthz answers: {alive}"
    )


@attack(10, "an unknown API path is a JSON 404, not an HTML page")
def api_404_json(world: World) -> Outcome:
    reply = world.admin.get("/api/v1/no/such/thing/")
    return held_if(json_error(reply, 404), reply.short()[:100])


@attack(10, "offset=10**20 on a list is a 400 naming offset")
def huge_offset(world: World) -> Outcome:
    reply = world.admin.get(f"/api/v1/projects/poc/jobs/?offset={10**20}")
    return held_if(json_error(reply, 400, "offset"), reply.short()[:100])


@attack(10, "malformed JSON and invalid UTF-8 are 400s")
def malformed_json(world: World) -> Outcome:
    a = world.admin.request(
        "POST", "/api/v1/projects/", b'{"name": ', {"Content-Type": "application/json"}
    )
    b = world.admin.request(
        "POST", "/api/v1/projects/", b'{"name": "\xff\xfe"}', {"Content-Type": "application/json"}
    )
    return held_if(json_error(a, 400) and json_error(b, 400), f"{a.status}, {b.status}")


@attack(10, "an enrolment token that is a huge number or an object is a 400")
def enrol_odd_token(world: World) -> Outcome:
    anon = Http(world.port)
    a = anon.post("/api/v1/enrol/check/", {"token": 10**400})
    b = anon.post("/api/v1/enrol/check/", {"token": {"$gt": ""}})
    return held_if(json_error(a, 400) and json_error(b, 400), f"{a.short()[:60]} | {b.status}")


# === 11. the smaller ones ======================================================================


@attack(11, "a short-lived API token cannot mint a token that outlives it")
def token_mint(world: World) -> Outcome:
    soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    short = world.admin.post("/api/v1/api-tokens/", {"name": "short", "expires_at": soon}).json()
    minted = Http(world.port, token=short["key"]).post("/api/v1/api-tokens/", {"name": "forever"})
    if minted.status >= 400:
        return Outcome(True, f"refused: {minted.short()[:80]}")
    expires = minted.json().get("expires_at")
    return held_if(
        expires is not None and expires <= short["expires_at"], f"minted token expires {expires}"
    )


@attack(11, "an org admin cannot add an account from outside the project")
def org_admin_adds_outsider(world: World) -> Outcome:
    reply = world.api("orgadmin").post(
        "/api/v1/projects/poc/memberships/",
        {"organization": world.org_b, "username": "mallory", "role": "member"},
    )
    members = world.admin.get("/api/v1/projects/poc/memberships/?limit=500").json()["results"]
    added = any(m["username"] == "mallory" for m in members)
    return held_if(reply.status >= 400 and not added, f"{reply.short()[:110]}")


@attack(11, "an org admin cannot tell which accounts exist (outsider vs nobody)")
def org_admin_enumerates(world: World) -> Outcome:
    who = world.api("orgadmin")
    payload = {"organization": world.org_b, "role": "member"}
    outsider = who.post("/api/v1/projects/poc/memberships/", {**payload, "username": "mallory"})
    nobody = who.post(
        "/api/v1/projects/poc/memberships/", {**payload, "username": "no-such-user-x"}
    )
    same = outsider.status == nobody.status and outsider.body.replace(
        b"mallory", b"X"
    ) == nobody.body.replace(b"no-such-user-x", b"X")
    return held_if(same, f"outsider {outsider.status}, nobody {nobody.status}, same answer: {same}")


@attack(11, "an initial model holding NaN is refused at submission")
def initial_model_nan(world: World) -> Outcome:
    path = Path(tempfile.mkstemp(suffix=".safetensors")[1])
    save_file({"w": torch.tensor([1.0, float("nan")])}, str(path))
    reply = submit_raw(world, *job_bundle(model=path.read_bytes()))
    path.unlink()
    return held_if(reply.status == 400 and reply.is_json_error(), reply.short()[:120])


def forged_safetensors(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data


@attack(11, "an initial model with overlapping tensors is refused")
def initial_model_overlap(world: World) -> Outcome:
    model = forged_safetensors(
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        b"\0" * 12,
    )
    reply = submit_raw(world, *job_bundle(model=model))
    return held_if(reply.status == 400 and reply.is_json_error(), reply.short()[:120])


@attack(11, "an app archive whose CRC lies is refused at submission")
def zip_crc_lies(world: World) -> Outcome:
    data = bytearray(zip_of({"client.py": b"print('an honest script')\n" * 20}))
    at = data.find(b"an honest")
    data[at] ^= 0x20  # the bytes change; the CRC in both headers stays
    reply = submit_raw(world, *job_bundle(app=bytes(data)))
    return held_if(reply.status == 400 and reply.is_json_error(), reply.short()[:120])


@attack(11, "an app archive with client.py and Client.py is refused")
def zip_case_collision(world: World) -> Outcome:
    reply = submit_raw(
        world, *job_bundle(app=zip_of({"client.py": b"a = 1\n", "Client.py": b"a = 2\n"}))
    )
    return held_if(reply.status == 400 and reply.is_json_error(), reply.short()[:120])


@attack(11, "600 half-sent requests: none still open after 20 s (header timeout)")
def slow_headers(world: World) -> Outcome:
    still_open = upload_flood.slow_headers(world.port, 600, 20.0)
    alive = Http(world.port).get("/healthz").status == 200
    return held_if(
        still_open == 0 and alive, f"{still_open} of 600 still open; /healthz answers: {alive}"
    )


@attack(11, "one person cannot hold more than FEDPORTAL_MAX_SOCKETS_PER_USER sockets")
def socket_cap(world: World) -> Outcome:
    person = world.browser("member")
    sockets, refused = [], 0
    try:
        for _ in range(30):
            ws = person.socket("/ws/dashboard/projects/poc/")
            first = messages_until(ws, 5, lambda m: m.get("kind") in ("hello", "error"))
            if first is None or first.get("kind") == "error":
                refused += 1
                ws.close()
            else:
                sockets.append(ws)
    finally:
        for ws in sockets:
            ws.close()
    return held_if(
        len(sockets) <= 20 and refused >= 10, f"{len(sockets)} open, {refused} refused (cap 20)"
    )


@attack(11, "the API docs load no script from a CDN; Swagger UI is the portal's own")
def docs_no_cdn(world: World) -> Outcome:
    page = world.admin.get("/api/docs/")
    text = page.body.decode(errors="replace")
    external = [u for u in ("cdn.", "unpkg", "jsdelivr", "https://") if u in text]
    own = "/static/drf_spectacular_sidecar/" in text or "/static/" in text
    return held_if(
        page.status == 200 and not external and own,
        f"{page.status}; external: {external or 'none'}",
    )


# === 2. anonymous disk filling =================================================================

FLOOD = 300 * MIB


def announced(method: str, path: str, size: int, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {size}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def refused_early(answer: str, sent: int, statuses: tuple[str, ...]) -> Outcome:
    """Answered before the body was sent. ``sent`` counts what the client handed to its socket:
    the loopback's socket buffers take a few MiB before the server reads any of it, so "early"
    is within 8 MiB (of 300); the server's own disk and memory are measured at the end."""
    ok = sent <= 8 * MIB and (any(f" {s} " in answer + " " for s in statuses) or "closed" in answer)
    return held_if(ok, f"{answer!r} after {sent / MIB:.1f} MiB of {FLOOD // MIB}")


def flood_sampler(world: World) -> upload_flood.Sampler:
    sampler = world.notes.get("sampler")
    if sampler is None:
        pid = world.env.processes["portal"].pid
        world.notes["rss_before"] = benchlib.proc_status_kib("VmRSS", pid)
        sampler = world.notes["sampler"] = upload_flood.Sampler(
            pid, world.notes["tmpdir"]
        ).__enter__()
    return sampler


@attack(2, "anonymous POST /login/ announcing 300 MB: refused before the body is read")
def flood_login(world: World) -> Outcome:
    flood_sampler(world)
    answer, sent, _ = upload_flood.flood(world.port, announced("POST", "/login/", FLOOD), FLOOD)
    return refused_early(answer, sent, ("413",))


@attack(2, "anonymous chunked POST of 300 MB (no Content-Length): cut off by counting")
def flood_chunked(world: World) -> Outcome:
    head = (
        b"POST /api/v1/projects/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    return refused_early(
        *upload_flood.flood(world.port, head, FLOOD, chunked=True)[:2],
        ("413", "401", "403", "400", "411"),
    )


@attack(2, "unsigned 300 MB PUT to an update route: refused before spooling")
def flood_unsigned_update(world: World) -> Outcome:
    path = f"/api/v1/agent/jobs/{uuid.uuid4()}/rounds/0/update/"
    answer, sent, _ = upload_flood.flood(world.port, announced("PUT", path, FLOOD), FLOOD)
    return refused_early(answer, sent, ("401", "403"))


def signed_update_flood(world: World, key: signing.PrivateKey, fingerprint: str) -> tuple[str, int]:
    """300 MB of update to a job that does not exist, signed (over a made-up digest) with
    ``key`` as the certificate ``fingerprint``."""
    path = f"/api/v1/agent/jobs/{uuid.uuid4()}/rounds/0/update/"
    digest = "0" * 64
    headers = signing.sign_request(
        key=key,
        cert_pem_or_fingerprint=fingerprint,
        method="PUT",
        path=path,
        body=b"",
        body_digest=digest,
    )
    headers["X-Content-SHA256"] = digest
    answer, sent, _ = upload_flood.flood(world.port, announced("PUT", path, FLOOD, headers), FLOOD)
    return answer, sent


@attack(2, "300 MB PUT signed with a key the portal never certified: refused before spooling")
def flood_unknown_signer(world: World) -> Outcome:
    answer, sent = signed_update_flood(world, signing.generate_key(), "ab" * 32)
    return refused_early(answer, sent, ("401", "403"))


@attack(2, "an enrolled site's 300 MB PUT for a job it is not in: refused before reading")
def flood_site_wrong_job(world: World) -> Outcome:
    answer, sent = signed_update_flood(world, world.evil.key, world.evil.identity.fingerprint)
    return refused_early(answer, sent, ("404", "403"))


@attack(2, "anonymous 300 MB multipart to the job submission route: refused before reading")
def flood_submission(world: World) -> Outcome:
    head = announced(
        "POST",
        "/api/v1/projects/poc/jobs/",
        FLOOD,
        {"Content-Type": "multipart/form-data; boundary=x"},
    )
    answer, sent, _ = upload_flood.flood(world.port, head, FLOOD)
    return refused_early(answer, sent, ("401", "403", "413"))


@attack(2, "a signed-in person's 50 MB JSON body: over the route's 1 MiB bound, refused")
def flood_person_json(world: World) -> Outcome:
    head = announced(
        "POST",
        "/api/v1/projects/",
        50 * MIB,
        {
            "Authorization": f"Bearer {world.env.credentials['api_token']}",
            "Content-Type": "application/json",
        },
    )
    answer, sent, _ = upload_flood.flood(world.port, head, 50 * MIB)
    return refused_early(answer, sent, ("413",))


@attack(2, "anonymous 20 MB to the enrol endpoint: refused")
def flood_enrol(world: World) -> Outcome:
    head = announced("POST", "/api/v1/enrol/", 20 * MIB, {"Content-Type": "application/json"})
    answer, sent, _ = upload_flood.flood(world.port, head, 20 * MIB)
    return refused_early(answer, sent, ("413",))


@attack(2, "after 1.3 GB of floods the portal's memory and temporary disk did not grow")
def flood_cost(world: World) -> Outcome:
    sampler = flood_sampler(world)
    sampler.__exit__(None, None, None)
    pid = world.env.processes["portal"].pid
    before = world.notes["rss_before"] / 1024
    after = benchlib.proc_status_kib("VmRSS", pid) / 1024
    peak = sampler.peak_rss / 1024
    tmp_now = upload_flood.tmpdir_bytes(pid, world.notes["tmpdir"]) / MIB
    ok = peak - before < 64 and sampler.peak_tmp < 4 * MIB and tmp_now < 1
    return held_if(
        ok,
        f"RSS {before:.0f} MiB before, {peak:.0f} peak, {after:.0f} after; "
        f"TMPDIR peak {sampler.peak_tmp / MIB:.1f} MiB, now {tmp_now:.1f}",
    )


# === 1. a site wedges a job: job A, where evil sends one bad update a round =====================

NAN_METRIC = (
    '{"params_type": "FULL", "metrics": {"score": NaN}, "meta": {"NUM_STEPS_CURRENT_ROUND": 1}}'
)

# Round by round, what evil sends: (what it tries, tensors from the round's model, metadata).
HOSTILE_ROUNDS: list[
    tuple[str, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], str]
] = [
    ("weight 1e308 with a finite metric", lambda p: p, fields_json(1e308, {"score": 0.5})),
    ("a NaN metric", lambda p: p, NAN_METRIC),
    (
        "a metric of 1e308 (finite, but the sum of two overflows)",
        lambda p: p,
        fields_json(1, {"score": 1e308}),
    ),
    (
        "a NaN in a tensor",
        lambda p: {k: torch.full_like(v, float("nan")) for k, v in p.items()},
        fields_json(1, {"score": 0.5}),
    ),
    ("a negative weight and a nested metric", lambda p: p, fields_json(-1, {"score": {"deep": 1}})),
]


def play_job_a(world: World) -> dict[str, Any]:
    """Submit job A (site-1, site-2, rel and evil; 3 needed) and play evil's rounds."""
    if "job_a" in world.notes:
        played: dict[str, Any] = world.notes["job_a"]
        return played
    world.notes["job_a"] = {"failed": "job A did not run (see the first of its attacks)"}
    start_relative_agent(world)
    uid = world.submit(
        "attacks-a",
        ["site-1", "site-2", "rel", "evil"],
        min_clients=3,
        num_rounds=len(HOSTILE_ROUNDS),
        timeout=120,
    )
    sent: dict[int, str] = {}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = world.evil.job(uid)
        if job is None or job["state"] in FINISHED:
            break
        if job["decision"] == "pending":
            world.decide(uid, "evil")
        task = job.get("current_task")
        if task and task["state"] in OPEN_TASK_STATES and task["round"] not in sent:
            number = int(task["round"])
            model = world.work / f"evil-model-{number}.safetensors"
            world.evil.client.download(task["model_url"], model)
            what, tensors, header = HOSTILE_ROUNDS[number]
            path = update_file(
                world.work / f"evil-update-{number}.safetensors",
                tensors(load_state_dict(model)),
                header,
            )
            try:
                world.evil.client.upload(task["update_url"], path)
                sent[number] = "taken for checking (202)"
            except PortalError as exc:
                sent[number] = f"refused at once: {exc.status} {exc.message}"
        time.sleep(0.2)
    result = {
        "uid": uid,
        "sent": sent,
        "job": world.wait_job(uid, FINISHED, 120),
        "sites": world.job_sites(uid),
        "rounds": world.admin.get(f"/api/v1/jobs/{uid}/rounds/").json(),
    }
    world.notes["job_a"] = result
    return result


def job_a(world: World) -> dict[str, Any]:
    result = play_job_a(world)
    if "failed" in result:
        raise RuntimeError(result["failed"])
    return result


def evil_task(world: World, number: int) -> dict[str, Any]:
    result = job_a(world)
    tasks: dict[int, dict[str, Any]] = {t["round"]: t for t in result["sites"]["evil"]["tasks"]}
    return tasks.get(number, {"state": "no task", "reason": ""})


def round_row(world: World, number: int) -> dict[str, Any]:
    rounds = job_a(world)["rounds"]
    rows = rounds["results"] if isinstance(rounds, dict) else rounds
    return next((r for r in rows if r["number"] == number), {})


def rejected_and_round_closed(world: World, number: int) -> Outcome:
    task, row = evil_task(world, number), round_row(world, number)
    ok = task["state"] == "rejected" and row.get("state") == "closed"
    return held_if(
        ok, f"evil's task {task['state']} ({task.get('reason', '')[:70]}); round {row.get('state')}"
    )


@attack(1, "round 1: an update with weight 1e308 is rejected; the round still closes")
def wedge_weight(world: World) -> Outcome:
    return rejected_and_round_closed(world, 0)


@attack(1, "round 2: a NaN metric in an update is rejected; the round still closes")
def wedge_nan_metric(world: World) -> Outcome:
    return rejected_and_round_closed(world, 1)


@attack(1, "round 3: a metric of 1e308 cannot make the round's metric infinite")
def wedge_huge_metric(world: World) -> Outcome:
    task, row = evil_task(world, 2), round_row(world, 2)
    metrics = row.get("metrics") or {}
    finite = all(isinstance(v, (int, float)) and abs(v) < float("inf") for v in metrics.values())
    ok = row.get("state") == "closed" and finite
    shown = {k: f"{float(v):.3g}" for k, v in metrics.items()}
    return held_if(ok, f"evil's task {task['state']}; round {row.get('state')}, metrics {shown}")


@attack(1, "round 4: a NaN tensor is rejected; the round still closes")
def wedge_nan_tensor(world: World) -> Outcome:
    return rejected_and_round_closed(world, 3)


@attack(1, "round 5: a negative weight and a nested metric are rejected")
def wedge_negative(world: World) -> Outcome:
    return rejected_and_round_closed(world, 4)


@attack(1, "the job completes with every round, whatever evil sent")
def wedge_job_completes(world: World) -> Outcome:
    result = job_a(world)
    job = result["job"]
    ok = job["state"] == "completed" and job.get("completed_rounds") == len(HOSTILE_ROUNDS)
    return held_if(
        ok,
        f"job {job['state']}, {job.get('completed_rounds')} rounds; "
        f"{job.get('failure_reason') or ''}",
    )


# === 5. reports over the socket's cap ===========================================================


def db_rows(world: World, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(world.notes["database_url"]) as conn:
        return list(conn.execute(sql, args).fetchall())


@attack(5, "a script's 3 MiB line is cut by the agent, with a marker, and stored")
def report_long_line(world: World) -> Outcome:
    uid = job_a(world)["uid"]
    rows = db_rows(
        world,
        "SELECT length(l.text), l.text LIKE '%%line cut: %%' FROM jobs_logline l JOIN jobs_job j "
        "ON l.job_id = j.id WHERE j.uid = %s AND length(l.text) > 1000",
        uuid.UUID(uid),
    )
    ok = len(rows) >= 3 and all(length <= 2000 and cut for length, cut in rows)
    return held_if(
        ok,
        f"{len(rows)} long lines stored (one per real site), "
        f"lengths {sorted({r[0] for r in rows})}",
    )


@attack(5, "1,500 lines in a round reach the portal split into reports; later points too")
def report_many_lines(world: World) -> Outcome:
    result = job_a(world)
    counts = {
        name: row.get("log_lines", 0) for name, row in result["sites"].items() if name != "evil"
    }
    points = world.admin.get(f"/api/v1/jobs/{result['uid']}/metrics/?limit=1000").json()
    rows = points["results"] if isinstance(points, dict) else points
    rounds_with_points = {
        p.get("step")
        for p in rows
        if p.get("key") == "score" and p.get("site") == "site-1" and p.get("source") == "log"
    }
    ok = all(c >= 1500 for c in counts.values()) and len(rounds_with_points) == len(HOSTILE_ROUNDS)
    return held_if(
        ok, f"lines kept {counts}; site-1's score points for steps {sorted(rounds_with_points)}"
    )


@attack(5, "a 700 KiB report is answered too_large, and the socket stays usable")
def report_too_large(world: World) -> Outcome:
    uid = job_a(world)["uid"]
    ws = world.evil.socket()
    try:
        ws.send(
            json.dumps(
                {"type": "report", "id": 1, "job": uid, "lines": [{"text": "y" * 1500}] * 470}
            )
        )
        ack = messages_until(ws, 10, lambda m: m.get("type") in ("ack", "error"))
        ws.send(json.dumps({"type": "heartbeat"}))
        still = close_code(ws, 2) is None
    finally:
        ws.close()
    code = ((ack or {}).get("error") or {}).get("code")
    return held_if(code == "too_large" and still, f"ack error {code}; open afterwards: {still}")


@attack(5, "a 2 MiB message (over the server's cap) closes only that socket")
def report_over_cap(world: World) -> Outcome:
    ws = world.evil.socket()
    ws.send("z" * (2 * MIB))
    code = close_code(ws, 10)
    again = world.evil.socket()  # the site is not shut out, and the portal carries on
    again.close()
    # 1009 when the close frame is read; 1006 when the server drops the connection while the
    # client is still writing the rest of its message (its close frame is then lost).
    return held_if(code in (1009, 1006), f"closed with {code}; a new socket opens at once")


# === 12. a new user's bugs (job A's rel site; then its agent stops) ==============================


@attack(12, "an agent started with a relative --dir (as enrol prints it) runs every round")
def relative_dir(world: World) -> Outcome:
    tasks = job_a(world)["sites"]["rel"]["tasks"]
    states = [t["state"] for t in tasks]
    return held_if(states == ["accepted"] * len(HOSTILE_ROUNDS), f"rel's tasks: {states}")


@attack(12, "a site whose agent stops shows offline at once, and stays offline")
def offline_after_disconnect(world: World) -> Outcome:
    uid = job_a(world)["uid"]
    agent = world.rel_agent
    assert agent is not None
    os.killpg(agent.pid, signal.SIGTERM)
    agent.wait(30)
    deadline, online = time.monotonic() + 10, True
    while time.monotonic() < deadline and online:
        online = bool(world.job_sites(uid)["rel"]["online"])
        time.sleep(0.3)
    time.sleep(3)
    later = bool(world.job_sites(uid)["rel"]["online"])
    return held_if(not online and not later, f"online after the stop: {online}; 3 s later: {later}")


# === job B: evil and site-1, kept running (evil never sends its update) ==========================


def start_job_b(world: World) -> dict[str, Any]:
    """Submit job B, with the admin's job page socket open, and have evil accept it."""
    if "job_b" in world.notes:
        started: dict[str, Any] = world.notes["job_b"]
        if "failed" in started:
            raise RuntimeError(started["failed"])
        return started
    world.notes["job_b"] = {"failed": "job B did not start (see the first of its attacks)"}
    uid = world.submit("attacks-b", ["site-1", "evil"], min_clients=2, num_rounds=1, timeout=3600)
    admin = world.browser_admin()
    ws = admin.socket(f"/ws/dashboard/jobs/{uid}/")
    messages_until(ws, 5, lambda m: m.get("kind") == "hello")
    world.decide(uid, "evil")
    pushed = messages_until(
        ws, 10, lambda m: m.get("kind") == "job.decision" and m.get("site") == "evil"
    )
    ws.close()
    started = {"uid": uid, "pushed": pushed}
    world.notes["job_b"] = started
    return started


@attack(12, "a site's decision reaches an open job page at once (pushed, not polled)")
def decision_pushed(world: World) -> Outcome:
    pushed = start_job_b(world)["pushed"]
    return held_if(
        pushed is not None, f"event: {json.dumps(pushed)[:120] if pushed else 'none in 10 s'}"
    )


@attack(1, "a metric point of 1e999 (JSON's way to say infinity) is a 400 naming it")
def metric_inf_http(world: World) -> Outcome:
    uid = start_job_b(world)["uid"]
    body = b'{"points": [{"key": "loss", "value": 1e999, "step": 1}]}'
    reply = world.evil.raw("POST", f"/api/v1/agent/jobs/{uid}/metrics/", body)
    return held_if(json_error(reply, 400, "points[0].value"), reply.short()[:120])


@attack(1, "a metric point with a step past int64 is a 400 naming it")
def metric_huge_step(world: World) -> Outcome:
    uid = start_job_b(world)["uid"]
    body = json.dumps({"points": [{"key": "loss", "value": 1.0, "step": 2**70}]}).encode()
    reply = world.evil.raw("POST", f"/api/v1/agent/jobs/{uid}/metrics/", body)
    return held_if(json_error(reply, 400, "points[0].step"), reply.short()[:120])


@attack(1, "a NaN metric over the socket is answered with an error, and nothing is stored")
def metric_nan_socket(world: World) -> Outcome:
    uid = start_job_b(world)["uid"]
    before = world.job_points(uid)
    ws = world.evil.socket()
    try:
        ws.send(
            # NaN as Python's json writes it: not JSON, but what a careless sender sends.
            f'{{"type": "report", "id": 7, "job": "{uid}", '
            '"points": [{"key": "loss", "value": NaN}]}'
        )
        ack = messages_until(ws, 10, lambda m: m.get("type") in ("ack", "error"))
    finally:
        ws.close()
    error = (ack or {}).get("error") or (ack if (ack or {}).get("type") == "error" else None)
    after = world.job_points(uid)
    return held_if(
        error is not None and after == before,
        f"answer {json.dumps(ack)[:110]}; points {before} -> {after}",
    )


@attack(1, "a round number of -1 or 2**40 in a metric point is a 400")
def metric_bad_round(world: World) -> Outcome:
    uid = start_job_b(world)["uid"]
    answers = []
    for number in (-1, 2**40):
        body = json.dumps({"points": [{"key": "loss", "value": 1.0, "round": number}]}).encode()
        answers.append(world.evil.raw("POST", f"/api/v1/agent/jobs/{uid}/metrics/", body))
    ok = all(json_error(a, 400, "points[0].round") for a in answers)
    return held_if(ok, " | ".join(a.short()[:60] for a in answers))


# === 7. the job page with 100,000 metric points =================================================

POINTS = 100_000


def fill_points(world: World) -> str:
    """100,000 points of evil's, without step or round, in job B: the first 10,000 through the
    API (the rate is reported), the rest written to the database directly (storing them one
    by one through the API takes minutes here; it is the page that is attacked)."""
    uid: str = start_job_b(world)["uid"]
    if not world.notes.get("filled"):
        started = time.monotonic()
        for start in range(0, 10_000, 1000):
            body = json.dumps(
                {
                    "points": [
                        {"key": f"series-{i % 4}", "value": float(i % 97), "id": f"p{i}"}
                        for i in range(start, start + 1000)
                    ]
                }
            ).encode()
            reply = world.evil.raw("POST", f"/api/v1/agent/jobs/{uid}/metrics/", body)
            if reply.status >= 400:
                raise RuntimeError(f"the points were refused: {reply.short()}")
        world.notes["ingest_rate"] = 10_000 / (time.monotonic() - started)
        with psycopg.connect(world.notes["database_url"]) as conn:
            found = conn.execute(
                "SELECT j.id, s.id FROM jobs_job j, sites_site s "
                "WHERE j.uid = %s AND s.name = 'evil'",
                (uuid.UUID(uid),),
            ).fetchone()
            if found is None:
                raise RuntimeError(f"job {uid} or site evil is not in the database")
            job_id, site_id = found
            with conn.cursor().copy(
                "COPY jobs_metricpoint "
                "(job_id, site_id, key, value, source, client_id, created_at) FROM STDIN"
            ) as copy:
                for i in range(10_000, POINTS):
                    copy.write_row(
                        (job_id, site_id, f"series-{i % 4}", float(i % 97), "log", f"p{i}", "now")
                    )
        world.notes["filled"] = True
    return uid


def timed(person: Http, path: str, times: int = 3) -> tuple[float, Reply]:
    replies = [person.get(path, timeout=120) for _ in range(times)]
    return benchlib.median([r.seconds for r in replies]), replies[-1]


@attack(7, "the job page with 100,000 points without step or round renders in under 0.5 s")
def job_page_fast(world: World) -> Outcome:
    uid = fill_points(world)
    seconds, reply = timed(world.browser_admin(), f"/jobs/{uid}/")
    return held_if(
        reply.status == 200 and seconds < 0.5,
        f"{reply.status} in {seconds:.3f} s (median of 3); the points arrived through the API at "
        f"{world.notes['ingest_rate']:.0f} a second",
    )


@attack(7, "the charts' data for 100,000 points is downsampled and fast")
def charts_bounded(world: World) -> Outcome:
    uid = fill_points(world)
    seconds, reply = timed(world.browser_admin(), f"/jobs/{uid}/metrics.json")
    data = reply.json()
    longest = max(
        (len(series) for chart in data["charts"].values() for series in chart["series"].values()),
        default=0,
    )
    ok = reply.status == 200 and seconds < 0.5 and 0 < longest <= data["max_points"]
    return held_if(
        ok, f"{seconds:.3f} s; longest series {longest} points (max {data['max_points']})"
    )


@attack(7, "the full series stays downloadable (CSV, every point)")
def csv_complete(world: World) -> Outcome:
    uid = fill_points(world)
    reply = world.browser_admin().get(f"/jobs/{uid}/metrics.csv", timeout=300)
    rows = reply.body.count(b"\n") - 1
    return held_if(reply.status == 200 and rows >= POINTS, f"{rows} rows in {reply.seconds:.2f} s")


@attack(7, "the metrics API pages: a limit of 10**6 is refused or capped")
def metrics_api_paged(world: World) -> Outcome:
    uid = fill_points(world)
    reply = world.admin.get(f"/api/v1/jobs/{uid}/metrics/?limit=1000000")
    if reply.status == 400:
        return Outcome(reply.is_json_error(), reply.short()[:100])
    got = len(reply.json()["results"])
    return held_if(
        reply.status == 200 and got <= 1000, f"{got} points in one page, {reply.seconds:.2f} s"
    )


# === 6. log ingestion (job B) ===================================================================


def send_lines(
    ws: ClientConnection, uid: str, lines: list[dict[str, Any]], ident: int
) -> dict[str, Any]:
    ws.send(json.dumps({"type": "report", "id": ident, "job": uid, "lines": lines}))
    return messages_until(ws, 20, lambda m: m.get("type") == "ack" and m.get("id") == ident) or {}


@attack(6, "output lines as fast as one site can send them: slowed to the site's rate")
def log_rate(world: World) -> Outcome:
    uid = start_job_b(world)["uid"]
    ws = world.evil.socket()
    stored = slowed = offered = 0
    started = time.monotonic()
    try:
        ident = 100
        while time.monotonic() - started < 8:
            lines = [{"text": "f" * 400, "id": f"r{ident}-{i}"} for i in range(1000)]
            offered += 400 * 1000
            ident += 1
            ack = send_lines(ws, uid, lines, ident)
            if (ack.get("error") or {}).get("code") == "slow_down":
                slowed += 1
            else:
                stored += int(ack.get("stored") or 0)
    finally:
        ws.close()
    seconds = time.monotonic() - started
    allowed = 4 * MIB + 256 * 1024 * seconds + 400 * 1000  # burst + rate + one batch
    stored_bytes = stored * 400
    world.notes["rate_stored"] = stored
    return held_if(
        slowed > 0 and stored_bytes <= allowed,
        f"offered {offered / MIB / seconds:.1f} MiB/s for {seconds:.0f} s; "
        f"took {stored_bytes / MIB:.1f} MiB "
        f"(bound {allowed / MIB:.1f}); {slowed} reports told to slow down",
    )


@attack(6, "past the quota, the oldest lines go and are counted; the newest are kept")
def log_quota(world: World) -> Outcome:
    uid = start_job_b(world)["uid"]
    time.sleep(20)  # the bucket refills after the flood above
    ws = world.evil.socket()
    try:
        for batch in range(5):
            ack = send_lines(
                ws,
                uid,
                [{"text": f"q{batch}-{i}", "id": f"q{batch}-{i}"} for i in range(1000)],
                900 + batch,
            )
            if ack.get("error"):
                return Outcome(False, f"refused: {ack['error']}")
    finally:
        ws.close()
    row = world.job_sites(uid)["evil"]
    newest = db_rows(
        world,
        "SELECT count(*) FROM jobs_logline l JOIN jobs_job j ON l.job_id = j.id "
        "WHERE j.uid = %s AND l.text LIKE 'q4-%%'",
        uuid.UUID(uid),
    )[0][0]
    ok = row["log_lines"] <= 2000 and row["log_lines_dropped"] >= 3000 and newest == 1000
    return held_if(
        ok,
        f"kept {row['log_lines']} (quota 2000), dropped {row['log_lines_dropped']}, "
        f"newest batch kept {newest}/1000",
    )


@attack(6, "lines for a job the site is not in are refused")
def log_other_job(world: World) -> Outcome:
    uid = start_job_c(world)
    ws = world.evil.socket()
    try:
        ack = send_lines(ws, uid, [{"text": "not my job"}], 1200)
    finally:
        ws.close()
    code = (ack.get("error") or {}).get("code")
    return held_if(code is not None and not ack.get("stored"), f"answer {json.dumps(ack)[:100]}")


@attack(6, "lines after the job ended (and its grace period) are refused, nothing stored")
def log_after_end(world: World) -> Outcome:
    uid = start_job_b(world)["uid"]
    world.admin.post(f"/api/v1/jobs/{uid}/abort/", {"reason": "the bench is done with it"})
    world.wait_job(uid, FINISHED, 30)
    time.sleep(4)  # FEDPORTAL_LOG_GRACE_SECONDS=3 here
    before = world.job_sites(uid)["evil"]["log_lines"]
    ws = world.evil.socket()
    try:
        ack = send_lines(ws, uid, [{"text": f"late {i}"} for i in range(100)], 1300)
    finally:
        ws.close()
    after = world.job_sites(uid)["evil"]["log_lines"]
    code = (ack.get("error") or {}).get("code")
    return held_if(
        code is not None and after == before, f"answer {code}; lines {before} -> {after}"
    )


# === job C: site-1 and site-2, one round; the job list ==========================================


def start_job_c(world: World) -> str:
    if "attacks-c" not in world.jobs:
        uid = world.submit(
            "attacks-c", ["site-1", "site-2"], min_clients=2, num_rounds=1, timeout=120
        )
        world.wait_job(uid, FINISHED, 120)
    return world.jobs["attacks-c"]


@attack(12, "the job list is paged and filtered by state, name and submitter (API)")
def job_list_filters(world: World) -> Outcome:
    start_job_c(world)
    base = "/api/v1/projects/poc/jobs/"
    every = world.admin.get(base).json()
    by_state = world.admin.get(base + "?state=completed").json()["results"]
    by_name = world.admin.get(base + "?name=ATTACKS-C").json()["results"]
    by_submitter = world.admin.get(base + "?submitter=member").json()["results"]
    second = world.admin.get(base + "?limit=1&offset=1").json()
    ok = (
        every["count"] >= 3
        and by_state
        and all(j["state"] == "completed" for j in by_state)
        and [j["name"] for j in by_name] == ["attacks-c"]
        and by_submitter == []
        and len(second["results"]) == 1
        and second["results"][0]["uid"] == every["results"][1]["uid"]
    )
    return held_if(
        ok,
        f"{every['count']} jobs; completed {len(by_state)}, name 'ATTACKS-C' {len(by_name)}, "
        "limit=1&offset=1 the second",
    )


@attack(12, "the project page filters and pages its job list too")
def job_page_filters(world: World) -> Outcome:
    start_job_c(world)
    page = world.browser_admin().get("/projects/poc/?name=attacks-c")
    text = page.body.decode(errors="replace")
    ok = page.status == 200 and "attacks-c" in text and "attacks-a" not in text
    return held_if(
        ok,
        f"{page.status}; attacks-c shown {'attacks-c' in text}, "
        f"attacks-a hidden {'attacks-a' not in text}",
    )


# === 3. access that outlives its grant ==========================================================


@attack(3, "a job page socket closes when its person signs out")
def socket_closes_on_sign_out(world: World) -> Outcome:
    uid = start_job_c(world)
    person = world.browser("member")
    ws = person.socket(f"/ws/dashboard/jobs/{uid}/")
    messages_until(ws, 5, lambda m: m.get("kind") == "hello")
    person.request("POST", "/logout/", b"", {"Content-Type": "application/x-www-form-urlencoded"})
    code = close_code(ws, 10)
    return held_if(code == 4401, f"closed with {code} within 10 s")


@attack(3, "a signed-out session cannot open a new socket")
def old_session_no_socket(world: World) -> Outcome:
    uid = start_job_c(world)
    person = world.browser("member")
    stolen = dict(person.cookies)
    person.request("POST", "/logout/", b"", {"Content-Type": "application/x-www-form-urlencoded"})
    thief = Http(world.port)
    thief.cookies = stolen
    try:
        ws = thief.socket(f"/ws/dashboard/jobs/{uid}/")
    except InvalidStatus as exc:
        return Outcome(True, f"handshake refused: {exc.response.status_code}")
    got = messages_until(ws, 5, lambda m: True)
    code = close_code(ws, 5)
    leaked = got is not None and got.get("kind") not in ("closed", "error")
    return held_if(not leaked and code is not None, f"first message {got}; closed with {code}")


@attack(3, "a job page socket closes when its person is removed from the project")
def socket_closes_on_removal(world: World) -> Outcome:
    uid = start_job_c(world)
    person = world.browser("leaver")
    ws = person.socket(f"/ws/dashboard/jobs/{uid}/")
    messages_until(ws, 5, lambda m: m.get("kind") == "hello")
    members = world.admin.get("/api/v1/projects/poc/memberships/?limit=500").json()["results"]
    pk = next(m["id"] for m in members if m["username"] == "leaver")
    removed = world.admin.request("DELETE", f"/api/v1/projects/poc/memberships/{pk}/")
    code = close_code(ws, 10)
    api = world.api("leaver").get(f"/api/v1/jobs/{uid}/")
    return held_if(
        removed.status == 204 and code == 4404 and api.status == 404,
        f"removal {removed.status}; socket closed with {code}; the API then says {api.status}",
    )


@attack(3, "a revoked API token is refused at once")
def revoked_token(world: World) -> Outcome:
    made = world.admin.post("/api/v1/api-tokens/", {"name": "to-revoke"}).json()
    holder = Http(world.port, token=made["key"])
    before = holder.get("/api/v1/projects/").status
    world.admin.post(f"/api/v1/api-tokens/{made['id']}/revoke/")
    after = holder.get("/api/v1/projects/").status
    return held_if(before == 200 and after == 401, f"before {before}, after revocation {after}")


def evil_site_pk(world: World) -> int:
    sites = world.admin.get("/api/v1/projects/poc/sites/?limit=500").json()["results"]
    return int(next(s["id"] for s in sites if s["name"] == "evil"))


@attack(3, "re-enrolment closes the socket of the superseded certificate, and its requests fail")
def superseded_certificate(world: World) -> Outcome:
    old = world.evil
    ws = old.socket()
    reply = world.admin.post(
        f"/api/v1/projects/poc/sites/{evil_site_pk(world)}/enrolment-token/", {}
    )
    token = reply.json()["enrolment"]["token"]
    cli.enrol(SiteDir(world.work / "evil-again"), portal=world.url, token=token, say=lambda _: None)
    code = close_code(ws, 10)
    try:
        old.jobs()
        http = "200"
    except PortalError as exc:
        http = str(exc.status)
    world.evil = HostileSite(world.url, world.work / "evil-again")
    return held_if(
        code == 4403 and http in ("401", "403"),
        f"old socket closed with {code}; old certificate's request: {http}",
    )


@attack(3, "revoking a site closes its socket at once and shows it offline")
def revoked_site(world: World) -> Outcome:
    ws = world.evil.socket()
    uid = job_a(world)["uid"]
    world.admin.post(
        f"/api/v1/projects/poc/sites/{evil_site_pk(world)}/revoke/", {"reason": "the bench"}
    )
    code = close_code(ws, 10)
    try:
        world.evil.jobs()
        http = "200"
    except PortalError as exc:
        http = str(exc.status)
    online = world.job_sites(uid)["evil"]["online"]
    return held_if(
        code == 4403 and http in ("401", "403") and not online,
        f"socket closed with {code}; request {http}; online {online}",
    )


# === 4. sign-in and token throttling ============================================================


def sign_in_until_refused(
    world: World, username: str, path: str, tries: int, person: Http
) -> tuple[int, int]:
    """(attempts made, the attempt number of the first 429; 0 if none)."""
    for attempt in range(1, tries + 1):
        reply = person.sign_in(username, f"wrong-{attempt}", path)
        if reply.status == 429:
            return attempt, attempt
    return tries, 0


@attack(4, "30 wrong passwords for one account on /login/: locked out after 5")
def lockout_login(world: World) -> Outcome:
    person = Http(world.port)
    _, first = sign_in_until_refused(world, "victim", "/login/", 30, person)
    world.notes["lockout_person"] = person
    return held_if(0 < first <= 6, f"refused (429) from attempt {first or 'never'}")


@attack(4, "the right password after the lockout is still refused")
def lockout_holds(world: World) -> Outcome:
    person = world.notes.get("lockout_person") or Http(world.port)
    reply = person.sign_in("victim", world.people["victim"]["password"])
    return held_if(
        reply.status == 429 and "sessionid" not in person.cookies,
        f"{reply.status}, Retry-After {reply.header('Retry-After')}",
    )


@attack(4, "30 wrong passwords on /admin/login/: locked out too")
def lockout_admin(world: World) -> Outcome:
    _, first = sign_in_until_refused(world, "victim2", "/admin/login/", 30, Http(world.port))
    return held_if(0 < first <= 6, f"refused (429) from attempt {first or 'never'}")


@attack(4, "one address trying 30 accounts: refused after 20 failures")
def lockout_address(world: World) -> Outcome:
    person = Http(world.port)
    for attempt in range(1, 31):
        if person.sign_in(f"sprayed-{attempt}", "password1", "/login/").status == 429:
            return held_if(attempt <= 21, f"refused (429) from attempt {attempt}")
    return Outcome(False, "30 accounts tried, none refused")


@attack(4, "a person from another address signs in while others are locked out")
def others_unaffected(world: World) -> Outcome:
    person = Http(world.port)
    reply = person.sign_in("bystander", world.people["bystander"]["password"])
    return held_if(
        "sessionid" in person.cookies, f"{reply.status}, signed in: {'sessionid' in person.cookies}"
    )


@attack(4, "guessing enrolment tokens: 200 tries, refused long before the end")
def enrol_token_guessing(world: World) -> Outcome:
    anon = Http(world.port)
    for attempt in range(1, 201):
        reply = anon.post("/api/v1/enrol/check/", {"token": secrets.token_urlsafe(24)})
        if reply.status == 429:
            return held_if(
                attempt <= 130,
                f"429 from attempt {attempt}, Retry-After {reply.header('Retry-After')}",
            )
    return Outcome(False, "200 guesses answered")


@attack(4, "guessing API tokens: 100 bad bearer tokens, refused early")
def api_token_guessing(world: World) -> Outcome:
    for attempt in range(1, 101):
        reply = Http(
            world.port,
            token=API_TOKEN_PREFIX + secrets.token_urlsafe(30),
            address=world.notes.setdefault("guesser", new_address()),
        ).get("/api/v1/projects/")
        if reply.status == 429:
            return held_if(attempt <= 60, f"429 from attempt {attempt}")
    return Outcome(False, "100 guesses answered")


# --- the run ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--database-url", default=DEFAULT_DATABASE)
    parser.add_argument("--only", type=int, action="append", help="run only this class (repeat)")
    args = parser.parse_args()
    benchlib.print_header(
        "attacks on a running deployment", __doc__.split("\n\n")[1].replace("\n", " ")
    )
    started = time.monotonic()
    with deployment(args.database_url) as world:
        print(
            f"deployment up in {time.monotonic() - started:.0f} s: {world.url} "
            f"(FEDPORTAL_DEV=0, PostgreSQL, Redis db {REDIS_DB})\n",
            flush=True,
        )
        for item in ATTACKS:
            if args.only and item.klass not in args.only:
                continue
            began = time.monotonic()
            try:
                item.outcome = item.run(world)
            except Exception as exc:  # the bench reports it and goes on
                traceback.print_exc(limit=3)
                item.outcome = Outcome(
                    False, f"the attack itself failed: {type(exc).__name__}: {exc}"
                )
            verdict = "HELD" if item.outcome.held else "GOT THROUGH"
            print(
                f"{verdict:>11}  {item.klass:>2}. {item.title} ({time.monotonic() - began:.1f} s)\n"
                f"{'':13}{item.outcome.seen}",
                flush=True,
            )
    ran = [a for a in ATTACKS if a.outcome is not None]
    print("\n| class | attacks | held | verdict |\n|---|---|---|---|")
    holding = 0
    for klass, title in CLASSES.items():
        mine = [a for a in ran if a.klass == klass]
        if not mine:
            continue
        held = sum(1 for a in mine if a.outcome and a.outcome.held)
        holding += held == len(mine)
        verdict = "holds" if held == len(mine) else "GOT THROUGH"
        print(f"| {klass}. {title} | {len(mine)} | {held} | {verdict} |")
    total_held = sum(1 for a in ran if a.outcome and a.outcome.held)
    classes = len({a.klass for a in ran})
    print(f"\n{total_held} of {len(ran)} attacks held, in {time.monotonic() - started:.0f} s")
    print(f"classes that hold: {holding} of {classes}")
    sys.exit(0 if total_held == len(ran) else 1)


if __name__ == "__main__":
    main()
