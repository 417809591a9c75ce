"""Signed agent requests: what the portal accepts, and each reason it refuses one.

Requests go through a real DRF view with ``SiteSignatureAuthentication``, as agent endpoints
will; the refusals are checked by the code and message the agent would see.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from django.contrib.auth.models import AnonymousUser
from django.core.cache import cache
from django.utils import timezone
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.test import APIRequestFactory
from rest_framework.views import APIView

from client_agent import signing
from sites import ca, conf, services, signed_cache
from sites.api.permissions import site_identity
from sites.authentication import (
    SiteIdentity,
    SiteSignatureAuthentication,
    identity_current,
    site_heartbeat,
    site_heartbeat_record,
    verify_signed_handshake,
    verify_signed_request,
)
from sites.exceptions import (
    CertificateUntrusted,
    ReplayDetected,
    SignatureExpired,
    SignatureInvalid,
)
from sites.models import Certificate, Site, SiteState
from sites.selectors import site_is_online
from tests.portal.factories import EnrolledSite, ProjectFactory, creator_of, enrolled_site

pytestmark = pytest.mark.django_db

PATH = "/api/v1/agent/heartbeat"


class IsSiteAgent(BasePermission):
    def has_permission(self, request: Request, view: Any) -> bool:
        return isinstance(request.auth, SiteIdentity)


class AgentView(APIView):
    authentication_classes = [SiteSignatureAuthentication]
    permission_classes = [IsSiteAgent]

    def get(self, request: Request) -> Response:
        return self.post(request)

    def post(self, request: Request) -> Response:
        identity = site_identity(request)
        return Response(
            {
                "site": identity.site.name,
                "project": identity.project.name,
                "anonymous_user": isinstance(request.user, AnonymousUser),
                "data": request.data if request.method == "POST" else None,
            }
        )


def call(
    method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> tuple[int, dict[str, Any], Any]:
    factory = APIRequestFactory()
    if method == "GET":
        request = factory.get(path, headers=headers)
    else:
        # drf-stubs type generic()'s data as str; DRF hands bytes to Django unchanged.
        request = factory.generic(
            method,
            path,
            data=body,  # type: ignore[arg-type]
            content_type="application/json",
            headers=headers,
        )
    response = AgentView.as_view()(request)
    data = response.data
    # The project's exception handler (fedportal.api) answers {"code", "message"}; DRF's own
    # answers {"detail"} with the code on it. Either way the agent gets both.
    if "detail" in data:
        data = {"code": getattr(data["detail"], "code", None), "message": str(data["detail"])}
    return response.status_code, data, data.get("code")


def refused(agent: EnrolledSite, headers: dict[str, str], body: bytes = b"{}") -> tuple[str, str]:
    status, data, code = call("POST", PATH, headers, body)
    assert status == 401, data
    return code, str(data["message"])


@pytest.fixture
def agent() -> EnrolledSite:
    return enrolled_site()


def test_good_request_is_accepted_and_counts_as_a_heartbeat(agent: EnrolledSite) -> None:
    body = json.dumps({"status": "idle"}).encode()
    assert agent.site.last_heartbeat is None

    headers = agent.headers("POST", PATH, body)
    status, data, _ = call("POST", PATH, headers, body)

    assert status == 200, data
    assert data == {
        "site": agent.site.name,
        "project": agent.site.project.name,
        "anonymous_user": True,
        "data": {"status": "idle"},
    }
    assert Site.objects.get(pk=agent.site.pk).last_heartbeat is not None
    assert signed_cache.nonce_used(
        fingerprint=agent.certificate.fingerprint, nonce=headers["X-FedPortal-Nonce"]
    )


def test_query_string_is_part_of_the_signed_path(agent: EnrolledSite) -> None:
    path = f"{PATH}?round=3&job=abc"
    assert call("GET", path, agent.headers("GET", path))[0] == 200

    headers = agent.headers("GET", path)
    status, _, code = call("GET", f"{PATH}?round=4&job=abc", headers)
    assert (status, code) == (401, "signature_invalid")


def test_replayed_request_is_refused(agent: EnrolledSite) -> None:
    headers = agent.headers("POST", PATH, b"{}")
    assert call("POST", PATH, headers, b"{}")[0] == 200

    code, message = refused(agent, headers)

    assert code == "replay_detected"
    assert headers["X-FedPortal-Nonce"] in message


def test_a_look_without_recording_uses_up_no_nonce_and_is_no_heartbeat(
    agent: EnrolledSite,
) -> None:
    """What the server does with an upload's headers before it reads the body: the request
    is checked (a replay included), and the view's authentication can still record it."""
    headers = agent.headers("POST", PATH, b"{}")
    identity = verify_signed_request(
        method="POST", path=PATH, headers=headers, body=b"{}", record=False
    )
    assert identity.site == agent.site
    assert not signed_cache.nonce_used(
        fingerprint=agent.certificate.fingerprint, nonce=headers["X-FedPortal-Nonce"]
    )
    assert Site.objects.get(pk=agent.site.pk).last_heartbeat is None

    assert call("POST", PATH, headers, b"{}")[0] == 200  # the same nonce, recorded now
    with pytest.raises(ReplayDetected):
        verify_signed_request(method="POST", path=PATH, headers=headers, body=b"{}", record=False)
    bad = {
        **headers,
        "X-FedPortal-Signature": agent.headers("POST", PATH, b"[]")["X-FedPortal-Signature"],
    }
    with pytest.raises(SignatureInvalid):
        verify_signed_request(method="POST", path=PATH, headers=bad, body=b"{}", record=False)


@pytest.mark.parametrize(("offset", "direction"), [(-400, "behind"), (400, "ahead of")])
def test_clock_skew_beyond_the_window_is_refused(
    agent: EnrolledSite, offset: int, direction: str
) -> None:
    headers = agent.headers("POST", PATH, b"{}", timestamp=int(time.time()) + offset)

    code, message = refused(agent, headers)

    assert code == "signature_expired"
    assert message == f"timestamp is 400 s {direction} the portal clock; allowed ±300 s"


def test_clock_skew_inside_the_window_is_accepted(agent: EnrolledSite) -> None:
    headers = agent.headers("POST", PATH, b"{}", timestamp=int(time.time()) - 290)
    assert call("POST", PATH, headers, b"{}")[0] == 200


def test_window_is_a_setting(agent: EnrolledSite, settings: Any) -> None:
    settings.FEDPORTAL_SIGNATURE_WINDOW_SECONDS = 30
    headers = agent.headers("POST", PATH, b"{}", timestamp=int(time.time()) - 60)

    assert refused(agent, headers)[1].endswith("allowed ±30 s")


@pytest.mark.parametrize(
    ("signed", "sent"),
    [
        (("POST", PATH, b'{"loss": 0.25}'), ("POST", PATH, b'{"loss": 0.01}')),
        (("POST", PATH, b"{}"), ("POST", "/api/v1/agent/other", b"{}")),
        (("POST", PATH, b"{}"), ("PUT", PATH, b"{}")),
    ],
    ids=["tampered-body", "tampered-path", "tampered-method"],
)
def test_tampered_request_is_refused(
    agent: EnrolledSite, signed: tuple[str, str, bytes], sent: tuple[str, str, bytes]
) -> None:
    headers = agent.headers(*signed)

    status, data, code = call(sent[0], sent[1], headers, sent[2])

    assert (status, code) == (401, "signature_invalid"), data
    assert "differ from what was signed" in str(data["message"])


def test_signature_by_another_key_is_refused(agent: EnrolledSite) -> None:
    headers = signing.sign_request(
        key=signing.generate_key(),
        cert_pem_or_fingerprint=agent.certificate.fingerprint,
        method="POST",
        path=PATH,
        body=b"{}",
    )
    assert refused(agent, headers)[0] == "signature_invalid"


def test_revoked_certificate_is_refused_on_the_very_next_request(agent: EnrolledSite) -> None:
    assert call("POST", PATH, agent.headers("POST", PATH, b"{}"), b"{}")[0] == 200

    services.certificate_revoke(
        certificate=agent.certificate,
        reason="laptop stolen",
        revoked_by=creator_of(agent.site.project),
    )
    code, message = refused(agent, agent.headers("POST", PATH, b"{}"))

    assert code == "certificate_revoked"
    assert message.endswith(": laptop stolen")


def test_revoked_site_is_refused(agent: EnrolledSite) -> None:
    services.site_revoke(
        site=agent.site, reason="left the consortium", revoked_by=creator_of(agent.site.project)
    )
    assert refused(agent, agent.headers("POST", PATH, b"{}"))[0] == "certificate_revoked"


def test_site_no_longer_enrolled_is_refused_even_with_a_live_certificate(
    agent: EnrolledSite,
) -> None:
    # Isolates the state check from certificate revocation, which site_revoke also does.
    Site.objects.filter(pk=agent.site.pk).update(state=SiteState.REVOKED)

    code, message = refused(agent, agent.headers("POST", PATH, b"{}"))

    assert code == "site_not_enrolled"
    assert message == f"site '{agent.site.name}' is revoked, not enrolled"


def test_unknown_fingerprint_is_refused(agent: EnrolledSite) -> None:
    headers = agent.headers("POST", PATH, b"{}")
    headers["X-FedPortal-Cert-Fingerprint"] = "ab" * 32

    assert refused(agent, headers)[0] == "unknown_certificate"


def test_expired_certificate_is_refused(agent: EnrolledSite) -> None:
    Certificate.objects.filter(pk=agent.certificate.pk).update(
        not_after=timezone.now() - dt.timedelta(minutes=1)
    )
    assert refused(agent, agent.headers("POST", PATH, b"{}"))[0] == "certificate_expired"


def _register_forged(agent: EnrolledSite, authority_pem: str, authority_key: bytes) -> Any:
    """A certificate for the agent's site with the right subject, signed by ``authority``, put
    into the database as if it belonged to the site (the fingerprint trick)."""
    key = signing.generate_key()
    issued = ca.sign_csr(
        csr_pem=signing.make_csr(key, agent.site.name, agent.site.project.name),
        ca_certificate_pem=authority_pem,
        ca_private_key_pem=authority_key,
        site_name=agent.site.name,
        project_name=agent.site.project.name,
        organization_name=agent.site.organization.name,
        validity_days=30,
    )
    Certificate.objects.create(
        site=agent.site,
        serial=issued.serial,
        subject_cn=issued.subject_cn,
        pem=issued.pem,
        fingerprint=issued.fingerprint,
        not_before=issued.not_before,
        not_after=issued.not_after,
    )
    return signing.sign_request(
        key=key, cert_pem_or_fingerprint=issued.pem, method="POST", path=PATH, body=b"{}"
    )


def test_certificate_from_another_projects_ca_is_refused(agent: EnrolledSite) -> None:
    other = ProjectFactory.create()
    other_key = ca.decrypt_private_key(
        other.ca_private_key_encrypted, keys=conf.ca_key_encryption_keys()
    )
    headers = _register_forged(agent, other.ca_certificate_pem, other_key)

    code, message = refused(agent, headers)

    assert code == "certificate_untrusted"
    assert f"not issued by project {agent.site.project.name!r}'s CA" in message


def test_certificate_from_a_look_alike_ca_with_the_same_subject_is_refused(
    agent: EnrolledSite,
) -> None:
    # Same issuer name as the real project CA; only the signature tells them apart.
    fake = ca.create_ca(project_name=agent.site.project.name, validity_days=30)
    real = ca.load_certificate(agent.site.project.ca_certificate_pem)
    assert ca.load_certificate(fake.certificate_pem).subject == real.subject
    headers = _register_forged(agent, fake.certificate_pem, fake.private_key_pem)

    assert refused(agent, headers)[0] == "certificate_untrusted"


@pytest.mark.parametrize(
    ("header", "value", "code"),
    [
        ("X-FedPortal-Nonce", "not-hex", "signature_malformed"),
        ("X-FedPortal-Timestamp", "12.5", "signature_malformed"),
        ("X-FedPortal-Signature", "***", "signature_malformed"),
        ("X-FedPortal-Cert-Fingerprint", "abc", "signature_malformed"),
        ("X-FedPortal-Signature", None, "signature_missing"),
    ],
)
def test_malformed_or_missing_headers_are_refused(
    agent: EnrolledSite, header: str, value: str | None, code: str
) -> None:
    headers = agent.headers("POST", PATH, b"{}")
    if value is None:
        del headers[header]
    else:
        headers[header] = value

    got, message = refused(agent, headers)

    assert got == code
    assert header in message


def test_request_without_signature_headers_is_left_to_other_authenticators() -> None:
    status, _, code = call("POST", PATH, {}, b"{}")

    assert (status, code) == (401, "not_authenticated")


@pytest.mark.parametrize(
    "make_key",
    [ed25519.Ed25519PrivateKey.generate, lambda: rsa.generate_private_key(65537, 2048)],
    ids=["ed25519", "rsa"],
)
def test_ed25519_and_rsa_sites_sign_too(make_key: Any) -> None:
    agent = enrolled_site(key=make_key())

    assert call("POST", PATH, agent.headers("POST", PATH, b"{}"), b"{}")[0] == 200


def test_a_nonce_is_remembered_until_a_replay_would_be_out_of_the_window(
    agent: EnrolledSite,
) -> None:
    now = timezone.now()
    ts = int(now.timestamp()) - 290
    headers = agent.headers("POST", PATH, b"{}", timestamp=ts)
    verify = dict(method="POST", path=PATH, headers=headers, body=b"{}")
    verify_signed_request(**verify, now=now)  # type: ignore[arg-type]
    with pytest.raises(ReplayDetected):
        verify_signed_request(**verify, now=now)  # type: ignore[arg-type]

    # The request stays in the ±300 s window for 10 s more: that long (and a second for the
    # rounding to whole seconds) its nonce is kept.
    assert signed_cache.nonce_expires_in(ts, now, 300) == 11
    later = now + dt.timedelta(seconds=20)
    cache.clear()  # the nonce expired
    # Forgotten, yet a replay still fails: its timestamp is now outside the window.
    with pytest.raises(SignatureExpired):
        verify_signed_request(**verify, now=later)  # type: ignore[arg-type]


def test_verify_signed_request_reads_headers_in_any_case(agent: EnrolledSite) -> None:
    headers = {k.lower(): v for k, v in agent.headers("GET", PATH).items()}

    identity = verify_signed_request(method="get", path=PATH, headers=headers, body=b"")

    assert identity.site == agent.site and identity.certificate == agent.certificate


# database_sync_to_async closes stale connections around each call, as it must in a server; a
# test inside one uncommitted transaction would lose its connection, so this one commits.
@pytest.mark.django_db(transaction=True)
def test_websocket_handshake_is_verified_from_async_code(agent: EnrolledSite) -> None:
    path = "/ws/agent/"
    headers = agent.headers("GET", f"{path}?v=1")
    scope = {
        "type": "websocket",
        "path": path,
        "query_string": b"v=1",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }

    identity = async_to_sync(verify_signed_handshake)(scope)

    assert identity.site == agent.site
    with pytest.raises(ReplayDetected):
        async_to_sync(verify_signed_handshake)(scope)
    bad = dict(scope, path="/ws/other/")
    with pytest.raises(SignatureInvalid):
        async_to_sync(verify_signed_handshake)(bad)


def test_certificate_record_must_match_its_pem(agent: EnrolledSite) -> None:
    other = enrolled_site(organization=agent.site.organization)
    # A row whose PEM is another certificate: the fingerprint looked up is not the PEM's.
    Certificate.objects.filter(pk=agent.certificate.pk).update(pem=other.certificate.pem)

    with pytest.raises(CertificateUntrusted, match="does not match its fingerprint"):
        verify_signed_request(method="GET", path=PATH, headers=agent.headers("GET", PATH), body=b"")


def test_certificate_record_cannot_name_another_site(agent: EnrolledSite) -> None:
    # A genuine certificate of this project's CA, recorded against the wrong site.
    other = enrolled_site(organization=agent.site.organization)
    Certificate.objects.filter(pk=other.certificate.pk).update(site=agent.site)

    with pytest.raises(CertificateUntrusted, match=f"not issued to site '{agent.site.name}'"):
        verify_signed_request(method="GET", path=PATH, headers=other.headers("GET", PATH), body=b"")


# --- what the check keeps in the cache ------------------------------------------------------


def test_a_verified_certificate_is_not_read_again(
    agent: EnrolledSite, django_assert_num_queries: Any
) -> None:
    assert call("POST", PATH, agent.headers("POST", PATH, b"{}"), b"{}")[0] == 200

    # Certificate, site and project from the cache, the nonce claimed there, and the heartbeat
    # written a moment ago: no statement at all.
    with django_assert_num_queries(0):
        assert call("POST", PATH, agent.headers("POST", PATH, b"{}"), b"{}")[0] == 200


def test_a_site_revoked_after_its_certificate_was_cached_is_refused_at_once(
    agent: EnrolledSite,
) -> None:
    assert call("POST", PATH, agent.headers("POST", PATH, b"{}"), b"{}")[0] == 200

    services.site_revoke(
        site=agent.site, reason="left the consortium", revoked_by=creator_of(agent.site.project)
    )

    assert refused(agent, agent.headers("POST", PATH, b"{}"))[0] == "certificate_revoked"


def test_a_site_whose_state_is_saved_after_caching_is_checked_again(agent: EnrolledSite) -> None:
    assert call("POST", PATH, agent.headers("POST", PATH, b"{}"), b"{}")[0] == 200

    site = Site.objects.get(pk=agent.site.pk)
    site.state = SiteState.REVOKED
    site.save(update_fields=["state"])

    assert refused(agent, agent.headers("POST", PATH, b"{}"))[0] == "site_not_enrolled"


def test_a_site_saved_with_only_what_no_check_reads_keeps_the_cached_certificates(
    agent: EnrolledSite,
) -> None:
    # Every agent reports its privacy policy when it connects: that must not end every other
    # site's entry, or a hundred agents connecting read the database on every request.
    before = signed_cache.generation()
    site = Site.objects.get(pk=agent.site.pk)
    site.privacy_policy = {"sha256": "c" * 64}
    site.save(update_fields=["privacy_policy", "privacy_policy_reported_at"])
    assert signed_cache.generation() == before

    site.name = "renamed"
    site.save(update_fields=["privacy_policy", "name"])  # with a field an entry keeps
    assert signed_cache.generation() != before
    before = signed_cache.generation()
    site.save()  # every field
    assert signed_cache.generation() != before


def test_an_entry_read_before_a_change_is_never_used(agent: EnrolledSite) -> None:
    """A request that read the certificate before a revocation committed stores its entry
    after it: the entry carries the generation read before the database, which the change
    ended."""
    row = Certificate.objects.select_related("site__project").get(pk=agent.certificate.pk)
    read_under = signed_cache.generation()
    signed_cache.certificates_changed()  # what saving the revocation does

    signed_cache.certificate_remember(row, read_under)

    assert signed_cache.certificate_cached(row.fingerprint, signed_cache.generation()) is None
    assert signed_cache.certificate_cached(row.fingerprint, read_under) is not None


def test_a_heartbeat_is_written_once_an_interval_and_again_after_a_cut_off(
    agent: EnrolledSite,
) -> None:
    heard: list[dict[str, Any]] = []

    def listener(**kwargs: Any) -> None:
        heard.append(kwargs)

    site_heartbeat.connect(listener)
    try:
        for _ in range(3):
            assert call("POST", PATH, agent.headers("POST", PATH, b"{}"), b"{}")[0] == 200
        first = Site.objects.get(pk=agent.site.pk).last_heartbeat
        assert [h["was_online"] for h in heard] == [False]  # written once, coming online

        site = Site.objects.get(pk=agent.site.pk)
        services.site_agent_connect(site=site, agent_version="1", channel="c1")
        assert services.site_agent_disconnect(site=site, channel="c1")
        assert call("POST", PATH, agent.headers("POST", PATH, b"{}"), b"{}")[0] == 200
    finally:
        site_heartbeat.disconnect(listener)

    after = Site.objects.get(pk=agent.site.pk)
    # The cut-off made the site offline; the next request brought it back, with a write.
    assert [h["was_online"] for h in heard] == [False, False]
    assert after.last_heartbeat is not None and first is not None
    assert after.last_heartbeat > after.agent_disconnected_at  # type: ignore[operator]
    assert site_is_online(after)


def test_the_heartbeat_of_a_site_online_until_now_is_one_statement(
    agent: EnrolledSite, django_assert_num_queries: Any
) -> None:
    heard: list[dict[str, Any]] = []

    def listener(**kwargs: Any) -> None:
        heard.append(kwargs)

    site = Site.objects.get(pk=agent.site.pk)
    earlier = timezone.now()
    assert site_heartbeat_record(site, now=earlier)  # came online
    signed_cache.site_heartbeat_due(site.pk)
    now = earlier + dt.timedelta(seconds=40)
    site_heartbeat.connect(listener)
    try:
        with django_assert_num_queries(1):
            assert not site_heartbeat_record(site, now=now)
    finally:
        site_heartbeat.disconnect(listener)
    assert [h["was_online"] for h in heard] == [True]
    assert Site.objects.get(pk=site.pk).last_heartbeat == now


def test_a_heartbeat_dated_before_a_cut_off_is_stored_after_it(agent: EnrolledSite) -> None:
    """Other processes' clocks may run ahead of this one's: a heartbeat that reads an earlier
    time than the last cut-off is stored just after the cut, or the site would read offline."""
    site = Site.objects.get(pk=agent.site.pk)
    now = timezone.now()
    assert site_heartbeat_record(site, now=now)
    cut = now + dt.timedelta(seconds=2)
    # Cut off, then heard again, both by processes whose clocks run 2 s ahead.
    Site.objects.filter(pk=site.pk).update(
        agent_disconnected_at=cut, last_heartbeat=cut + dt.timedelta(seconds=1)
    )
    signed_cache.site_heartbeat_due(site.pk)

    assert not site_heartbeat_record(site, now=now + dt.timedelta(seconds=1))  # was online

    after = Site.objects.get(pk=site.pk)
    assert after.last_heartbeat is not None and after.last_heartbeat > cut
    assert site_is_online(after, now=cut + dt.timedelta(seconds=1))


def test_heartbeat_writes_are_less_often_than_the_online_window(settings: Any) -> None:
    settings.FEDPORTAL_SITE_ONLINE_SECONDS = 90
    settings.FEDPORTAL_HEARTBEAT_WRITE_SECONDS = 30
    assert signed_cache.heartbeat_write_seconds() == 30
    settings.FEDPORTAL_HEARTBEAT_WRITE_SECONDS = 600
    assert signed_cache.heartbeat_write_seconds() == 45  # half the window at most


@pytest.mark.parametrize(
    ("backend", "refused"),
    [
        ("django.core.cache.backends.redis.RedisCache", False),
        ("django.core.cache.backends.locmem.LocMemCache", True),
        ("django.core.cache.backends.dummy.DummyCache", True),
    ],
)
def test_a_deployment_whose_cache_its_processes_do_not_share_is_refused_by_the_checks(
    settings: Any, backend: str, refused: bool
) -> None:
    # Nonces are claimed in the cache: one of each process's own lets a replay through.
    from sites.checks import check_cache_is_shared

    settings.CACHES = {"default": {"BACKEND": backend}}
    errors = check_cache_is_shared()
    assert [e.id for e in errors] == (["sites.E002"] if refused else [])


def test_an_identity_holds_without_a_check_only_in_its_generation_and_validity(
    agent: EnrolledSite,
) -> None:
    certificate = Certificate.objects.select_related("site").get(pk=agent.certificate.pk)
    now = timezone.now()
    current = signed_cache.generation()
    identity = SiteIdentity(site=certificate.site, certificate=certificate, generation=current)

    assert identity_current(identity, current, now)
    # Any change of a certificate, site or project since: checked again in full.
    assert not identity_current(identity, "another generation", now)
    # One verified before generations were kept (none recorded): checked again in full.
    unknown = SiteIdentity(site=certificate.site, certificate=certificate)
    assert not identity_current(unknown, current, now)
    # Time alone ends a certificate: no change is needed for that.
    assert not identity_current(identity, current, certificate.not_after + dt.timedelta(seconds=1))
    assert not identity_current(identity, current, certificate.not_before - dt.timedelta(seconds=1))
