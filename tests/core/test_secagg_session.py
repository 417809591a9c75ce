"""The protected round as messages (client_agent.secagg.session, he_session, local): the sum
the server gets, what it stores, and how bad messages are refused, each by the site that
sent it."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

from client_agent.secagg import ring
from client_agent.secagg.local import run_local
from client_agent.secagg.session import (
    HOMOMORPHIC,
    MASKING,
    MaskingServer,
    MaskingSite,
    ProtocolError,
    TooFewSites,
    b64,
    error_bound,
    round_context,
)
from client_agent.secagg.vector import Layout
from tests.ring_uniformity import UNIFORM_CHI2_MAX, chi2_top_bits

JOB = "job-1"


def updates(sites: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"site-{i}": rng.normal(scale=3.0, size=length) for i in range(sites)}


def exact_sum(vectors: dict[str, np.ndarray], survivors: list[str], sites: int) -> np.ndarray:
    """What masking must give bit for bit: the ring sum of the quantized values."""
    total = np.zeros(len(next(iter(vectors.values()))), dtype=np.uint64)
    for site in survivors:
        total += ring.quantize(vectors[site], sites=sites)
    return ring.dequantize(total)


@pytest.mark.parametrize("sites", [3, 5, 10])
def test_the_masked_sum_is_the_plain_sum_within_the_stated_bound(sites: int) -> None:
    vectors = updates(sites, 2_000, seed=sites)
    result = run_local(MASKING, vectors, job=JOB, round_number=2)

    plain = sum(vectors.values())
    # The bound per value of the mean, times the sites for the sum (weights of 1).
    assert np.max(np.abs(result.total - plain)) <= error_bound(sites, 1.0)
    assert np.array_equal(result.total, exact_sum(vectors, list(vectors), sites))


@pytest.mark.parametrize("dropped", [["site-3"], ["site-2", "site-6"]])
def test_sites_dropped_after_sharing_are_recovered_exactly(dropped: list[str]) -> None:
    vectors = updates(8, 1_000)
    result = run_local(MASKING, vectors, job=JOB, round_number=0, drop_after_shares=dropped)

    survivors = [s for s in vectors if s not in dropped]
    assert list(result.survivors) == survivors
    assert np.array_equal(result.total, exact_sum(vectors, survivors, 8))


def test_a_survivor_that_vanishes_before_revealing_is_not_needed() -> None:
    vectors = updates(10, 500)
    result = run_local(
        MASKING,
        vectors,
        job=JOB,
        round_number=1,
        drop_after_shares=["site-4"],
        drop_before_finish=["site-7"],
    )
    survivors = [s for s in vectors if s != "site-4"]
    assert np.array_equal(result.total, exact_sum(vectors, survivors, 10))


def test_every_stored_upload_is_uniform_in_the_ring() -> None:
    # All that the server keeps of a site's update is its masked vector: it passes the
    # uniformity test of tests.ring_uniformity, which tells an unmasked quantized update from
    # uniform, so it can fail.
    vectors = {site: np.zeros(40_000) for site in ("a", "b", "c", "d")}
    vectors["b"][:] = 1.0  # a site whose update is all ones: still uniform once masked
    result = run_local(MASKING, vectors, job=JOB, round_number=0, drop_after_shares=["d"])

    for site, stored in result.stored.items():
        assert chi2_top_bits(np.frombuffer(stored, dtype="<u8")) < UNIFORM_CHI2_MAX, site
    assert chi2_top_bits(ring.quantize(vectors["b"], sites=4)) > 1_000


def test_no_site_reveals_both_secrets_of_one_site() -> None:
    # The server recovers b of every survivor and the mask key of every dropped site; with
    # both of one site it could unmask that site alone.
    context = round_context(JOB, 0)
    names = [f"site-{i}" for i in range(6)]
    sites = {n: MaskingSite(n, context=context, round_number=0) for n in names}
    server = MaskingServer(job=JOB, round_number=0, length=10, min_sites=3)
    roster = server.roster({n: server.check_advert(n, s.advertise()) for n, s in sites.items()})
    shares = {
        n: server.check_shares(roster, n, s.share(roster.to_json())) for n, s in sites.items()
    }
    setups = server.setups(roster, shares)
    for name in names[:-1]:
        sites[name].protect(np.ones(10), setups[name])
    requests = server.finish_requests(roster, names, names[:-1])
    revealed: dict[str, set[str]] = {}
    for name, request in requests.items():
        answer, _ = sites[name].finish(request)
        for owner in answer["self_seed_shares"]:
            revealed.setdefault(owner, set()).add("seed")
        for owner in answer["mask_key_shares"]:
            revealed.setdefault(owner, set()).add("key")
    assert revealed["site-5"] == {"key"}
    assert all(kinds == {"seed"} for owner, kinds in revealed.items() if owner != "site-5")
    # Asked again with other survivors (a server trying to get both), a site refuses.
    other = {"survivors": names[1:-1], "dropped": [names[0], names[-1]]}
    with pytest.raises(ProtocolError, match="asked twice with different survivors"):
        sites["site-1"].finish(other)
    assert sites["site-1"].finish(requests["site-1"])[0]["self_seed_shares"]  # a retry: same


def test_too_few_sites_fail_with_the_reason() -> None:
    with pytest.raises(TooFewSites, match="1 site\\(s\\) sent their keys; .* at least 2"):
        run_local(MASKING, updates(1, 10), job=JOB, round_number=0)
    with pytest.raises(TooFewSites, match="2 masked update\\(s\\) came; .* at least 3"):
        run_local(
            MASKING,
            updates(4, 10),
            job=JOB,
            round_number=0,
            min_sites=3,
            drop_after_shares=["site-0", "site-1"],
        )


def round_to_upload(length: int = 8, names: tuple[str, ...] = ("a", "b", "c")):
    context = round_context(JOB, 3)
    sites = {n: MaskingSite(n, context=context, round_number=3) for n in names}
    server = MaskingServer(job=JOB, round_number=3, length=length, min_sites=3)
    roster = server.roster({n: server.check_advert(n, s.advertise()) for n, s in sites.items()})
    return context, sites, server, roster


def test_bad_messages_are_refused_naming_the_site_and_what_was_wrong() -> None:
    _, sites, server, roster = round_to_upload()
    with pytest.raises(ProtocolError, match="mask_public: 5 bytes, expected 32") as caught:
        server.check_advert("a", {"mask_public": b64(b"short"), "seal_public": b64(bytes(32))})
    assert caught.value.site == "a"
    with pytest.raises(ProtocolError, match="not base64"):
        server.check_advert("a", {"mask_public": "@@@", "seal_public": b64(bytes(32))})
    message = sites["a"].share(roster.to_json())
    with pytest.raises(ProtocolError, match="sealed shares for \\['b'\\]; a's neighbours"):
        server.check_shares(roster, "a", {"boxes": {"b": message["boxes"]["b"]}})
    shares = {
        n: server.check_shares(roster, n, s.share(roster.to_json()))
        for n, s in sites.items()
        if n != "a"
    }
    shares["a"] = server.check_shares(roster, "a", message)
    setups = server.setups(roster, shares)
    upload = sites["a"].protect(np.ones(8), setups["a"])
    with pytest.raises(
        ProtocolError, match="masked vector is 56 bytes; the round's is 64"
    ) as caught:
        server.check_upload(roster, "a", io.BytesIO(upload[:-8]), shares)
    assert caught.value.site == "a"
    # A tampered box is refused at its receiver, naming the sender.
    box = bytearray(base64.b64decode(setups["b"]["inbox"]["c"]))
    box[-1] ^= 1
    tampered = {**setups["b"], "inbox": {**setups["b"]["inbox"], "c": b64(bytes(box))}}
    with pytest.raises(ProtocolError, match="from site 2 do not open") as caught:
        sites["b"].protect(np.ones(8), tampered)
    assert caught.value.site == "c"
    request = {"survivors": ["a", "b", "c"], "dropped": []}
    with pytest.raises(ProtocolError, match="must be a hexadecimal share") as caught:
        server.check_finish(roster, "b", request, {"self_seed_shares": {"a": 12}}, b"")
    assert caught.value.site == "b"
    with pytest.raises(ProtocolError, match="holds no such share of 'zz'"):
        server.check_finish(roster, "b", request, {"self_seed_shares": {"zz": "ff"}}, b"")


def shared_round(length: int = 8, names: tuple[str, ...] = ("a", "b", "c")):
    """A masked round of ``names`` through the shares phase: its sessions, server, roster,
    shares and each site's setup for the upload phase."""
    _, sites, server, roster = round_to_upload(length, names)
    shares = {
        n: server.check_shares(roster, n, s.share(roster.to_json())) for n, s in sites.items()
    }
    return sites, server, roster, shares, server.setups(roster, shares)


def test_masks_drawn_while_training_give_the_upload_drawn_at_upload_time() -> None:
    sites, _, _, _, setups = shared_round(length=70_000, names=("a", "b", "c", "d", "e"))
    update = Layout.of({"w": (700, 100)}).weighted(
        {"w": np.random.default_rng(3).normal(size=(700, 100)).astype(np.float32)}, weight=2.5
    )
    site = sites["a"]
    site.prepare(setups["a"])  # the agent's: as soon as the setup is in
    drawn_ahead = bytes(site.protect(update, setups["a"]))
    assert site.drawn is None  # the masks went into that upload: never into a second one
    drawn_now = bytes(site.protect(update, setups["a"]))  # nothing prepared: drawn here
    assert drawn_ahead == drawn_now
    # the float64 vector of the same update gives the same bits as its weighted tensors
    assert bytes(site.protect(update.array(), setups["a"])) == drawn_now
    # masks drawn for other sites that shared are drawn again for the setup that came
    fewer = {**setups["a"], "shared": ["a", "b", "c", "d"]}
    site.prepare(setups["a"])
    assert bytes(site.protect(update, fewer)) != drawn_now
    assert site.shared == ("a", "b", "c", "d")


def test_the_server_refuses_a_missing_or_cut_masked_vector_at_the_sum_naming_the_site() -> None:
    sites, server, roster, _, setups = shared_round()
    uploads = {
        n: np.frombuffer(s.protect(np.ones(8), setups[n]), dtype=np.uint8) for n, s in sites.items()
    }
    request = server.finish_requests(roster, list(setups), sorted(sites))
    answers = {n: s.finish(request[n]) for n, s in sites.items()}
    survivors = sorted(sites)
    assert server.result(roster, survivors, survivors, answers, uploads).tolist() == [3.0] * 8
    with pytest.raises(ProtocolError, match="masked vector of b, a survivor, is missing"):
        server.result(roster, survivors, survivors, answers, {"a": uploads["a"], "c": uploads["c"]})
    with pytest.raises(ProtocolError, match="56 bytes; the round's is 64") as caught:
        server.result(roster, survivors, survivors, answers, {**uploads, "c": uploads["c"][8:]})
    assert caught.value.site == "c"


def test_a_roster_with_keys_the_site_did_not_sign_is_refused() -> None:
    # The portal relays keys; a portal that swaps one for its own is caught by the signature.
    from cryptography.hazmat.primitives.asymmetric import ed25519

    keys = {n: ed25519.Ed25519PrivateKey.generate() for n in ("a", "b", "c")}

    def verify(site: str, message: bytes, signature: bytes) -> bool:
        try:
            keys[site].public_key().verify(signature, message)
        except Exception:
            return False
        return True

    context = round_context(JOB, 0)
    sites = {
        n: MaskingSite(n, context=context, round_number=0, sign=keys[n].sign, verify=verify)
        for n in keys
    }
    server = MaskingServer(job=JOB, round_number=0, length=4, min_sites=3)
    adverts = {n: server.check_advert(n, s.advertise()) for n, s in sites.items()}
    assert sites["a"].share(server.roster(adverts).to_json())["boxes"]  # signed: accepted
    swapped = dict(adverts, b={**adverts["b"], "mask_public": b64(bytes(range(32)))})
    with pytest.raises(ProtocolError, match="keys on the roster for b are not signed by b"):
        sites["c"].share(server.roster(swapped).to_json())


def test_the_encrypted_sum_is_the_plain_sum_within_ckks_precision() -> None:
    vectors = {k: v / 3.0 for k, v in updates(3, 9_000).items()}  # three batches of 4096
    result = run_local(HOMOMORPHIC, vectors, job=JOB, round_number=0)

    assert np.max(np.abs(result.total - sum(vectors.values()))) < 1e-5
    # The server stored ciphertexts only: none of them is a site's values in the clear.
    for site, stored in result.stored.items():
        assert vectors[site].astype("<f8").tobytes()[:64] not in stored


def test_an_encrypted_upload_of_another_context_is_refused_naming_the_site() -> None:
    from client_agent import he
    from client_agent.secagg.he_session import HEServer, HESite

    context = round_context(JOB, 0)
    sites = {n: HESite(n, context=context, round_number=0) for n in ("a", "b", "c")}
    server = HEServer(job=JOB, round_number=0, length=100, min_sites=3)
    roster = server.roster({n: server.check_advert(n, s.advertise()) for n, s in sites.items()})
    shares = {
        n: server.check_shares(roster, n, s.share(roster.to_json())) for n, s in sites.items()
    }
    setups = server.setups(roster, shares)
    good = sites["b"].protect(np.ones(100), setups["b"])
    server.check_upload(roster, "b", io.BytesIO(good), shares)
    stranger = he.pack(he.encrypt(he.HEContext.create(), np.ones(100)))
    with pytest.raises(ProtocolError, match="encrypted under another context") as caught:
        server.check_upload(roster, "c", io.BytesIO(stranger), shares)
    assert caught.value.site == "c"
    with pytest.raises(ProtocolError, match="holds the secret key"):
        secret = he.HEContext.create()
        server.check_shares(
            roster, "a", {"public_context": b64(secret.secret_bytes()), "boxes": {}}
        )
    with pytest.raises(ProtocolError, match="only a shares this round's context"):
        server.check_shares(roster, "b", {"public_context": "x"})


def test_an_update_is_checked_at_the_site_before_it_is_weighted_and_protected() -> None:
    import torch

    from client_agent.secagg.vector import UpdateShapeError

    layout = Layout.of({"b": (2,), "w": (2, 3)})
    params = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": np.ones(2)}
    update = layout.weighted(params, weight=0.5)
    assert len(update) == 8
    # the layout's order (by name), weight × values in float64, no copy of the tensors made
    assert update.array().tolist() == [0.5, 0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    nan = {**params, "w": torch.tensor([[0.0, float("nan"), 1.0]] * 2)}
    for bad, message in (
        ({"w": params["w"]}, "no tensor 'b'"),
        ({**params, "x": np.ones(1)}, "tensor 'x', which the round does not sum"),
        ({**params, "b": np.ones(3)}, "'b' has shape \\(3,\\)"),
        (nan, "'w' holds NaN or Inf"),
        ({**params, "b": np.array(["a", "b"])}, "'b' holds <U1, not numbers"),
    ):
        with pytest.raises(UpdateShapeError, match=message):
            layout.weighted(bad)
