"""Guessing is throttled: passwords on the sign-in pages (by account and by address), API
tokens, and enrolment tokens on the anonymous enrolment endpoints."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest
from axes.models import AccessAttempt
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from fedportal.throttling import CredentialFailures, EnrolThrottle
from sites import services
from tests.portal.factories import UserFactory

pytestmark = pytest.mark.django_db

PASSWORD = "the-right-password-42"


@pytest.fixture
def alice() -> Any:
    user = UserFactory.create(username="alice", is_staff=True)
    user.set_password(PASSWORD)
    user.save()
    return user


def sign_in(path: str, username: str, password: str, address: str = "10.0.0.1") -> Any:
    client = Client(REMOTE_ADDR=address)
    return client, client.post(path, {"username": username, "password": password})


def signed_in(client: Client) -> bool:
    return "_auth_user_id" in client.session


@pytest.mark.parametrize("path", ["/login/", "/admin/login/"])
def test_the_sixth_password_for_an_account_is_refused_even_when_right(
    alice: Any, path: str
) -> None:
    answers = [
        sign_in(path, "alice", f"wrong-{attempt}", f"10.0.0.{attempt + 1}")[1].status_code
        for attempt in range(5)
    ]
    # The form again, with its error; the fifth wrong password locks the account.
    assert answers == [200, 200, 200, 200, 429]

    client, refused = sign_in(path, "alice", PASSWORD, "10.9.9.9")

    assert refused.status_code == 429
    assert not signed_in(client)
    assert int(refused["Retry-After"]) == 15 * 60
    assert re.search(r"for 15 minutes", refused.content.decode())

    # After the cool-off, the right password works again.
    AccessAttempt.objects.update(attempt_time=timezone.now() - dt.timedelta(minutes=16))
    client, welcome = sign_in(path, "alice", PASSWORD, "10.9.9.9")
    assert welcome.status_code == 302
    assert signed_in(client)


def test_an_address_trying_many_accounts_is_throttled(alice: Any) -> None:
    answers = [
        sign_in("/login/", f"someone-{index}", "guess", "10.6.6.6")[1].status_code
        for index in range(20)
    ]
    assert answers == [200] * 19 + [429]

    client, refused = sign_in("/login/", "alice", PASSWORD, "10.6.6.6")
    assert refused.status_code == 429
    assert not signed_in(client)
    # Alice herself, from her own address, is not locked out by someone else's spraying.
    client, welcome = sign_in("/login/", "alice", PASSWORD, "10.1.2.3")
    assert welcome.status_code == 302
    assert signed_in(client)


def test_a_few_typos_do_not_lock_anyone_out(alice: Any) -> None:
    for attempt in range(4):
        sign_in("/login/", "alice", f"typo-{attempt}")
    client, welcome = sign_in("/login/", "alice", PASSWORD)
    assert welcome.status_code == 302
    # A success clears the account's count: four more typos are again not a lockout.
    for attempt in range(4):
        sign_in("/login/", "alice", f"typo-{attempt}")
    client, again = sign_in("/login/", "alice", PASSWORD)
    assert again.status_code == 302


def test_wrong_api_tokens_from_one_address_are_throttled_with_a_json_429(alice: Any) -> None:
    _, key = services.api_token_create(user=alice, name="script")
    guesser = APIClient(REMOTE_ADDR="10.7.7.7")
    for index in range(20):
        response = guesser.get("/api/v1/projects/", HTTP_AUTHORIZATION=f"Bearer fpt_guess{index}")
        assert response.status_code == 401

    refused = guesser.get("/api/v1/projects/", HTTP_AUTHORIZATION=f"Bearer {key}")

    assert refused.status_code == 429
    body = refused.json()
    assert body["code"] == "throttled"
    wait = int(refused["Retry-After"])
    assert 0 < wait <= 600
    assert body["retry_after_seconds"] == wait
    assert f"Try again in {wait} s" in body["message"]
    elsewhere = APIClient(REMOTE_ADDR="10.8.8.8")
    assert elsewhere.get("/api/v1/projects/", HTTP_AUTHORIZATION=f"Bearer {key}").status_code == 200


@pytest.mark.parametrize("path", ["/api/v1/enrol/", "/api/v1/enrol/check/"])
def test_guessed_enrolment_tokens_are_throttled(path: str) -> None:
    guesser = APIClient(REMOTE_ADDR="10.5.5.5")
    body = {"token": "fpe_guess", "csr_pem": "-----BEGIN CERTIFICATE REQUEST-----"}
    for _ in range(20):
        assert guesser.post(path, body, format="json").status_code == 400

    refused = guesser.post(path, body, format="json")

    assert refused.status_code == 429
    assert refused.json()["code"] == "throttled"
    assert "Try again in" in refused.json()["message"]
    other = APIClient(REMOTE_ADDR="10.5.5.6")
    assert other.post(path, body, format="json").status_code == 400


def test_the_enrolment_endpoints_are_rate_limited_per_address(monkeypatch: Any) -> None:
    monkeypatch.setattr(
        EnrolThrottle, "THROTTLE_RATES", {**EnrolThrottle.THROTTLE_RATES, "enrol": "3/minute"}
    )
    client = APIClient(REMOTE_ADDR="10.4.4.4")
    answers = [client.post("/api/v1/enrol/check/", {}, format="json").status_code for _ in range(4)]
    assert answers == [400, 400, 400, 429]


def test_rates_may_name_a_multiple_of_their_unit() -> None:
    throttle = CredentialFailures()
    assert throttle.parse_rate("20/10minute") == (20, 600)
    assert throttle.parse_rate("5/hour") == (5, 3600)
    with pytest.raises(ValueError, match="not like"):
        throttle.parse_rate("five a minute")
