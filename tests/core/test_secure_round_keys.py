"""The agent's check of the keys on a protected round's roster: each site's certificate is
issued by the project's CA to that site, and its key signed the keys. A portal that puts
keys of its own on the roster, or a certificate of another CA, is refused."""

from __future__ import annotations

import functools

import pytest

from client_agent import signing
from client_agent.secagg.session import (
    MaskingServer,
    MaskingSite,
    ProtocolError,
    round_context,
)
from client_agent.secure_round import certificate_check
from sites import ca

PROJECT = "hospital-net"


def issued(authority: ca.NewCA, site: str) -> tuple[signing.PrivateKey, str]:
    key = signing.generate_key()
    certificate = ca.sign_csr(
        csr_pem=signing.make_csr(key, site, PROJECT),
        ca_certificate_pem=authority.certificate_pem,
        ca_private_key_pem=authority.private_key_pem,
        site_name=site,
        project_name=PROJECT,
        organization_name="Org A",
        validity_days=30,
    )
    return key, certificate.pem


@pytest.fixture(scope="module")
def authority() -> ca.NewCA:
    return ca.create_ca(project_name=PROJECT, validity_days=30)


def roster_for(
    authority: ca.NewCA, *, certificate_of: dict[str, str] | None = None
) -> tuple[dict[str, MaskingSite], dict]:
    """Three sites' sessions, each signing with its enrolment key, and the roster the portal
    makes of their keys with each site's certificate (or the ones ``certificate_of`` says)."""
    context = round_context("job-1", 0)
    verify = certificate_check(authority.certificate_pem.encode())
    roster_keys: dict = {}
    sessions, certificates = {}, {}
    for name in ("site-1", "site-2", "site-3"):
        key, pem = issued(authority, name)
        certificates[name] = pem
        sessions[name] = MaskingSite(
            name,
            context=context,
            round_number=0,
            sign=functools.partial(signing.sign_bytes, key),
            verify=lambda s, m, sig: verify(s, m, sig, roster=roster_keys),
        )
    server = MaskingServer(job="job-1", round_number=0, length=4, min_sites=3)
    adverts = {n: server.check_advert(n, s.advertise()) for n, s in sessions.items()}
    roster = server.roster(adverts).to_json()
    for name in sessions:
        pem = (certificate_of or {}).get(name, certificates[name])
        roster["keys"][name]["certificate"] = pem
    roster_keys.update(roster["keys"])
    return sessions, roster


def test_keys_signed_by_the_sites_certified_by_the_ca_are_taken(authority: ca.NewCA) -> None:
    sessions, roster = roster_for(authority)
    assert set(sessions["site-1"].share(roster)["boxes"]) == {"site-2", "site-3"}


def test_a_certificate_of_another_ca_is_refused(authority: ca.NewCA) -> None:
    stranger = ca.create_ca(project_name=PROJECT, validity_days=30)
    _, forged = issued(stranger, "site-2")
    sessions, roster = roster_for(authority, certificate_of={"site-2": forged})
    with pytest.raises(ProtocolError, match="keys on the roster for site-2 are not signed"):
        sessions["site-1"].share(roster)


def test_another_sites_certificate_is_refused(authority: ca.NewCA) -> None:
    _, other = issued(authority, "site-9")  # genuine, but for another site
    sessions, roster = roster_for(authority, certificate_of={"site-3": other})
    with pytest.raises(ProtocolError, match="keys on the roster for site-3 are not signed"):
        sessions["site-1"].share(roster)


def test_keys_swapped_by_the_portal_are_refused(authority: ca.NewCA) -> None:
    from client_agent.secagg.session import b64

    sessions, roster = roster_for(authority)
    roster["keys"]["site-2"]["mask_public"] = b64(bytes(range(32)))
    with pytest.raises(ProtocolError, match="keys on the roster for site-2 are not signed"):
        sessions["site-3"].share(roster)
