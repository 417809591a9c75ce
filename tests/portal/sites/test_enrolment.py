"""The enrolment path through the services: request, approve, enrol with a CSR; and every way
an enrolment is refused, each leaving the database exactly as it was."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from django.utils import timezone
from pytest_django.fixtures import Settings

from client_agent import signing
from common.exceptions import DomainError
from sites import ca, selectors, services
from sites.exceptions import (
    CAKeyUnavailable,
    InvalidCSR,
    SiteNotApproved,
    SubjectMismatch,
    TokenAlreadyUsed,
    TokenExpired,
    TokenInvalid,
    WeakKey,
    WrongProject,
)
from sites.models import (
    AuditEvent,
    Certificate,
    EnrolmentToken,
    Membership,
    Organization,
    Project,
    Role,
    Site,
    SiteState,
)
from tests.portal.factories import (
    OrganizationFactory,
    ProjectFactory,
    SiteFactory,
    UserFactory,
    approved_site,
    creator_of,
    enrolled_site,
)

pytestmark = pytest.mark.django_db


def snapshot() -> dict[str, Any]:
    """Everything enrolment could touch: row counts, site states, token and certificate state."""
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


def csr_for(site: Site, key: Any = None) -> str:
    return signing.make_csr(key or signing.generate_key(), site.name, site.project.name)


def test_whole_enrolment_path() -> None:
    admin = UserFactory.create(username="padmin")
    project = services.project_create(name="Oncology", created_by=admin)
    hospital = services.organization_create(project=project, name="Hospital A", created_by=admin)
    org_admin = UserFactory.create(username="oadmin")
    services.membership_add(
        organization=hospital, user=org_admin, role=Role.ORG_ADMIN, added_by=admin
    )

    site = services.site_request(
        organization=hospital,
        name="hospital-a",
        contact_email="it@hospital-a.example",
        resources={"gpus": 2, "memory_gb": 64},
        requested_by=org_admin,
        source_address="10.0.0.7",
    )
    assert site.state == SiteState.REQUESTED and site.project == project
    site, token = services.site_approve(site=site, approved_by=admin)
    assert site.state == SiteState.APPROVED and token.startswith("fpe_")
    assert EnrolmentToken.objects.get(site=site).token_hash != token  # stored hashed

    key = signing.generate_key()  # at the site; only the CSR travels
    enrolment = services.site_enrol(
        token=token, csr_pem=signing.make_csr(key, "hospital-a", "Oncology"), project=project
    )

    site.refresh_from_db()
    cert = enrolment.certificate
    assert site.state == SiteState.ENROLLED and site.enrolled_at is not None
    assert enrolment.ca_certificate_pem == project.ca_certificate_pem
    x509_cert = ca.load_certificate(cert.pem)
    assert ca.is_issued_by(x509_cert, ca.load_certificate(enrolment.ca_certificate_pem))
    assert x509_cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    assert cert.fingerprint == signing.certificate_fingerprint(cert.pem)
    assert cert.subject_cn == "hospital-a" and cert.site == site
    assert EnrolmentToken.objects.get(site=site).used_at is not None
    assert selectors.site_current_certificate(site) == cert
    trail = list(
        AuditEvent.objects.filter(project=project).order_by("pk").values_list("action", flat=True)
    )
    assert trail[-4:] == ["site.requested", "site.approved", "certificate.issued", "site.enrolled"]
    requested = AuditEvent.objects.get(action="site.requested")
    assert (requested.actor, requested.source_address) == (org_admin, "10.0.0.7")
    enrolled = AuditEvent.objects.get(action="site.enrolled")
    assert enrolled.actor is None and enrolled.actor_site == site


def test_re_enrolment_with_a_reissued_token_supersedes_the_old_certificate() -> None:
    first = enrolled_site()
    token_row, token = services.enrolment_token_reissue(
        site=first.site, issued_by=creator_of(first.site.project)
    )

    second = services.site_enrol(token=token, csr_pem=csr_for(first.site))

    old = Certificate.objects.get(pk=first.certificate.pk)
    assert old.revoked_at is not None and "superseded" in old.revocation_reason
    assert second.certificate.revoked_at is None
    assert Site.objects.get(pk=first.site.pk).state == SiteState.ENROLLED
    event = AuditEvent.objects.filter(action="site.enrolled").latest("pk")
    assert event.details["re_enrolment"] is True


def test_reissuing_a_token_voids_the_previous_one() -> None:
    site, old_token = approved_site()
    services.enrolment_token_reissue(site=site, issued_by=creator_of(site.project))
    before = snapshot()

    with pytest.raises(TokenInvalid, match="replaced by a newer one"):
        services.site_enrol(token=old_token, csr_pem=csr_for(site))
    assert snapshot() == before


# Each case: set the scene, return (token, csr, extra kwargs) for site_enrol.
Case = Callable[[], tuple[str, str, dict[str, Any]]]


def _reused() -> tuple[str, str, dict[str, Any]]:
    site, token = approved_site()
    services.site_enrol(token=token, csr_pem=csr_for(site))
    return token, csr_for(site), {}


def _expired() -> tuple[str, str, dict[str, Any]]:
    site, token = approved_site()
    EnrolmentToken.objects.filter(site=site).update(
        expires_at=timezone.now() - dt.timedelta(seconds=1)
    )
    return token, csr_for(site), {}


def _wrong_project() -> tuple[str, str, dict[str, Any]]:
    site, token = approved_site()
    return token, csr_for(site), {"project": ProjectFactory.create()}


def _denied() -> tuple[str, str, dict[str, Any]]:
    site, token = approved_site()
    services.site_deny(
        site=site, reason="not in the consortium", denied_by=creator_of(site.project)
    )
    return token, csr_for(site), {}


def _revoked_site() -> tuple[str, str, dict[str, Any]]:
    enrolled = enrolled_site()
    _, token = services.enrolment_token_reissue(
        site=enrolled.site, issued_by=creator_of(enrolled.site.project)
    )
    admin = creator_of(enrolled.site.project)
    services.site_revoke(site=enrolled.site, reason="left the consortium", revoked_by=admin)
    return token, csr_for(enrolled.site), {}


def _unknown() -> tuple[str, str, dict[str, Any]]:
    site, _ = approved_site()
    return "fpe_not-a-token", csr_for(site), {}


def _subject_mismatch() -> tuple[str, str, dict[str, Any]]:
    site, token = approved_site()
    return token, signing.make_csr(signing.generate_key(), "another-site", site.project.name), {}


def _other_project_in_subject() -> tuple[str, str, dict[str, Any]]:
    site, token = approved_site()
    return token, signing.make_csr(signing.generate_key(), site.name, "Some Other Project"), {}


def _malformed() -> tuple[str, str, dict[str, Any]]:
    _, token = approved_site()
    return token, "-----BEGIN CERTIFICATE REQUEST-----\nbm9wZQ==\n", {}


def _weak_key() -> tuple[str, str, dict[str, Any]]:
    site, token = approved_site()
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return token, csr_for(site, key), {}


@pytest.mark.parametrize(
    ("scene", "error", "message"),
    [
        (_reused, TokenAlreadyUsed, "was used at"),
        (_expired, TokenExpired, "expired at"),
        (_wrong_project, WrongProject, "not for project"),
        (_denied, SiteNotApproved, "is denied"),
        (_revoked_site, SiteNotApproved, "is revoked"),
        (_unknown, TokenInvalid, "not known"),
        (_subject_mismatch, SubjectMismatch, "CN=another-site"),
        (_other_project_in_subject, SubjectMismatch, "O=Some Other Project"),
        (_malformed, InvalidCSR, "cannot be parsed"),
        (_weak_key, WeakKey, "1024 bits"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) and not isinstance(v, type) else None,
)
def test_refused_enrolment_names_the_cause_and_changes_nothing(
    scene: Case, error: type[DomainError], message: str
) -> None:
    token, csr, extra = scene()
    before = snapshot()

    with pytest.raises(error, match=message) as caught:
        services.site_enrol(token=token, csr_pem=csr, source_address="192.0.2.1", **extra)

    assert snapshot() == before
    assert 400 <= caught.value.status < 500
    assert caught.value.as_dict()["code"] == caught.value.code


def test_unusable_ca_key_changes_nothing(settings: Settings) -> None:
    site, token = approved_site()
    before = snapshot()
    settings.FEDPORTAL_CA_KEY_ENCRYPTION_KEY = "a-different-key"

    with pytest.raises(CAKeyUnavailable):
        services.site_enrol(token=token, csr_pem=csr_for(site))
    assert snapshot() == before


def test_site_names_must_be_dns_labels_and_unique_in_the_project() -> None:
    site = SiteFactory.create(name="hospital-a")
    from common.exceptions import AlreadyExists, ValidationFailed

    for bad in ["Hospital-A", "-a", "a-", "a_b", "", "x" * 64]:
        with pytest.raises(ValidationFailed) as caught:
            SiteFactory.create(organization=site.organization, name=bad)
        assert caught.value.field == "name"
    with pytest.raises(AlreadyExists, match="already has a site named 'hospital-a'"):
        SiteFactory.create(
            organization=OrganizationFactory.create(project=site.project), name="hospital-a"
        )
    # Another project may use the same name: names are unique per project.
    assert SiteFactory.create(name="hospital-a").project != site.project
