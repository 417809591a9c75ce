"""Access that ends closes the WebSockets it opened, through the real routes: a person who signs
out, is removed from the project, is deactivated or loses the superuser status that let them
see it stops receiving the job's events; an agent whose certificate is superseded by a
re-enrolment or revoked is closed and hears nothing more; a newer connection of a site replaces
the older one; and a person holds at most FEDPORTAL_MAX_SOCKETS_PER_USER dashboard sockets."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
from typing import Any

import channels.consumer
import pytest
import torch
from asgiref.sync import async_to_sync, sync_to_async
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client
from django.utils import timezone

from client_agent import signing
from client_agent.protocol import CLOSE_REPLACED, CLOSE_REVOKED, UpdateMessage
from dashboard.consumers import CLOSE_NOT_FOUND, CLOSE_SIGNED_OUT, CLOSE_TOO_MANY
from fedportal import sockets
from fedportal.routing import websocket_urlpatterns
from jobs import consumers as agent_consumers
from jobs.models import SiteTask, TaskState
from jobs.services.participation import job_abort
from jobs.services.telemetry import metrics_record
from sites import services, signed_cache
from sites.authentication import SiteIdentity, identity_check
from sites.models import Membership, Site
from sites.selectors import site_is_online
from tests.portal import jobs_api_world as jw
from tests.portal.factories import EnrolledSite, UserFactory, creator_of

pytestmark = pytest.mark.django_db(transaction=True)

APP = URLRouter(websocket_urlpatterns)
AGENT_PATH = "/ws/agent/"


def signed_in(user: Any) -> tuple[Client, list[tuple[bytes, bytes]]]:
    """A browser: its Django client (same session) and the headers its page's socket sends."""
    client = Client()
    client.force_login(user)
    cookie = client.cookies[settings.SESSION_COOKIE_NAME].value
    headers = [
        (b"origin", b"http://localhost"),
        (b"cookie", f"{settings.SESSION_COOKIE_NAME}={cookie}".encode()),
    ]
    return client, headers


async def open_socket(path: str, headers: list[tuple[bytes, bytes]]) -> WebsocketCommunicator:
    socket = WebsocketCommunicator(APP, path, headers=headers)
    connected, code = await socket.connect()
    assert connected, code
    return socket


async def greeted(path: str, headers: list[tuple[bytes, bytes]]) -> WebsocketCommunicator:
    """A dashboard socket, open, past its ``hello``."""
    socket = await open_socket(path, headers)
    assert (await socket.receive_json_from())["kind"] == "hello"
    return socket


async def closed_with(socket: WebsocketCommunicator) -> tuple[dict[str, Any], int]:
    """The last message before the close, and the close code."""
    said = await socket.receive_json_from(timeout=3)
    close = await socket.receive_output(timeout=3)
    assert close["type"] == "websocket.close", close
    return said, close["code"]


async def post_metric(jobs_world: jw.World, value: float) -> None:
    assert jobs_world.job is not None
    await database_sync_to_async(metrics_record)(
        job=jobs_world.job, site=jobs_world.sites[0].site, points=[{"key": "loss", "value": value}]
    )


def job_path(jobs_world: jw.World) -> str:
    assert jobs_world.job is not None
    return f"/ws/dashboard/jobs/{jobs_world.job.uid}/"


# --- people ---------------------------------------------------------------------------------


def test_signing_out_closes_the_sockets_of_that_session_only(jobs_world: jw.World) -> None:
    lead = jobs_world.users[jw.LEAD]
    browser, headers = signed_in(lead)
    _, other_headers = signed_in(lead)  # the same person signed in on another machine

    async def run() -> None:
        socket = await greeted(job_path(jobs_world), headers)
        other = await greeted(job_path(jobs_world), other_headers)

        response = await sync_to_async(browser.post)("/logout/")
        assert response.status_code == 302

        said, code = await closed_with(socket)
        assert code == CLOSE_SIGNED_OUT and said["code"] == "signed_out"
        await post_metric(jobs_world, 0.5)
        assert (await other.receive_json_from(timeout=3))["kind"] == "metrics"
        await other.disconnect()

    async_to_sync(run)()


def test_removed_from_the_project_the_socket_closes_and_hears_nothing_more(
    jobs_world: jw.World,
) -> None:
    member = jobs_world.users[jw.MEMBER]
    _, headers = signed_in(member)
    membership = Membership.objects.get(user=member)

    async def run() -> None:
        socket = await greeted(job_path(jobs_world), headers)
        await database_sync_to_async(services.membership_remove)(
            membership=membership, removed_by=jobs_world.users[jw.ADMIN]
        )
        said, code = await closed_with(socket)
        assert code == CLOSE_NOT_FOUND and said["code"] == "access_lost"
        await post_metric(jobs_world, 0.5)
        assert await socket.receive_nothing(timeout=0.3)

    async_to_sync(run)()


def test_a_role_change_that_keeps_the_project_visible_keeps_the_socket(
    jobs_world: jw.World,
) -> None:
    member = jobs_world.users[jw.MEMBER]
    _, headers = signed_in(member)
    membership = Membership.objects.get(user=member)

    async def run() -> None:
        socket = await greeted(job_path(jobs_world), headers)
        await database_sync_to_async(services.membership_update_role)(
            membership=membership, role="lead", updated_by=jobs_world.users[jw.ADMIN]
        )
        await post_metric(jobs_world, 0.5)
        assert (await socket.receive_json_from(timeout=3))["kind"] == "metrics"
        await socket.disconnect()

    async_to_sync(run)()


def test_a_superuser_who_loses_the_status_that_let_them_see_the_job_is_closed(
    jobs_world: jw.World,
) -> None:
    root = UserFactory.create(username="root", is_superuser=True, is_staff=True)
    _, headers = signed_in(root)

    async def run() -> None:
        socket = await greeted(job_path(jobs_world), headers)

        def demote() -> None:  # as the admin's user form saves it
            root.is_superuser = False
            root.save()

        await database_sync_to_async(demote)()
        said, code = await closed_with(socket)
        assert code == CLOSE_NOT_FOUND and said["code"] == "access_lost"

    async_to_sync(run)()


def test_a_deactivated_account_is_signed_out_of_its_sockets(jobs_world: jw.World) -> None:
    lead = jobs_world.users[jw.LEAD]
    _, headers = signed_in(lead)

    async def run() -> None:
        socket = await greeted(f"/ws/dashboard/projects/{jobs_world.project.slug}/", headers)

        def deactivate() -> None:
            lead.is_active = False
            lead.save()

        await database_sync_to_async(deactivate)()
        said, code = await closed_with(socket)
        assert code == CLOSE_SIGNED_OUT and said["code"] == "signed_out"

    async_to_sync(run)()


def test_access_lost_without_an_event_stops_the_stream_at_the_next_check(
    jobs_world: jw.World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The safety net: a membership deleted behind the services' back sends no event; the
    socket checks again before forwarding the next event and closes instead."""
    monkeypatch.setattr(sockets, "EVENT_RECHECK_SECONDS", 0.0)
    member = jobs_world.users[jw.MEMBER]
    _, headers = signed_in(member)

    async def run() -> None:
        socket = await greeted(job_path(jobs_world), headers)
        await database_sync_to_async(Membership.objects.filter(user=member).delete)()
        await post_metric(jobs_world, 0.5)
        said, code = await closed_with(socket)
        assert code == CLOSE_NOT_FOUND and said["kind"] == "closed"

    async_to_sync(run)()


def test_an_idle_socket_checks_again_on_its_own(jobs_world: jw.World, settings: Any) -> None:
    settings.FEDPORTAL_SOCKET_RECHECK_SECONDS = 0.2
    member = jobs_world.users[jw.MEMBER]
    _, headers = signed_in(member)

    async def run() -> None:
        socket = await greeted(job_path(jobs_world), headers)
        await database_sync_to_async(Membership.objects.filter(user=member).delete)()
        said, code = await closed_with(socket)
        assert code == CLOSE_NOT_FOUND

    async_to_sync(run)()


def test_a_person_holds_at_most_the_configured_number_of_sockets(
    jobs_world: jw.World, settings: Any
) -> None:
    settings.FEDPORTAL_MAX_SOCKETS_PER_USER = 2
    lead = jobs_world.users[jw.LEAD]
    _, headers = signed_in(lead)
    _, admin_headers = signed_in(jobs_world.users[jw.ADMIN])

    async def run() -> None:
        first = await greeted(job_path(jobs_world), headers)
        second = await greeted(f"/ws/dashboard/projects/{jobs_world.project.slug}/", headers)

        third = await open_socket(job_path(jobs_world), headers)
        said, code = await closed_with(third)
        assert code == CLOSE_TOO_MANY and said["code"] == "too_many_sockets"
        # Someone else is not counted against the lead.
        admins = await greeted(job_path(jobs_world), admin_headers)

        await first.disconnect()
        again = await greeted(job_path(jobs_world), headers)
        for socket in (second, admins, again):
            await socket.disconnect()
        assert await sockets.socket_count(lead.pk) == 0

    async_to_sync(run)()


def test_claims_of_a_portal_process_that_died_lapse(jobs_world: jw.World, settings: Any) -> None:
    settings.FEDPORTAL_MAX_SOCKETS_PER_USER = 2
    settings.FEDPORTAL_SOCKET_RECHECK_SECONDS = 0.1  # claims live 0.3 s unrenewed
    lead = jobs_world.users[jw.LEAD]
    _, headers = signed_in(lead)

    async def run() -> None:
        # Two sockets of a process that was killed: never released, never renewed.
        assert await sockets.socket_claim(lead.pk, "dead-process!a")
        assert await sockets.socket_claim(lead.pk, "dead-process!b")
        refused = await open_socket(job_path(jobs_world), headers)
        assert (await closed_with(refused))[1] == CLOSE_TOO_MANY
        await asyncio.sleep(0.4)
        socket = await greeted(job_path(jobs_world), headers)
        await socket.disconnect()

    async_to_sync(run)()


# --- site agents ----------------------------------------------------------------------------


def agent_headers(agent: EnrolledSite) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode(), v.encode()) for k, v in agent.headers("GET", AGENT_PATH).items()]


async def open_agent(agent: EnrolledSite) -> WebsocketCommunicator:
    socket = await open_socket(AGENT_PATH, agent_headers(agent))
    assert (await socket.receive_json_from())["type"] == "welcome"
    return socket


def re_enrolled(old: EnrolledSite) -> EnrolledSite:
    site = old.site
    _, token = services.enrolment_token_reissue(site=site, issued_by=creator_of(site.project))
    key = signing.generate_key()
    enrolment = services.site_enrol(
        token=token, csr_pem=signing.make_csr(key, site.name, site.project.name)
    )
    site.refresh_from_db()
    return EnrolledSite(site, key, enrolment.certificate, enrolment.ca_certificate_pem)


def fresh(site: Site) -> Site:
    return Site.objects.get(pk=site.pk)


def test_re_enrolment_closes_the_old_agents_socket_and_it_hears_nothing_more(
    jobs_world: jw.World,
) -> None:
    old = jobs_world.sites[0]

    async def run() -> None:
        socket = await open_agent(old)
        new = await database_sync_to_async(re_enrolled)(old)
        said, code = await closed_with(socket)
        assert code == CLOSE_REVOKED and said["code"] == "certificate_revoked"
        assert not await database_sync_to_async(lambda: site_is_online(fresh(old.site)))()

        # The new certificate's agent connects, is online, and hears the job's events.
        replacement = await open_agent(new)
        assert await database_sync_to_async(lambda: site_is_online(fresh(old.site)))()
        assert jobs_world.job is not None
        await database_sync_to_async(abort)(jobs_world)
        assert (await replacement.receive_json_from(timeout=3))["type"] == "event"
        assert await socket.receive_nothing(timeout=0.3)
        await replacement.disconnect()

    async_to_sync(run)()


def abort(jobs_world: jw.World) -> None:
    """A job state change: it goes to the job's sites' agents."""
    assert jobs_world.job is not None
    job_abort(job=jobs_world.job, actor=None, reason="test")


def test_a_revoked_certificate_closes_the_socket_and_the_site_is_offline_at_once(
    jobs_world: jw.World,
) -> None:
    agent = jobs_world.sites[0]
    _, headers = signed_in(jobs_world.users[jw.MEMBER])

    async def run() -> None:
        page = await greeted(job_path(jobs_world), headers)
        socket = await open_agent(agent)
        online = await page.receive_json_from(timeout=3)
        assert (online["kind"], online["site"], online["online"]) == ("site.status", "site-1", True)

        await database_sync_to_async(services.certificate_revoke)(
            certificate=agent.certificate,
            reason="key leaked",
            revoked_by=jobs_world.users[jw.ADMIN],
        )
        said, code = await closed_with(socket)
        assert code == CLOSE_REVOKED and "key leaked" in said["message"]
        offline = await page.receive_json_from(timeout=3)
        assert (offline["kind"], offline["site"], offline["online"]) == (
            "site.status",
            "site-1",
            False,
        )
        assert not await database_sync_to_async(lambda: site_is_online(fresh(agent.site)))()
        await page.disconnect()

    async_to_sync(run)()


def test_an_agent_that_disconnects_is_offline_at_once_and_its_job_page_is_told(
    jobs_world: jw.World,
) -> None:
    agent = jobs_world.sites[1]
    _, headers = signed_in(jobs_world.users[jw.LEAD])

    async def run() -> None:
        page = await greeted(job_path(jobs_world), headers)
        socket = await open_agent(agent)
        assert (await page.receive_json_from(timeout=3))["online"] is True
        await socket.disconnect()
        event = await page.receive_json_from(timeout=3)
        assert (event["kind"], event["site"], event["online"]) == ("site.status", "site-2", False)
        site = await database_sync_to_async(fresh)(agent.site)
        # Heard from seconds ago, yet offline: the socket is gone.
        assert site.last_heartbeat is not None
        assert timezone.now() - site.last_heartbeat < dt.timedelta(seconds=30)
        assert not site_is_online(site)
        await page.disconnect()

    async_to_sync(run)()


def test_a_newer_connection_of_the_site_replaces_the_older_one(jobs_world: jw.World) -> None:
    agent = jobs_world.sites[2]

    async def run() -> None:
        first = await open_agent(agent)
        second = await open_agent(agent)
        said, code = await closed_with(first)
        assert code == CLOSE_REPLACED and said["code"] == "connection_replaced"
        await first.disconnect()
        # The older socket's close does not make the site offline: the newer one is live.
        site = await database_sync_to_async(fresh)(agent.site)
        assert site_is_online(site)
        await second.disconnect()
        assert not site_is_online(await database_sync_to_async(fresh)(agent.site))

    async_to_sync(run)()


def revoke_without_event(agent: EnrolledSite) -> None:
    """Revoke the agent's certificate by saving it, not through the service that sends
    ``site.revoked`` (the event that closes its socket at once)."""
    certificate = type(agent.certificate).objects.get(pk=agent.certificate.pk)
    certificate.revoked_at = timezone.now()
    certificate.save(update_fields=["revoked_at"])


def test_an_agent_socket_that_only_receives_checks_its_certificate_before_an_event(
    jobs_world: jw.World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A certificate revoked without its event (saved, not through the service that sends
    ``site.revoked``): the next event the socket would forward makes it check the certificate
    again, through the cache of verified certificates that the save made stale, and it closes
    instead."""
    monkeypatch.setattr(agent_consumers, "RECHECK_SECONDS", 0.0)
    agent = jobs_world.sites[0]

    async def run() -> None:
        socket = await open_agent(agent)

        await database_sync_to_async(revoke_without_event)(agent)
        await database_sync_to_async(abort)(jobs_world)
        said, code = await closed_with(socket)
        assert code == CLOSE_REVOKED and said["code"] == "certificate_revoked"

    async_to_sync(run)()


def test_an_update_on_the_socket_of_a_certificate_revoked_without_its_event_is_refused(
    jobs_world: jw.World, media: Any
) -> None:
    """As an upload's signature is checked on every request, an update on the socket is taken
    only from a certificate that holds now: revoked a moment after its socket's last check,
    and without the event that closes the socket, the update is refused, the socket closed."""
    agent = jobs_world.sites[0]
    assert jobs_world.job is not None
    data = jw.update_bytes({"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(1)}, jobs_world.tmp)
    update = UpdateMessage(
        job=str(jobs_world.job.uid),
        round=0,
        sha256=hashlib.sha256(data).hexdigest(),
        data=data,
        id="u1",
    )

    async def run() -> None:
        socket = await open_agent(agent)

        await database_sync_to_async(revoke_without_event)(agent)
        await socket.send_json_to(update.to_json())
        said, code = await closed_with(socket)
        assert code == CLOSE_REVOKED and said["code"] == "certificate_revoked"

    async_to_sync(run)()

    task = SiteTask.objects.get(round__job=jobs_world.job, round__number=0, site=agent.site)
    assert task.state == TaskState.ASSIGNED and not task.update


def test_the_sockets_passing_on_one_event_share_one_read_of_the_generation(
    jobs_world: jw.World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every site's socket is due a check before the job's event: one read of the generation
    of verified certificates serves them all, and none checks its certificate in full (a
    hundred had gone one after the other through the sockets' one database thread)."""
    monkeypatch.setattr(agent_consumers, "RECHECK_SECONDS", 0.0)
    reads: list[str] = []
    full_checks: list[SiteIdentity] = []

    def generation() -> str:
        reads.append(current := generation_read())
        return current

    def full_check(identity: SiteIdentity) -> SiteIdentity:
        full_checks.append(identity)
        return identity_check(identity)

    generation_read = signed_cache.generation
    monkeypatch.setattr(signed_cache, "generation", generation)
    monkeypatch.setattr(agent_consumers, "identity_check", full_check)

    async def run() -> list[dict[str, Any]]:
        sockets_ = [await open_agent(agent) for agent in jobs_world.sites]
        reads.clear()
        await database_sync_to_async(abort)(jobs_world)
        heard = [await socket.receive_json_from(timeout=5) for socket in sockets_]
        for socket in sockets_:
            await socket.disconnect()
        return heard

    heard = async_to_sync(run)()

    assert [event["event"]["kind"] for event in heard] == ["job.state"] * len(jobs_world.sites)
    assert len(jobs_world.sites) == 3
    assert (len(reads), len(full_checks)) == (1, 0)


def test_a_revocation_behind_the_services_back_closes_the_agent_socket_at_the_periodic_check(
    jobs_world: jw.World, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    """A queryset update starts no new generation of the cache, so messages and events, which
    check through the cache, still pass; the periodic check reads the database and closes the
    socket."""
    monkeypatch.setattr(agent_consumers, "RECHECK_SECONDS", 0.0)
    settings.FEDPORTAL_SOCKET_RECHECK_SECONDS = 0.3
    agent = jobs_world.sites[0]

    async def run() -> None:
        socket = await open_agent(agent)

        def revoke_quietly() -> None:
            type(agent.certificate).objects.filter(pk=agent.certificate.pk).update(
                revoked_at=timezone.now()
            )

        await database_sync_to_async(revoke_quietly)()
        await socket.send_json_to({"type": "heartbeat", "id": "h1"})
        assert await socket.receive_json_from(timeout=2) == {"type": "ack", "id": "h1"}
        said, code = await closed_with(socket)
        assert code == CLOSE_REVOKED and said["code"] == "certificate_revoked"

    async_to_sync(run)()


def test_the_sockets_pass_messages_on_without_a_trip_to_the_database_thread(
    jobs_world: jw.World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Channels' own dispatch first sends every message to the thread of thread-sensitive work
    to close old database connections; the portal's consumers do their database work through
    ``database_sync_to_async`` (which does that itself) and dispatch at once."""
    trips: list[str] = []

    async def counted() -> None:
        trips.append("aclose_old_connections")

    monkeypatch.setattr(channels.consumer, "aclose_old_connections", counted)
    member = jobs_world.users[jw.MEMBER]
    _, headers = signed_in(member)

    async def run() -> None:
        page = await greeted(job_path(jobs_world), headers)
        agent = await open_agent(jobs_world.sites[0])
        await agent.send_json_to({"type": "heartbeat"})
        await post_metric(jobs_world, 0.5)  # an event for the page
        kinds = [(await page.receive_json_from(timeout=3))["kind"] for _ in range(2)]
        assert kinds == ["site.status", "metrics"], kinds  # the agent came online, the point
        await agent.disconnect()
        await page.disconnect()

    async_to_sync(run)()

    assert trips == []
