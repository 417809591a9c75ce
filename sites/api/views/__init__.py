"""REST API of the sites app, under ``/api/v1/``.

Every view does the same four things and nothing else: find what the URL names through a
``*_visible_to`` selector (404 when the caller cannot see it), check the caller's role with a
``sites.selectors`` rule (403), parse the body with an input serializer (400), call one service
and serialize what it returns. Domain errors raised by the services become JSON in one place,
``fedportal.api.exception_handler``. See ``sites.api.permissions`` for the 401/404/403 order.

Rules:

- **Creating a project** is for Django superusers and for users given the ``sites.add_project``
  permission; the creator becomes the project's first project admin.
- **Organisations** are created and renamed by project admins only: the name is the OU of
  every certificate of the organisation's sites.
- **Listing** returns what the caller may see, so a lead sees an empty list of invitations
  rather than a 403; **acting** on something visible without the role is a 403.
- **Enrolment tokens** are shown once, in the response to approval or reissue, together with
  the exact command the site admin runs; ``FEDPORTAL_PUBLIC_URL`` sets the portal address in
  it (default: the address the request came to).
"""

from sites.api import schema as _schema  # noqa: F401  (registers the auth schemes)
from sites.api.views.agents import (
    AgentPrivacyPolicyView,
    EnrolCheckView,
    EnrolView,
    WhoamiView,
)
from sites.api.views.api_tokens import ApiTokenDetailView, ApiTokenListView, ApiTokenRevokeView
from sites.api.views.audit import AuditEventListView, ProjectAuditEventListView
from sites.api.views.people import (
    InvitationAcceptView,
    InvitationDetailView,
    InvitationListView,
    InvitationRevokeView,
    MembershipDetailView,
    MembershipListView,
    OrganizationDetailView,
    OrganizationListView,
    ProjectDetailView,
    ProjectListView,
)
from sites.api.views.sites import (
    CertificateDetailView,
    CertificateListView,
    CertificateRevokeView,
    SiteApproveView,
    SiteDenyView,
    SiteDetailView,
    SiteEnrolmentTokenView,
    SiteListView,
    SiteRevokeView,
)

__all__ = [
    "AgentPrivacyPolicyView",
    "ApiTokenDetailView",
    "ApiTokenListView",
    "ApiTokenRevokeView",
    "AuditEventListView",
    "CertificateDetailView",
    "CertificateListView",
    "CertificateRevokeView",
    "EnrolCheckView",
    "EnrolView",
    "InvitationAcceptView",
    "InvitationDetailView",
    "InvitationListView",
    "InvitationRevokeView",
    "MembershipDetailView",
    "MembershipListView",
    "OrganizationDetailView",
    "OrganizationListView",
    "ProjectAuditEventListView",
    "ProjectDetailView",
    "ProjectListView",
    "SiteApproveView",
    "SiteDenyView",
    "SiteDetailView",
    "SiteEnrolmentTokenView",
    "SiteListView",
    "SiteRevokeView",
    "WhoamiView",
]
