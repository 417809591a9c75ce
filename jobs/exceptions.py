"""Domain exceptions of the jobs app that ``sites.exceptions`` has no class for.

They subclass :class:`sites.exceptions.DomainError`, so ``fedportal.api.exception_handler``
maps them to HTTP like every other domain failure. A job's invalid state change is
``jobs.models.InvalidJobTransition`` (409).
"""

from __future__ import annotations

from sites.exceptions import DomainError


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
