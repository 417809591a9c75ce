"""Shamir's threshold secret sharing (1979) of 32-byte secrets.

A secret ``s`` becomes the constant term of a random polynomial of degree ``t − 1`` over the
prime field of :data:`PRIME` = 2**521 − 1 (a Mersenne prime, larger than any 32-byte
secret); share ``x`` is the polynomial's value at ``x``. Any ``t`` shares give ``s`` back
(Lagrange interpolation at 0); any ``t − 1`` shares are consistent with every secret, each
with the same number of polynomials, so they reveal nothing about it.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

PRIME = 2**521 - 1
SECRET_BYTES = 32


def split(
    secret: bytes, *, threshold: int, holders: list[int], prime: int = PRIME
) -> dict[int, int]:
    """Shares of ``secret`` for each holder (distinct integers ≥ 1, the share's x): any
    ``threshold`` of them recover it. ``prime`` is for tests with a small field."""
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"threshold must be in 1..{len(holders)} (the holders), got {threshold}")
    if len(set(holders)) != len(holders) or min(holders) < 1 or max(holders) >= prime:
        raise ValueError("holders must be distinct integers in 1..prime−1")
    value = int.from_bytes(secret, "big")
    if value >= prime:
        raise ValueError("the secret does not fit the field")
    coefficients = [value] + [secrets.randbelow(prime) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x, prime) for x in holders}


def combine(
    shares: Mapping[int, int], *, threshold: int, size: int = SECRET_BYTES, prime: int = PRIME
) -> bytes:
    """The secret from at least ``threshold`` shares (x → y); ValueError with fewer."""
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} share(s) given; {threshold} are needed")
    points = list(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                numerator = numerator * (-xj) % prime
                denominator = denominator * (xi - xj) % prime
        secret = (secret + yi * numerator * pow(denominator, -1, prime)) % prime
    if secret >= 1 << (8 * size):
        raise ValueError("the shares do not belong to one secret of this size")
    return secret.to_bytes(size, "big")


def _evaluate(coefficients: list[int], x: int, prime: int) -> int:
    value = 0
    for coefficient in reversed(coefficients):
        value = (value * x + coefficient) % prime
    return value
