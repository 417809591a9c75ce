"""API tokens for people: made through the API, shown once, accepted as the person, refused
from the moment they are revoked or expire."""

from __future__ import annotations

import datetime as dt

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from sites.models import ApiToken
from tests.portal.factories import ProjectFactory, UserFactory

pytestmark = pytest.mark.django_db

TOKENS = "/api/v1/api-tokens/"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def signed_in() -> APIClient:
    """A project admin in a browser session, about to make a token for a script."""
    user = UserFactory.create(username="alice")
    ProjectFactory.create(name="Alice's Project", created_by=user)
    client = APIClient()
    client.force_login(user)
    return client


def test_a_token_is_shown_once_and_acts_as_its_owner(signed_in: APIClient) -> None:
    made = signed_in.post(TOKENS, {"name": "ci"}, format="json")

    assert made.status_code == 201
    assert made["Cache-Control"] == "no-store"
    key = made.json()["key"]
    assert key.startswith("fpt_") and made.json()["prefix"] == key[:12]
    assert ApiToken.objects.get(pk=made.json()["id"]).key_hash != key
    listed = signed_in.get(TOKENS).json()["results"]
    assert [t["name"] for t in listed] == ["ci"] and "key" not in listed[0]
    assert "key" not in signed_in.get(f"{TOKENS}{made.json()['id']}/").json()

    projects = APIClient().get("/api/v1/projects/", headers=bearer(key))
    assert projects.status_code == 200
    assert [p["name"] for p in projects.json()["results"]] == ["Alice's Project"]
    assert projects.json()["results"][0]["my_roles"] == ["project_admin"]
    assert ApiToken.objects.get(pk=made.json()["id"]).last_used_at is not None
    # The "Token" scheme is accepted too, for clients written for DRF's TokenAuthentication.
    as_token = APIClient().get("/api/v1/projects/", headers={"Authorization": f"Token {key}"})
    assert as_token.status_code == 200


def test_a_revoked_token_is_refused_on_its_next_request(signed_in: APIClient) -> None:
    made = signed_in.post(TOKENS, {"name": "ci"}, format="json").json()
    script = APIClient()
    assert script.get("/api/v1/projects/", headers=bearer(made["key"])).status_code == 200

    revoked = signed_in.post(f"{TOKENS}{made['id']}/revoke/")

    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    refused = script.get("/api/v1/projects/", headers=bearer(made["key"]))
    assert refused.status_code == 401
    assert refused.json()["code"] == "api_token_invalid"
    assert "revoked" in refused.json()["message"]
    again = signed_in.post(f"{TOKENS}{made['id']}/revoke/")
    assert (again.status_code, again.json()["code"]) == (409, "invalid_transition")


def test_a_token_can_revoke_itself(signed_in: APIClient) -> None:
    made = signed_in.post(TOKENS, {"name": "ci"}, format="json").json()
    script = APIClient()

    assert (
        script.post(f"{TOKENS}{made['id']}/revoke/", headers=bearer(made["key"])).status_code == 200
    )
    assert script.get(TOKENS, headers=bearer(made["key"])).status_code == 401


def test_an_expired_token_is_refused(signed_in: APIClient) -> None:
    soon = timezone.now() + dt.timedelta(hours=1)
    made = signed_in.post(TOKENS, {"name": "ci", "expires_at": soon.isoformat()}, format="json")
    assert made.status_code == 201
    ApiToken.objects.filter(pk=made.json()["id"]).update(
        expires_at=timezone.now() - dt.timedelta(seconds=1)
    )

    refused = APIClient().get(TOKENS, headers=bearer(made.json()["key"]))

    assert (refused.status_code, refused.json()["code"]) == (401, "api_token_invalid")
    assert "expired" in refused.json()["message"]


def test_expiry_in_the_past_or_a_blank_name_is_refused(signed_in: APIClient) -> None:
    past = (timezone.now() - dt.timedelta(hours=1)).isoformat()

    late = signed_in.post(TOKENS, {"name": "ci", "expires_at": past}, format="json")
    blank = signed_in.post(TOKENS, {"name": "  "}, format="json")

    assert (late.status_code, late.json()["field"]) == (400, "expires_at")
    assert (blank.status_code, blank.json()["field"]) == (400, "name")
    assert ApiToken.objects.count() == 0


def test_unknown_or_malformed_credentials_are_refused() -> None:
    unknown = APIClient().get(TOKENS, headers=bearer("fpt_not-a-token"))
    malformed = APIClient().get(TOKENS, headers={"Authorization": "Bearer a b"})
    nothing = APIClient().get(TOKENS)

    assert (unknown.status_code, unknown.json()["code"]) == (401, "api_token_invalid")
    assert (malformed.status_code, malformed.json()["code"]) == (401, "api_token_invalid")
    assert (nothing.status_code, nothing.json()["code"]) == (401, "not_authenticated")
    assert nothing["WWW-Authenticate"].startswith("Bearer")


def test_an_inactive_owner_locks_their_tokens(signed_in: APIClient) -> None:
    made = signed_in.post(TOKENS, {"name": "ci"}, format="json").json()
    ApiToken.objects.get(pk=made["id"]).user.__class__.objects.filter(username="alice").update(
        is_active=False
    )

    refused = APIClient().get(TOKENS, headers=bearer(made["key"]))

    assert (refused.status_code, refused.json()["code"]) == (401, "api_token_invalid")


def test_nobody_sees_another_persons_tokens(signed_in: APIClient) -> None:
    made = signed_in.post(TOKENS, {"name": "ci"}, format="json").json()
    bob = APIClient()
    bob.force_login(UserFactory.create(username="bob"))

    assert bob.get(TOKENS).json()["results"] == []
    assert bob.get(f"{TOKENS}{made['id']}/").status_code == 404
    assert bob.post(f"{TOKENS}{made['id']}/revoke/").status_code == 404
    assert ApiToken.objects.get(pk=made["id"]).revoked_at is None


def test_a_short_lived_token_cannot_mint_a_longer_lived_one(signed_in: APIClient) -> None:
    soon = timezone.now() + dt.timedelta(hours=1)
    short = signed_in.post(TOKENS, {"name": "short", "expires_at": soon.isoformat()}, format="json")
    script = APIClient()
    script.credentials(HTTP_AUTHORIZATION=f"Bearer {short.json()['key']}")

    forever = script.post(TOKENS, {"name": "forever"}, format="json")
    later = (soon + dt.timedelta(days=365)).isoformat()
    longer = script.post(TOKENS, {"name": "longer", "expires_at": later}, format="json")
    explicit_none = script.post(TOKENS, {"name": "none", "expires_at": None}, format="json")
    shorter = script.post(
        TOKENS,
        {"name": "shorter", "expires_at": (soon - dt.timedelta(minutes=5)).isoformat()},
        format="json",
    )

    # Without an expiry, the new token expires with the one that made it.
    assert forever.status_code == 201
    made = ApiToken.objects.get(pk=forever.json()["id"])
    assert made.expires_at == ApiToken.objects.get(name="short").expires_at
    assert explicit_none.status_code == 201
    assert ApiToken.objects.get(pk=explicit_none.json()["id"]).expires_at == made.expires_at
    assert longer.status_code == 400
    assert (longer.json()["code"], longer.json()["field"]) == ("invalid", "expires_at")
    assert not ApiToken.objects.filter(name="longer").exists()
    assert shorter.status_code == 201


def test_a_session_or_a_lasting_token_may_make_a_lasting_token(signed_in: APIClient) -> None:
    lasting = signed_in.post(TOKENS, {"name": "lasting"}, format="json")
    assert lasting.status_code == 201
    assert ApiToken.objects.get(pk=lasting.json()["id"]).expires_at is None
    script = APIClient()
    script.credentials(HTTP_AUTHORIZATION=f"Bearer {lasting.json()['key']}")
    again = script.post(TOKENS, {"name": "again"}, format="json")
    assert again.status_code == 201
    assert ApiToken.objects.get(pk=again.json()["id"]).expires_at is None
