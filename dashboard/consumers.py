"""The browser's WebSocket: ``/ws/dashboard/jobs/<uid>/`` and ``/ws/dashboard/projects/<slug>/``.

A signed-in person who may see the job (or project) joins its Channels group and receives every
event published there (``job.state``, ``round.state``, ``task.state``, ``metric``, ``log``,
``site.status``) as the JSON object ``jobs.events`` / ``sites.events`` built. Anyone else is
refused at the handshake (close code 4404, as the page would be 404): the same selectors as the
API decide. The socket is one-way; messages from the browser are ignored.
"""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from client_agent import jsonlimits
from fedportal.events import job_group, project_group
from jobs.selectors import jobs_visible_to
from sites.selectors import projects_visible_to

CLOSE_NOT_FOUND = 4404


def group_for(user: Any, kwargs: dict[str, Any]) -> str | None:
    """The group ``user`` may listen to for the URL's job or project; None when they may not
    see it (or it does not exist: the same answer)."""
    if "uid" in kwargs:
        job_id = jobs_visible_to(user).filter(uid=kwargs["uid"]).values_list("pk", flat=True)
        found = job_id.first()
        return job_group(found) if found is not None else None
    project_id = projects_visible_to(user).filter(slug=kwargs.get("slug", "")).first()
    return project_group(project_id.pk) if project_id is not None else None


class DashboardConsumer(AsyncJsonWebsocketConsumer):
    group: str | None = None

    @classmethod
    async def decode_json(cls, text_data: str) -> Any:
        """The message, or None (answered as not a JSON object) when it is not JSON or is
        nested too deeply (``client_agent.jsonlimits``)."""
        try:
            return jsonlimits.loads(text_data)
        except ValueError:
            return None

    async def connect(self) -> None:
        kwargs = self.scope.get("url_route", {}).get("kwargs", {})
        self.group = await database_sync_to_async(group_for)(self.scope.get("user"), kwargs)
        if self.group is None:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self.send_json({"kind": "hello", "group": self.group})

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        return  # one-way: the page acts through forms and the REST API

    async def fedportal_event(self, message: dict[str, Any]) -> None:
        await self.send_json(message["event"])

    async def disconnect(self, code: int) -> None:
        if self.group is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)
