"""Shares travel sealed: the portal relays them between sites and cannot read them.

A site seals the two shares it holds for a neighbour (of its self seed and of its mask
private key) with AES-256-GCM under a key only the two of them can derive: X25519 between the
sender's and the receiver's *sealing* key pairs (not the mask key pairs, whose private halves
may be recovered when a site drops out), then HKDF. The associated data binds the box to the
job, the round and the direction, so a box replayed into another round, or sent back by the
server as if from another site, fails to open.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

NONCE_BYTES = 12
SHARE_BYTES = 66
"""A share is below 2**521: 66 bytes, big-endian."""


class SealedShareError(ValueError):
    """A sealed box that does not open: tampered with, cut, or meant for another round or
    pair of sites."""


def seal(
    shares: tuple[int, int],
    *,
    sender: int,
    receiver: int,
    sender_private: bytes,
    receiver_public: bytes,
    context: bytes,
    round_number: int,
) -> bytes:
    """``shares`` (self-seed share, key share) for ``receiver`` only: nonce ‖ ciphertext."""
    plaintext = b"".join(share.to_bytes(SHARE_BYTES, "big") for share in shares)
    return seal_bytes(
        plaintext,
        sender=sender,
        receiver=receiver,
        sender_private=sender_private,
        receiver_public=receiver_public,
        context=context,
        round_number=round_number,
    )


def open_sealed(
    box: bytes,
    *,
    sender: int,
    receiver: int,
    receiver_private: bytes,
    sender_public: bytes,
    context: bytes,
    round_number: int,
) -> tuple[int, int]:
    """The shares ``sender`` sealed for this site (``receiver``); :class:`SealedShareError`
    naming the sender when the box does not open."""
    if len(box) != NONCE_BYTES + 2 * SHARE_BYTES + 16:
        raise SealedShareError(
            f"the sealed shares from site {sender} are {len(box)} bytes, expected "
            f"{NONCE_BYTES + 2 * SHARE_BYTES + 16}"
        )
    plaintext = open_bytes(
        box,
        sender=sender,
        receiver=receiver,
        receiver_private=receiver_private,
        sender_public=sender_public,
        context=context,
        round_number=round_number,
        what="sealed shares",
    )
    return (
        int.from_bytes(plaintext[:SHARE_BYTES], "big"),
        int.from_bytes(plaintext[SHARE_BYTES:], "big"),
    )


def seal_bytes(
    plaintext: bytes,
    *,
    sender: int,
    receiver: int,
    sender_private: bytes,
    receiver_public: bytes,
    context: bytes,
    round_number: int,
) -> bytes:
    """Any ``plaintext`` for ``receiver`` only (an HE secret context, say): nonce ‖
    ciphertext, bound like the shares to the job, round and direction."""
    key = _box_key(sender_private, receiver_public, context)
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(
        nonce, plaintext, _associated(context, round_number, sender, receiver)
    )


def open_bytes(
    box: bytes,
    *,
    sender: int,
    receiver: int,
    receiver_private: bytes,
    sender_public: bytes,
    context: bytes,
    round_number: int,
    what: str = "sealed box",
) -> bytes:
    """What :func:`seal_bytes` sealed; :class:`SealedShareError` naming the sender (and
    ``what`` it sealed) when the box does not open."""
    if len(box) < NONCE_BYTES + 16:
        raise SealedShareError(f"the {what} from site {sender} is cut ({len(box)} bytes)")
    key = _box_key(receiver_private, sender_public, context)
    try:
        return AESGCM(key).decrypt(
            box[:NONCE_BYTES],
            box[NONCE_BYTES:],
            _associated(context, round_number, sender, receiver),
        )
    except InvalidTag:
        raise SealedShareError(
            f"the {what} from site {sender} {'do' if what.endswith('s') else 'does'} not open: "
            "tampered with, or sealed for another round or site"
        ) from None


def _box_key(private: bytes, public: bytes, context: bytes) -> bytes:
    shared = X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(public)
    )
    info = b"fedportal-secagg-seal:" + context
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def _associated(context: bytes, round_number: int, sender: int, receiver: int) -> bytes:
    return b"%s:%d:%d->%d" % (context, round_number, sender, receiver)
