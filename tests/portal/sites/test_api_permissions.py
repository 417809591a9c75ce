"""The permission matrix: every endpoint and method of the sites API, called by every persona.

Each row is one endpoint and method, with a body that would succeed for someone allowed, and
the status each persona gets. Adding an endpoint means adding a row; a row left out fails
``test_every_endpoint_and_method_has_a_row``. The rules, after NVFlare's default policy:

- project admin: everything in the project; org admin: their organisation's members and
  sites; lead and member: read. Anonymous: 401 everywhere but the enrolment exchange.
- Another project's objects: 404, as if they did not exist. An object one can see but not act
  on: 403.
- Site agents reach only agent endpoints (people endpoints answer their signature with 401),
  and people never reach agent endpoints.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from django.db import transaction
from django.urls import URLPattern, resolve

from tests.portal.api_world import (
    ADMIN,
    AGENT_A,
    AGENT_B,
    ANONYMOUS,
    LEAD,
    MEMBER,
    ORG_ADMIN_A,
    ORG_ADMIN_B,
    OUTSIDER,
    PERSONAS,
    World,
    build_world,
)

pytestmark = pytest.mark.django_db

Expect = dict[str, int]


def expect(
    admin: int,
    org_admin_a: int,
    org_admin_b: int,
    lead: int,
    member: int,
    outsider: int,
    anonymous: int = 401,
    agents: int = 401,
) -> Expect:
    return {
        ADMIN: admin,
        ORG_ADMIN_A: org_admin_a,
        ORG_ADMIN_B: org_admin_b,
        LEAD: lead,
        MEMBER: member,
        OUTSIDER: outsider,
        ANONYMOUS: anonymous,
        AGENT_A: agents,
        AGENT_B: agents,
    }


def everyone_in_p(ok: int) -> Expect:
    """Readable by every member of project P; the outsider does not see it exists."""
    return expect(ok, ok, ok, ok, ok, 404)


def p_admin(ok: int) -> Expect:
    """Visible to P's members, changed by its project admin only."""
    return expect(ok, 403, 403, 403, 403, 404)


def org_a_admins(ok: int) -> Expect:
    """Organisation A's business: its org admin and the project admin."""
    return expect(ok, ok, 403, 403, 403, 404)


def only_a_admins_see(ok: int) -> Expect:
    """Hidden from everyone but organisation A's admins (invitations)."""
    return expect(ok, ok, 404, 404, 404, 404)


def any_person(ok: int) -> Expect:
    return expect(ok, ok, ok, ok, ok, ok)


def own_token(ok: int) -> Expect:
    """The project admin's own API token: nobody else sees it."""
    return expect(ok, 404, 404, 404, 404, 404)


def nobody_sees(_: int = 0) -> Expect:
    return expect(404, 404, 404, 404, 404, 404)


@dataclass(frozen=True)
class Row:
    method: str
    path: str  # formatted with World.ids()
    expected: Expect
    body: dict[str, Any] | None = None

    def id(self) -> str:
        return f"{self.method} {self.path}"


ROWS: list[Row] = [
    # projects
    Row("GET", "/api/v1/projects/", any_person(200)),
    # Creating projects needs a superuser or the sites.add_project permission (test_api_behaviour).
    Row("POST", "/api/v1/projects/", any_person(403), {"name": "Brand New"}),
    Row("GET", "{p}/", everyone_in_p(200)),
    Row("PATCH", "{p}/", p_admin(200), {"description": "new words"}),
    Row("GET", "{q}/", expect(404, 404, 404, 404, 404, 200)),
    Row("PATCH", "{q}/", expect(404, 404, 404, 404, 404, 200), {"description": "x"}),
    # organisations
    Row("GET", "{p}/organizations/", everyone_in_p(200)),
    Row("POST", "{p}/organizations/", p_admin(201), {"name": "Org C"}),
    Row("GET", "{p}/organizations/{org_a}/", everyone_in_p(200)),
    Row("PATCH", "{p}/organizations/{org_a}/", p_admin(200), {"name": "Org A2"}),
    # memberships
    Row("GET", "{p}/memberships/", everyone_in_p(200)),
    Row(
        "POST",
        "{p}/memberships/",
        org_a_admins(201),
        {"organization": "{org_a}", "username": "{colleague}", "role": "member"},
    ),
    Row("GET", "{p}/memberships/{membership}/", everyone_in_p(200)),
    Row("PATCH", "{p}/memberships/{membership}/", org_a_admins(200), {"role": "lead"}),
    Row("DELETE", "{p}/memberships/{membership}/", org_a_admins(204)),
    # invitations
    Row("GET", "{p}/invitations/", everyone_in_p(200)),
    Row(
        "POST",
        "{p}/invitations/",
        org_a_admins(201),
        {"organization": "{org_a}", "email": "new@example.org", "role": "lead"},
    ),
    Row("GET", "{p}/invitations/{invitation}/", only_a_admins_see(200)),
    Row("POST", "{p}/invitations/{invitation}/revoke/", only_a_admins_see(200)),
    # Anyone signed in may accept an invitation; this token is unknown, hence 400.
    Row("POST", "/api/v1/invitations/accept/", any_person(400), {"token": "fpi_unknown"}),
    # sites
    Row("GET", "{p}/sites/", everyone_in_p(200)),
    Row(
        "POST",
        "{p}/sites/",
        org_a_admins(201),
        {"organization": "{org_a}", "name": "site-new", "contact_email": "ops@a.example.org"},
    ),
    Row("GET", "{p}/sites/{site_a}/", everyone_in_p(200)),
    Row("PATCH", "{p}/sites/{site_a}/", org_a_admins(200), {"contact_email": "new@a.example"}),
    Row("POST", "{p}/sites/{site_r}/approve/", p_admin(200)),
    Row("POST", "{p}/sites/{site_r}/deny/", p_admin(200), {"reason": "unknown hospital"}),
    Row("POST", "{p}/sites/{site_a}/enrolment-token/", p_admin(201)),
    Row("POST", "{p}/sites/{site_a}/revoke/", p_admin(200), {"reason": "left the project"}),
    # another project's site through this project's URL, and the other way round
    Row("GET", "{p}/sites/{site_q}/", nobody_sees()),
    Row("POST", "{p}/sites/{site_q}/revoke/", nobody_sees(), {"reason": "x"}),
    Row("GET", "{q}/sites/{site_a}/", nobody_sees()),
    # certificates
    Row("GET", "{p}/certificates/", everyone_in_p(200)),
    Row("GET", "{p}/certificates/{cert_a}/", everyone_in_p(200)),
    Row("POST", "{p}/certificates/{cert_a}/revoke/", p_admin(200), {"reason": "key lost"}),
    Row("POST", "{p}/certificates/{cert_q}/revoke/", nobody_sees(), {"reason": "x"}),
    # audit events
    Row("GET", "{p}/audit-events/", everyone_in_p(200)),
    Row("GET", "/api/v1/audit-events/", any_person(200)),
    # API tokens: one's own only
    Row("GET", "/api/v1/api-tokens/", any_person(200)),
    Row("POST", "/api/v1/api-tokens/", any_person(201), {"name": "ci"}),
    Row("GET", "/api/v1/api-tokens/{admin_token}/", own_token(200)),
    Row("POST", "/api/v1/api-tokens/{admin_token}/revoke/", own_token(200)),
    # agents: the enrolment exchange takes no credentials (this token is unknown: 400) …
    Row(
        "POST",
        "/api/v1/enrol/",
        expect(400, 400, 400, 400, 400, 400, anonymous=400, agents=400),
        {"token": "fpe_unknown", "csr_pem": "not a CSR"},
    ),
    Row(
        "POST",
        "/api/v1/enrol/check/",
        expect(400, 400, 400, 400, 400, 400, anonymous=400, agents=400),
        {"token": "fpe_unknown"},
    ),
    # … and whoami takes a site signature only.
    Row("GET", "/api/v1/agent/whoami/", expect(401, 401, 401, 401, 401, 401, agents=200)),
    Row("GET", "/api/v1/agent/privacy-policy/", expect(401, 401, 401, 401, 401, 401, agents=200)),
    Row(
        "POST",
        "/api/v1/agent/privacy-policy/",
        expect(401, 401, 401, 401, 401, 401, agents=400),
        {"policy": "x"},
    ),
]


def _fill(value: Any, ids: dict[str, Any]) -> Any:
    """Format ``{name}`` placeholders; a string that is only a placeholder keeps its type."""
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    if isinstance(value, str):
        if value.startswith("{") and value.endswith("}") and value[1:-1] in ids:
            return ids[value[1:-1]]
        return value.format(**ids)
    return value


@pytest.fixture(scope="module")
def matrix_world(django_db_setup: None, django_db_blocker: Any) -> Iterator[World]:
    """One world for the whole matrix, built once inside a transaction that is rolled back
    after the last row. Each test runs in a savepoint inside it (pytest-django's own
    per-test transaction), so whatever a row changes is undone before the next row."""
    with django_db_blocker.unblock(), transaction.atomic():
        yield build_world()
        transaction.set_rollback(True)


CASES = [
    pytest.param(row, persona, id=f"{row.id()} as {persona}")
    for row in ROWS
    for persona in PERSONAS
]


@pytest.mark.parametrize(("row", "persona"), CASES)
def test_permission_matrix(matrix_world: World, row: Row, persona: str) -> None:
    ids = matrix_world.ids()
    path = _fill(row.path, ids)
    response = matrix_world.call(persona, row.method, path, _fill(row.body, ids))

    expected = row.expected[persona]
    assert response.status_code == expected, (persona, row.id(), response.content[:300])
    if expected >= 400:
        body = response.json()
        assert isinstance(body.get("code"), str) and isinstance(body.get("message"), str), body


def _api_routes() -> set[tuple[str, str]]:
    """(method, route) of every view under /api/v1/ from the sites app's URLconf."""
    from sites.api import urls

    routes: set[tuple[str, str]] = set()
    for pattern in urls.urlpatterns:
        assert isinstance(pattern, URLPattern)
        view_class: Any = pattern.callback.view_class  # type: ignore[attr-defined]
        for method in ("get", "post", "patch", "put", "delete"):
            if hasattr(view_class, method):
                routes.add((method.upper(), str(pattern.pattern)))
    return routes


def _row_route(row: Row) -> str:
    path = _fill(row.path, {**_PLACEHOLDER_IDS})
    match = resolve(path)
    return str(match.route).removeprefix("api/v1/")


_PLACEHOLDER_IDS: dict[str, Any] = {
    "p": "/api/v1/projects/p",
    "q": "/api/v1/projects/q",
    **{
        name: 1
        for name in (
            "org_a",
            "org_b",
            "host",
            "site_a",
            "site_b",
            "site_r",
            "site_q",
            "cert_a",
            "cert_q",
            "membership",
            "invitation",
            "admin_token",
        )
    },
    "newcomer": "newcomer",
}


def test_every_endpoint_and_method_has_a_row() -> None:
    routes = _api_routes()
    assert routes
    covered = {(row.method, _row_route(row)) for row in ROWS}
    missing = routes - covered
    assert not missing, f"add permission matrix rows for {sorted(missing)}"


def test_every_row_names_every_persona() -> None:
    assert ROWS
    for row in ROWS:
        assert set(row.expected) == set(PERSONAS), row.id()
