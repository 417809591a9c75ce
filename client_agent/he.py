"""Homomorphic encryption of updates (CKKS, through TenSEAL): the server adds what it cannot
read.

A site creates the job's :class:`HEContext` (its secret key never leaves the sites); the
server gets only :meth:`HEContext.public_bytes`, which can add ciphertexts and nothing else.
A vector is encrypted in batches of ``slots`` values (half the polynomial degree), each batch
one CKKS ciphertext, so memory stays bounded by a batch whatever the model's size. Every
batch carries the id of the context it was made under: CKKS would add or decrypt a
ciphertext of another context without complaint and give garbage, so a mismatch is refused
with :class:`HEError` instead.

CKKS is approximate: with the default parameters (degree 8192, scale 2**40) a sum of values
of magnitude ≤ 1 comes back within about 1e-6 (:data:`PRECISION`).
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import tenseal as ts

POLY_MODULUS_DEGREE = 8192
COEFF_MOD_BIT_SIZES = (60, 40, 40, 60)
SCALE_BITS = 40
PRECISION = 1e-6
"""The largest error of a decrypted sum of values of magnitude ≤ 1, at the defaults."""
_FINGERPRINT_BYTES = 16


class HEError(ValueError):
    """A ciphertext that does not belong here: another context, or malformed."""


@dataclass
class HEContext:
    """A CKKS context: with the secret key at a site, without it at the server.

    ``fingerprint`` is a random id made with the key and carried with every copy of the
    context (TenSEAL's serialized keys differ from copy to copy, so they cannot name it): it
    tells a ciphertext of another context from one of this context, as a check against
    mistakes, not against a forger."""

    context: ts.Context
    fingerprint: bytes

    @classmethod
    def create(cls) -> HEContext:
        context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=POLY_MODULUS_DEGREE,
            coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES),
        )
        context.global_scale = 2.0**SCALE_BITS
        return cls(context, secrets.token_bytes(_FINGERPRINT_BYTES))

    @classmethod
    def from_bytes(cls, data: bytes) -> HEContext:
        """A context as :meth:`secret_bytes` or :meth:`public_bytes` wrote it."""
        try:
            context = ts.context_from(data[_FINGERPRINT_BYTES:])
        except (ValueError, RuntimeError) as exc:
            raise HEError(f"not a TenSEAL context: {exc}") from None
        return cls(context, data[:_FINGERPRINT_BYTES])

    @property
    def slots(self) -> int:
        return POLY_MODULUS_DEGREE // 2

    @property
    def is_private(self) -> bool:
        return bool(self.context.is_private())

    def secret_bytes(self) -> bytes:
        """The whole context, secret key included: only ever sealed for another site."""
        if not self.is_private:
            raise HEError("this context holds no secret key")
        return self.fingerprint + bytes(self.context.serialize(save_secret_key=True))

    def public_bytes(self) -> bytes:
        """The context without its secret key: what the server may hold."""
        public = self.context.copy()
        public.make_context_public()
        return self.fingerprint + bytes(public.serialize())


def encrypt(context: HEContext, values: np.ndarray) -> Iterator[bytes]:
    """``values`` (float) as serialized ciphertexts, one per batch of ``context.slots``,
    each prefixed with the context's fingerprint."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    fingerprint = context.fingerprint
    for start in range(0, len(flat), context.slots):
        batch = ts.ckks_vector(context.context, flat[start : start + context.slots].tolist())
        yield fingerprint + bytes(batch.serialize())


def add(context: HEContext, totals: list[bytes] | None, batches: Iterable[bytes]) -> list[bytes]:
    """The batch-wise sum of ``totals`` (None: none yet) and a site's ``batches``, computed
    under the public ``context``; :class:`HEError` for a batch of another context."""
    out: list[bytes] = []
    fingerprint = context.fingerprint
    for index, batch in enumerate(batches):
        vector = _vector(context, fingerprint, batch, index)
        if totals is not None:
            if index >= len(totals):
                raise HEError(f"batch {index}: more batches than the sum so far ({len(totals)})")
            so_far = _vector(context, fingerprint, totals[index], index)
            if vector.size() != so_far.size():
                raise HEError(
                    f"batch {index} holds {vector.size()} values, the sum so far {so_far.size()}"
                )
            vector = vector + so_far
        out.append(fingerprint + bytes(vector.serialize()))
    if totals is not None and len(out) != len(totals):
        raise HEError(f"{len(out)} batches, the sum so far has {len(totals)}")
    return out


def check_batch(context: HEContext, batch: bytes, index: int) -> int:
    """The number of values in ``batch`` when it is a ciphertext of ``context``;
    :class:`HEError` otherwise."""
    return int(_vector(context, context.fingerprint, batch, index).size())


def sum_batch(context: HEContext, batches: Iterable[bytes], index: int) -> bytes:
    """The sum of the sites' batch number ``index`` (one ciphertext each), read once each and
    written once: the server's step under the public ``context``."""
    total: ts.CKKSVector | None = None
    for batch in batches:
        vector = _vector(context, context.fingerprint, batch, index)
        if total is not None and vector.size() != total.size():
            raise HEError(f"batch {index} holds {vector.size()} values, the others {total.size()}")
        total = vector if total is None else total + vector
    if total is None:
        raise HEError(f"batch {index}: no ciphertext to add")
    return context.fingerprint + bytes(total.serialize())


def decrypt(context: HEContext, batches: Iterable[bytes], length: int) -> np.ndarray:
    """The first ``length`` values of ``batches``, decrypted with the secret ``context``."""
    if not context.is_private:
        raise HEError("decrypting needs the secret context, which only the sites hold")
    fingerprint = context.fingerprint
    values: list[float] = []
    for index, batch in enumerate(batches):
        values.extend(_vector(context, fingerprint, batch, index).decrypt())
    if len(values) < length:
        raise HEError(f"the ciphertexts hold {len(values)} values, {length} expected")
    return np.asarray(values[:length], dtype=np.float64)


def _vector(context: HEContext, fingerprint: bytes, batch: bytes, index: int) -> ts.CKKSVector:
    if batch[:_FINGERPRINT_BYTES] != fingerprint:
        raise HEError(f"batch {index} was encrypted under another context")
    try:
        return ts.ckks_vector_from(context.context, batch[_FINGERPRINT_BYTES:])
    except (ValueError, RuntimeError) as exc:
        raise HEError(f"batch {index} is not a CKKS ciphertext: {exc}") from None


def pack(batches: Iterable[bytes]) -> bytes:
    """Batches as one byte string: each with its length (4 bytes, big-endian) first."""
    return b"".join(struct.pack(">I", len(b)) + b for b in batches)


def unpack(data: bytes) -> list[bytes]:
    """The batches of :func:`pack`; :class:`HEError` for a cut or overlong length."""
    batches, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise HEError("a batch's length is cut")
        (size,) = struct.unpack_from(">I", data, offset)
        offset += 4
        if offset + size > len(data):
            raise HEError(f"a batch of {size} bytes is cut at {len(data) - offset}")
        batches.append(data[offset : offset + size])
        offset += size
    return batches
