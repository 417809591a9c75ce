"""One protected round, as messages: what a site says and does at each phase, and what the
server makes of it. No network here: SimEnv calls these in-process, the portal stores the
messages in its database and relays them, the agent sends them over HTTPS.

Both protections run the same four phases, in this order, each a barrier at the server:

1. ``keys``: every planned site advertises fresh public keys for the round (signed with its
   enrolment key where there is one). The server's :meth:`roster` lists the sites that did,
   with their keys; this is the round's set of sites from now on.
2. ``shares``: every site on the roster sends what it shares through the server, sealed for
   each receiver. Masking: Shamir shares of its self seed and mask key for each neighbour.
   Homomorphic encryption: the first site of the roster makes the round's CKKS context and
   seals its secret copy for every other site; the server keeps only the public copy.
3. ``upload``: every site that shared uploads its weighted update, protected (masked, or
   encrypted). The server checks what it can (the size, the ring, the context's id) and sums.
4. ``finish``: masking: each surviving site reveals, per neighbour, the share of the self seed
   (a survivor) or of the mask key (a site that dropped out after sharing), never both; the
   server removes the masks. Encryption: one surviving site decrypts the encrypted sum.

The result is the sum of the survivors' weighted updates, as float64. Sites never send
anything the server could open alone, and the server keeps nothing that reveals one site's
update (threat model: an honest-but-curious server; see the README's "Secure aggregation").
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, ClassVar

import numpy as np

from client_agent.secagg import masking, prg, ring, shamir
from client_agent.secagg.keys import KEY_BYTES, KeyPair, pair_seed
from client_agent.secagg.sealed import SealedShareError, open_sealed, seal
from client_agent.secagg.vector import WeightedUpdate, as_weighted

PHASES = ("keys", "shares", "upload", "finish")
MASKING = "masking"
HOMOMORPHIC = "he"
KINDS = (MASKING, HOMOMORPHIC)
SECURE_AGGREGATION_META_KEY = "secure_aggregation"
"""The key of a train task's ``FLModel.meta`` that tells the site's agent to protect its
update, and how (``"masking"`` or ``"he"``)."""
MIN_SITES = 2
"""The fewest sites a protected round may sum: the sum of one site is its update. (With two,
each site can work out the other's update from the sum, as with any protocol and in NVFlare's
HE; the server still cannot. Use three or more where sites must not learn each other's.)"""

Signer = Callable[[bytes], bytes]
Verifier = Callable[[str, bytes, bytes], bool]
"""``verify(site, message, signature)``: whether ``site``'s enrolment key signed it."""


class ProtocolError(ValueError):
    """A message that does not follow the protocol; ``site`` is who sent it (None: the server
    or the round as a whole). The text says what was wrong."""

    def __init__(self, reason: str, *, site: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.site = site


class TooFewSites(ProtocolError):
    """Too few sites are left for the round to go on (or to finish) safely."""


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(value: Any, what: str, *, site: str | None = None, size: int | None = None) -> bytes:
    """``value`` decoded from base64; :class:`ProtocolError` naming ``what`` otherwise."""
    if not isinstance(value, str):
        raise ProtocolError(f"{what}: must be a base64 string", site=site)
    try:
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ProtocolError(f"{what}: not base64", site=site) from None
    if size is not None and len(data) != size:
        raise ProtocolError(f"{what}: {len(data)} bytes, expected {size}", site=site)
    return data


def _mapping(value: Any, what: str, *, site: str | None = None) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ProtocolError(f"{what}: must be an object", site=site)
    return value


def round_context(job: str, round_number: int) -> bytes:
    """What binds a round's keys, seeds and sealed boxes to it: the job and the round."""
    return f"fedportal:{job}:{round_number}".encode()


def keys_message(context: bytes, site: str, keys: Sequence[bytes]) -> bytes:
    """The bytes a site signs when it advertises ``keys``: its name, the round, the keys."""
    return (
        b"fedportal-secagg-keys\x00" + context + b"\x00" + site.encode() + b"\x00" + b"".join(keys)
    )


@dataclass(frozen=True)
class Roster:
    """The round's sites (name order; a site's index is its place here) and their keys."""

    kind: str
    context: bytes
    sites: tuple[str, ...]
    keys: Mapping[str, Mapping[str, str]]
    degree: int
    threshold: int
    length: int

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "context": b64(self.context),
            "sites": list(self.sites),
            "keys": {s: dict(k) for s, k in self.keys.items()},
            "degree": self.degree,
            "threshold": self.threshold,
            "length": self.length,
        }

    @classmethod
    def from_json(cls, data: Any) -> Roster:
        data = _mapping(data, "roster")
        try:
            sites = tuple(str(s) for s in data["sites"])
            return cls(
                kind=str(data["kind"]),
                context=unb64(data["context"], "roster context"),
                sites=sites,
                keys={s: dict(data["keys"][s]) for s in sites},
                degree=int(data["degree"]),
                threshold=int(data["threshold"]),
                length=int(data["length"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"roster: malformed ({exc})") from None

    def index(self, site: str) -> int:
        try:
            return self.sites.index(site)
        except ValueError:
            raise ProtocolError(f"site {site!r} is not on the round's roster") from None

    @property
    def graph(self) -> dict[int, list[int]]:
        return masking.neighbours(len(self.sites), self.degree)

    def neighbours_of(self, site: str) -> list[str]:
        return [self.sites[j] for j in self.graph[self.index(site)]]


def _key(roster: Roster, site: str, name: str) -> bytes:
    return unb64(roster.keys[site].get(name), f"{site}'s {name}", site=site, size=KEY_BYTES)


def _check_roster_signatures(roster: Roster, names: Sequence[str], verify: Verifier | None) -> None:
    """Each site's advertised keys, signed by that site (when the caller can check)."""
    if verify is None:
        return
    context = roster.context
    for site in roster.sites:
        entry = roster.keys[site]
        keys = [_key(roster, site, name) for name in names]
        signature = unb64(entry.get("signature"), f"{site}'s signature", site=site)
        if not verify(site, keys_message(context, site, keys), signature):
            raise ProtocolError(
                f"the keys on the roster for {site} are not signed by {site}: refusing to "
                "share with keys the portal may have put there",
                site=site,
            )


def read_exactly(stream: BinaryIO, size: int, what: str, *, site: str | None = None) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise ProtocolError(f"{what} is cut: {len(data)} of {size} bytes", site=site)
    return data


def shared_sites(roster: Roster, shares: Mapping[str, Any]) -> list[str]:
    """The roster's sites that sent their shares (name order): the sites whose uploads count."""
    return [s for s in roster.sites if s in shares]


# --------------------------------------------------------------------------------------------
# What every protection offers its drivers, and the parts they share
# --------------------------------------------------------------------------------------------


class SiteSession(ABC):
    """One site's side of one protected round. Shared here: the round it is for, its sealing
    key pair, its signed advert of its public keys, and the roster it accepts."""

    KIND: ClassVar[str]
    KEY_NAMES: ClassVar[tuple[str, ...]]
    """The names of the public keys a site advertises, in the order they are signed."""

    def __init__(
        self,
        site: str,
        *,
        context: bytes,
        round_number: int,
        sign: Signer | None = None,
        verify: Verifier | None = None,
    ) -> None:
        self.site = site
        self.context = context
        self.round_number = round_number
        self.sign = sign
        self.verify = verify
        self.seal_keys = KeyPair.generate()
        self.roster: Roster | None = None
        self._begin()

    @abstractmethod
    def _begin(self) -> None:
        """The protection's own state for the fresh round: its secrets, and what it will
        hold of the others'."""

    @abstractmethod
    def public_keys(self) -> list[bytes]:
        """This round's public keys, in :attr:`KEY_NAMES`' order."""

    @abstractmethod
    def share(self, roster: Mapping[str, Any]) -> dict[str, Any]:
        """What this site sends through the server once the roster is in."""

    def prepare(self, setup: Mapping[str, Any]) -> None:  # noqa: B027 - optional, see below
        """Do what :meth:`protect` will need that does not depend on the update, as soon as
        the ``setup`` (the upload phase's) is in: drivers call it while the script still
        trains, so the work is off the round's critical path. :meth:`protect` does it itself
        when it was not called. Masking draws its masks here; HE has nothing to do ahead."""

    @abstractmethod
    def protect(
        self, values: np.ndarray | WeightedUpdate, setup: Mapping[str, Any]
    ) -> bytes | memoryview:
        """``values`` (its weighted update: a float64 vector, or the tensors and their weight
        as ``Layout.update_vector`` gives them) protected: the bytes it uploads."""

    @abstractmethod
    def finish(
        self, request: Mapping[str, Any], total: bytes = b""
    ) -> tuple[dict[str, Any], bytes]:
        """The site's answer to the finish request (JSON, and bytes: HE's decrypted sum);
        ``total`` is the protected sum when the request says ``"total": true``."""

    def advertise(self) -> dict[str, Any]:
        keys = self.public_keys()
        message: dict[str, Any] = {
            name: b64(k) for name, k in zip(self.KEY_NAMES, keys, strict=True)
        }
        if self.sign is not None:
            message["signature"] = b64(self.sign(keys_message(self.context, self.site, keys)))
        return message

    def _accept_roster(self, roster: Mapping[str, Any]) -> Roster:
        """The roster, checked: this round's kind and context, this site's own keys on it,
        and (with ``verify``) every site's keys signed by that site."""
        parsed = Roster.from_json(roster)
        if parsed.kind != self.KIND:
            raise ProtocolError(f"the roster is for {parsed.kind!r}, this round is {self.KIND!r}")
        parsed.index(self.site)
        mine = parsed.keys[self.site]
        advertised = [b64(k) for k in self.public_keys()]
        if [mine.get(name) for name in self.KEY_NAMES] != advertised:
            raise ProtocolError(f"the roster does not hold the keys {self.site} advertised")
        if parsed.context != self.context:
            raise ProtocolError("the roster belongs to another job or round")
        _check_roster_signatures(parsed, self.KEY_NAMES, self.verify)
        self.roster = parsed
        return parsed

    def _roster(self) -> Roster:
        if self.roster is None:
            raise ProtocolError("the round's roster has not come yet")
        return self.roster


class ServerSession(ABC):
    """The server's side of one protected round. Stateless between calls: everything it needs
    comes in as the stored messages and files, so a driver that restarted carries on. Shared
    here: the round, the adverts' checks and the roster.

    Bulk data (uploads, the sum) goes through binary streams, read in pieces: a 25M-parameter
    round never needs every site's upload in memory at once."""

    KIND: ClassVar[str]
    KEY_NAMES: ClassVar[tuple[str, ...]]
    NAME: ClassVar[str]
    """The protection in words, for errors: "secure aggregation", "encrypted aggregation"."""

    def __init__(self, *, job: str, round_number: int, length: int, min_sites: int) -> None:
        self.context = round_context(job, round_number)
        self.round_number = round_number
        self.length = length
        self.min_sites = max(MIN_SITES, min_sites)

    @property
    def kind(self) -> str:
        return self.KIND

    def check_advert(self, site: str, message: Mapping[str, Any]) -> dict[str, Any]:
        message = _mapping(message, f"{site}'s keys", site=site)
        checked = {
            name: b64(unb64(message.get(name), name, site=site, size=KEY_BYTES))
            for name in self.KEY_NAMES
        }
        if message.get("signature") is not None:
            checked["signature"] = b64(unb64(message["signature"], "signature", site=site))
        return checked

    @abstractmethod
    def graph(self, sites: int) -> tuple[int, int]:
        """The roster's (degree, threshold) for ``sites`` sites."""

    def roster(self, adverts: Mapping[str, Mapping[str, Any]]) -> Roster:
        sites = tuple(sorted(adverts))
        if len(sites) < self.min_sites:
            raise TooFewSites(
                f"{len(sites)} site(s) sent their keys; {self.NAME} needs at least {self.min_sites}"
            )
        degree, threshold = self.graph(len(sites))
        return Roster(
            kind=self.KIND,
            context=self.context,
            sites=sites,
            keys={s: dict(adverts[s]) for s in sites},
            degree=degree,
            threshold=threshold,
            length=self.length,
        )

    def _too_few(self, count: int, what: str) -> TooFewSites:
        return TooFewSites(f"{count} {what}; {self.NAME} needs at least {self.min_sites}")

    @abstractmethod
    def check_shares(
        self, roster: Roster, site: str, message: Mapping[str, Any]
    ) -> dict[str, Any]: ...

    @abstractmethod
    def setups(
        self, roster: Roster, shares: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, dict[str, Any]]: ...

    @abstractmethod
    def check_upload(
        self,
        roster: Roster,
        site: str,
        stream: BinaryIO,
        shares: Mapping[str, Mapping[str, Any]],
    ) -> None: ...

    @abstractmethod
    def finish_requests(
        self, roster: Roster, shared: Sequence[str], survivors: Sequence[str]
    ) -> dict[str, dict[str, Any]]: ...

    @abstractmethod
    def check_finish(
        self,
        roster: Roster,
        site: str,
        request: Mapping[str, Any],
        answer: Mapping[str, Any],
        data: bytes,
    ) -> None: ...

    @abstractmethod
    def result(
        self,
        roster: Roster,
        shared: Sequence[str],
        survivors: Sequence[str],
        answers: Mapping[str, tuple[Mapping[str, Any], bytes]],
        uploads: Mapping[str, np.ndarray],
    ) -> np.ndarray:
        """The survivors' sum (float64), from the finish ``answers`` and the survivors'
        protected bytes (``uploads``: site → ``uint8`` array, a memory map of the stored file
        on the portal; a protection that :class:`SumsBeforeFinish` reads none, and drivers
        may pass none)."""


class SumsBeforeFinish(ABC):
    """A protection whose finish needs the protected sum itself (HE: a site decrypts it):
    drivers sum the uploads with :meth:`total` and store it before they ask for the finish.
    (Masking does not: it sums the masked vectors and removes the masks in one pass, in
    :meth:`ServerSession.result`.)"""

    @abstractmethod
    def total(
        self,
        roster: Roster,
        uploads: Sequence[tuple[str, BinaryIO]],
        shares: Mapping[str, Mapping[str, Any]],
        out: BinaryIO,
    ) -> None:
        """The protected sum of the ``uploads`` (site, stream at its protected bytes),
        written to ``out``."""


# --------------------------------------------------------------------------------------------
# Masking (SecAgg+)
# --------------------------------------------------------------------------------------------

MASK_KEYS = ("mask_public", "seal_public")


class MaskingSite(SiteSession):
    """A site's side of a masked round: fresh keys and self seed, its shares sealed for its
    neighbours, its masked vector, and what it reveals to remove the masks."""

    KIND = MASKING
    KEY_NAMES = MASK_KEYS

    def _begin(self) -> None:
        self.mask_keys = KeyPair.generate()
        self.self_seed = secrets.token_bytes(prg.SEED_BYTES)
        self.held: dict[str, tuple[int, int]] = {}
        self.shared: tuple[str, ...] = ()
        self.drawn: tuple[tuple[str, ...], np.ndarray] | None = None
        """The sites that shared, and the masks :meth:`prepare` drew for them."""
        self.answer: tuple[tuple[str, ...], tuple[str, ...], dict[str, Any]] | None = None

    def public_keys(self) -> list[bytes]:
        return [self.mask_keys.public, self.seal_keys.public]

    def share(self, roster: Mapping[str, Any]) -> dict[str, Any]:
        parsed = self._accept_roster(roster)
        me = parsed.index(self.site)
        graph = parsed.graph
        shares = masking.share_secrets(
            me=me,
            self_seed=self.self_seed,
            keys=self.mask_keys,
            graph=graph,
            threshold=parsed.threshold,
        )
        boxes = {
            parsed.sites[j]: b64(
                seal(
                    shares[j],
                    sender=me,
                    receiver=j,
                    sender_private=self.seal_keys.private,
                    receiver_public=_key(parsed, parsed.sites[j], "seal_public"),
                    context=self.context,
                    round_number=self.round_number,
                )
            )
            for j in graph[me]
        }
        return {"boxes": boxes}

    def prepare(self, setup: Mapping[str, Any]) -> None:
        """Open the neighbours' sealed shares, agree the pairwise seeds and draw this site's
        masks (its self mask and one per neighbour that shared) into one vector, ready for
        :meth:`protect`: the offline phase of Bonawitz et al., run while the script trains.
        Holds 8 bytes a value until the update is protected. ``setup``: ``shared`` (the
        sites that sent shares) and ``inbox`` (the boxes this site's neighbours sealed for
        it)."""
        self.drawn = self._draw(setup)

    def _draw(self, setup: Mapping[str, Any]) -> tuple[tuple[str, ...], np.ndarray]:
        """:meth:`prepare`'s work: the sites that shared, and this site's masks for them."""
        roster = self._roster()
        shared = tuple(str(s) for s in setup.get("shared") or ())
        if self.site not in shared:
            raise ProtocolError(f"{self.site} is not among the sites that shared")
        inbox = _mapping(setup.get("inbox") or {}, "inbox")
        me = roster.index(self.site)
        neighbours = [j for j in roster.graph[me] if roster.sites[j] in shared]
        if len(neighbours) < roster.threshold:
            raise TooFewSites(
                f"only {len(neighbours)} of {self.site}'s neighbours sent their shares; "
                f"{roster.threshold} are needed to remove its masks: not uploading"
            )
        seeds: dict[int, bytes] = {}
        for j in neighbours:
            sender = roster.sites[j]
            if sender not in inbox:
                raise ProtocolError(f"no sealed shares from {sender}, which shared", site=sender)
            try:
                self.held[sender] = open_sealed(
                    unb64(inbox[sender], f"the sealed shares from {sender}", site=sender),
                    sender=j,
                    receiver=me,
                    receiver_private=self.seal_keys.private,
                    sender_public=_key(roster, sender, "seal_public"),
                    context=self.context,
                    round_number=self.round_number,
                )
            except SealedShareError as exc:
                raise ProtocolError(str(exc), site=sender) from None
            seeds[j] = pair_seed(
                self.mask_keys.private,
                _key(roster, sender, "mask_public"),
                context=self.context,
                pair=(me, j),
            )
        self.shared = shared
        masks = masking.masked_input(
            np.zeros(roster.length, dtype=np.uint64),
            me=me,
            self_seed=self.self_seed,
            pair_seeds=seeds,
            nonce=prg.round_nonce(self.round_number),
            in_place=True,  # the zeros are this call's own
        )
        return shared, masks

    def protect(
        self, values: np.ndarray | WeightedUpdate, setup: Mapping[str, Any]
    ) -> bytes | memoryview:
        """``values`` (this site's weighted update) quantized and added to the masks
        :meth:`prepare` drew (drawing them now if it was not called for this ``setup``), as
        the bytes to upload: a view of the masked vector, so 25M values are not copied
        again."""
        roster = self._roster()
        values = as_weighted(values)
        if len(values) != roster.length:
            raise ProtocolError(f"the update holds {len(values)} values, the round {roster.length}")
        shared = tuple(str(s) for s in setup.get("shared") or ())
        drawn = self.drawn
        if drawn is None or drawn[0] != shared:
            drawn = self._draw(setup)
        masked = drawn[1]
        ring.add_quantized(masked, values.pieces, weight=values.weight, sites=len(shared))
        self.drawn = None  # the masks are in the upload now: never add them to a second one
        return masked.astype("<u8", copy=False).view(np.uint8).data

    def finish(
        self, request: Mapping[str, Any], total: bytes = b""
    ) -> tuple[dict[str, Any], bytes]:
        """The shares that remove the masks: for each neighbour that shared, of its self seed
        when it survived, of its mask key when it dropped out. Asked again with the same sites
        (a retry), the same answer; asked with other sites, refused: revealing both shares of
        one site would let the server unmask it."""
        roster = self._roster()
        survivors = tuple(sorted(str(s) for s in request.get("survivors") or ()))
        dropped = tuple(sorted(str(s) for s in request.get("dropped") or ()))
        if self.answer is not None:
            if self.answer[:2] != (survivors, dropped):
                raise ProtocolError(
                    f"{self.site} was asked twice with different survivors: refusing, the two "
                    "answers together could unmask a site"
                )
            return self.answer[2], b""
        if set(survivors) & set(dropped):
            raise ProtocolError("a site cannot have both survived and dropped out")
        if self.site not in survivors:
            raise ProtocolError(f"{self.site} is not among the survivors it is asked about")
        if set(survivors) | set(dropped) != set(self.shared):
            raise ProtocolError("the survivors and the dropped sites are not the sites that shared")
        _check_recoverable(roster, survivors, dropped)
        seed_shares: dict[str, str] = {}
        key_shares: dict[str, str] = {}
        for sender, (seed_share, key_share) in sorted(self.held.items()):
            if sender in survivors:
                seed_shares[sender] = _share_hex(seed_share)
            elif sender in dropped:
                key_shares[sender] = _share_hex(key_share)
        answer = {"self_seed_shares": seed_shares, "mask_key_shares": key_shares}
        self.answer = (survivors, dropped, answer)
        return answer, b""


def _check_recoverable(roster: Roster, survivors: Sequence[str], dropped: Sequence[str]) -> None:
    """Every survivor's self seed and every dropped site's mask key must be held by at least
    a threshold of surviving neighbours; :class:`TooFewSites` naming the first that is not,
    before anyone reveals a share for a sum that could not be opened."""
    alive = set(survivors)
    for owner in sorted(survivors) + sorted(dropped):
        holders = [n for n in roster.neighbours_of(owner) if n in alive]
        if len(holders) < roster.threshold:
            what = "self mask" if owner in alive else "masks shared with it"
            raise TooFewSites(
                f"{owner}'s {what} could not be removed: {len(holders)} of its neighbours "
                f"survived, {roster.threshold} are needed (dropped: {', '.join(dropped)})"
            )


def _stream_size(stream: BinaryIO) -> int:
    here = stream.tell()
    size = stream.seek(0, os.SEEK_END)
    stream.seek(here)
    return size - here


def _share_hex(value: int) -> str:
    return format(value, "x")


def _share_int(value: Any, what: str, site: str) -> int:
    if not isinstance(value, str) or not value or len(value) > 132:
        raise ProtocolError(f"{what}: must be a hexadecimal share", site=site)
    try:
        number = int(value, 16)
    except ValueError:
        raise ProtocolError(f"{what}: not hexadecimal", site=site) from None
    if not 0 <= number < shamir.PRIME:
        raise ProtocolError(f"{what}: outside the field", site=site)
    return number


class MaskingServer(ServerSession):
    """The server's side of a masked round (stateless; see :class:`ServerSession`)."""

    KIND = MASKING
    KEY_NAMES = MASK_KEYS
    NAME = "secure aggregation"

    def graph(self, sites: int) -> tuple[int, int]:
        degree = masking.default_degree(sites)
        return degree, masking.default_threshold(degree)

    def check_shares(self, roster: Roster, site: str, message: Mapping[str, Any]) -> dict[str, Any]:
        message = _mapping(message, f"{site}'s shares", site=site)
        boxes = _mapping(message.get("boxes"), "boxes", site=site)
        expected = set(roster.neighbours_of(site))
        if set(boxes) != expected:
            raise ProtocolError(
                f"sealed shares for {sorted(boxes)}; {site}'s neighbours are {sorted(expected)}",
                site=site,
            )
        size = 12 + 2 * 66 + 16  # nonce, two shares, tag: see client_agent.secagg.sealed
        return {
            "boxes": {
                to: b64(unb64(box, f"the box for {to}", site=site, size=size))
                for to, box in sorted(boxes.items())
            }
        }

    def setups(
        self, roster: Roster, shares: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        shared = shared_sites(roster, shares)
        if len(shared) < self.min_sites:
            raise self._too_few(len(shared), "site(s) sent their shares")
        return {
            site: {
                "shared": shared,
                "inbox": {
                    sender: shares[sender]["boxes"][site]
                    for sender in shared
                    if site in shares[sender]["boxes"]
                },
            }
            for site in shared
        }

    def check_upload(
        self,
        roster: Roster,
        site: str,
        stream: BinaryIO,
        shares: Mapping[str, Mapping[str, Any]],
    ) -> None:
        if site not in shares:
            raise ProtocolError(
                f"{site} sent no shares this round: its upload could not be unmasked", site=site
            )
        size = _stream_size(stream)
        if size != 8 * roster.length:
            raise ProtocolError(
                f"the masked vector is {size} bytes; the round's is {8 * roster.length} "
                f"({roster.length} ring elements of 8 bytes)",
                site=site,
            )

    def finish_requests(
        self, roster: Roster, shared: Sequence[str], survivors: Sequence[str]
    ) -> dict[str, dict[str, Any]]:
        survivors = sorted(survivors)
        if len(survivors) < self.min_sites:
            raise self._too_few(len(survivors), "masked update(s) came")
        dropped = sorted(set(shared) - set(survivors))
        _check_recoverable(roster, survivors, dropped)
        return {site: {"survivors": survivors, "dropped": dropped} for site in survivors}

    def check_finish(
        self,
        roster: Roster,
        site: str,
        request: Mapping[str, Any],
        answer: Mapping[str, Any],
        data: bytes,
    ) -> None:
        answer = _mapping(answer, f"{site}'s shares", site=site)
        extra = sorted(set(answer) - {"self_seed_shares", "mask_key_shares"})
        if extra:
            raise ProtocolError(f"{extra[0]}: not part of a finish answer", site=site)
        neighbours = set(roster.neighbours_of(site))
        survivors, dropped = set(request["survivors"]), set(request["dropped"])
        for field, allowed in (("self_seed_shares", survivors), ("mask_key_shares", dropped)):
            values = _mapping(answer.get(field, {}), field, site=site)
            for owner, value in values.items():
                if owner not in neighbours or owner not in allowed:
                    raise ProtocolError(
                        f"{field}: {site} holds no such share of {owner!r}", site=site
                    )
                _share_int(value, f"{field}[{owner}]", site)

    def result(
        self,
        roster: Roster,
        shared: Sequence[str],
        survivors: Sequence[str],
        answers: Mapping[str, tuple[Mapping[str, Any], bytes]],
        uploads: Mapping[str, np.ndarray],
    ) -> np.ndarray:
        """The survivors' sum (float64): their masked vectors summed and the masks removed
        with the revealed shares, in one pass. Each secret is recovered from its first
        ``threshold`` shares in holder-name order, so every driver gets the same bits."""
        index = {s: i for i, s in enumerate(roster.sites)}
        dropped = sorted(set(shared) - set(survivors))
        self_seeds: dict[int, bytes] = {}
        dropped_keys: dict[int, bytes] = {}
        for owner, field, into in [
            (s, "self_seed_shares", self_seeds) for s in sorted(survivors)
        ] + [(s, "mask_key_shares", dropped_keys) for s in dropped]:
            points = {
                index[holder] + 1: _share_int(answer[field][owner], field, holder)
                for holder, (answer, _) in sorted(answers.items())
                if owner in (answer.get(field) or {})
            }
            if len(points) < roster.threshold:
                what = "self mask" if field == "self_seed_shares" else "masks shared with it"
                raise TooFewSites(
                    f"cannot remove {owner}'s {what}: {len(points)} of the {roster.threshold} "
                    "shares needed came back"
                )
            try:
                secret = masking.recover(
                    dict(list(points.items())[: roster.threshold]), threshold=roster.threshold
                )
            except ValueError as exc:
                raise ProtocolError(
                    f"the shares revealed for {owner} do not agree: {exc}"
                ) from None
            if field == "mask_key_shares" and KeyPair.from_private(secret).public != _key(
                roster, owner, "mask_public"
            ):
                raise ProtocolError(
                    f"the shares revealed for {owner}'s mask key do not give the key it "
                    "advertised: a neighbour sent a wrong share"
                )
            into[index[owner]] = secret
        vectors = []
        for site in sorted(survivors):
            data = uploads.get(site)
            if data is None:
                raise ProtocolError(f"the masked vector of {site}, a survivor, is missing")
            if data.nbytes != 8 * roster.length:
                raise ProtocolError(
                    f"the masked vector is {data.nbytes} bytes; the round's is {8 * roster.length}",
                    site=site,
                )
            vectors.append(data.view("<u8"))
        summed = masking.unmask_sum(
            vectors,
            survivors=[index[s] for s in survivors],
            graph=roster.graph,
            self_seeds=self_seeds,
            dropped_keys=dropped_keys,
            public_keys={index[s]: _key(roster, s, "mask_public") for s in shared},
            context=self.context,
            nonce=prg.round_nonce(self.round_number),
        )
        return ring.dequantize(summed, in_place=True)  # the array is this call's own


def error_bound(sites: int, total_weight: float) -> float:
    """How far a masked round's weighted mean can be from plain FedAvg's, per value, before
    the result is rounded to the model's dtype: each site's weighted values move by at most
    2**−25 when quantized, so the sum by ``sites`` times that, and the mean by that over the
    total weight (at most 2**−25 when every weight is at least 1)."""
    if total_weight <= 0 or not math.isfinite(total_weight):
        raise ValueError(f"the total weight must be positive, got {total_weight}")
    return sites * ring.mean_error_bound() / total_weight
