"""The enrolment path over HTTP, as the org admin, the project admin and the site's agent see
it; every refused enrolment with its status and code, changing nothing; and revocation taking
effect on the agent's very next signed request."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
from django.utils import timezone
from pytest_django.fixtures import Settings

from client_agent import signing
from sites import ca, signed_cache
from sites.models import (
    AuditEvent,
    Certificate,
    EnrolmentToken,
    Membership,
    Organization,
    Project,
    Site,
    SiteState,
)
from tests.portal.api_world import ADMIN, ANONYMOUS, ORG_ADMIN_A, World
from tests.portal.factories import EnrolledSite

pytestmark = pytest.mark.django_db

ENROL = "/api/v1/enrol/"
WHOAMI = "/api/v1/agent/whoami/"


def snapshot() -> dict[str, Any]:
    """Everything an enrolment could change."""
    counts = {
        model.__name__: model.objects.count()
        for model in (
            Project,
            Organization,
            Membership,
            Site,
            EnrolmentToken,
            Certificate,
            AuditEvent,
        )
    }
    return counts | {
        "sites": list(Site.objects.order_by("pk").values_list("pk", "state", "enrolled_at")),
        "tokens": list(
            EnrolmentToken.objects.order_by("pk").values_list("pk", "used_at", "revoked_at")
        ),
        "certificates": list(Certificate.objects.order_by("pk").values_list("pk", "revoked_at")),
    }


def request_and_approve(world: World, name: str = "site-new") -> tuple[Site, dict[str, Any]]:
    """Org admin A asks for a site, the project admin approves it: the approval's body."""
    p = f"/api/v1/projects/{world.project.slug}"
    requested = world.call(
        ORG_ADMIN_A,
        "POST",
        f"{p}/sites/",
        {
            "organization": world.org_a.pk,
            "name": name,
            "contact_email": "ops@a.example.org",
            "resources": {"gpus": 2},
        },
    )
    assert requested.status_code == 201, requested.json()
    assert requested.json()["state"] == "requested"
    approved = world.call(ADMIN, "POST", f"{p}/sites/{requested.json()['id']}/approve/")
    assert approved.status_code == 200, approved.json()
    assert approved["Cache-Control"] == "no-store"  # it carries the token
    return Site.objects.get(pk=requested.json()["id"]), approved.json()


def whoami(world: World, agent: EnrolledSite) -> Any:
    return world.call(ANONYMOUS, "GET", WHOAMI, **agent.headers("GET", WHOAMI))


def test_whole_enrolment_path_over_http(sites_world: World) -> None:
    site, approval = request_and_approve(sites_world)
    token = approval["enrolment"]["token"]
    assert approval["site"]["state"] == "approved"
    assert token.startswith("fpe_")
    assert approval["enrolment"]["command"] == (
        f"python -m client_agent enrol --portal http://testserver --token {token}"
    )
    assert dt.datetime.fromisoformat(approval["enrolment"]["expires_at"]) > timezone.now()

    # At the site: the key is made there, only the CSR travels; no credentials but the token.
    key = signing.generate_key()
    csr = signing.make_csr(key, site.name, sites_world.project.name)
    response = sites_world.call(
        ANONYMOUS,
        "POST",
        ENROL,
        {"token": token, "csr_pem": csr, "project": sites_world.project.slug},
    )

    assert response.status_code == 201, response.json()
    body = response.json()
    assert (body["site"], body["project"], body["organization"]) == (
        site.name,
        sites_world.project.slug,
        "Org A",
    )
    assert body["ca_certificate_pem"] == sites_world.project.ca_certificate_pem
    cert = ca.load_certificate(body["certificate_pem"])
    assert ca.is_issued_by(cert, ca.load_certificate(body["ca_certificate_pem"]))
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    assert body["fingerprint"] == signing.certificate_fingerprint(body["certificate_pem"])
    assert Site.objects.get(pk=site.pk).state == SiteState.ENROLLED

    # The agent now proves who it is with a signature, and that counts as a heartbeat.
    agent = EnrolledSite(
        site,
        key,
        Certificate.objects.get(fingerprint=body["fingerprint"]),
        body["ca_certificate_pem"],
    )
    me = whoami(sites_world, agent)
    assert me.status_code == 200, me.json()
    assert me.json()["site"] == site.name
    assert me.json()["project"] == sites_world.project.slug
    assert me.json()["state"] == "enrolled"
    assert me.json()["certificate_fingerprint"] == body["fingerprint"]
    assert Site.objects.get(pk=site.pk).last_heartbeat is not None

    # And the project admin sees the site enrolled with that certificate.
    listed = sites_world.call(
        ADMIN, "GET", f"/api/v1/projects/{sites_world.project.slug}/certificates/?site={site.pk}"
    )
    assert [c["fingerprint"] for c in listed.json()["results"]] == [body["fingerprint"]]


def test_the_token_is_shown_once(sites_world: World) -> None:
    site, approval = request_and_approve(sites_world)
    token = approval["enrolment"]["token"]

    shown = sites_world.call(
        ADMIN, "GET", f"/api/v1/projects/{sites_world.project.slug}/sites/{site.pk}/"
    )

    assert token not in shown.content.decode()
    assert EnrolmentToken.objects.get(site=site).token_hash != token


def test_public_url_setting_names_the_portal_in_the_command(
    sites_world: World, settings: Settings
) -> None:
    settings.FEDPORTAL_PUBLIC_URL = "https://portal.example.org/"

    _, approval = request_and_approve(sites_world)

    assert approval["enrolment"]["command"] == (
        "python -m client_agent enrol --portal https://portal.example.org "
        f"--token {approval['enrolment']['token']}"
    )


def test_reissued_token_enrols_again_and_the_old_key_stops_working(sites_world: World) -> None:
    old = sites_world.site_a
    p = f"/api/v1/projects/{sites_world.project.slug}"
    reissued = sites_world.call(ADMIN, "POST", f"{p}/sites/{old.site.pk}/enrolment-token/")
    assert reissued.status_code == 201
    key = signing.generate_key()

    response = sites_world.call(
        ANONYMOUS,
        "POST",
        ENROL,
        {
            "token": reissued.json()["enrolment"]["token"],
            "csr_pem": signing.make_csr(key, old.site.name, sites_world.project.name),
        },
    )

    assert response.status_code == 201, response.json()
    new = EnrolledSite(
        old.site, key, Certificate.objects.get(fingerprint=response.json()["fingerprint"]), ""
    )
    assert whoami(sites_world, new).status_code == 200
    refused = whoami(sites_world, old)
    assert (refused.status_code, refused.json()["code"]) == (401, "certificate_revoked")


# --- refusals: each one names its cause and changes nothing ---------------------------------

# A scene sets up a refusal and returns the request body to send.
Scene = Callable[[World], dict[str, Any]]


def _csr(world: World, site: Site, cn: str | None = None) -> str:
    return signing.make_csr(signing.generate_key(), cn or site.name, world.project.name)


def _reused(world: World) -> dict[str, Any]:
    site, approval = request_and_approve(world)
    body = {"token": approval["enrolment"]["token"], "csr_pem": _csr(world, site)}
    assert world.call(ANONYMOUS, "POST", ENROL, body).status_code == 201
    return {**body, "csr_pem": _csr(world, site)}


def _expired(world: World) -> dict[str, Any]:
    site, approval = request_and_approve(world)
    EnrolmentToken.objects.filter(site=site).update(expires_at=timezone.now() - dt.timedelta(1))
    return {"token": approval["enrolment"]["token"], "csr_pem": _csr(world, site)}


def _wrong_project(world: World) -> dict[str, Any]:
    site, approval = request_and_approve(world)
    return {
        "token": approval["enrolment"]["token"],
        "csr_pem": _csr(world, site),
        "project": world.other.slug,
    }


def _unknown_project(world: World) -> dict[str, Any]:
    return {**_wrong_project(world), "project": "no-such-project"}


def _denied(world: World) -> dict[str, Any]:
    site, approval = request_and_approve(world)
    denied = world.call(
        ADMIN,
        "POST",
        f"/api/v1/projects/{world.project.slug}/sites/{site.pk}/deny/",
        {"reason": "not in the consortium"},
    )
    assert denied.status_code == 200
    return {"token": approval["enrolment"]["token"], "csr_pem": _csr(world, site)}


def _superseded(world: World) -> dict[str, Any]:
    site, approval = request_and_approve(world)
    path = f"/api/v1/projects/{world.project.slug}/sites/{site.pk}/enrolment-token/"
    assert world.call(ADMIN, "POST", path).status_code == 201
    return {"token": approval["enrolment"]["token"], "csr_pem": _csr(world, site)}


def _unknown_token(world: World) -> dict[str, Any]:
    site, _ = request_and_approve(world)
    return {"token": "fpe_not-a-token", "csr_pem": _csr(world, site)}


def _subject_mismatch(world: World) -> dict[str, Any]:
    site, approval = request_and_approve(world)
    return {"token": approval["enrolment"]["token"], "csr_pem": _csr(world, site, "site-a")}


def _malformed_csr(world: World) -> dict[str, Any]:
    _, approval = request_and_approve(world)
    return {"token": approval["enrolment"]["token"], "csr_pem": "not a certificate request"}


def _no_csr(world: World) -> dict[str, Any]:
    _, approval = request_and_approve(world)
    return {"token": approval["enrolment"]["token"]}


@pytest.mark.parametrize(
    ("scene", "status", "code", "field", "message"),
    [
        (_reused, 410, "token_used", "token", "was used at"),
        (_expired, 410, "token_expired", "token", "expired at"),
        (_wrong_project, 400, "wrong_project", "token", "not for project 'Other Net'"),
        (_unknown_project, 400, "wrong_project", "token", "not for project 'no-such-project'"),
        (_denied, 409, "site_not_approved", "token", "is denied"),
        (_superseded, 400, "token_invalid", "token", "replaced by a newer one"),
        (_unknown_token, 400, "token_invalid", "token", "not known"),
        (_subject_mismatch, 400, "subject_mismatch", "csr_pem", "CN=site-a"),
        (_malformed_csr, 400, "invalid_csr", "csr_pem", "not a PEM"),
        (_no_csr, 400, "invalid", "csr_pem", "required"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_refused_enrolment_names_the_cause_and_changes_nothing(
    sites_world: World, scene: Scene, status: int, code: str, field: str | None, message: str
) -> None:
    body = scene(sites_world)
    before = snapshot()

    response = sites_world.call(ANONYMOUS, "POST", ENROL, body)

    assert snapshot() == before
    error = response.json()
    assert (response.status_code, error["code"], error.get("field")) == (status, code, field)
    assert message in error["message"]


# --- revocation takes effect on the next signed request ------------------------------------


def test_revoked_certificate_is_refused_on_the_next_request(sites_world: World) -> None:
    agent = sites_world.site_a
    assert whoami(sites_world, agent).status_code == 200
    path = (
        f"/api/v1/projects/{sites_world.project.slug}/certificates/{agent.certificate.pk}/revoke/"
    )

    revoked = sites_world.call(ADMIN, "POST", path, {"reason": "laptop stolen"})

    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    refused = whoami(sites_world, agent)
    assert refused.status_code == 401
    assert refused.json()["code"] == "certificate_revoked"
    assert "laptop stolen" in refused.json()["message"]
    assert whoami(sites_world, sites_world.site_b).status_code == 200  # another site is unaffected


def test_revoked_site_is_refused_on_the_next_request(sites_world: World) -> None:
    agent = sites_world.site_a
    path = f"/api/v1/projects/{sites_world.project.slug}/sites/{agent.site.pk}/revoke/"

    revoked = sites_world.call(ADMIN, "POST", path, {"reason": "left the consortium"})

    assert revoked.status_code == 200 and revoked.json()["state"] == "revoked"
    refused = whoami(sites_world, agent)
    assert (refused.status_code, refused.json()["code"]) == (401, "certificate_revoked")


def test_signature_made_for_another_path_is_refused(sites_world: World) -> None:
    headers = sites_world.site_a.headers("GET", "/api/v1/agent/other/")

    refused = sites_world.call(ANONYMOUS, "GET", WHOAMI, **headers)

    assert (refused.status_code, refused.json()["code"]) == (401, "signature_invalid")


def test_replayed_whoami_is_refused(sites_world: World) -> None:
    headers = sites_world.site_a.headers("GET", WHOAMI)
    assert sites_world.call(ANONYMOUS, "GET", WHOAMI, **headers).status_code == 200

    refused = sites_world.call(ANONYMOUS, "GET", WHOAMI, **headers)

    assert (refused.status_code, refused.json()["code"]) == (401, "replay_detected")


def test_a_site_signature_does_not_open_people_endpoints(sites_world: World) -> None:
    path = f"/api/v1/projects/{sites_world.project.slug}/sites/"
    headers = sites_world.site_a.headers("GET", path)

    refused = sites_world.call(ANONYMOUS, "GET", path, **headers)

    assert (refused.status_code, refused.json()["code"]) == (401, "not_authenticated")
    assert not signed_cache.nonce_used(
        fingerprint=headers[signing.HEADER_FINGERPRINT], nonce=headers["X-FedPortal-Nonce"]
    )


def test_an_api_token_does_not_open_agent_endpoints(sites_world: World) -> None:
    refused = sites_world.call(ADMIN, "GET", WHOAMI)

    assert (refused.status_code, refused.json()["code"]) == (401, "not_authenticated")
    assert refused["WWW-Authenticate"].startswith("FedPortal-Signature")
