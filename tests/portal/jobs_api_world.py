"""The world the jobs API tests run in, and the personas that call it.

Project P has a host organisation (its project admin) and organisation A, whose org admin,
two leads and a member are people of P; sites 1, 2 and 3 of organisation A take part in the
job, site 4 (also A's, enrolled) does not. The outsider is the project admin of project Q,
whose site Q is enrolled there. The lead submitted the job. People call with their own API
token; a site agent signs each request with its site's key; anonymous sends nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from django.conf import settings
from django.contrib.auth.models import User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test.client import BOUNDARY, MULTIPART_CONTENT, encode_multipart
from django.utils import timezone
from rest_framework.test import APIClient

from client_agent.fl_model import FLModel
from client_agent.wire import load_state_dict, save_state_dict, write_model_file
from jobs.api.authentication import HEADER_CONTENT_SHA256
from jobs.bundle import build_spec
from jobs.models import Job
from jobs.services.submission import job_submit
from jobs.workflows import FedAvg
from sites import services
from sites.models import Project, Role
from tests.portal.factories import (
    EnrolledSite,
    MembershipFactory,
    OrganizationFactory,
    ProjectFactory,
    UserFactory,
    enrolled_site,
)

ADMIN = "project_admin"
LEAD = "lead"  # submitted the job
OTHER_LEAD = "other_lead"
MEMBER = "member"
ORG_ADMIN = "org_admin"  # of organisation A, whose sites take part
OUTSIDER = "outsider"
ANONYMOUS = "anonymous"
SITE_IN = "site_in_job"
SITE_OUT = "site_not_in_job"
SITE_ELSEWHERE = "site_of_other_project"

PEOPLE = (ADMIN, LEAD, OTHER_LEAD, MEMBER, ORG_ADMIN, OUTSIDER)
AGENTS = (SITE_IN, SITE_OUT, SITE_ELSEWHERE)
PERSONAS = (*PEOPLE, ANONYMOUS, *AGENTS)

INITIAL = {"w": torch.tensor([0.0, 1.0]), "n": torch.tensor(4)}
TRAIN_SCRIPT = "client.py"


@dataclass
class Bundle:
    """A job bundle as ``recipe.export()`` writes it, in memory: spec, model, zipped app."""

    spec: dict[str, Any]
    model: bytes
    app: bytes

    def form(self, **overrides: Any) -> dict[str, Any]:
        """The multipart fields of a submission; ``overrides`` replace or add fields (None
        drops one)."""
        fields: dict[str, Any] = {
            "spec": SimpleUploadedFile("job.json", json.dumps(self.spec).encode()),
            "initial_model": SimpleUploadedFile("initial_model.safetensors", self.model),
            "app": SimpleUploadedFile("app.zip", self.app),
        }
        fields.update(overrides)
        return {k: v for k, v in fields.items() if v is not None}


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def model_bytes(params: dict[str, torch.Tensor], tmp: Path) -> bytes:
    path = tmp / "model.safetensors"
    save_state_dict(path, params)
    data = path.read_bytes()
    path.unlink()
    return data


def make_bundle(tmp: Path, *, min_clients: int = 3, num_rounds: int = 2, **spec: Any) -> Bundle:
    workflow = FedAvg(min_clients=min_clients, num_rounds=num_rounds)
    full = build_spec(
        name="api-job", workflow=workflow, train_script=TRAIN_SCRIPT, train_args="--epochs 1"
    )
    full.update(spec)
    app = zip_bytes({TRAIN_SCRIPT: b"print('a client script')\n", "lib/util.py": b"X = 1\n"})
    return Bundle(spec=full, model=model_bytes(INITIAL, tmp), app=app)


def update_bytes(
    params: dict[str, torch.Tensor], tmp: Path, *, weight: float = 1.0, metrics: Any = None
) -> bytes:
    """A site's update file, as the agent sends it (client_agent.wire)."""
    path = tmp / "update.safetensors"
    write_model_file(
        path,
        FLModel(params=params, metrics=metrics or {}, meta={"NUM_STEPS_CURRENT_ROUND": weight}),
    )
    data = path.read_bytes()
    path.unlink()
    return data


def tensors_of(data: bytes, tmp: Path) -> dict[str, torch.Tensor]:
    path = tmp / "downloaded.safetensors"
    path.write_bytes(data)
    try:
        return load_state_dict(path)
    finally:
        path.unlink()


def body_of(response: Any) -> bytes:
    if getattr(response, "streaming", False):
        return b"".join(response.streaming_content)
    return bytes(response.content)


def stored_files() -> list[str]:
    """Every file under the media root (the tests point it at a fresh folder)."""
    root = Path(settings.MEDIA_ROOT)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@dataclass
class World:
    project: Project
    other: Project
    users: dict[str, User]
    keys: dict[str, str]
    agents: dict[str, EnrolledSite]
    sites: list[EnrolledSite]  # in the job: site-1, site-2, site-3
    tmp: Path
    job: Job | None = None
    clients: dict[str, APIClient] = field(default_factory=dict)

    @property
    def p(self) -> str:
        return f"/api/v1/projects/{self.project.slug}"

    @property
    def j(self) -> str:
        assert self.job is not None
        return f"/api/v1/jobs/{self.job.uid}"

    @property
    def a(self) -> str:
        assert self.job is not None
        return f"/api/v1/agent/jobs/{self.job.uid}"

    def call(
        self,
        persona: str,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        multipart: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        signed_body: bytes | None = None,
    ) -> Any:
        """Send a request as ``persona``. ``body`` is sent as JSON, ``raw`` as
        application/octet-stream (with its X-Content-SHA256 unless ``headers`` give one),
        ``multipart`` as a form. An agent signs the body sent, or ``signed_body``."""
        headers = dict(headers or {})
        client = APIClient()
        if multipart is not None:
            if persona in self.keys:
                headers["Authorization"] = f"Bearer {self.keys[persona]}"
            return client.generic(method, path, headers=headers, **_multipart(multipart))
        if raw is not None:
            data, content_type = raw, "application/octet-stream"
            headers.setdefault(HEADER_CONTENT_SHA256, hashlib.sha256(raw).hexdigest())
        else:
            data = b"" if body is None else json.dumps(body).encode()
            content_type = "application/json"
        if persona in self.keys:
            headers["Authorization"] = f"Bearer {self.keys[persona]}"
        elif persona in self.agents:
            signed = data if signed_body is None else signed_body
            headers.update(self.agents[persona].headers(method, path, signed))
        # drf-stubs type generic()'s data as str; DRF hands bytes to Django unchanged.
        return client.generic(
            method,
            path,
            data=data,  # type: ignore[arg-type]
            content_type=content_type,
            headers=headers,
        )

    def agent(self, who: str | EnrolledSite, method: str, path: str, *args: Any, **kw: Any) -> Any:
        """``call`` as a site: a persona name, or one of ``self.sites``."""
        if isinstance(who, EnrolledSite):
            name = f"site:{who.site.name}"
            self.agents.setdefault(name, who)
            return self.call(name, method, path, *args, **kw)
        return self.call(who, method, path, *args, **kw)


def _multipart(fields: dict[str, Any]) -> dict[str, Any]:
    for value in fields.values():
        if hasattr(value, "seek"):
            value.seek(0)
    return {"data": encode_multipart(BOUNDARY, fields), "content_type": MULTIPART_CONTENT}


def build_world(tmp: Path, *, start: bool = True, submit: bool = True, **bundle: Any) -> World:
    """Project P with its personas and sites; with ``submit``, the lead's job on sites 1-3.

    ``start``: every site of the job accepts jobs automatically and is online, so the job is
    running with round 0 open. Otherwise only site 1 accepts automatically and no site is
    online, so the job waits (sites 2 and 3 still undecided).
    """
    admin = UserFactory.create(username="admin")
    project = ProjectFactory.create(name="Hospital Net", created_by=admin)
    org_a = OrganizationFactory.create(project=project, name="Org A")
    users: dict[str, User] = {ADMIN: admin}
    for persona, role in [
        (LEAD, Role.LEAD),
        (OTHER_LEAD, Role.LEAD),
        (MEMBER, Role.MEMBER),
        (ORG_ADMIN, Role.ORG_ADMIN),
    ]:
        users[persona] = UserFactory.create(username=persona)
        MembershipFactory.create(user=users[persona], organization=org_a, role=role)
    users[OUTSIDER] = UserFactory.create(username=OUTSIDER)
    other = ProjectFactory.create(name="Other Net", created_by=users[OUTSIDER])
    elsewhere = enrolled_site(organization=OrganizationFactory.create(project=other), name="site-q")

    sites = [enrolled_site(organization=org_a, name=f"site-{i}") for i in (1, 2, 3)]
    spare = enrolled_site(organization=org_a, name="site-4")
    for number, enrolled in enumerate(sites, start=1):
        enrolled.site.auto_accept_jobs = start or number == 1
        enrolled.site.last_heartbeat = timezone.now() if start else None
        enrolled.site.save()
    keys = {
        persona: services.api_token_create(user=user, name="tests")[1]
        for persona, user in users.items()
    }
    world = World(
        project=project,
        other=other,
        users=users,
        keys=keys,
        agents={SITE_IN: sites[0], SITE_OUT: spare, SITE_ELSEWHERE: elsewhere},
        sites=sites,
        tmp=tmp,
    )
    if submit:
        made = make_bundle(tmp, **bundle)
        world.job = job_submit(
            project=project,
            submitted_by=users[LEAD],
            spec=made.spec,
            initial_model=io.BytesIO(made.model),
            app_archive=io.BytesIO(made.app),
            sites=[s.site.name for s in sites],
        )
        world.job.refresh_from_db()
    return world
