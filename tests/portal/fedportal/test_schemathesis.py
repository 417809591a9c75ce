"""Schemathesis over the OpenAPI schema at /api/schema/: no generated request gets a 5xx.

The schema is loaded from the Django app through WSGI and every operation is called with
requests generated from it, valid ones and invalid ones, as the project admin of the API test
world (with an API token). Half of the cases name real objects in their path (the project's
slug, a site's id…) so that the requests get past the 404 and into the views and services.
Each case runs inside a transaction that is rolled back, so every case meets the same world.
Hypothesis is derandomised and the number of examples bounded, so the run is repeatable and
short.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from django.core.handlers.wsgi import WSGIHandler
from django.core.signals import request_finished, request_started
from django.db import close_old_connections, transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err
from schemathesis.generation.modes import GenerationMode

from tests.portal.api_world import ADMIN, World

pytestmark = pytest.mark.django_db

EXAMPLES_PER_OPERATION = 8


@pytest.fixture
def app() -> Iterator[WSGIHandler]:
    """The portal as a WSGI app, served in this thread and inside the test's transaction.

    Django closes the database connection at the end of each request; in a test that would
    end the test's transaction, so the two signal handlers are disconnected meanwhile, as
    Django's own test client does.
    """
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield WSGIHandler()
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


def real_path_parameters(world: World, path: str) -> dict[str, Any]:
    """Path parameters naming objects that exist in the world, chosen by the path's shape."""
    ids = {
        "organizations": world.org_a.pk,
        "memberships": world.member_membership.pk,
        "invitations": world.invitation_a.pk,
        "sites": world.site_requested.pk if "approve" in path or "deny" in path else None,
        "certificates": world.site_a.certificate.pk,
        "api-tokens": world.api_tokens[ADMIN].pk,
    }
    if ids["sites"] is None:
        ids["sites"] = world.site_a.site.pk
    params: dict[str, Any] = {}
    if "{project}" in path:
        params["project"] = world.project.slug
    match = re.search(r"/([a-z-]+)/\{id\}", path)
    if match and match.group(1) in ids:
        params["id"] = ids[match.group(1)]
    return params


def with_real_organization(world: World, case: Any) -> Any:
    """Name organisation A where a generated body names an organisation, so that requests to
    create sites, memberships and invitations reach the services."""
    if isinstance(case.body, dict) and "organization" in case.body:
        case.body["organization"] = world.org_a.pk
    return case


def test_no_generated_request_gets_a_server_error(sites_world: World, app: WSGIHandler) -> None:
    schema = schemathesis.openapi.from_wsgi("/api/schema/", app)
    auth = {"Authorization": f"Bearer {sites_world.keys[ADMIN]}"}
    operations = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):  # a part of the schema that cannot be read fails the test
            raise result.err()
        operations.append(result.ok())
    assert len(operations) >= 30  # the whole sites API, not an empty schema
    called: list[str] = []

    for operation in operations:
        real = real_path_parameters(sites_world, operation.path)
        strategies = [
            operation.as_strategy(GenerationMode.POSITIVE, headers=auth),
            operation.as_strategy(GenerationMode.NEGATIVE, headers=auth),
        ]
        if real:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                strategy = operation.as_strategy(mode, headers=auth, path_parameters=real)
                strategies.append(
                    strategy.map(lambda case: with_real_organization(sites_world, case))
                )

        @settings(
            max_examples=EXAMPLES_PER_OPERATION * len(strategies),
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=st.one_of(strategies))
        def run(case: Any) -> None:
            with transaction.atomic():
                response = case.call()
                transaction.set_rollback(True)
            case.validate_response(response, checks=[not_a_server_error])

        run()
        called.append(f"{operation.method.upper()} {operation.path}")

    assert "POST /api/v1/enrol/" in called and "GET /api/v1/agent/whoami/" in called
