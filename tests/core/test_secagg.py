"""Secure aggregation's pure parts: fixed point in Z/2**64, masks, Shamir sharing, X25519
seeds, and one round of SecAgg+ masking with sites dropping out after they masked."""

from __future__ import annotations

import itertools
import secrets
from typing import Any

import numpy as np
import pytest

from client_agent.secagg import prg, ring, shamir
from client_agent.secagg.keys import KeyPair, pair_seed
from client_agent.secagg.masking import (
    default_degree,
    default_threshold,
    masked_input,
    neighbours,
    recover,
    share_secrets,
    unmask_sum,
)
from client_agent.secagg.sealed import SealedShareError, open_sealed, seal
from tests.ring_uniformity import UNIFORM_CHI2_MAX, chi2_top_bits

CONTEXT = b"job-1"


# -- the ring ----------------------------------------------------------------------------------


def test_quantized_sums_read_back_within_the_stated_bound() -> None:
    rng = np.random.default_rng(0)
    values = [rng.normal(scale=10.0, size=10_000) for _ in range(5)]
    total = np.zeros(10_000, dtype=np.uint64)
    for v in values:
        total += ring.quantize(v, sites=5)
    mean = ring.dequantize(total) / 5
    error = np.max(np.abs(mean - np.mean(values, axis=0)))
    assert 0 < error <= ring.mean_error_bound()


def test_the_ring_wraps_and_negative_values_come_back() -> None:
    big = ring.quantize(np.array([-3.5, 2.25]), sites=2)
    assert big.dtype == np.uint64 and big[0] > 2**63  # two's complement
    assert ring.dequantize(big + ring.quantize(np.array([1.5, -0.25]), sites=2)).tolist() == [
        -2.0,
        2.0,
    ]


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_a_value_that_is_not_finite_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        ring.quantize(np.array([1.0, bad]), sites=3)


def test_a_value_whose_sum_could_leave_the_range_is_refused() -> None:
    limit = ring.max_magnitude(10)
    ring.quantize(np.array([limit * 0.99]), sites=10)
    with pytest.raises(ValueError, match="too large to sum over 10 sites"):
        ring.quantize(np.array([limit]), sites=10)


# -- masks ----------------------------------------------------------------------------------


def test_a_mask_is_the_same_for_the_same_seed_and_nonce_only() -> None:
    seed = bytes(range(32))
    first = prg.mask(seed, 1000, nonce=prg.round_nonce(0))
    assert np.array_equal(first, prg.mask(seed, 1000, nonce=prg.round_nonce(0)))
    assert not np.array_equal(first, prg.mask(seed, 1000, nonce=prg.round_nonce(1)))
    assert not np.array_equal(first, prg.mask(bytes(32), 1000, nonce=prg.round_nonce(0)))
    with pytest.raises(ValueError, match="32 bytes"):
        prg.mask(b"short", 10)


# -- Shamir ---------------------------------------------------------------------------------


def test_a_mask_drawn_in_chunks_is_the_key_stream_drawn_whole() -> None:
    # add_masks draws a cache-sized chunk at a time; across the chunks' borders the counter
    # runs on, so the mask is the one key stream, and adding then subtracting it is exact.
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    seed, nonce = bytes(range(32)), prg.round_nonce(7)
    length = 2 * prg.CHUNK + 5
    whole = Cipher(algorithms.AES(seed), modes.CTR(nonce)).encryptor().update(bytes(8 * length))
    assert np.array_equal(prg.mask(seed, length, nonce=nonce), np.frombuffer(whole, dtype="<u8"))
    values = np.arange(length, dtype=np.uint64)
    prg.add_masks(values, [(seed, False), (bytes(32), True), (seed, True)], nonce=nonce)
    prg.add_mask(values, bytes(32), nonce=nonce)
    assert np.array_equal(values, np.arange(length, dtype=np.uint64))


def test_any_threshold_shares_recover_the_secret_and_fewer_do_not() -> None:
    secret = secrets.token_bytes(32)
    shares = shamir.split(secret, threshold=3, holders=[1, 2, 3, 4, 5])
    for chosen in itertools.combinations(shares, 3):
        assert shamir.combine({x: shares[x] for x in chosen}, threshold=3) == secret
    with pytest.raises(ValueError, match="2 share"):
        shamir.combine({1: shares[1], 2: shares[2]}, threshold=3)


def test_shares_below_the_threshold_are_consistent_with_every_secret_equally() -> None:
    # In a field small enough to enumerate every polynomial: the shares of holders 1 and 2
    # under threshold 3 are met by exactly one polynomial whatever the secret is, so they
    # favour no secret over another.
    prime = 13
    observed = {1: 7, 2: 4}
    counts = {}
    for secret in range(prime):
        counts[secret] = sum(
            all((secret + a * x + b * x * x) % prime == y for x, y in observed.items())
            for a in range(prime)
            for b in range(prime)
        )
    assert set(counts.values()) == {1}


def test_split_refuses_bad_holders_and_thresholds() -> None:
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(bytes(32), threshold=4, holders=[1, 2, 3])
    with pytest.raises(ValueError, match="distinct"):
        shamir.split(bytes(32), threshold=2, holders=[1, 1, 2])
    with pytest.raises(ValueError, match="distinct"):
        shamir.split(bytes(32), threshold=2, holders=[0, 1])


# -- keys -----------------------------------------------------------------------------------


def test_both_sites_of_a_pair_derive_the_same_seed_bound_to_the_job() -> None:
    a, b = KeyPair.generate(), KeyPair.generate()
    ab = pair_seed(a.private, b.public, context=CONTEXT, pair=(0, 1))
    assert ab == pair_seed(b.private, a.public, context=CONTEXT, pair=(1, 0))
    assert ab != pair_seed(a.private, b.public, context=b"job-2", pair=(0, 1))
    assert KeyPair.from_private(a.private) == a


# -- one round ------------------------------------------------------------------------------


def test_the_graph_is_symmetric_with_the_stated_degree() -> None:
    for sites in (2, 3, 10, 50):
        degree = default_degree(sites)
        graph = neighbours(sites, degree)
        assert all(len(others) == degree for others in graph.values())
        assert all(i in graph[j] for i, others in graph.items() for j in others)
    assert default_degree(50) == 12  # grows with log n, not n


class Round:
    """Every site's secrets, shares and masked vector for one round."""

    def __init__(self, sites: int, length: int, degree: int | None = None) -> None:
        self.sites = sites
        self.graph = neighbours(sites, degree)
        self.threshold = default_threshold(len(self.graph[0]))
        self.nonce = prg.round_nonce(4)
        rng = np.random.default_rng(1)
        self.values = {i: rng.normal(size=length) for i in range(sites)}
        self.keys = {i: KeyPair.generate() for i in range(sites)}
        self.publics = {i: k.public for i, k in self.keys.items()}
        self.seeds = {i: secrets.token_bytes(32) for i in range(sites)}
        self.held: dict[int, dict[int, tuple[int, int]]] = {}
        for i in range(sites):
            shares = share_secrets(
                me=i,
                self_seed=self.seeds[i],
                keys=self.keys[i],
                graph=self.graph,
                threshold=self.threshold,
            )
            for holder, share in shares.items():
                self.held.setdefault(holder, {})[i] = share
        self.masked = {
            i: masked_input(
                ring.quantize(self.values[i], sites=sites),
                me=i,
                self_seed=self.seeds[i],
                pair_seeds={
                    j: pair_seed(
                        self.keys[i].private, self.publics[j], context=CONTEXT, pair=(i, j)
                    )
                    for j in self.graph[i]
                },
                nonce=self.nonce,
            )
            for i in range(sites)
        }

    def aggregate(self, dropped: set[int]) -> np.ndarray:
        """What the server computes from the survivors' masked vectors and revealed shares."""
        survivors = set(range(self.sites)) - dropped
        total = np.zeros_like(self.masked[0])
        for i in survivors:
            total += self.masked[i]
        seeds = {
            i: recover(
                {h + 1: self.held[h][i][0] for h in self.graph[i] if h in survivors},
                threshold=self.threshold,
            )
            for i in survivors
        }
        keys = {
            j: recover(
                {h + 1: self.held[h][j][1] for h in self.graph[j] if h in survivors},
                threshold=self.threshold,
            )
            for j in dropped
        }
        return ring.dequantize(
            unmask_sum(
                [total],
                survivors=survivors,
                graph=self.graph,
                self_seeds=seeds,
                dropped_keys=keys,
                public_keys=self.publics,
                context=CONTEXT,
                nonce=self.nonce,
            )
        )


@pytest.mark.parametrize("dropped", [set(), {3}, {3, 7}])
def test_the_unmasked_sum_equals_the_plain_sum_with_sites_dropped_after_masking(
    dropped: set[int],
) -> None:
    one = Round(sites=10, length=5_000, degree=6)
    survivors = [i for i in range(10) if i not in dropped]
    plain = np.sum([one.values[i] for i in survivors], axis=0)
    got = one.aggregate(dropped)
    assert np.max(np.abs(got - plain)) <= len(survivors) * ring.mean_error_bound()


def test_too_few_surviving_neighbours_fail_the_recovery() -> None:
    one = Round(sites=7, length=10, degree=4)  # threshold 3 of 4 neighbours
    with pytest.raises(ValueError, match="needed"):
        one.aggregate({2, 4})  # site 3 keeps only 1 and 5


def test_a_masked_vector_is_uniform_in_the_ring() -> None:
    # What the portal stores of one site (tests.ring_uniformity); the unmasked values are far
    # from uniform.
    one = Round(sites=5, length=50_000)
    for vector in (one.masked[0], ring.quantize(one.values[0], sites=5)):
        chi2 = chi2_top_bits(vector)
        uniform = chi2 < UNIFORM_CHI2_MAX
        assert uniform == (vector is one.masked[0]), chi2


def test_a_survivors_mask_key_is_never_recovered() -> None:
    one = Round(sites=5, length=10)
    with pytest.raises(ValueError, match="answered"):
        unmask_sum(
            [np.zeros(10, dtype=np.uint64)],
            survivors={0, 1},
            graph=one.graph,
            self_seeds={0: one.seeds[0], 1: one.seeds[1]},
            dropped_keys={1: one.keys[1].private},
            public_keys=one.publics,
            context=CONTEXT,
            nonce=one.nonce,
        )


# -- sealed shares --------------------------------------------------------------------------


def _sealed_pair() -> tuple[KeyPair, KeyPair, bytes]:
    alice, bob = KeyPair.generate(), KeyPair.generate()
    box = seal(
        (12345, 2**520 + 7),
        sender=0,
        receiver=1,
        sender_private=alice.private,
        receiver_public=bob.public,
        context=CONTEXT,
        round_number=3,
    )
    return alice, bob, box


def test_sealed_shares_open_for_their_receiver_only() -> None:
    alice, bob, box = _sealed_pair()
    opened = open_sealed(
        box,
        sender=0,
        receiver=1,
        receiver_private=bob.private,
        sender_public=alice.public,
        context=CONTEXT,
        round_number=3,
    )
    assert opened == (12345, 2**520 + 7)
    eve = KeyPair.generate()
    with pytest.raises(SealedShareError, match="from site 0 do not open"):
        open_sealed(
            box,
            sender=0,
            receiver=1,
            receiver_private=eve.private,
            sender_public=alice.public,
            context=CONTEXT,
            round_number=3,
        )


@pytest.mark.parametrize(
    ("sender", "round_number", "damage", "message"),
    [
        (0, 4, "", "do not open"),  # replayed into another round
        (2, 3, "", "do not open"),  # passed off as another site's
        (0, 3, "flip", "do not open"),
        (0, 3, "cut", "bytes, expected"),
    ],
)
def test_a_sealed_box_replayed_tampered_or_cut_is_refused_with_the_reason(
    sender: int, round_number: int, damage: str, message: str
) -> None:
    alice, bob, box = _sealed_pair()
    if damage == "flip":
        box = box[:-1] + bytes([box[-1] ^ 1])
    if damage == "cut":
        box = box[:-5]
    with pytest.raises(SealedShareError, match=message):
        open_sealed(
            box,
            sender=sender,
            receiver=1,
            receiver_private=bob.private,
            sender_public=alice.public,
            context=CONTEXT,
            round_number=round_number,
        )


# -- the fast paths give the plain paths' bits ------------------------------------------------


def test_a_long_mask_drawn_on_threads_is_the_key_stream_drawn_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Over THREADED_FROM elements the vector is cut into parts, each drawn on its own thread
    # from its own place in the key stream; three parts (on any machine) must give the bits of
    # one stream, and of one thread.
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    monkeypatch.setattr(prg, "workers", lambda: 3)
    seed, nonce = bytes(range(32)), prg.round_nonce(2**40 + 3)
    length = prg.THREADED_FROM + 3 * prg.CHUNK + 7  # odd: the last part ends mid-block
    assert len(prg._parts(length, 3)) == 3
    whole = Cipher(algorithms.AES(seed), modes.CTR(nonce)).encryptor().update(bytes(8 * length))
    assert np.array_equal(prg.mask(seed, length, nonce=nonce), np.frombuffer(whole, dtype="<u8"))
    values = np.arange(length, dtype=np.uint64)
    seeds = [(seed, False), (bytes(32), True), (bytes([7]) * 32, False)]
    prg.add_masks(values, seeds, nonce=nonce)
    monkeypatch.setattr(prg, "workers", lambda: 1)
    one_thread = np.arange(length, dtype=np.uint64)
    prg.add_masks(one_thread, seeds, nonce=nonce)
    assert np.array_equal(values, one_thread)


@pytest.mark.parametrize(("length", "count"), [(0, 2), (5, 4), (prg.CHUNK, 2), (10**6 + 1, 3)])
def test_the_parts_cover_the_vector_end_to_end_starting_at_whole_chunks(
    length: int, count: int
) -> None:
    parts = prg._parts(length, count)
    assert parts[0][0] == 0 and parts[-1][1] == length and len(parts) <= count
    assert all(end == start for (_, end), (start, _) in itertools.pairwise(parts))
    assert all(start % prg.CHUNK == 0 for start, _ in parts)


def test_a_mask_stream_starts_only_at_an_even_element() -> None:
    with pytest.raises(ValueError, match="even element"):
        prg.MaskStream([(bytes(32), False)], begin=3)


def test_quantizing_weighted_pieces_into_a_vector_adds_the_quantized_weighted_values() -> None:
    rng = np.random.default_rng(5)
    pieces: list[np.ndarray] = [
        rng.normal(size=70_000).astype(np.float32),  # over a chunk
        np.arange(6, dtype=np.int64).reshape(-1),
        rng.normal(size=3),
    ]
    weight = 3.7
    start = rng.integers(0, 2**63, size=sum(p.size for p in pieces)).astype(np.uint64)
    out = start.copy()
    ring.add_quantized(out, pieces, weight=weight, sites=4)
    flat = np.concatenate([p.astype(np.float64) * weight for p in pieces])
    assert np.array_equal(out, start + ring.quantize(flat, sites=4))


def test_a_value_too_large_or_not_finite_leaves_the_vector_as_it_was() -> None:
    out = np.arange(4, dtype=np.uint64)
    limit = ring.max_magnitude(3)
    for bad, message in ((limit / 2, "too large"), (float("nan"), "finite")):
        with pytest.raises(ValueError, match=message):
            # the weight makes the second piece's value too large
            ring.add_quantized(out, [np.zeros(2), np.array([1.0, bad])], weight=2.0, sites=3)
        assert out.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="1-D uint64 array of as many"):
        ring.add_quantized(out, [np.zeros(5)], sites=3)


def test_dequantizing_in_place_gives_the_same_values() -> None:
    ring_values = ring.quantize(np.random.default_rng(2).normal(size=70_001) * 1e3, sites=2)
    expected = ring.dequantize(ring_values)
    assert np.array_equal(ring.dequantize(ring_values.copy(), in_place=True), expected)


@pytest.mark.parametrize("dropped", [set(), {3}])
def test_unmasking_the_uploads_in_one_pass_is_unmasking_their_sum(dropped: set[int]) -> None:
    one = Round(sites=6, length=1_000, degree=4)
    survivors = [i for i in range(6) if i not in dropped]
    common: dict[str, Any] = dict(
        survivors=survivors,
        graph=one.graph,
        self_seeds={i: one.seeds[i] for i in survivors},
        dropped_keys={j: one.keys[j].private for j in dropped},
        public_keys=one.publics,
        context=CONTEXT,
        nonce=one.nonce,
    )
    total = np.zeros(1_000, dtype=np.uint64)
    for i in survivors:
        total += one.masked[i]
    in_one_pass = unmask_sum([one.masked[i] for i in survivors], **common)
    assert np.array_equal(in_one_pass, unmask_sum([total], **common))
    plain = np.sum([ring.quantize(one.values[i], sites=6) for i in survivors], axis=0)
    assert np.array_equal(in_one_pass, plain)
    with pytest.raises(ValueError, match="all of one length"):
        unmask_sum([one.masked[0], one.masked[1][:-1]], **common)
