"""A protected round run in one process: each site a separate session with its own secrets,
the server seeing only the messages and uploads. ``SimEnv`` runs its rounds this way, and the
tests and the bench use it to check the protocol without a portal.

Sites in ``drop_after_shares`` send their keys and shares, then vanish before uploading (the
case the Shamir shares exist for); sites in ``drop_before_finish`` upload and then vanish
before revealing (their shares are not needed when enough neighbours remain).
"""

from __future__ import annotations

import io
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from client_agent.secagg.session import (
    HOMOMORPHIC,
    MASKING,
    ProtocolError,
    Roster,
    ServerSession,
    SiteSession,
    SumsBeforeFinish,
    round_context,
)
from client_agent.secagg.vector import WeightedUpdate


@dataclass
class LocalRound:
    """What one in-process protected round gave: the survivors' sum and its cost."""

    total: np.ndarray
    roster: Roster
    survivors: tuple[str, ...]
    sent_bytes: dict[str, int] = field(default_factory=dict)
    """Bytes each site sent (keys, shares, upload, answer), as the portal would receive them."""
    site_seconds: dict[str, float] = field(default_factory=dict)
    """Each site's protocol work (not its training)."""
    server_seconds: float = 0.0
    stored: dict[str, bytes | memoryview] = field(default_factory=dict)
    """What the server held of each site's update: its protected upload."""


def sessions_for(kind: str) -> tuple[type[Any], type[Any]]:
    """The (site, server) session classes of a protection."""
    if kind == MASKING:
        from client_agent.secagg.session import MaskingServer, MaskingSite

        return MaskingSite, MaskingServer
    if kind == HOMOMORPHIC:
        from client_agent.secagg.he_session import HEServer, HESite

        return HESite, HEServer
    raise ValueError(f"unknown protection {kind!r} (known: {MASKING}, {HOMOMORPHIC})")


def _size(message: Mapping[str, Any]) -> int:
    import json

    return len(json.dumps(message).encode())


def run_local(
    kind: str,
    vectors: Mapping[str, np.ndarray | WeightedUpdate],
    *,
    job: str,
    round_number: int,
    min_sites: int = 0,
    drop_after_shares: Collection[str] = (),
    drop_before_finish: Collection[str] = (),
) -> LocalRound:
    """The sum of the ``vectors`` (site → weighted update: float64, or as
    ``Layout.update_vector`` gives it) of the sites that stayed, through ``kind``'s four
    phases. :class:`ProtocolError` (``TooFewSites``) when too few remain."""
    site_cls, server_cls = sessions_for(kind)
    length = len(next(iter(vectors.values())))
    context = round_context(job, round_number)
    server: ServerSession = server_cls(
        job=job, round_number=round_number, length=length, min_sites=min_sites
    )
    sent: dict[str, int] = dict.fromkeys(vectors, 0)
    seconds: dict[str, float] = dict.fromkeys(vectors, 0.0)
    server_seconds = 0.0

    def site_call(site: str, fn: Any, *args: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args)
        seconds[site] += time.perf_counter() - start
        return out

    sites: dict[str, SiteSession] = {
        s: site_cls(s, context=context, round_number=round_number) for s in sorted(vectors)
    }
    adverts = {}
    for name, session in sites.items():
        message = site_call(name, session.advertise)
        sent[name] += _size(message)
        adverts[name] = server.check_advert(name, message)
    start = time.perf_counter()
    roster = server.roster(adverts)
    server_seconds += time.perf_counter() - start
    shares = {}
    for name in roster.sites:
        message = site_call(name, sites[name].share, roster.to_json())
        sent[name] += _size(message)
        shares[name] = server.check_shares(roster, name, message)
    setups = server.setups(roster, shares)
    uploads: dict[str, bytes | memoryview] = {}
    for name, setup in setups.items():
        if name in drop_after_shares:
            continue
        data = site_call(name, sites[name].protect, vectors[name], setup)
        sent[name] += len(data)
        start = time.perf_counter()
        server.check_upload(roster, name, io.BytesIO(data), shares)
        server_seconds += time.perf_counter() - start
        uploads[name] = data
    survivors = sorted(uploads)
    shared = list(setups)
    start = time.perf_counter()
    requests = server.finish_requests(roster, shared, survivors)
    total = io.BytesIO()
    if isinstance(server, SumsBeforeFinish):
        server.total(roster, [(s, io.BytesIO(uploads[s])) for s in survivors], shares, total)
    server_seconds += time.perf_counter() - start
    answers = {}
    for name, request in requests.items():
        if name in drop_before_finish:
            continue
        answer, data = site_call(
            name,
            sites[name].finish,
            request,
            total.getvalue() if request.get("total") else b"",
        )
        sent[name] += _size(answer) + len(data)
        server.check_finish(roster, name, request, answer, data)
        answers[name] = (answer, data)
    start = time.perf_counter()
    stored = {s: np.frombuffer(uploads[s], dtype=np.uint8) for s in survivors}
    result = server.result(roster, shared, survivors, answers, stored)
    server_seconds += time.perf_counter() - start
    return LocalRound(
        total=result,
        roster=roster,
        survivors=tuple(survivors),
        sent_bytes=sent,
        site_seconds=seconds,
        server_seconds=server_seconds,
        stored=uploads,
    )


def protection_record(kind: str, local: LocalRound, *, plain_bytes: int) -> dict[str, Any]:
    """A protected round as a run records it, in the shape of the portal's rounds API: the
    kind, the roster, the sites that shared and those summed (``survivors``), and its cost
    beyond a plain round per site on average: ``bytes_per_site`` sent (keys, shares, the
    protected upload, the finish answer), ``extra_bytes_per_site`` over a plain float32
    upload of ``plain_bytes``, the sites' protocol ``site_seconds`` and the server's."""
    count = max(1, len(local.sent_bytes))
    sent = sum(local.sent_bytes.values()) / count
    return {
        "kind": kind,
        "phase": "done",
        "roster": list(local.roster.sites),
        "shared": sorted(local.sent_bytes),
        "survivors": list(local.survivors),
        "cost": {
            "bytes_per_site": round(sent),
            "extra_bytes_per_site": round(sent - plain_bytes),
            "site_seconds": sum(local.site_seconds.values()) / count,
            "server_seconds": local.server_seconds,
        },
    }


__all__ = ["LocalRound", "ProtocolError", "protection_record", "run_local", "sessions_for"]
