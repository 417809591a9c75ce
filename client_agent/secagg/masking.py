"""One round of masking: the neighbour graph, a site's masked vector, the server's unmasking.

Sites are numbered 0…n−1. Each site ``i`` has neighbours (:func:`neighbours`: a circulant
Harary graph, each site joined to the ``degree / 2`` sites on either side, so the work per
site grows with the degree, O(log n), not with n) and, per round:

- a *self seed* ``b_i`` and a mask key pair (X25519), both Shamir-shared among its neighbours
  with threshold ``t`` (:func:`default_threshold`);
- a masked vector ``y_i = x_i + PRG(b_i) + Σ_{j ∈ N(i)} ±PRG(s_ij)`` in Z/2**64, ``+`` when
  ``i < j`` and ``−`` otherwise, ``s_ij`` the seed sites i and j agree
  (:func:`client_agent.secagg.keys.pair_seed`).

The server sums the ``y_i`` of the sites that answered (the survivors). The pairwise masks of
two survivors cancel in that sum. For every survivor the server then asks its neighbours for
shares of ``b_i`` (and removes ``PRG(b_i)``); for every site that dropped out after sharing
it asks for shares of that site's mask private key (and removes the masks it shared with its
surviving neighbours). A neighbour reveals, for one site, the self-seed share or the key
share, never both: with both, the server could unmask a survivor's vector on its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from client_agent.secagg import prg, shamir
from client_agent.secagg.keys import KeyPair, pair_seed


def default_degree(sites: int) -> int:
    """Neighbours per site: 2·⌈log2 n⌉ (even), at most n − 1 (all the others)."""
    if sites < 2:
        raise ValueError(f"secure aggregation needs at least 2 sites, got {sites}")
    return min(sites - 1, 2 * math.ceil(math.log2(sites)))


def default_threshold(degree: int) -> int:
    """Shares needed to recover a secret: a majority of the neighbours."""
    return degree // 2 + 1


def neighbours(sites: int, degree: int | None = None) -> dict[int, list[int]]:
    """Each site's neighbours: the ``degree / 2`` sites on either side in a ring of the
    ``sites`` sites (all others when ``degree ≥ sites − 1``). Symmetric."""
    degree = default_degree(sites) if degree is None else degree
    if degree >= sites - 1:
        return {i: [j for j in range(sites) if j != i] for i in range(sites)}
    if degree < 2 or degree % 2:
        raise ValueError(f"the degree must be even and ≥ 2 (or ≥ sites − 1), got {degree}")
    half = degree // 2
    return {
        i: sorted({(i + step) % sites for step in range(-half, half + 1)} - {i})
        for i in range(sites)
    }


def masked_input(
    values: np.ndarray,
    *,
    me: int,
    self_seed: bytes,
    pair_seeds: Mapping[int, bytes],
    nonce: bytes,
    in_place: bool = False,
) -> np.ndarray:
    """``values`` (ring elements) plus this site's self mask and its pairwise masks; with
    ``in_place`` (``values`` a ``uint64`` array the caller no longer needs) no copy is made."""
    masked: np.ndarray = values if in_place else np.array(values, dtype=np.uint64)
    if me in pair_seeds:
        raise ValueError("a site shares no pairwise mask with itself")
    masks = [(self_seed, False)] + [(seed, me > other) for other, seed in pair_seeds.items()]
    prg.add_masks(masked, masks, nonce=nonce)
    return masked


def unmask_sum(
    masked: Sequence[np.ndarray],
    *,
    survivors: Iterable[int],
    graph: Mapping[int, list[int]],
    self_seeds: Mapping[int, bytes],
    dropped_keys: Mapping[int, bytes],
    public_keys: Mapping[int, bytes],
    context: bytes,
    nonce: bytes,
) -> np.ndarray:
    """The sum of the survivors' values from their ``masked`` vectors (``uint64``, e.g.
    memory maps of the uploads), in one pass: each chunk summed and its masks removed while
    it is in the cache, so the masked sum is never written whole. The masks removed: each
    survivor's self mask (``self_seeds``, recovered from shares), and the masks each dropped
    site ``j`` (``dropped_keys``: its recovered mask private key) shared with surviving
    neighbours."""
    survivors = set(survivors)
    missing = survivors - set(self_seeds)
    if missing:
        raise ValueError(f"no self seed for surviving site(s) {sorted(missing)}")
    if not masked or len({len(vector) for vector in masked}) != 1:
        raise ValueError("unmasking needs one or more masked vectors, all of one length")
    masks = [(self_seeds[site], True) for site in sorted(survivors)]
    for dropped, private in sorted(dropped_keys.items()):
        if dropped in survivors:
            raise ValueError(f"site {dropped} answered: its mask key must never be recovered")
        for site in graph[dropped]:
            if site not in survivors:
                continue
            seed = pair_seed(private, public_keys[site], context=context, pair=(site, dropped))
            # y_site holds +PRG(seed) when site < dropped, −PRG(seed) otherwise.
            masks.append((seed, site < dropped))
    first, rest = masked[0], masked[1:]
    out = np.empty(len(first), dtype=np.uint64)

    def unmask_part(begin: int, end: int) -> None:
        stream = prg.MaskStream(masks, nonce=nonce, begin=begin)
        for start in range(begin, end, prg.CHUNK):
            stop = min(start + prg.CHUNK, end)
            part = out[start:stop]
            np.copyto(part, first[start:stop], casting="same_kind")
            for vector in rest:
                np.add(part, vector[start:stop], out=part, casting="same_kind")
            stream.apply(part)

    prg.in_parts(len(out), unmask_part)
    return out


def recover(shares: Mapping[int, int], *, threshold: int) -> bytes:
    """A self seed or a mask private key from its revealed shares (holder → share)."""
    return shamir.combine(shares, threshold=threshold)


def share_secrets(
    *, me: int, self_seed: bytes, keys: KeyPair, graph: Mapping[int, list[int]], threshold: int
) -> dict[int, tuple[int, int]]:
    """Shares of this site's self seed and mask private key for each neighbour:
    neighbour → (self-seed share, key share). Shares are indexed by holder id + 1 (x ≥ 1)."""
    holders = [j + 1 for j in graph[me]]
    seed_shares = shamir.split(self_seed, threshold=threshold, holders=holders)
    key_shares = shamir.split(keys.private, threshold=threshold, holders=holders)
    return {j: (seed_shares[j + 1], key_shares[j + 1]) for j in graph[me]}
