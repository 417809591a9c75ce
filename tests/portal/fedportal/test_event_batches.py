"""Several events to the same groups from one transaction (``send_all_after_commit``): one
message per group, after the commit, with the events in their order."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

from fedportal import events

pytestmark = pytest.mark.django_db(transaction=True)  # on_commit runs the sends


def listener(*groups: str) -> str:
    layer = get_channel_layer()
    channel: str = async_to_sync(layer.new_channel)()
    for group in groups:
        async_to_sync(layer.group_add)(group, channel)
    return channel


def heard(channel: str) -> list[dict[str, Any]]:
    """Every message waiting for ``channel``."""

    async def drain() -> list[dict[str, Any]]:
        layer = get_channel_layer()
        got = []
        while True:
            try:
                got.append(await asyncio.wait_for(layer.receive(channel), 0.2))
            except TimeoutError:
                return got

    return async_to_sync(drain)()


def test_events_sent_together_go_as_one_message_per_group_after_the_commit() -> None:
    job_page, project_page = listener("job.1"), listener("project.1")
    news = [{"kind": "task.state", "site": f"site-{n}"} for n in range(3)]

    with transaction.atomic():
        events.send_all_after_commit(["job.1", "project.1"], news)
        assert heard(job_page) == []  # not before the commit

    for channel in (job_page, project_page):
        assert heard(channel) == [{"type": events.BATCH_MESSAGE_TYPE, "events": news}]


def test_one_event_goes_as_a_message_of_its_own_and_none_as_nothing() -> None:
    page = listener("job.1")

    events.send_all_after_commit(["job.1"], [{"kind": "task.state"}])
    events.send_all_after_commit(["job.1"], [])

    assert heard(page) == [{"type": events.MESSAGE_TYPE, "event": {"kind": "task.state"}}]


def test_a_long_batch_is_cut_into_messages_of_bounded_size_in_order() -> None:
    page = listener("job.1")
    news = [{"kind": "task.state", "n": n} for n in range(events.BATCH_MAX_EVENTS * 2 + 1)]

    events.send_all_after_commit(["job.1"], news)

    messages = heard(page)
    assert [len(m["events"]) for m in messages] == [events.BATCH_MAX_EVENTS] * 2 + [1]
    assert [e for m in messages for e in m["events"]] == news


def test_a_rolled_back_transaction_sends_nothing() -> None:
    page = listener("job.1")

    with pytest.raises(RuntimeError), transaction.atomic():
        events.send_all_after_commit(["job.1"], [{"kind": "a"}, {"kind": "b"}])
        raise RuntimeError("rolled back")

    assert heard(page) == []
