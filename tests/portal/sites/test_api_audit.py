"""Every change made through the API leaves an audit event naming who, what, which object and
from where; the audit endpoints show and filter them; a refused request leaves none."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from client_agent import signing
from jobs.models import Job, JobState, Round
from jobs.selectors import task_for_site
from jobs.services import rounds
from jobs.services.tasks import update_upload
from sites import services
from sites.models import AuditEvent, Role
from tests.portal import jobs_api_world as jw
from tests.portal.api_world import ADMIN, ANONYMOUS, LEAD, MEMBER, ORG_ADMIN_A, World

pytestmark = pytest.mark.django_db


@dataclass(frozen=True)
class Change:
    """One change through the API: ``request(world)`` returns (persona, method, path, body,
    extra headers); ``actions`` are the audit events it must add, and nothing else."""

    name: str
    request: Callable[[World], tuple[str, str, str, Any, dict[str, str]]]
    actions: tuple[str, ...]
    target_type: str


def p(world: World) -> str:
    return f"/api/v1/projects/{world.project.slug}"


def _create_project(w: World) -> tuple[str, str, str, Any, dict[str, str]]:
    w.users[LEAD].user_permissions.add(Permission.objects.get(codename="add_project"))
    return LEAD, "POST", "/api/v1/projects/", {"name": "Cardio Net"}, {}


def _accept_invitation(w: World) -> tuple[str, str, str, Any, dict[str, str]]:
    _, token = services.invitation_create(
        organization=w.org_b, role=Role.LEAD, invited_by=w.users[ADMIN], username="newcomer"
    )
    _, key = services.api_token_create(user=w.newcomer, name="newcomer's")
    auth = {"Authorization": f"Bearer {key}"}
    return ANONYMOUS, "POST", "/api/v1/invitations/accept/", {"token": token}, auth


def _enrol(w: World) -> tuple[str, str, str, Any, dict[str, str]]:
    site, token = services.site_approve(site=w.site_requested, approved_by=w.users[ADMIN])
    csr = signing.make_csr(signing.generate_key(), site.name, w.project.name)
    return ANONYMOUS, "POST", "/api/v1/enrol/", {"token": token, "csr_pem": csr}, {}


def simple(
    persona: str, method: str, path: str, body: Any = None
) -> Callable[[World], tuple[str, str, str, Any, dict[str, str]]]:
    def request(w: World) -> tuple[str, str, str, Any, dict[str, str]]:
        ids = w.ids()
        filled = {k: ids[v[1:-1]] if str(v).startswith("{") else v for k, v in (body or {}).items()}
        return persona, method, path.format(**ids), filled if body is not None else None, {}

    return request


CHANGES = [
    Change(
        "project created",
        _create_project,
        ("project.created", "organization.created", "membership.added"),
        "project",
    ),
    Change(
        "project updated",
        simple(ADMIN, "PATCH", "{p}/", {"description": "now with words"}),
        ("project.updated",),
        "project",
    ),
    Change(
        "organisation created",
        simple(ADMIN, "POST", "{p}/organizations/", {"name": "Org C"}),
        ("organization.created",),
        "organization",
    ),
    Change(
        "organisation renamed",
        simple(ADMIN, "PATCH", "{p}/organizations/{org_a}/", {"name": "Org A Renamed"}),
        ("organization.updated",),
        "organization",
    ),
    Change(
        "member added",
        simple(
            ORG_ADMIN_A,
            "POST",
            "{p}/memberships/",
            {"organization": "{org_a}", "username": "{colleague}", "role": "lead"},
        ),
        ("membership.added",),
        "membership",
    ),
    Change(
        "role changed",
        simple(ORG_ADMIN_A, "PATCH", "{p}/memberships/{membership}/", {"role": "lead"}),
        ("membership.role_changed",),
        "membership",
    ),
    Change(
        "member removed",
        simple(ORG_ADMIN_A, "DELETE", "{p}/memberships/{membership}/"),
        ("membership.removed",),
        "membership",
    ),
    Change(
        "invitation created",
        simple(
            ORG_ADMIN_A,
            "POST",
            "{p}/invitations/",
            {"organization": "{org_a}", "email": "x@example.org", "role": "member"},
        ),
        ("invitation.created",),
        "invitation",
    ),
    Change(
        "invitation revoked",
        simple(ORG_ADMIN_A, "POST", "{p}/invitations/{invitation}/revoke/"),
        ("invitation.revoked",),
        "invitation",
    ),
    Change(
        "invitation accepted",
        _accept_invitation,
        ("invitation.accepted", "membership.added"),
        "invitation",
    ),
    Change(
        "site requested",
        simple(
            ORG_ADMIN_A,
            "POST",
            "{p}/sites/",
            {"organization": "{org_a}", "name": "site-x", "contact_email": "a@b.org"},
        ),
        ("site.requested",),
        "site",
    ),
    Change(
        "site updated",
        simple(ORG_ADMIN_A, "PATCH", "{p}/sites/{site_a}/", {"auto_accept_jobs": True}),
        ("site.updated",),
        "site",
    ),
    Change(
        "site approved",
        simple(ADMIN, "POST", "{p}/sites/{site_r}/approve/"),
        ("site.approved",),
        "site",
    ),
    Change(
        "site denied",
        simple(ADMIN, "POST", "{p}/sites/{site_r}/deny/", {"reason": "unknown"}),
        ("site.denied",),
        "site",
    ),
    Change(
        "token reissued",
        simple(ADMIN, "POST", "{p}/sites/{site_a}/enrolment-token/"),
        ("enrolment_token.reissued",),
        "enrolmenttoken",
    ),
    Change("site enrolled", _enrol, ("certificate.issued", "site.enrolled"), "site"),
    Change(
        "site revoked",
        simple(ADMIN, "POST", "{p}/sites/{site_a}/revoke/", {"reason": "gone"}),
        ("certificate.revoked", "site.revoked"),
        "site",
    ),
    Change(
        "certificate revoked",
        simple(ADMIN, "POST", "{p}/certificates/{cert_a}/revoke/", {"reason": "key lost"}),
        ("certificate.revoked",),
        "certificate",
    ),
    Change(
        "API token created",
        simple(MEMBER, "POST", "/api/v1/api-tokens/", {"name": "ci"}),
        ("api_token.created",),
        "apitoken",
    ),
    Change(
        "API token revoked",
        simple(ADMIN, "POST", "/api/v1/api-tokens/{admin_token}/revoke/"),
        ("api_token.revoked",),
        "apitoken",
    ),
]


@pytest.mark.parametrize("change", CHANGES, ids=lambda c: c.name)
def test_every_change_through_the_api_is_audited(sites_world: World, change: Change) -> None:
    persona, method, path, body, headers = change.request(sites_world)
    last = AuditEvent.objects.order_by("-pk").values_list("pk", flat=True).first() or 0

    response = sites_world.call(persona, method, path, body, **headers)

    assert response.status_code < 300, response.content[:300]
    events = list(AuditEvent.objects.filter(pk__gt=last).order_by("pk"))
    assert sorted(e.action for e in events) == sorted(change.actions)
    main = next(e for e in events if e.action == change.actions[-1])
    assert main.source_address == "127.0.0.1"
    if persona == ANONYMOUS and not headers:  # the agent's enrolment: the site acted
        assert main.actor is None and main.actor_site is not None
    else:
        assert main.actor is not None and main.actor_repr == main.actor.username
    assert any(e.target_type == change.target_type for e in events)
    if main.project == sites_world.project:
        # The project admin finds it in the project's audit trail.
        listed = sites_world.call(
            ADMIN, "GET", f"{p(sites_world)}/audit-events/?action={main.action}"
        )
        assert main.pk in [e["id"] for e in listed.json()["results"]]


@pytest.mark.parametrize(
    ("persona", "method", "path", "body"),
    [
        (LEAD, "POST", "{p}/sites/{site_r}/approve/", None),
        (ADMIN, "POST", "{p}/sites/{site_a}/approve/", None),  # enrolled: invalid transition
        (ADMIN, "POST", "{p}/sites/{site_r}/deny/", {"reason": ""}),
        (ORG_ADMIN_A, "POST", "{p}/sites/", {"organization": "{org_a}", "name": "Bad Name"}),
        (MEMBER, "DELETE", "{p}/memberships/{membership}/", None),
    ],
)
def test_a_refused_change_leaves_no_event(
    sites_world: World, persona: str, method: str, path: str, body: Any
) -> None:
    ids = sites_world.ids()
    if body:
        body = {k: ids[v[1:-1]] if str(v).startswith("{") else v for k, v in body.items()}
    before = AuditEvent.objects.count()

    response = sites_world.call(persona, method, path.format(**ids), body)

    assert 400 <= response.status_code < 500
    assert AuditEvent.objects.count() == before


# --- reading the trail ---------------------------------------------------------------------


def _listed(world: World, persona: str, query: str = "", project: bool = True) -> list[dict]:
    base = f"{p(world)}/audit-events/" if project else "/api/v1/audit-events/"
    response = world.call(persona, "GET", base + query)
    assert response.status_code == 200, response.json()
    results: list[dict[str, Any]] = response.json()["results"]
    return results


def test_the_project_admin_sees_the_project_trail_and_others_only_their_own(
    sites_world: World,
) -> None:
    sites_world.call(
        ORG_ADMIN_A,
        "PATCH",
        f"{p(sites_world)}/sites/{sites_world.site_a.site.pk}/",
        {"resources": {}},
    )

    everything = _listed(sites_world, ADMIN)
    mine = _listed(sites_world, ORG_ADMIN_A)

    assert {e["project"] for e in everything} == {sites_world.project.slug}
    assert {"site.updated", "site.enrolled", "project.created"} <= {e["action"] for e in everything}
    assert mine and {e["actor"] for e in mine} == {ORG_ADMIN_A}
    assert _listed(sites_world, LEAD) == []


def test_filters_by_actor_action_target_and_time(sites_world: World) -> None:
    site = sites_world.site_a.site
    path = f"{p(sites_world)}/sites/{site.pk}/"
    sites_world.call(ORG_ADMIN_A, "PATCH", path, {"contact_email": "n@a.example"})

    by_actor = _listed(sites_world, ADMIN, f"?actor={ORG_ADMIN_A}")
    assert [(e["actor"], e["action"]) for e in by_actor] == [(ORG_ADMIN_A, "site.updated")]
    assert {e["actor"] for e in _listed(sites_world, ADMIN, "?actor=admin")} == {"admin"}
    by_site = _listed(sites_world, ADMIN, "?actor_site=site-a")
    assert {e["action"] for e in by_site} == {"certificate.issued", "site.enrolled"}
    assert [e["action"] for e in _listed(sites_world, ADMIN, "?action=site.updated")] == [
        "site.updated"
    ]
    prefixed = {e["action"] for e in _listed(sites_world, ADMIN, "?action=site.")}
    assert prefixed == {"site.requested", "site.approved", "site.enrolled", "site.updated"}
    target = _listed(sites_world, ADMIN, f"?target_type=site&target_id={site.pk}")
    assert {e["target_id"] for e in target} == {str(site.pk)}
    assert "site.updated" in {e["action"] for e in target}

    future = (timezone.now() + dt.timedelta(hours=1)).isoformat()
    past = (timezone.now() - dt.timedelta(hours=1)).isoformat()
    assert _listed(sites_world, ADMIN, "?since=" + future.replace("+", "%2B")) == []
    assert _listed(sites_world, ADMIN, "?until=" + past.replace("+", "%2B")) == []
    assert len(_listed(sites_world, ADMIN, "?since=" + past.replace("+", "%2B"))) == len(
        _listed(sites_world, ADMIN)
    )


def test_since_after_until_is_a_bad_request(sites_world: World) -> None:
    response = sites_world.call(
        ADMIN,
        "GET",
        f"{p(sites_world)}/audit-events/?since=2030-01-02T00:00Z&until=2030-01-01T00:00Z",
    )

    assert response.status_code == 400
    assert (response.json()["code"], response.json()["field"]) == ("invalid", "until")


def test_own_api_token_events_are_in_the_global_trail(sites_world: World) -> None:
    sites_world.call(MEMBER, "POST", "/api/v1/api-tokens/", {"name": "laptop"})

    mine = _listed(sites_world, MEMBER, "?action=api_token.", project=False)

    assert {e["action"] for e in mine} == {"api_token.created"}
    assert {e["actor"] for e in mine} == {MEMBER}
    theirs = _listed(sites_world, ADMIN, "?action=api_token.", project=False)
    assert theirs and {e["actor"] for e in theirs} == {"admin"}  # not the member's


# --- job actions -----------------------------------------------------------------------------

# Committed for real: a job moves on in on-commit hooks, with Celery tasks run inline.
JOBS = pytest.mark.django_db(transaction=True)


def _job_events(world: jw.World) -> list[tuple[str, str, str | None, dict[str, Any]]]:
    """The project's job events as its admin reads them: (action, actor, actor site, details),
    oldest first."""
    listed = world.call(jw.ADMIN, "GET", f"{world.p}/audit-events/?action=job.")
    assert listed.status_code == 200, listed.json()
    events = listed.json()["results"]
    assert world.job is not None
    assert {(e["target_type"], e["target_id"]) for e in events} == {("job", str(world.job.pk))}
    return [(e["action"], e["actor"], e["actor_site"], e["details"]) for e in reversed(events)]


@JOBS
def test_a_job_submitted_decided_for_and_aborted_is_audited_with_each_actor(
    tmp_path: Path, media: Path, eager_celery: None
) -> None:
    world = jw.build_world(tmp_path, start=False, submit=False)  # only site-1 auto-accepts
    sites = ["site-1", "site-2", "site-3"]
    submitted = world.call(
        jw.LEAD, "POST", f"{world.p}/jobs/", multipart=jw.make_bundle(tmp_path).form(sites=sites)
    )
    assert submitted.status_code == 201, submitted.json()
    world.job = Job.objects.get(uid=submitted.json()["uid"])

    declined = world.call(
        jw.ORG_ADMIN, "POST", f"{world.j}/sites/site-2/decision/", {"accept": False}
    )
    by_agent = world.call(jw.SITE_IN, "POST", f"{world.a}/decision/", {"accept": True})
    aborted = world.call(jw.ADMIN, "POST", f"{world.j}/abort/")

    assert (declined.status_code, by_agent.status_code, aborted.status_code) == (200, 200, 200)
    lead, org_admin, admin = (world.users[p].username for p in (jw.LEAD, jw.ORG_ADMIN, jw.ADMIN))
    assert aborted.json()["failure_reason"] == f"aborted by {admin}"
    assert _job_events(world) == [
        ("job.submitted", lead, None, {"sites": sites}),
        # site-1 accepts jobs automatically: its policy, applied by the portal.
        (
            "job.site_decided",
            "",
            None,
            {"site": "site-1", "decision": "accepted", "automatic": True},
        ),
        ("job.site_decided", org_admin, None, {"site": "site-2", "decision": "declined"}),
        ("job.site_decided", "", "site-1", {"site": "site-1", "decision": "accepted"}),
        ("job.aborted", admin, None, {"reason": f"aborted by {admin}"}),
    ]
    person_events = AuditEvent.objects.filter(action__startswith="job.", actor__isnull=False)
    assert {e.source_address for e in person_events} == {"127.0.0.1"}
    # The dashboard's audit log lists them too.
    browser = Client()
    browser.force_login(world.users[jw.ADMIN])
    page = browser.get(reverse("dashboard:audit"), {"action": "job."}).content.decode()
    assert page.count("<code>job.site_decided</code>") == 3
    assert "<code>job.submitted</code>" in page and "<code>job.aborted</code>" in page


@JOBS
def test_a_job_completed_by_the_round_controller_is_audited_with_no_actor(
    tmp_path: Path, media: Path, eager_celery: None
) -> None:
    world = jw.build_world(tmp_path, num_rounds=1)
    job = world.job
    assert job is not None
    for number, enrolled in enumerate(world.sites, start=1):
        update = jw.update_bytes(
            {"w": torch.tensor([1.0, 2.0]) * number, "n": torch.tensor(5)}, tmp_path
        )
        task = task_for_site(job=job, site=enrolled.site, round_number=0)
        update_upload(
            task=task,
            stream=io.BytesIO(update),
            sha256=hashlib.sha256(update).hexdigest(),
            length=len(update),
        )
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, job.failure_reason

    assert _job_events(world)[-1] == ("job.completed", "", None, {"rounds": 1})


@JOBS
def test_a_job_failed_by_the_round_controller_is_audited_with_no_actor_and_the_reason(
    tmp_path: Path, media: Path, eager_celery: None
) -> None:
    world = jw.build_world(tmp_path)
    job = world.job
    assert job is not None
    Round.objects.filter(job=job).update(deadline=timezone.now())  # no site answered

    assert rounds.job_advance(job_id=job.pk) == rounds.Advance(rounds.Step.FAILED, "failed: quorum")

    job.refresh_from_db()
    action, actor, actor_site, details = _job_events(world)[-1]
    assert (action, actor, actor_site) == ("job.failed", "", None)
    assert details == {"rounds": 0, "reason": job.failure_reason}
    assert "min_clients is 3" in details["reason"]
