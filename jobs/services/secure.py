"""Secure aggregation on the portal: the phases of a protected round in the database.

A round of a job whose workflow sets ``secure_aggregation`` (``"masking"`` or ``"he"``) runs
the four phases of :mod:`client_agent.secagg.session` before it closes. ``Round.protection``
holds where it is::

    keys    every planned site posts its public keys     → the roster (the round's sites)
    shares  every roster site posts its sealed shares    → each site's setup (shared, inbox)
    upload  every site that shared uploads its protected update (the usual update upload;
            the check is the session's: sizes, ring, context) → the survivors; quorum
    summing HE only: a worker sums the survivors' uploads into ``Round.protected_total``,
            which the site asked to finish decrypts
    finish  the survivors post what removes the masks (or decrypt the sum)
    (then the round is claimed for aggregation as usual: under masking the uploads are
    summed and the masks removed in one pass, under HE the decrypted sum is read; the
    workflow closes from the sum: ``jobs.workflows.secure.close_from_sum``)

Each phase ends when every site it waits for has answered, or at its deadline
(``FEDPORTAL_SECURE_PHASE_SECONDS`` for keys, shares and finish; the round's deadline for
uploads); a site that misses a phase is out of the round from then on, and its masks are
removed with the others' shares. Too few sites at any point fail the round with the reason.

Everything is re-read from the database and storage at each step, like the rest of the
state machine: the server sessions keep no state, so a worker or portal restart carries on.
What the portal stores: public keys (with the site certificate they are signed with), sealed
boxes it cannot open, protected uploads, under HE their encrypted sum, and the shares that
remove the masks; never both kinds of share of one site.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Any

from cryptography import x509
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from client_agent.secagg.session import (
    PHASES,
    ProtocolError,
    Roster,
    ServerSession,
    SumsBeforeFinish,
    keys_message,
    unb64,
)
from client_agent.signing import verify_signature
from client_agent.wire import read_header
from common.exceptions import Conflict, ValidationFailed
from jobs import storage
from jobs.models import TASK_ANSWERED, Job, Round, RoundState, SecureMessage, SiteTask, TaskState
from jobs.services.kicks import kick_after_commit
from jobs.services.plans import protected_total_name, secure_data_name
from jobs.workflows import Workflow
from jobs.workflows.secure import layout_of, protection_of
from sites.models import Site

log = logging.getLogger(__name__)

PHASE_KEYS, PHASE_SHARES, PHASE_UPLOAD, PHASE_FINISH = PHASES
PHASE_SUMMING = "summing"
POSTED_PHASES = (PHASE_KEYS, PHASE_SHARES, PHASE_FINISH)


def protection_start(*, job: Job, workflow: Workflow, global_model_path: Any) -> dict[str, Any]:
    """``Round.protection`` of a round that opens: its kind, the length of the vector it sums
    (from the global model's header: no tensors read) and the keys phase's deadline; empty
    for a plain workflow."""
    kind = protection_of(workflow)
    if kind is None:
        return {}
    header, _ = read_header(global_model_path)
    specs = {name: (entry["dtype"], tuple(entry["shape"])) for name, entry in header.items()}
    return {
        "kind": kind,
        "phase": PHASE_KEYS,
        "length": layout_of(workflow, specs).length,
        "phase_deadline": _phase_deadline().isoformat(),
    }


def _phase_deadline() -> Any:
    return timezone.now() + timedelta(seconds=settings.FEDPORTAL_SECURE_PHASE_SECONDS)


def server_of(rnd: Round) -> ServerSession:
    from client_agent.secagg.local import sessions_for

    protection = rnd.protection
    _, server_cls = sessions_for(protection["kind"])
    server: ServerSession = server_cls(
        job=str(rnd.job.uid),
        round_number=rnd.number,
        length=int(protection["length"]),
        min_sites=rnd.job.min_clients,
    )
    return server


def _messages(rnd: Round, phase: str) -> dict[str, SecureMessage]:
    return {
        m.site.name: m
        for m in SecureMessage.objects.filter(round=rnd, phase=phase).select_related("site")
    }


def roster_of(rnd: Round) -> Roster:
    return Roster.from_json(rnd.protection["roster"])


def shares_of(rnd: Round) -> dict[str, dict[str, Any]]:
    return {name: dict(m.payload) for name, m in _messages(rnd, PHASE_SHARES).items()}


# --------------------------------------------------------------------------------------------
# What a site sees and sends
# --------------------------------------------------------------------------------------------


def secure_view(*, task: SiteTask) -> dict[str, Any]:
    """What the site needs now: the phase, the roster (from ``shares`` on), its setup (in
    ``upload``: who shared, its inbox) and, in ``finish``, its request."""
    rnd = task.round
    protection = rnd.protection
    if not protection:
        raise Conflict("this round has no secure aggregation")
    phase = protection.get("phase", PHASE_KEYS)
    view: dict[str, Any] = {
        "kind": protection["kind"],
        "phase": phase,
        "round_state": rnd.state,
    }
    site = task.site.name
    if "roster" in protection:
        view["roster"] = protection["roster"]
    if phase == PHASE_UPLOAD and site in protection.get("shared", ()):
        # Only while it is needed: under HE the setup carries the round's public context.
        roster = roster_of(rnd)
        setups = server_of(rnd).setups(roster, shares_of(rnd))
        view["setup"] = setups.get(site)
    requests = protection.get("requests") or {}
    if site in requests:
        view["request"] = requests[site]
        answered = SecureMessage.objects.filter(round=rnd, site=task.site, phase=PHASE_FINISH)
        view["answered"] = answered.exists()
    return view


def secure_message_post(
    *, task: SiteTask, phase: str, payload: Any, data: bytes = b""
) -> dict[str, Any]:
    """Store what the site sent in ``phase`` after the session's checks: 400 naming what is
    wrong, 409 when the round is not in that phase (or the site is not part of it). The same
    message sent again is taken once; a different one is refused."""
    if phase not in POSTED_PHASES:
        raise ValidationFailed(
            f"phase must be one of {', '.join(POSTED_PHASES)}, got {phase!r}", field="phase"
        )
    if not isinstance(payload, dict):
        raise ValidationFailed("the message must be a JSON object", field="message")
    with transaction.atomic():
        rnd = Round.objects.select_for_update().select_related("job").get(pk=task.round_id)
        protection = rnd.protection
        if not protection:
            raise Conflict("this round has no secure aggregation")
        existing = SecureMessage.objects.filter(round=rnd, site=task.site, phase=phase).first()
        if existing is not None:
            # Checked before the phase: the last site's message may have moved the phase on,
            # and the same message sent again (a retry) is answered as taken, not refused.
            if existing.payload != _comparable(rnd, task.site, phase, payload):
                raise Conflict(
                    f"{task.site.name} already sent its {phase} message, a different one"
                )
            return {"phase": phase, "stored": False}
        if rnd.state != RoundState.OPEN or protection.get("phase") != phase:
            raise Conflict(
                f"the round is {rnd.state}, in phase {protection.get('phase')!r}: a {phase} "
                "message is not taken now",
                code="round_closed" if rnd.state != RoundState.OPEN else "wrong_phase",
            )
        site = task.site.name
        expected = _waited_for(rnd, phase)
        if site not in expected:
            raise Conflict(f"{site} is not part of the round's {phase} phase", code="not_in_phase")
        server = server_of(rnd)
        try:
            if phase == PHASE_KEYS:
                checked = server.check_advert(site, payload)
                checked["certificate"] = _signed_by_site(rnd, task.site, checked)
            elif phase == PHASE_SHARES:
                checked = server.check_shares(roster_of(rnd), site, payload)
            else:
                checked = dict(payload)
                server.check_finish(
                    roster_of(rnd), site, protection["requests"][site], checked, data
                )
        except ProtocolError as exc:
            raise ValidationFailed(exc.reason, field=phase) from None
        message = SecureMessage(round=rnd, site=task.site, phase=phase, payload=checked)
        if data:
            name = secure_data_name(rnd.job, rnd.number, phase, site)
            message.data.name = default_storage.save(name, ContentFile(data))
        message.save()
        if set(_messages(rnd, phase)) >= set(expected):
            from jobs.services.rounds import job_kick_after_commit

            job_kick_after_commit(rnd.job)
    return {"phase": phase, "stored": True}


def _comparable(rnd: Round, site: Site, phase: str, payload: dict[str, Any]) -> Any:
    """``payload`` as it would have been stored, to tell a resent message from another one
    (a keys message is stored with the site's certificate; any that does not check is simply
    not the same message)."""
    server = server_of(rnd)
    try:
        if phase == PHASE_KEYS:
            checked = server.check_advert(site.name, payload)
            checked["certificate"] = _signed_by_site(rnd, site, checked)
            return checked
        if phase == PHASE_SHARES:
            return server.check_shares(roster_of(rnd), site.name, payload)
    except ProtocolError:
        return None
    return dict(payload)


def _signed_by_site(rnd: Round, site: Site, advert: dict[str, Any]) -> str:
    """The site's certificate (PEM) when its signature over the keys checks; the other sites
    check it again against the project's CA, so the portal cannot swap keys unnoticed."""
    from client_agent.secagg.he_session import HE_KEYS
    from client_agent.secagg.session import MASK_KEYS, MASKING

    names = MASK_KEYS if rnd.protection["kind"] == MASKING else HE_KEYS
    if "signature" not in advert:
        raise ProtocolError("the keys must be signed with the site's enrolment key", site=site.name)
    certificate = site.certificates.filter(revoked_at__isnull=True).order_by("-id").first()
    if certificate is None:
        raise ProtocolError(f"{site.name} holds no valid certificate", site=site.name)
    keys = [unb64(advert[name], name, site=site.name) for name in names]
    message = keys_message(_context(rnd), site.name, keys)
    public = x509.load_pem_x509_certificate(certificate.pem.encode()).public_key()
    if not verify_signature(public, unb64(advert["signature"], "signature"), message):
        raise ProtocolError(
            "the keys' signature does not check with the site's certificate", site=site.name
        )
    return str(certificate.pem)


def _context(rnd: Round) -> bytes:
    from client_agent.secagg.session import round_context

    return round_context(str(rnd.job.uid), rnd.number)


def _waited_for(rnd: Round, phase: str) -> list[str]:
    """The sites ``phase`` waits for: planned sites whose task has not failed (keys), the
    roster (shares), the sites asked (finish)."""
    protection = rnd.protection
    if phase == PHASE_KEYS:
        out = (TaskState.FAILED, TaskState.REJECTED, TaskState.LATE)
        return sorted(rnd.tasks.exclude(state__in=out).values_list("site__name", flat=True))
    if phase == PHASE_SHARES:
        return list(roster_of(rnd).sites)
    if phase == PHASE_FINISH:
        return sorted(protection.get("requests") or {})
    return []


# --------------------------------------------------------------------------------------------
# The state machine's steps (called by jobs.services.rounds under the job's lock)
# --------------------------------------------------------------------------------------------


class SecureStep:
    """What :func:`secure_round_step` found: wait (``waiting``), a failure (``failure``), a
    sum to make (``sum_due``) or the round ready to aggregate (``aggregate``)."""

    def __init__(
        self,
        *,
        waiting: str = "",
        failure: str = "",
        sum_due: bool = False,
        aggregate: bool = False,
    ) -> None:
        self.waiting, self.failure = waiting, failure
        self.sum_due, self.aggregate = sum_due, aggregate


def secure_round_step(rnd: Round) -> SecureStep:
    """The next step of a protected round that is open (job lock held): move a phase on when
    every site it waits for answered, or at its deadline; say what else is due."""
    protection = dict(rnd.protection)
    phase = protection.get("phase")
    now = timezone.now()
    deadline = parse_datetime(protection.get("phase_deadline") or "") or rnd.deadline
    if phase in (PHASE_KEYS, PHASE_SHARES):
        waited = _waited_for(rnd, phase)
        answered = _messages(rnd, phase)
        if not set(answered) >= set(waited) and now < deadline:
            return SecureStep(waiting=f"{phase}: {len(answered)} of {len(waited)} site(s)")
        server = server_of(rnd)
        try:
            if phase == PHASE_KEYS:
                adverts = {name: m.payload for name, m in answered.items()}
                protection["roster"] = server.roster(adverts).to_json()
                missing = sorted(set(waited) - set(adverts))
                next_phase = PHASE_SHARES
            else:
                roster = roster_of(rnd)
                shares = {name: dict(m.payload) for name, m in answered.items()}
                server.setups(roster, shares)  # enough sites, the key holder among them
                protection["shared"] = [s for s in roster.sites if s in shares]
                missing = sorted(set(roster.sites) - set(shares))
                next_phase = PHASE_UPLOAD
        except ProtocolError as exc:
            missing_now = sorted(set(waited) - set(answered))
            none_from = f"; none from {', '.join(missing_now)}" if missing_now else ""
            return SecureStep(failure=f"{rnd.label}: secure aggregation: {exc.reason}{none_from}")
        _out_of_round(rnd, missing, f"sent no {phase} before the phase ended")
        protection["phase"] = next_phase
        if next_phase == PHASE_UPLOAD:
            # Waiting for a site's keys or shares must not eat the others' upload time: the
            # uploads get the round's deadline, and at least a phase's time from now.
            rnd.deadline = max(rnd.deadline, _phase_deadline())
            rnd.save(update_fields=["deadline"])
            protection["phase_deadline"] = rnd.deadline.isoformat()
        else:
            protection["phase_deadline"] = _phase_deadline().isoformat()
        _protection_save(rnd, protection)
        _kick_at(rnd, protection["phase_deadline"])
        return SecureStep(waiting=f"{next_phase}: started")
    if phase == PHASE_UPLOAD:
        return SecureStep()  # the caller's plain rule: all answered or the deadline, quorum
    if phase == PHASE_SUMMING:
        return SecureStep(sum_due=True)
    if phase == PHASE_FINISH:
        waited = _waited_for(rnd, phase)
        answered = _messages(rnd, phase)
        if not set(answered) >= set(waited) and now < deadline:
            return SecureStep(waiting=f"finish: {len(answered)} of {len(waited)} site(s)")
        if not answered and _ask_next_decryptor(rnd, protection):
            return SecureStep(waiting="finish: the next survivor is asked to decrypt")
        return SecureStep(aggregate=True)
    return SecureStep(failure=f"{rnd.label}: secure aggregation in an unknown phase {phase!r}")


def _ask_next_decryptor(rnd: Round, protection: dict[str, Any]) -> bool:
    """Under HE, the survivor asked to decrypt the sum did not answer in time: ask the next
    one (every survivor holds the round's secret context). False when none is left, or for
    masking, where every survivor was asked at once."""
    requests = protection.get("requests") or {}
    if not any(request.get("total") for request in requests.values()):
        return False
    asked = list(protection.get("asked") or sorted(requests))
    left = [s for s in protection.get("survivors") or () if s not in asked]
    if not left:
        return False
    site = left[0]
    protection["requests"] = {site: next(iter(requests.values()))}
    protection["asked"] = [*asked, site]
    protection["phase_deadline"] = _phase_deadline().isoformat()
    _protection_save(rnd, protection)
    _kick_at(rnd, protection["phase_deadline"])
    return True


def uploads_closed(rnd: Round, survivors: list[str]) -> bool:
    """The upload phase ended with ``survivors`` (accepted, quorum met; job lock held).
    Under HE the protected sum is due next (the site asked to finish decrypts it): returns
    True. Under masking the survivors are asked to finish at once (the sum is taken with the
    masks' removal, in one pass at aggregation): returns False. :class:`ProtocolError`
    (``TooFewSites``) when the survivors could not remove the masks."""
    protection = dict(rnd.protection)
    protection["survivors"] = sorted(survivors)
    server = server_of(rnd)
    if isinstance(server, SumsBeforeFinish):
        protection["phase"] = PHASE_SUMMING
        _protection_save(rnd, protection)
        return True
    requests = server.finish_requests(roster_of(rnd), protection["shared"], survivors)
    _ask_to_finish(rnd, protection, requests)
    return False


def _ask_to_finish(
    rnd: Round, protection: dict[str, Any], requests: dict[str, Any], *also: str
) -> None:
    """Into the finish phase (round row locked): the ``requests`` and the phase's deadline
    saved, with the round's fields named in ``also``."""
    protection["requests"] = requests
    protection["phase"] = PHASE_FINISH
    protection["phase_deadline"] = _phase_deadline().isoformat()
    _protection_save(rnd, protection, *also)
    _kick_at(rnd, protection["phase_deadline"])


def round_sum(round_id: int) -> str:
    """Sum the survivors' protected uploads into ``Round.protected_total`` (long: no lock
    held; a re-run writes the same bytes), then ask the survivors to finish. Returns what it
    did, for logs."""
    rnd = Round.objects.select_related("job").get(pk=round_id)
    if rnd.state != RoundState.OPEN or rnd.protection.get("phase") != PHASE_SUMMING:
        return "nothing: not summing"
    protection = rnd.protection
    roster = roster_of(rnd)
    survivors = list(protection["survivors"])
    tasks = {
        t.site.name: t
        for t in SiteTask.objects.filter(round=rnd, site__name__in=survivors).select_related("site")
    }
    server = server_of(rnd)
    if not isinstance(server, SumsBeforeFinish):
        return "nothing: this protection sums at aggregation"
    shares = shares_of(rnd)
    from client_agent.secagg.upload import sum_uploads

    total_name = protected_total_name(rnd.job, rnd.number)
    total_path = storage.path_to_write(total_name)
    uploads = [(site, storage.local_path(tasks[site].update.name)) for site in survivors]
    sum_uploads(server, roster, uploads, shares, total_path)
    storage.publish(total_name)
    requests = server.finish_requests(roster, list(protection["shared"]), survivors)
    with transaction.atomic():
        locked = Round.objects.select_for_update().get(pk=round_id)
        if locked.state != RoundState.OPEN or locked.protection.get("phase") != PHASE_SUMMING:
            return "nothing: summed meanwhile"
        locked.protected_total = total_name
        _ask_to_finish(locked, dict(locked.protection), requests, "protected_total")
    return f"summed {len(survivors)} protected update(s)"


def protected_upload_check(task: SiteTask, path: Any) -> Any:
    """A protected update's check: it came in the upload phase from a site that shared, its
    weight and metrics are good numbers, and its protected bytes pass the session's check
    (the masked vector's length; each ciphertext under the round's context). A
    :class:`~jobs.workflows.TrainResult` whose tensors are not read (there are none to read:
    the server cannot), or :class:`ProtocolError` / ``UpdateRejected`` with the reason."""
    from client_agent.fl_model import FLModel, ParamsType
    from client_agent.secagg.upload import read_protected
    from jobs.aggregation import SiteUpdate, UpdateRejected
    from jobs.aggregation.sources import MemoryTensorSource
    from jobs.numbers import NumberRejected, check_result_metrics, check_update_weight
    from jobs.workflows import TrainResult

    rnd = task.round
    site = task.site.name
    protection = rnd.protection
    if protection.get("phase") != PHASE_UPLOAD or site not in protection.get("shared", ()):
        raise ProtocolError(
            f"an update outside the round's upload phase (now {protection.get('phase')!r}), "
            "or from a site that sent no shares: it could not be unmasked",
            site=site,
        )
    upload = read_protected(path)
    model = FLModel(**upload.fields)
    try:
        weight = check_update_weight(model.weight)
        metrics = check_result_metrics(model.metrics or {})
    except NumberRejected as exc:
        raise UpdateRejected(site, str(exc)) from None
    with upload.open(path) as stream:
        server_of(rnd).check_upload(roster_of(rnd), site, stream, shares_of(rnd))
    update = SiteUpdate(
        site=site,
        source=MemoryTensorSource({}),
        weight=weight,
        params_type=ParamsType(model.params_type or ParamsType.FULL),
        metrics=metrics,
    )
    return TrainResult(site, update)


def protected_sum(rnd: Round) -> Any:
    """The survivors' sum in the clear (float64), from the finish answers and, under masking,
    the survivors' uploads (memory maps: it sums them and removes the masks in one pass; HE
    reads the decrypted sum from the answer). :class:`ProtocolError` (with the reason) when too few
    answers came back."""
    from client_agent.secagg.upload import protected_arrays

    protection = rnd.protection
    answers = {}
    for name, message in _messages(rnd, PHASE_FINISH).items():
        data = b""
        if message.data:
            with message.data.open("rb") as fh:
                data = fh.read()
        answers[name] = (dict(message.payload), data)
    survivors = list(protection["survivors"])
    server = server_of(rnd)
    uploads = {}
    if not isinstance(server, SumsBeforeFinish):  # HE's result is in the answer alone
        tasks = SiteTask.objects.filter(round=rnd, site__name__in=survivors).select_related("site")
        uploads = protected_arrays({t.site.name: storage.local_path(t.update.name) for t in tasks})
    return server.result(roster_of(rnd), list(protection["shared"]), survivors, answers, uploads)


def protected_total_bytes(rnd: Round) -> Any:
    """The stored protected sum, for the site asked to decrypt it."""
    if not rnd.protected_total:
        raise Conflict("the round's protected sum is not made yet")
    return rnd.protected_total.storage.open(str(rnd.protected_total.name), "rb")


def _out_of_round(rnd: Round, sites: list[str], why: str) -> None:
    """Sites that missed a phase: their tasks fail with the reason (the round goes on)."""
    if not sites:
        return
    from jobs import events

    tasks = SiteTask.objects.filter(round=rnd, site__name__in=sites).exclude(
        state__in=TASK_ANSWERED
    )
    for task in tasks.select_related("site", "round__job"):
        task.state, task.reason = TaskState.FAILED, f"secure aggregation: {why}"
        task.save(update_fields=["state", "reason", "updated_at"])
        events.task_state(task)


def _protection_save(rnd: Round, protection: dict[str, Any], *also: str) -> None:
    rnd.protection = protection
    rnd.save(update_fields=["protection", *also])


def kick_at_phase_deadline(rnd: Round) -> None:
    """A job_advance at the deadline of the round's current phase."""
    _kick_at(rnd, rnd.protection["phase_deadline"])


def _kick_at(rnd: Round, deadline_iso: str) -> None:
    """A job_advance at the phase's deadline (the phase ends then if sites are missing)."""
    from jobs.tasks import job_advance_task

    deadline = parse_datetime(deadline_iso)
    if deadline is None:
        return
    seconds = max(0.0, (deadline - timezone.now()).total_seconds()) + 1
    job_id = rnd.job_id
    kick_after_commit(lambda: job_advance_task.apply_async((job_id,), countdown=seconds))


def protection_cost(rnd: Round) -> dict[str, Any]:
    """What protecting the round cost: bytes each site sent beyond a plain float32 update
    (its keys, its shares, the protected upload's excess, its finish answer), on average."""
    protection = rnd.protection
    if not protection:
        return {}
    sizes: dict[str, int] = {}
    for message in SecureMessage.objects.filter(round=rnd).select_related("site"):
        sizes[message.site.name] = sizes.get(message.site.name, 0) + len(
            json.dumps(message.payload)
        )
        if message.data:
            sizes[message.site.name] += message.data.size
    plain = 4 * int(protection["length"])
    for task in SiteTask.objects.filter(round=rnd, update_size__isnull=False).select_related(
        "site"
    ):
        sizes[task.site.name] = sizes.get(task.site.name, 0) + int(task.update_size or 0) - plain
    count = max(1, len(sizes))
    return {"extra_bytes_per_site": round(sum(sizes.values()) / count)}
