"""One-time secrets (enrolment and invitation tokens, API keys): made here, stored as SHA-256.

A secret is a short type prefix plus 256 random bits in URL-safe base64, e.g. ``fpe_…`` for an
enrolment token. The prefix tells a person (and secret scanners) what a leaked string is. With
that much entropy a plain SHA-256 cannot be brute-forced, so lookups can go by hash in one
indexed query, and a slow password hash would add nothing.
"""

from __future__ import annotations

import hashlib
import secrets

ENROLMENT_TOKEN_PREFIX = "fpe_"
INVITATION_TOKEN_PREFIX = "fpi_"
API_TOKEN_PREFIX = "fpt_"


def new_secret(prefix: str) -> tuple[str, str]:
    """A fresh ``(plaintext, sha256 hex)`` pair. Show the plaintext once; store the hash."""
    plaintext = prefix + secrets.token_urlsafe(32)
    return plaintext, hash_secret(plaintext)


def hash_secret(plaintext: str) -> str:
    return hashlib.sha256(plaintext.strip().encode("utf-8")).hexdigest()
