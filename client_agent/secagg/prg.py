"""Masks: a pseudo-random vector of ring elements expanded from a 32-byte seed.

The key stream of ChaCha20 (RFC 8439, through the ``cryptography`` package) under the seed as
key and a nonce naming the use, read as little-endian ``uint64``: indistinguishable from
uniform in Z/2**64 to anyone without the seed, and the same bits on every machine.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

SEED_BYTES = 32


def mask(seed: bytes, length: int, *, nonce: bytes = bytes(16)) -> np.ndarray:
    """``length`` ring elements from ``seed`` (32 bytes); ``nonce`` (16 bytes) separates
    masks drawn from one seed for different uses (rounds)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes, got {len(seed)}")
    if len(nonce) != 16:
        raise ValueError(f"a mask nonce is 16 bytes, got {len(nonce)}")
    stream = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()
    data = stream.update(bytes(8 * length)) + stream.finalize()
    return np.frombuffer(data, dtype="<u8").astype(np.uint64, copy=False)


def round_nonce(round_number: int) -> bytes:
    """The nonce of the masks of round ``round_number``: fresh masks every round."""
    if round_number < 0:
        raise ValueError(f"a round number is ≥ 0, got {round_number}")
    return round_number.to_bytes(16, "little")
