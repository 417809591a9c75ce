"""The jobs app's own domain errors.

They subclass :class:`common.exceptions.DomainError`, so ``fedportal.api.exception_handler``
maps them to HTTP like every other domain failure. A job's invalid state change is
``jobs.models.InvalidJobTransition`` (409).
"""

from __future__ import annotations

import errno
from typing import Any

from client_agent.protocol import ERROR_SLOW_DOWN
from common.exceptions import Conflict, DomainError


class DecisionNotDelegated(DomainError):
    """A site agent tried to accept or decline a job for a site whose admin decides.

    A site's policy (``Site.auto_accept_jobs``) says who decides: when it is off, only the
    site's org admins (or a project admin) accept jobs, through the API for people.
    """

    code = "decision_not_delegated"
    status = 403
    default_message = (
        "this site does not accept jobs automatically, so its admin decides, not its agent"
    )


class PrivacyPolicyRefuses(Conflict):
    """The site's privacy policy, as its agent reported it, refuses the job: its project or
    submitter is not allowed there, or not one of its rounds fits the site's privacy budget.
    Accepting it would only have every round declined; the message is the policy's reason."""

    code = "privacy_policy_refuses"
    default_message = "the site's privacy policy refuses this job"


class StorageFull(DomainError):
    """The portal's file storage has no room left (``ENOSPC``, a quota): nothing was kept.

    Not the sender's fault, and not for good: a site retries its upload later, and a worker
    retries storing a round's model (``jobs.services.rounds.TRANSIENT_ERRORS``).
    """

    code = "storage_full"
    status = 507
    default_message = "the portal's storage is full; nothing was kept: try again later"


_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_storage_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS


class SlowDown(DomainError):
    """A site sends output lines faster than its rate allows; nothing of the batch was stored.
    ``retry_after`` says in how many seconds the same batch would be taken."""

    code = ERROR_SLOW_DOWN
    status = 429
    default_message = "output lines arrive faster than this site may send them"

    def __init__(self, message: str | None = None, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "retry_after": round(self.retry_after, 2)}
