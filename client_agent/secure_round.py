"""The agent's side of a protected round (secure aggregation): the phases of
:mod:`client_agent.secagg.session` over the portal's ``…/rounds/<n>/secure/`` endpoints.

The keys and the sealed shares are exchanged while the script trains (:meth:`setup`), so they
cost the round little time; the released update (after the site's privacy policy) is then
checked, weighted, masked or encrypted, and uploaded as a protected file
(:meth:`protected_file`); last, the agent answers the portal's finish request
(:meth:`finish`): the shares that remove the masks, or the decrypted sum.

The agent checks every other site's keys against the project's CA before it seals anything
for them: a portal that put its own keys on the roster is refused, and the round fails here
with the reason. The round's secrets live in memory only: an agent that restarts mid-round
is, for the protocol, a site that dropped out.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from client_agent import signing
from client_agent.fl_model import ParamsType
from client_agent.secagg.local import sessions_for
from client_agent.secagg.session import (
    SECURE_AGGREGATION_META_KEY,
    SiteSession,
    round_context,
)
from client_agent.secagg.upload import write_protected
from client_agent.secagg.vector import Layout
from client_agent.wire import read_header, read_model_file

if TYPE_CHECKING:
    from client_agent.agent import JobRunner

POLL_FIRST_SECONDS = 0.02
POLL_MOST_SECONDS = 0.5
ROUND_OVER = ("closed", "failed", "aggregating")


def secure_kind(task: dict[str, Any]) -> str | None:
    """How the portal asks this round's update to be protected (``"masking"``, ``"he"``), or
    None for a plain round."""
    meta = (task.get("task") or {}).get("meta") or {}
    kind = meta.get(SECURE_AGGREGATION_META_KEY)
    return str(kind) if kind else None


class SecureRoundOut(Exception):
    """The round went on without this site (it missed a phase, or the round ended)."""


def certificate_check(ca_pem: bytes) -> Any:
    """``verify(site, message, signature)``: the roster's certificate for ``site`` is issued
    by the project's CA to that site, and its key signed ``message``."""
    ca = x509.load_pem_x509_certificate(ca_pem)

    def verify(site: str, message: bytes, signature: bytes, *, roster: dict[str, Any]) -> bool:
        pem = (roster.get(site) or {}).get("certificate")
        if not isinstance(pem, str):
            return False
        try:
            certificate = x509.load_pem_x509_certificate(pem.encode())
            certificate.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):  # not a certificate, or not the CA's
            return False
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not names or names[0].value != site:
            return False
        return signing.verify_signature(certificate.public_key(), signature, message)

    return verify


class SecureRound:
    """One protected round at this site."""

    def __init__(self, runner: JobRunner, task: dict[str, Any], kind: str) -> None:
        self.runner = runner
        self.number = int(task["round"])
        self.meta = dict((task.get("task") or {}).get("meta") or {})
        self.base = str(task["update_url"]).removesuffix("update/") + "secure/"
        agent = runner.agent
        site = agent.identity.site
        self.site = site
        verify = certificate_check(agent.site_dir.ca_path.read_bytes())
        self.roster_keys: dict[str, Any] = {}
        self.upload_setup: Any = None
        site_cls, _ = sessions_for(kind)
        key = agent.client.key
        self.session: SiteSession = site_cls(
            site,
            context=round_context(runner.uid, self.number),
            round_number=self.number,
            sign=(lambda message: signing.sign_bytes(key, message)) if key is not None else None,
            verify=lambda s, m, sig: verify(s, m, sig, roster=self.roster_keys),
        )

    # -- the phases -------------------------------------------------------------------------

    async def setup(self) -> None:
        """Advertise this round's keys, seal and send the shares once the roster is in, then
        take the upload phase's setup and do what protecting needs ahead of the update (under
        masking, draw the masks): all while the script trains."""
        await self._post("keys", self.session.advertise())
        view = await self._wait(lambda v: v["phase"] != "keys")
        if view["phase"] != "shares" or "roster" not in view:
            raise SecureRoundOut("the round went on without this site's keys")
        self.roster_keys = dict(view["roster"].get("keys") or {})
        message = await asyncio.to_thread(self.session.share, view["roster"])
        await self._post("shares", message)
        self.upload_setup = await self._upload_setup()
        await asyncio.to_thread(self.session.prepare, self.upload_setup)

    async def _upload_setup(self) -> Any:
        view = await self._wait(lambda v: v["phase"] not in ("keys", "shares"))
        setup = view.get("setup")
        if setup is None:
            raise SecureRoundOut("the round went on without this site's shares")
        return setup

    async def protected_file(self, released: Path, model_path: Path) -> Path:
        """The released update, checked against the global model, weighted and protected, as
        the file to upload (beside ``released``)."""
        setup = self.upload_setup or await self._upload_setup()
        path = released.with_name(released.name.replace(".safetensors", ".protected.safetensors"))
        await asyncio.to_thread(self._protect, released, model_path, setup, path)
        # ``released`` stays until the round is over for this site: an agent that restarts
        # finds it, and knows its round keys are gone (it never sends it unprotected).
        return path

    def _protect(self, released: Path, model_path: Path, setup: Any, path: Path) -> None:
        from client_agent.config import EXCLUDE_VARS_META_KEY

        model = read_model_file(released)
        header, _ = read_header(model_path)
        shapes = {name: entry["shape"] for name, entry in header.items()}
        exclude = self.meta.get(EXCLUDE_VARS_META_KEY)
        layout = Layout.for_model(shapes, exclude)
        withheld = _withheld(model.meta)
        vector = layout.update_vector(
            dict(model.params or {}),
            weight=model.weight,
            model_names=set(shapes),
            withheld=withheld,
            global_params=lambda names: {
                n: t
                for n, t in (read_model_file(model_path).params or {}).items()
                if n in set(names)
            },
            diff=model.params_type == ParamsType.DIFF,
        )
        data = self.session.protect(vector, setup)
        write_protected(
            path,
            data,
            params_type=str(model.params_type or ParamsType.FULL),
            metrics=dict(model.metrics or {}),
            meta=dict(model.meta or {}),
        )

    async def finish(self) -> None:
        """Answer the finish request when there is one for this site; return when the round
        no longer needs this site: answered, or over. (Under HE a survivor may be asked late,
        when the one asked first did not answer.)"""
        try:
            view = await self._wait(lambda v: "request" in v and not v.get("answered"))
        except SecureRoundOut:
            return  # the round went on: nothing more is asked of this site
        request = view["request"]
        total = b""
        if request.get("total"):
            dest = self.runner.workspace / "updates" / f"round-{self.number:03d}-total.bin"
            await asyncio.to_thread(self.runner.client.download, self.base + "total/", dest)
            total = dest.read_bytes()
            dest.unlink(missing_ok=True)
        answer, data = await asyncio.to_thread(self.session.finish, request, total)
        body: dict[str, Any] = {"message": answer}
        if data:
            body["data"] = base64.b64encode(data).decode("ascii")
        await asyncio.to_thread(self.runner.client.post_signed, self.base + "finish/", body)

    # -- transport --------------------------------------------------------------------------

    async def _post(self, phase: str, message: dict[str, Any]) -> None:
        await asyncio.to_thread(
            self.runner.client.post_signed, self.base + f"{phase}/", {"message": message}
        )

    async def _wait(self, ready: Any) -> dict[str, Any]:
        """Poll the round's secure state until ``ready(view)``; :class:`SecureRoundOut` when
        the round ended first (closed without this site, or failed)."""
        pause = POLL_FIRST_SECONDS
        while True:
            view: dict[str, Any] = await asyncio.to_thread(self.runner.client.get, self.base)
            if ready(view):
                return view
            if view.get("round_state") in ROUND_OVER:
                raise SecureRoundOut(f"the round is {view.get('round_state')}")
            await asyncio.sleep(pause)
            pause = min(pause * 1.5, POLL_MOST_SECONDS)


def _withheld(meta: Any) -> list[str]:
    from client_agent.config import PRIVACY_META_KEY

    report = (meta or {}).get(PRIVACY_META_KEY)
    names = report.get("excluded") if isinstance(report, dict) else None
    return [str(n) for n in names] if isinstance(names, list) else []
