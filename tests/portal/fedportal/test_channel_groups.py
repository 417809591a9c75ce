"""A channel leaves its groups ``group_expiry`` seconds after it last joined them (the
channels of a portal process that died stop receiving events in minutes, not a day), while
the sockets that live join again at every recheck and keep hearing their events."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from fedportal.events import MESSAGE_TYPE, site_group
from tests.portal import jobs_api_world as jw
from tests.portal.fedportal.test_socket_access import greeted, job_path, open_agent, signed_in

pytestmark = pytest.mark.django_db(transaction=True)

EXPIRY = 1  # seconds, for the test's layer


@pytest.fixture
def short_lived_groups(settings: Any) -> None:
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels.layers.InMemoryChannelLayer",
            "CONFIG": {"group_expiry": EXPIRY},
        }
    }
    settings.FEDPORTAL_SOCKET_RECHECK_SECONDS = 0.2


@pytest.mark.usefixtures("short_lived_groups")
def test_live_sockets_stay_in_their_groups_and_a_dead_channel_falls_out(
    jobs_world: jw.World,
) -> None:
    agent = jobs_world.sites[0]
    _, headers = signed_in(jobs_world.users[jw.MEMBER])
    assert jobs_world.job is not None
    job_group = f"job.{jobs_world.job.pk}"

    async def run() -> None:
        layer = get_channel_layer()
        socket = await open_agent(agent)
        page = await greeted(job_path(jobs_world), headers)
        # A channel of a portal process that died: it joined, and nothing renews it.
        dead = await layer.new_channel()
        await layer.group_add(site_group(agent.site.pk), dead)

        await asyncio.sleep(EXPIRY * 2.5)  # past the expiry of what joined at the start
        event = {"type": MESSAGE_TYPE, "event": {"kind": "round.state", "state": "open"}}
        await layer.group_send(site_group(agent.site.pk), event)
        await layer.group_send(job_group, {"type": MESSAGE_TYPE, "event": {"kind": "ping"}})

        assert (await socket.receive_json_from(timeout=3))["event"]["kind"] == "round.state"
        assert (await page.receive_json_from(timeout=3))["kind"] == "ping"
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(layer.receive(dead), 0.5)
        await socket.disconnect()
        await page.disconnect()

    async_to_sync(run)()


def test_an_expiry_shorter_than_three_rechecks_stops_the_portal_naming_both() -> None:
    from tests.portal.settings_probe import portal_settings

    out = portal_settings(
        "s.CHANNEL_LAYERS",
        FEDPORTAL_CHANNEL_GROUP_EXPIRY_SECONDS="60",
        FEDPORTAL_SOCKET_RECHECK_SECONDS="30",
    )
    assert out.returncode != 0
    assert "FEDPORTAL_CHANNEL_GROUP_EXPIRY_SECONDS must be at least 3 times" in out.stderr
    assert "FEDPORTAL_SOCKET_RECHECK_SECONDS (30)" in out.stderr
