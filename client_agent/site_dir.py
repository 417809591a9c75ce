"""The site's folder: its identity (key, certificate, portal) and its job workspaces.

Layout (``--dir``, default ``$FEDPORTAL_SITE_DIR`` or ``./fedportal-site``)::

    site.json     portal URL, site, project, certificate serial and fingerprint
    site.key      the private key, mode 0600; made here, never sent anywhere
    site.crt      the site's certificate, issued by the project's CA
    ca.crt        the project CA's certificate (it signs the sites' certificates)
    tls-ca.pem    the CA bundle that verifies the portal's TLS certificate, when enrolled with
                  ``--ca-file`` (optional; otherwise the system's trust store: client_agent.tls)
    privacy.toml  the site's privacy policy, written by the site admin (optional; see
                  client_agent.privacy.policy); the agent reads it at start, never writes it
    privacy-ledger.json  what the site has spent: each noised release per job (mode 0600)
    jobs/<uid>/   one workspace per job: app/ (the client script), models/, updates/, work/,
                  log.txt, spec.json, and app-rejected.json when its app archive was refused;
                  models/round-NNN.safetensors is the model round NNN starts from, and
                  updates/round-NNN.safetensors its update (rounds counted from 0), and
                  updates/round-NNN.enforced.safetensors what of it may leave under the
                  privacy policy (sent again as it is after a restart)
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from client_agent import signing

DEFAULT_DIR_ENV = "FEDPORTAL_SITE_DIR"


def default_dir() -> Path:
    return Path(os.environ.get(DEFAULT_DIR_ENV) or "fedportal-site")


class NotEnrolled(RuntimeError):
    """The folder holds no enrolled site."""


@dataclass(frozen=True)
class SiteIdentity:
    portal: str
    site: str
    project: str
    project_name: str
    organization: str
    serial: str
    fingerprint: str
    not_after: str


class SiteDir:
    """A site's folder. Its path is made absolute once, here: everything derived from it (a
    job's model files, handed to a script that runs in another directory) must not depend on
    the directory the agent was started in."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = (Path(path) if path is not None else default_dir()).resolve()

    @property
    def config_path(self) -> Path:
        return self.path / "site.json"

    @property
    def key_path(self) -> Path:
        return self.path / "site.key"

    @property
    def cert_path(self) -> Path:
        return self.path / "site.crt"

    @property
    def ca_path(self) -> Path:
        return self.path / "ca.crt"

    @property
    def tls_ca_path(self) -> Path:
        return self.path / "tls-ca.pem"

    def tls_ca_file(self) -> Path | None:
        """The site's own CA bundle for the portal's TLS certificate, if it has one."""
        return self.tls_ca_path if self.tls_ca_path.exists() else None

    @property
    def jobs_path(self) -> Path:
        return self.path / "jobs"

    def job_path(self, uid: str) -> Path:
        return self.jobs_path / uid

    def is_enrolled(self) -> bool:
        return self.config_path.exists() and self.key_path.exists() and self.cert_path.exists()

    def identity(self) -> SiteIdentity:
        if not self.is_enrolled():
            raise NotEnrolled(
                f"{self.path} holds no enrolled site (site.json, site.key and site.crt); run "
                "`python -m client_agent enrol --portal URL --token TOKEN --dir "
                f"{self.path}` first"
            )
        try:
            data = json.loads(self.config_path.read_text())
            return SiteIdentity(**{k: str(data[k]) for k in SiteIdentity.__dataclass_fields__})
        except (ValueError, KeyError, TypeError) as exc:
            raise NotEnrolled(f"{self.config_path} is damaged ({exc}); enrol again") from exc

    def key(self) -> signing.PrivateKey:
        mode = self.key_path.stat().st_mode & 0o777
        if mode & 0o077:
            raise PermissionError(
                f"{self.key_path} is readable by others (mode {mode:o}); run chmod 600 on it"
            )
        return signing.load_key(self.key_path)

    def save(
        self,
        identity: SiteIdentity,
        *,
        key: signing.PrivateKey,
        cert_pem: str,
        ca_pem: str,
        tls_ca_pem: str | None = None,
    ) -> None:
        """Write the identity into a private folder (0700); the key first. Every file is the
        owner's only (0600) from the moment it exists, not after a chmod. ``tls_ca_pem`` (the
        CA bundle for the portal's TLS certificate) is written, or, when None, a bundle left
        by an earlier enrolment is removed: the new identity trusts what it was enrolled with."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        signing.save_key(self.key_path, key)
        write_private(self.cert_path, cert_pem.encode())
        write_private(self.ca_path, ca_pem.encode())
        if tls_ca_pem is None:
            self.tls_ca_path.unlink(missing_ok=True)
        else:
            write_private(self.tls_ca_path, tls_ca_pem.encode())
        write_private(self.config_path, (json.dumps(asdict(identity), indent=2) + "\n").encode())


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only (0600) from the start, under a
    temporary name renamed over ``path``: no other user sees it, even for a moment, and a
    crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
