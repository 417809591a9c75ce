"""One round under homomorphic encryption (CKKS through TenSEAL), in the four phases of
:mod:`client_agent.secagg.session`:

1. ``keys``: every site advertises a fresh X25519 sealing key (signed where it can be).
2. ``shares``: the roster's first site (the key holder) makes the round's CKKS context, sends
   the server its public copy and, sealed for each other site, the secret copy; the other
   sites send nothing but their presence. The server never holds the secret key.
3. ``upload``: each site encrypts its weighted update under the context, in batches of 4096
   values; the server checks each batch's context and count, and adds them, batch by batch,
   without any secret.
4. ``finish``: the first surviving site decrypts the encrypted sum and sends back the sum.

The server learns the sum, as with plain FedAvg's mean, and nothing about one site's update.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, BinaryIO

import numpy as np

from client_agent import he
from client_agent.secagg.sealed import SealedShareError, open_bytes, seal_bytes
from client_agent.secagg.session import (
    HOMOMORPHIC,
    ProtocolError,
    Roster,
    ServerSession,
    SiteSession,
    SumsBeforeFinish,
    TooFewSites,
    _key,
    _mapping,
    _stream_size,
    b64,
    read_exactly,
    shared_sites,
    unb64,
)
from client_agent.secagg.vector import WeightedUpdate

HE_KEYS = ("seal_public",)
MAX_BATCH_BYTES = 4 << 20
"""A serialized CKKS batch is about 330 KB at the default parameters; anything near 4 MiB is
not one."""


def batches_in(length: int) -> int:
    return math.ceil(length / (he.POLY_MODULUS_DEGREE // 2))


def iter_batches(stream: BinaryIO, *, site: str | None = None) -> Iterator[bytes]:
    """The length-prefixed batches of :func:`client_agent.he.pack`, read one at a time."""
    while True:
        head = stream.read(4)
        if not head:
            return
        if len(head) != 4:
            raise ProtocolError("a batch's length is cut", site=site)
        (size,) = struct.unpack(">I", head)
        if size > MAX_BATCH_BYTES:
            raise ProtocolError(f"a batch of {size} bytes is not a CKKS ciphertext", site=site)
        yield read_exactly(stream, size, "a batch", site=site)


class HESite(SiteSession):
    """A site's side of an encrypted round."""

    KIND = HOMOMORPHIC
    KEY_NAMES = HE_KEYS

    def _begin(self) -> None:
        self.he: he.HEContext | None = None

    def public_keys(self) -> list[bytes]:
        return [self.seal_keys.public]

    def share(self, roster: Mapping[str, Any]) -> dict[str, Any]:
        parsed = self._accept_roster(roster)
        if parsed.sites[0] != self.site:
            return {}
        self.he = he.HEContext.create()
        secret = self.he.secret_bytes()
        return {
            "public_context": b64(self.he.public_bytes()),
            "boxes": {
                other: b64(
                    seal_bytes(
                        secret,
                        sender=0,
                        receiver=j,
                        sender_private=self.seal_keys.private,
                        receiver_public=_key(parsed, other, "seal_public"),
                        context=self.context,
                        round_number=self.round_number,
                    )
                )
                for j, other in enumerate(parsed.sites)
                if j > 0
            },
        }

    def protect(
        self, values: np.ndarray | WeightedUpdate, setup: Mapping[str, Any]
    ) -> bytes | memoryview:
        roster = self._roster()
        if isinstance(values, WeightedUpdate):
            values = values.array()  # CKKS encrypts float64 batches of the one vector
        if len(values) != roster.length:
            raise ProtocolError(f"the update holds {len(values)} values, the round {roster.length}")
        holder = roster.sites[0]
        if self.he is None:
            box = setup.get("box")
            if box is None:
                raise ProtocolError(f"no sealed context from {holder}", site=holder)
            try:
                secret = open_bytes(
                    unb64(box, f"the sealed context from {holder}", site=holder),
                    sender=0,
                    receiver=roster.index(self.site),
                    receiver_private=self.seal_keys.private,
                    sender_public=_key(roster, holder, "seal_public"),
                    context=self.context,
                    round_number=self.round_number,
                    what="sealed context",
                )
                self.he = he.HEContext.from_bytes(secret)
            except (SealedShareError, he.HEError) as exc:
                raise ProtocolError(str(exc), site=holder) from None
            public = unb64(setup.get("public_context"), "the public context", site=holder)
            if public[: len(self.he.fingerprint)] != self.he.fingerprint:
                raise ProtocolError(
                    f"the public context the server relays is not {holder}'s", site=holder
                )
        return he.pack(he.encrypt(self.he, values))

    def finish(
        self, request: Mapping[str, Any], total: bytes = b""
    ) -> tuple[dict[str, Any], bytes]:
        roster = self._roster()
        if self.he is None:
            raise ProtocolError(f"{self.site} holds no secret context for this round")

        summed = he.decrypt(self.he, iter_batches(io.BytesIO(total)), roster.length)
        return {}, summed.astype("<f8").tobytes()


class HEServer(ServerSession, SumsBeforeFinish):
    """The server's side of an encrypted round: it holds the public context only."""

    KIND = HOMOMORPHIC
    KEY_NAMES = HE_KEYS
    NAME = "encrypted aggregation"

    def graph(self, sites: int) -> tuple[int, int]:
        return sites - 1, 1  # every site holds the round's secret context

    def check_shares(self, roster: Roster, site: str, message: Mapping[str, Any]) -> dict[str, Any]:
        message = _mapping(message, f"{site}'s shares", site=site)
        if site != roster.sites[0]:
            if message:
                raise ProtocolError(
                    f"only {roster.sites[0]} shares this round's context", site=site
                )
            return {}
        public = unb64(message.get("public_context"), "public_context", site=site)
        try:
            context = he.HEContext.from_bytes(public)
        except he.HEError as exc:
            raise ProtocolError(f"public_context: {exc}", site=site) from None
        if context.is_private:
            raise ProtocolError(
                "public_context holds the secret key: the server must never have it; not stored",
                site=site,
            )
        boxes = _mapping(message.get("boxes"), "boxes", site=site)
        others = set(roster.sites[1:])
        if set(boxes) != others:
            raise ProtocolError(
                f"sealed contexts for {sorted(boxes)}; the other sites are {sorted(others)}",
                site=site,
            )
        return {
            "public_context": b64(public),
            "boxes": {
                to: b64(unb64(box, f"the box for {to}", site=site))
                for to, box in sorted(boxes.items())
            },
        }

    def setups(
        self, roster: Roster, shares: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        holder = roster.sites[0]
        if holder not in shares:
            raise TooFewSites(
                f"{holder}, which makes the round's encryption context, did not send it"
            )
        shared = shared_sites(roster, shares)
        if len(shared) < self.min_sites:
            raise self._too_few(len(shared), "site(s) are ready")
        held = shares[holder]
        return {
            site: {
                "shared": shared,
                "public_context": held["public_context"],
                "box": held["boxes"].get(site),
            }
            for site in shared
        }

    def public(self, shares: Mapping[str, Mapping[str, Any]], roster: Roster) -> he.HEContext:
        holder = roster.sites[0]
        return he.HEContext.from_bytes(unb64(shares[holder]["public_context"], "public context"))

    def check_upload(
        self,
        roster: Roster,
        site: str,
        stream: BinaryIO,
        shares: Mapping[str, Mapping[str, Any]],
    ) -> None:
        """Every batch under the round's context and the right count of them; each one is
        read back as a CKKS ciphertext, so what the sum would trip over is refused now."""
        if site not in shares:
            raise ProtocolError(f"{site} was not ready when the round's context came", site=site)
        if _stream_size(stream) == 0:
            raise ProtocolError("the encrypted update is empty", site=site)
        context = self.public(shares, roster)
        expected = batches_in(roster.length)
        count = 0
        for index, batch in enumerate(iter_batches(stream, site=site)):
            try:
                he.check_batch(context, batch, index)  # read back: the context's id, the form
            except he.HEError as exc:
                raise ProtocolError(str(exc), site=site) from None
            count += 1
            if count > expected:
                break
        if count != expected:
            raise ProtocolError(
                f"{count} encrypted batch(es); the round's {roster.length} values take {expected}",
                site=site,
            )

    def total(
        self,
        roster: Roster,
        uploads: Sequence[tuple[str, BinaryIO]],
        shares: Mapping[str, Mapping[str, Any]],
        out: BinaryIO,
    ) -> None:
        """The encrypted sum, batch by batch over all uploads at once (memory: one batch per
        site), under the public context."""
        context = self.public(shares, roster)
        readers = [(site, iter_batches(stream, site=site)) for site, stream in uploads]
        for index in range(batches_in(roster.length)):
            batches = []
            for site, reader in readers:
                batch = next(reader, None)
                if batch is None:
                    raise ProtocolError(f"{site}'s update ends at batch {index}", site=site)
                batches.append(batch)
            try:
                out.write(he.pack([he.sum_batch(context, batches, index)]))
            except he.HEError as exc:  # each upload was checked when it came: not expected
                raise ProtocolError(f"the sum of batch {index}: {exc}") from None

    def finish_requests(
        self, roster: Roster, shared: Sequence[str], survivors: Sequence[str]
    ) -> dict[str, dict[str, Any]]:
        survivors = sorted(survivors)
        if len(survivors) < self.min_sites:
            raise self._too_few(len(survivors), "encrypted update(s) came")
        return {survivors[0]: {"total": True, "length": roster.length}}

    def check_finish(
        self,
        roster: Roster,
        site: str,
        request: Mapping[str, Any],
        answer: Mapping[str, Any],
        data: bytes,
    ) -> None:
        if answer:
            raise ProtocolError("the decrypted sum comes as data, with an empty message", site=site)
        if len(data) != 8 * roster.length:
            raise ProtocolError(
                f"the decrypted sum is {len(data)} bytes; {roster.length} float64 values are "
                f"{8 * roster.length}",
                site=site,
            )
        if not np.all(np.isfinite(np.frombuffer(data, dtype="<f8"))):
            raise ProtocolError("the decrypted sum holds NaN or Inf", site=site)

    def result(
        self,
        roster: Roster,
        shared: Sequence[str],
        survivors: Sequence[str],
        answers: Mapping[str, tuple[Mapping[str, Any], bytes]],
        uploads: Mapping[str, np.ndarray],
    ) -> np.ndarray:
        # The first survivor is asked; when it does not answer, the driver may ask the next.
        for decryptor in sorted(survivors):
            if decryptor in answers and answers[decryptor][1]:
                return np.frombuffer(answers[decryptor][1], dtype="<f8").astype(np.float64)
        raise TooFewSites("no surviving site sent back the decrypted sum")
