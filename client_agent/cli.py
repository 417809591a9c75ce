"""``python -m client_agent enrol | run | status | doctor | policy``: what a site admin types.

Exit codes: 0 done; 1 a check failed or bad input (the message says which); 2 usage, or a
privacy policy (``privacy.toml``) that cannot be enforced or a damaged privacy ledger (the
message names the file, line and field); 3 the portal refuses this site (revoked, unknown
certificate, not enrolled).

``policy show`` prints the site's privacy policy, its file and SHA-256, and what the site has
spent (ε per job and for the project, from its ledger); ``policy check`` checks the file and
prints what it implies: ε after N rounds, the rounds a job may run, the noise a budget would
need, and with ``--job UID`` what that job is expected to spend here.

Every command refuses a plain ``http://`` portal on another machine (the enrolment token and
every signed request would cross the network in clear text) unless given ``--insecure``; a
portal on this machine (localhost, 127.0.0.0/8, ::1) needs no flag. An ``https://`` portal's
certificate is always verified (``client_agent.tls``): against the CA bundle given to ``enrol
--ca-file`` and kept in the site folder, else the system's trust store; a refused certificate
is reported with its reason, never skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import email.utils
import http.client
import logging
import os
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from client_agent import signing
from client_agent.portal import (
    InsecurePortal,
    PortalClient,
    PortalError,
    PortalUnreachable,
    PortalUntrusted,
    WireLog,
    WireRecorder,
    require_secure_transport,
)
from client_agent.privacy import accounting
from client_agent.privacy.ledger import LedgerDamaged, PrivacyLedger
from client_agent.privacy.policy import POLICY_FILE, PolicyError, PrivacyPolicy, assess_job
from client_agent.site_dir import NotEnrolled, SiteDir, SiteIdentity, default_dir
from client_agent.tls import BadCABundle, read_ca_bundle
from common.rounds import round_for_people

ENROL_CHECK_PATH = "/api/v1/enrol/check/"
ENROL_PATH = "/api/v1/enrol/"
HEALTH_PATH = "/healthz"
MAX_CLOCK_SKEW_SECONDS = 60  # the portal allows ±300 s; warn well before that
EXIT_BAD_POLICY = 2
CHECK_ROUNDS = (1, 5, 10, 20, 50)


class CommandError(RuntimeError):
    """Bad input or a failed step; the message says what to do."""


def _dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        default=None,
        help=f"the site's folder (default: $FEDPORTAL_SITE_DIR or ./{default_dir()})",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow a plain http:// portal on another machine (tokens and requests then "
        "cross the network in clear text); a portal on this machine needs no flag",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m client_agent",
        description="FedPortal site agent: enrol this site, then run its federated jobs.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    enrol = commands.add_parser(
        "enrol", help="make this site's key, get its certificate with a one-time token"
    )
    enrol.add_argument(
        "--portal", required=True, help="the portal's URL, e.g. https://fl.example.org"
    )
    enrol.add_argument("--token", required=True, help="the one-time enrolment token")
    enrol.add_argument(
        "--force", action="store_true", help="replace an identity already in the folder"
    )
    enrol.add_argument(
        "--ca-file",
        "--root-certificates",
        dest="ca_file",
        type=Path,
        metavar="PEM",
        help="the CA certificate(s), PEM, that signed the portal's TLS certificate, when it is "
        "not one the system trusts (a private CA): checked, copied into the site folder "
        "(tls-ca.pem) and used for every later connection of this site instead of the "
        "system's trust store",
    )
    _dir_arg(enrol)
    run = commands.add_parser("run", help="connect to the portal and run this site's jobs")
    _dir_arg(run)
    run.add_argument(
        "--poll-seconds",
        type=float,
        default=10.0,
        help="look for work at least this often even without a signal (default 10)",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="log more")
    run.add_argument(
        "--wire-log",
        metavar="FILE",
        help="append a JSON line to FILE for everything the agent sends (bodies of JSON "
        "messages; tensor names and shapes of updates), to audit what leaves the site",
    )
    status = commands.add_parser("status", help="who this site is and its jobs on the portal")
    _dir_arg(status)
    doctor = commands.add_parser(
        "doctor", help="check the folder, the portal, the certificate and the clock"
    )
    _dir_arg(doctor)
    policy = commands.add_parser(
        "policy", help="show or check the site's privacy policy (privacy.toml) and its spending"
    )
    policy_commands = policy.add_subparsers(dest="policy_command", required=True, metavar="WHAT")
    show = policy_commands.add_parser(
        "show", help="the policy's rules, its file and SHA-256, and ε spent per job and project"
    )
    _dir_arg(show)
    check = policy_commands.add_parser(
        "check", help="check privacy.toml and print what it implies (ε after N rounds, …)"
    )
    _dir_arg(check)
    check.add_argument(
        "--rounds",
        type=_positive_int,
        nargs="+",
        default=list(CHECK_ROUNDS),
        metavar="N",
        help="round counts to print ε for (default: 1 5 10 20 50)",
    )
    check.add_argument(
        "--job",
        metavar="UID",
        help="also ask the portal for this job's rounds and print what it would spend here",
    )
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None, *, wire: WireRecorder | None = None) -> int:
    """Run one command; ``wire`` is shown everything it sends (``run --wire-log`` writes
    it to a file instead)."""
    args = build_parser().parse_args(argv)
    site_dir = SiteDir(args.dir)
    try:
        if args.command == "enrol":
            return enrol(
                site_dir,
                portal=args.portal,
                token=args.token,
                force=args.force,
                insecure=args.insecure,
                wire=wire,
                ca_file=args.ca_file,
            )
        if args.command == "policy":
            if args.policy_command == "show":
                return policy_show(site_dir)
            return policy_check(
                site_dir, rounds=args.rounds, job=args.job, insecure=args.insecure, wire=wire
            )
        if args.command == "run":
            logging.basicConfig(
                level=logging.INFO if args.verbose else logging.WARNING,
                format="%(asctime)s %(name)s %(levelname)s %(message)s",
            )
            # websockets only when running
            from client_agent.agent import Agent

            if args.wire_log:
                wire = WireLog(Path(os.path.abspath(args.wire_log)))
            # The privacy policy and ledger are read here, before anything connects: a bad
            # one stops the agent with its line and field.
            agent = Agent(
                site_dir, poll_seconds=args.poll_seconds, insecure=args.insecure, wire=wire
            )
            return asyncio.run(agent.run())
        if args.command == "status":
            return status(site_dir, insecure=args.insecure, wire=wire)
        return doctor(site_dir, insecure=args.insecure, wire=wire)
    except (PolicyError, LedgerDamaged) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_POLICY
    # PortalUntrusted before PortalUnreachable: its message says what is wrong and what to do.
    except (
        CommandError,
        NotEnrolled,
        PermissionError,
        InsecurePortal,
        BadCABundle,
        PortalUntrusted,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except PortalUnreachable as exc:
        print(f"error: the portal cannot be reached: {exc}", file=sys.stderr)
        return 1
    except PortalError as exc:
        print(f"error: the portal refused: {exc.message} ({exc.code})", file=sys.stderr)
        return 3 if exc.refused_for_good else 1


# -- enrol --------------------------------------------------------------------------------------


def enrol(
    site_dir: SiteDir,
    *,
    portal: str,
    token: str,
    force: bool = False,
    insecure: bool = False,
    say: Callable[[str], None] = print,
    wire: WireRecorder | None = None,
    ca_file: Path | None = None,
) -> int:
    """Make the key here, send only a CSR with the token, keep the certificate. The token is
    sent in clear text over plain HTTP, which is refused to another machine unless
    ``insecure``. ``ca_file``: the CA bundle that verifies the portal's TLS certificate,
    checked before anything is sent and kept in the folder for every later connection."""
    tls_ca_pem = None
    if ca_file is not None:
        try:
            tls_ca_pem = read_ca_bundle(ca_file)
        except BadCABundle as exc:
            raise CommandError(f"--ca-file: {exc}") from None
        if not portal.strip().lower().startswith("https://"):
            raise CommandError(
                f"--ca-file verifies an https:// portal's certificate; {portal} is not https"
            )
        ca_file = ca_file.resolve()
    try:
        client = PortalClient(portal, insecure=insecure, wire=wire, ca_file=ca_file)
    except BadCABundle:
        raise
    except ValueError as exc:
        raise CommandError(f"--portal: {exc}") from None
    if site_dir.is_enrolled() and not force:
        who = site_dir.identity()
        raise CommandError(
            f"{site_dir.path} already holds site {who.site!r} of project {who.project!r}; pass "
            "--force to enrol again with a new token, or --dir for another folder"
        )
    who = client.post(ENROL_CHECK_PATH, {"token": token})
    key = signing.generate_key()
    csr = signing.make_csr(key, who["site"], who["project_name"])
    issued = client.post(ENROL_PATH, {"token": token, "csr_pem": csr, "project": who["project"]})
    identity = SiteIdentity(
        portal=client.url,
        site=issued["site"],
        project=issued["project"],
        project_name=issued["project_name"],
        organization=issued["organization"],
        serial=issued["serial"],
        fingerprint=issued["fingerprint"],
        not_after=issued["not_after"],
    )
    site_dir.save(
        identity,
        key=key,
        cert_pem=issued["certificate_pem"],
        ca_pem=issued["ca_certificate_pem"],
        tls_ca_pem=tls_ca_pem,
    )
    say(
        f"enrolled site {identity.site!r} ({identity.organization}) in project "
        f"{identity.project_name!r} at {identity.portal}"
    )
    say(f"  key          {site_dir.key_path} (made here, mode 0600, never sent)")
    say(
        f"  certificate  {site_dir.cert_path} (serial {identity.serial}, "
        f"valid until {identity.not_after})"
    )
    say(f"  project CA   {site_dir.ca_path}")
    if tls_ca_pem is not None:
        say(f"  portal TLS   {site_dir.tls_ca_path} (verifies the portal's certificate)")
    say(f"  identity     {site_dir.config_path}")
    say(
        f"next: python -m client_agent run --dir {site_dir.path}{' --insecure' if insecure else ''}"
    )
    return 0


# -- status -------------------------------------------------------------------------------------


def _signed_client(
    site_dir: SiteDir, *, insecure: bool, wire: WireRecorder | None = None
) -> tuple[SiteIdentity, PortalClient]:
    identity = site_dir.identity()
    from client_agent.agent import AGENT_VERSION

    client = PortalClient(
        identity.portal,
        key=site_dir.key(),
        fingerprint=identity.fingerprint,
        agent_version=AGENT_VERSION,
        timeout=15,
        insecure=insecure,
        wire=wire,
        ca_file=site_dir.tls_ca_file(),
    )
    return identity, client


def status(site_dir: SiteDir, *, insecure: bool = False, wire: WireRecorder | None = None) -> int:
    identity, client = _signed_client(site_dir, insecure=insecure, wire=wire)
    me = client.get("/api/v1/agent/whoami/")
    print(
        f"site {me['site']} ({me['organization']}), project {me['project_name']}, "
        f"{me['state']} at {identity.portal}"
    )
    print(f"certificate {me['certificate_serial']}, valid until {me['certificate_not_after']}")
    jobs = client.get("/api/v1/agent/jobs/")
    if not jobs:
        print("no active jobs")
    for job in jobs:
        task = job.get("current_task")
        where = (
            f"round {round_for_people(task['round'])}/{job['num_rounds']}: {task['state']}"
            if task
            else f"{job['completed_rounds']}/{job['num_rounds']} rounds done"
        )
        print(
            f"job {job['name']} ({job['uid']}): {job['state']}, decision {job['decision']}, {where}"
        )
    return 0


# -- policy -------------------------------------------------------------------------------------


def _epsilon_text(value: float | None) -> str:
    return "∞ (no noise bounds it)" if value is None or value == float("inf") else f"{value:.4g}"


def policy_show(site_dir: SiteDir, *, say: Callable[[str], None] = print) -> int:
    """The policy's rules, its file, and what the site has spent on each job and project."""
    policy = PrivacyPolicy.in_folder(site_dir.path)
    ledger = PrivacyLedger.in_folder(site_dir.path)
    if policy.path:
        say(f"privacy policy {policy.path}")
        say(f"  sha256 {policy.sha256}")
    else:
        say(
            f"no {POLICY_FILE} in {site_dir.path}: the default policy (updates leave as the "
            "script sends them)"
        )
    width = max(len(rule) for rule, _ in policy.describe())
    for rule, setting in policy.describe():
        say(f"  {rule:<{width}}  {setting}")
    jobs = ledger.jobs()
    if not jobs:
        say(f"spent: nothing released under a privacy policy yet ({ledger.path})")
        return 0
    say(f"spent (from {ledger.path}, ε at δ={policy.delta:g}):")
    for uid in jobs:
        history = ledger.job_history(uid)
        cap = f" of {policy.max_epsilon:g}" if policy.max_epsilon is not None else ""
        say(
            f"  job {uid}: {len(history)} release(s), "
            f"ε {_epsilon_text(accounting.epsilon(history, policy.delta))}{cap}"
        )
    project = ledger.project_history()
    cap = f" of {policy.max_project_epsilon:g}" if policy.max_project_epsilon is not None else ""
    say(
        f"  project: {len(project)} release(s), "
        f"ε {_epsilon_text(accounting.epsilon(project, policy.delta))}{cap}"
    )
    return 0


def policy_check(
    site_dir: SiteDir,
    *,
    rounds: Sequence[int] = CHECK_ROUNDS,
    job: str | None = None,
    insecure: bool = False,
    say: Callable[[str], None] = print,
    wire: WireRecorder | None = None,
) -> int:
    """Check the policy (a bad one raises :class:`PolicyError`) and print what it implies."""
    policy = PrivacyPolicy.in_folder(site_dir.path)
    ledger = PrivacyLedger.in_folder(site_dir.path)
    if policy.path:
        say(f"ok: {policy.path} (sha256 {policy.sha256})")
    else:
        say(f"ok: no {POLICY_FILE} in {site_dir.path}; the default policy applies")
    if not policy.changes_updates:
        say(
            "no clipping: updates are not privatized, so no ε bounds what they reveal"
            + (" (tensors are still excluded)" if policy.exclude_tensors else "")
        )
    else:
        say(
            f"ε at δ={policy.delta:g} after N rounds of one job "
            f"(noise multiplier {policy.noise_multiplier:g}):"
        )
        for count in rounds:
            say(f"  N={count:<5} ε {_epsilon_text(policy.epsilon_after(count))}")
    project_spent = ledger.project_history()
    if policy.has_budget and policy.adds_noise:
        for label, cap, spent in (
            ("ε per job", policy.max_epsilon, ()),
            ("ε per project", policy.max_project_epsilon, project_spent),
        ):
            if cap is None:
                continue
            fit = accounting.steps_within(
                cap, policy.noise_multiplier, policy.delta, spent=tuple(spent)
            )
            after = " after what the project spent so far" if spent else ""
            say(f"{label} {cap:g}: a new job may run {fit} round(s){after}")
    if policy.max_epsilon is not None:
        say(f"noise multiplier that keeps one job within ε {policy.max_epsilon:g}:")
        for count in rounds:
            sigma = accounting.noise_for_epsilon(policy.max_epsilon, count, policy.delta)
            say(f"  N={count:<5} noise_multiplier ≥ {sigma:.4g}")
    if job is not None:
        _check_job(site_dir, policy, ledger, job, insecure=insecure, say=say, wire=wire)
    return 0


def _check_job(
    site_dir: SiteDir,
    policy: PrivacyPolicy,
    ledger: PrivacyLedger,
    uid: str,
    *,
    insecure: bool,
    say: Callable[[str], None],
    wire: WireRecorder | None,
) -> None:
    """What job ``uid`` (from the portal's listing for this site) would spend here."""
    identity, client = _signed_client(site_dir, insecure=insecure, wire=wire)
    from client_agent.agent import JOBS_PATH

    found = [j for j in client.get(JOBS_PATH) if str(j.get("uid")) == uid]
    if not found:
        raise CommandError(f"--job: the portal lists no job {uid} for this site")
    (listed,) = found
    rounds = int(listed["num_rounds"])
    assessment = assess_job(
        policy,
        project=identity.project,
        submitter=listed.get("submitter"),
        rounds=rounds,
        job_spent=ledger.job_history(uid),
        project_spent=ledger.project_history(),
    )
    say(f"job {listed.get('name', uid)} ({uid}): {rounds} round(s)")
    if assessment.refused:
        say(f"  declined here: {assessment.refused}")
        return
    if assessment.expected_epsilon is None:
        say("  no accounting: this site does not clip updates")
        return
    runs = rounds if assessment.rounds_within is None else min(rounds, assessment.rounds_within)
    cap = f" of {policy.max_epsilon:g}" if policy.max_epsilon is not None else ""
    expected = _epsilon_text(assessment.expected_epsilon)
    say(f"  expected spend: ε {expected}{cap} over {runs} round(s)")
    if assessment.partial:
        say(f"  only {runs} of its {rounds} rounds fit the budget; the rest are declined")


# -- doctor -------------------------------------------------------------------------------------


def doctor(site_dir: SiteDir, *, insecure: bool = False, wire: WireRecorder | None = None) -> int:
    """Each check prints ok or FAIL with what to do; exit 1 if any failed."""
    failures = 0

    def report(ok: bool, what: str, detail: str = "") -> bool:
        nonlocal failures
        failures += not ok
        print(f"[{'ok' if ok else 'FAIL'}] {what}" + (f": {detail}" if detail else ""))
        return ok

    try:
        identity = site_dir.identity()
    except NotEnrolled as exc:
        report(False, "site folder", str(exc))
        return 1
    report(
        True,
        "site folder",
        f"{site_dir.path}: site {identity.site!r}, project {identity.project!r}",
    )
    try:
        mode = site_dir.key_path.stat().st_mode & 0o777
        site_dir.key()
        report(True, "private key", f"{site_dir.key_path} (mode {mode:o})")
    except (OSError, ValueError) as exc:
        report(False, "private key", str(exc))
        return 1
    cert_ok, cert_detail = _certificate_dates(site_dir)
    report(cert_ok, "certificate dates", cert_detail)
    try:
        require_secure_transport(identity.portal, insecure=insecure)
    except InsecurePortal as exc:
        report(False, "portal address", str(exc))
        return 1
    try:
        plain = PortalClient(
            identity.portal, timeout=10, insecure=insecure, ca_file=site_dir.tls_ca_file()
        )
        skew = _portal_clock(plain)
    except (BadCABundle, PortalUntrusted) as exc:
        report(False, "portal certificate", str(exc))
        return 1
    if isinstance(skew, str):
        report(False, "portal reachable", skew)
        return 1
    report(True, "portal reachable", identity.portal)
    if plain.tls is not None:
        report(
            True,
            "portal certificate",
            f"valid for {plain.host}, verified with {plain.trust_source}",
        )
    report(
        abs(skew) <= MAX_CLOCK_SKEW_SECONDS,
        "clock",
        f"{skew:+.0f} s from the portal's clock"
        + (
            ""
            if abs(skew) <= MAX_CLOCK_SKEW_SECONDS
            else "; signed requests fail beyond ±300 s: synchronise this machine's clock (NTP)"
        ),
    )
    _, client = _signed_client(site_dir, insecure=insecure, wire=wire)
    try:
        me = client.get("/api/v1/agent/whoami/")
        report(True, "certificate accepted", f"serial {me['certificate_serial']}, not revoked")
    except PortalError as exc:
        report(False, "certificate accepted", f"{exc.code}: {exc.message}")
    except PortalUnreachable as exc:
        report(False, "certificate accepted", str(exc))
    return 1 if failures else 0


def _certificate_dates(site_dir: SiteDir) -> tuple[bool, str]:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(site_dir.cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        return False, f"{site_dir.cert_path}: {exc}"
    now = dt.datetime.now(dt.UTC)
    if now < cert.not_valid_before_utc:
        return False, f"not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    if now > cert.not_valid_after_utc:
        return False, f"expired {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; enrol again"
    days = (cert.not_valid_after_utc - now).days
    return True, f"valid until {cert.not_valid_after_utc:%Y-%m-%d} ({days} days)"


def _portal_clock(client: PortalClient) -> float | str:
    """Seconds this machine's clock is ahead of the portal's, or why it cannot be told;
    :class:`PortalUntrusted` when the portal's certificate is refused."""
    portal = client.url
    connection = client._connection()
    try:
        sent = time.time()
        connection.request("GET", client.target(HEALTH_PATH))
        response = connection.getresponse()
        response.read()
        received = time.time()
    except ssl.SSLCertVerificationError as exc:
        raise PortalUntrusted(f"{portal}: {client.untrusted(exc)}") from exc
    except (OSError, http.client.HTTPException) as exc:
        return f"{portal}: {exc}"
    finally:
        connection.close()
    if response.status != 200:
        return f"{portal}{HEALTH_PATH} answered HTTP {response.status}"
    date = response.getheader("Date")
    if not date:
        return 0.0
    portal_time = email.utils.parsedate_to_datetime(date).timestamp()
    # The Date header has whole seconds; compare with the middle of the exchange.
    return (sent + received) / 2 - portal_time - 0.5
