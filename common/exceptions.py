"""The domain errors every app raises: one class per kind of failure, each with its HTTP status.

Every error carries a machine-readable ``code``, a human ``message`` that names the cause, an
HTTP ``status`` and, for bad input, the ``field`` at fault. ``fedportal.api.exception_handler``
maps the whole hierarchy to a response in one place, so a view never needs to know which
subclass it caught. Services raise these inside their transaction, so a raised ``DomainError``
means nothing was written.

The apps subclass these for their own reasons (``sites.exceptions``, ``jobs.exceptions``).
Standard library only: pure modules (``sites.ca``) raise these too.
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Base of every domain failure. Subclasses set ``code``, ``status`` and a default message."""

    code: str = "error"
    status: int = 400
    default_message: str = "the request could not be completed"

    def __init__(
        self,
        message: str | None = None,
        *,
        code: str | None = None,
        status: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message or self.default_message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.field = field
        super().__init__(self.message)

    def as_dict(self) -> dict[str, Any]:
        """The JSON error body: ``{"code", "message"}`` plus ``"field"`` when one is at fault."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


# --- bad input and conflicts ----------------------------------------------------------------


class ValidationFailed(DomainError):
    """A field's value is not acceptable; ``field`` names it."""

    code = "invalid"
    status = 400
    default_message = "invalid input"


class NotFound(DomainError):
    code = "not_found"
    status = 404
    default_message = "not found"


class Conflict(DomainError):
    code = "conflict"
    status = 409
    default_message = "the request conflicts with the current state"


class AlreadyExists(Conflict):
    """A name (project, organisation, site) or a membership is already taken."""

    code = "already_exists"


class InvalidTransition(Conflict):
    """A status change that the state machine does not allow (e.g. approving a denied site)."""

    code = "invalid_transition"


class AuthenticationError(DomainError):
    """Base of every reason a signed request or an API token is refused (HTTP 401)."""

    code = "authentication_failed"
    status = 401
    default_message = "authentication failed"
