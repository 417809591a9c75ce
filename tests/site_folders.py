"""A site folder as ``python -m client_agent enrol`` leaves it: made without a portal
(``enrolled_folder``), for tests of the agent's own behaviour, where nothing is sent (or
sending fails at once); or for a site enrolled in the test database (``site_folder``), for the
agent against a real portal."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from client_agent import signing
from client_agent.site_dir import SiteDir, SiteIdentity

if TYPE_CHECKING:
    from tests.portal.factories import EnrolledSite


def identity(portal: str = "http://127.0.0.1:9") -> SiteIdentity:
    return SiteIdentity(
        portal=portal,
        site="site-1",
        project="p",
        project_name="P",
        organization="O",
        serial="1",
        fingerprint="ab" * 32,
        not_after="2030-01-01T00:00:00Z",
    )


def enrolled_folder(path: Path, portal: str = "http://127.0.0.1:9") -> SiteDir:
    folder = SiteDir(path)
    folder.save(identity(portal), key=signing.generate_key(), cert_pem="unused", ca_pem="unused")
    return folder


def site_folder(path: Path, enrolled: EnrolledSite, portal: str) -> SiteDir:
    """The folder ``client_agent enrol`` leaves for ``enrolled``."""
    certificate = enrolled.certificate
    folder = SiteDir(path)
    held = SiteIdentity(
        portal=portal,
        site=enrolled.site.name,
        project=enrolled.site.project.slug,
        project_name=enrolled.site.project.name,
        organization=enrolled.site.organization.name,
        serial=certificate.serial,
        fingerprint=certificate.fingerprint,
        not_after=certificate.not_after.isoformat(),
    )
    folder.save(
        held,
        key=enrolled.key,
        cert_pem=certificate.pem,
        ca_pem=enrolled.ca_certificate_pem,
    )
    return folder
