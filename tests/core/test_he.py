"""CKKS through TenSEAL: sites encrypt, the server adds under the public context only."""

from __future__ import annotations

import numpy as np
import pytest

from client_agent import he


@pytest.fixture(scope="module")
def site_context() -> he.HEContext:
    return he.HEContext.create()


def test_the_encrypted_sum_equals_the_plain_sum_within_ckks_precision(
    site_context: he.HEContext,
) -> None:
    rng = np.random.default_rng(0)
    length = site_context.slots * 2 + 123  # three batches, the last one partial
    updates = [rng.uniform(-1, 1, size=length) for _ in range(3)]
    server = he.HEContext.from_bytes(site_context.public_bytes())
    assert not server.is_private
    total = None
    for update in updates:
        total = he.add(server, total, he.unpack(he.pack(he.encrypt(site_context, update))))
    assert total is not None and len(total) == 3
    got = he.decrypt(site_context, total, length)
    assert np.max(np.abs(got - np.sum(updates, axis=0))) < 3 * he.PRECISION


def test_the_server_cannot_decrypt(site_context: he.HEContext) -> None:
    server = he.HEContext.from_bytes(site_context.public_bytes())
    batches = list(he.encrypt(site_context, np.ones(10)))
    with pytest.raises(he.HEError, match="secret context"):
        he.decrypt(server, batches, 10)
    with pytest.raises(he.HEError, match="no secret key"):
        server.secret_bytes()


def test_another_sites_context_shares_the_key_through_its_secret_bytes(
    site_context: he.HEContext,
) -> None:
    other_site = he.HEContext.from_bytes(site_context.secret_bytes())
    assert other_site.fingerprint == site_context.fingerprint
    batches = list(he.encrypt(other_site, np.array([0.5, -0.25])))
    assert np.allclose(he.decrypt(site_context, batches, 2), [0.5, -0.25], atol=he.PRECISION)


def test_a_ciphertext_of_another_context_is_refused(site_context: he.HEContext) -> None:
    stranger = he.HEContext.create()
    server = he.HEContext.from_bytes(site_context.public_bytes())
    ours = he.add(server, None, he.encrypt(site_context, np.ones(5)))
    with pytest.raises(he.HEError, match="another context"):
        he.add(server, ours, he.encrypt(stranger, np.ones(5)))


def test_malformed_or_mismatched_batches_are_refused(site_context: he.HEContext) -> None:
    server = he.HEContext.from_bytes(site_context.public_bytes())
    good = list(he.encrypt(site_context, np.ones(5)))
    with pytest.raises(he.HEError, match="not a CKKS ciphertext"):
        he.add(server, None, [good[0][:16] + b"garbage"])
    with pytest.raises(he.HEError, match="cut"):
        he.unpack(he.pack(good)[:-3])
    two = list(he.encrypt(site_context, np.ones(site_context.slots + 1)))
    with pytest.raises(he.HEError, match="holds 5 values, the sum so far 4096"):
        he.add(server, he.add(server, None, two), good)
    one_full = list(he.encrypt(site_context, np.ones(site_context.slots)))
    with pytest.raises(he.HEError, match="more batches than the sum so far"):
        he.add(server, he.add(server, None, one_full), two)
    with pytest.raises(he.HEError, match="1 batches, the sum so far has 2"):
        he.add(server, he.add(server, None, two), one_full)
