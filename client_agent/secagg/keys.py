"""X25519 key agreement (RFC 7748) and what a pair of sites derives from it.

Each site makes a key pair per job for its pairwise masks; the public keys are relayed
through the portal. Two sites derive the same 32-byte seed from their agreement with HKDF
(SHA-256), bound to the job and to the pair, so one agreement never serves two purposes.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32


@dataclass(frozen=True)
class KeyPair:
    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        key = X25519PrivateKey.generate()
        return cls(private=_raw_private(key), public=_raw_public(key.public_key()))

    @classmethod
    def from_private(cls, private: bytes) -> KeyPair:
        key = X25519PrivateKey.from_private_bytes(private)
        return cls(private=private, public=_raw_public(key.public_key()))


def pair_seed(
    private: bytes, their_public: bytes, *, context: bytes, pair: tuple[int, int]
) -> bytes:
    """The 32-byte seed sites ``pair`` (in either order) share: X25519, then HKDF over the
    ``context`` (the job) and the pair's ids in ascending order."""
    if len(their_public) != KEY_BYTES:
        raise ValueError(f"an X25519 public key is {KEY_BYTES} bytes, got {len(their_public)}")
    shared = X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(their_public)
    )
    low, high = sorted(pair)
    info = b"fedportal-secagg-pair:" + context + b":" + f"{low}:{high}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
