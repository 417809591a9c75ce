"""Writes of the sites app. Import from here: ``from sites.services import site_approve``.

Conventions every function follows, so that the API layer can be thin:

- Keyword-only arguments, typed, named ``<thing>_<verb>``.
- The acting person is passed in (``created_by``, ``approved_by``…), or the acting site for
  agent calls, together with ``source_address`` (the client IP, or None); each state change
  appends an :class:`~sites.models.AuditEvent` in the same transaction.
- Input is checked first; a bad value raises :class:`~common.exceptions.ValidationFailed` with
  ``field`` set. Every failure is a :class:`~common.exceptions.DomainError` raised inside the
  transaction, so after one *nothing* was written.
- **No permission checks here.** Who may call what is the API layer's decision, made with the
  helpers in :mod:`sites.selectors` (``is_project_admin``, ``is_org_admin``,
  ``can_grant_role``…). A service trusts its caller.
- Secrets (enrolment and invitation tokens, API keys) are returned in plaintext exactly once,
  by the service that makes them, and stored only as SHA-256.
- Model instances passed in may be stale: services that change a state re-read the row under
  ``select_for_update`` and return the fresh instance; use the return value.
"""

from sites.services.agents import (
    site_agent_connect,
    site_agent_disconnect,
    site_agent_heartbeat,
)
from sites.services.api_tokens import api_token_create, api_token_revoke
from sites.services.audit import audit_event_record
from sites.services.enrolment import (
    Enrolment,
    certificate_revoke,
    enrolment_token_check,
    enrolment_token_reissue,
    site_approve,
    site_deny,
    site_enrol,
    site_request,
    site_revoke,
    site_update,
)
from sites.services.projects import (
    invitation_accept,
    invitation_create,
    invitation_revoke,
    membership_add,
    membership_remove,
    membership_update_role,
    organization_create,
    organization_update,
    project_create,
    project_update,
)

__all__ = [
    "Enrolment",
    "api_token_create",
    "api_token_revoke",
    "audit_event_record",
    "enrolment_token_check",
    "certificate_revoke",
    "site_agent_connect",
    "site_agent_disconnect",
    "site_agent_heartbeat",
    "enrolment_token_reissue",
    "invitation_accept",
    "invitation_create",
    "invitation_revoke",
    "membership_add",
    "membership_remove",
    "membership_update_role",
    "organization_create",
    "organization_update",
    "project_create",
    "project_update",
    "site_approve",
    "site_deny",
    "site_enrol",
    "site_request",
    "site_revoke",
    "site_update",
]
