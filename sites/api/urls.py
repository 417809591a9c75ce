"""URLs under /api/v1/ for the sites app.

Everything of a project is nested under ``projects/<slug>/``; objects are named by id. Actions
that change a state are ``POST …/<action>/``; API tokens and the agent endpoints are the
caller's own and so are not nested.
"""

from django.urls import URLPattern, path

from sites.api import views

app_name = "sites-api"

project = "projects/<str:project>/"

urlpatterns: list[URLPattern] = [
    path("projects/", views.ProjectListView.as_view(), name="project-list"),
    path(project, views.ProjectDetailView.as_view(), name="project-detail"),
    path(
        f"{project}organizations/",
        views.OrganizationListView.as_view(),
        name="organization-list",
    ),
    path(
        f"{project}organizations/<int:pk>/",
        views.OrganizationDetailView.as_view(),
        name="organization-detail",
    ),
    path(f"{project}memberships/", views.MembershipListView.as_view(), name="membership-list"),
    path(
        f"{project}memberships/<int:pk>/",
        views.MembershipDetailView.as_view(),
        name="membership-detail",
    ),
    path(f"{project}invitations/", views.InvitationListView.as_view(), name="invitation-list"),
    path(
        f"{project}invitations/<int:pk>/",
        views.InvitationDetailView.as_view(),
        name="invitation-detail",
    ),
    path(
        f"{project}invitations/<int:pk>/revoke/",
        views.InvitationRevokeView.as_view(),
        name="invitation-revoke",
    ),
    path("invitations/accept/", views.InvitationAcceptView.as_view(), name="invitation-accept"),
    path(f"{project}sites/", views.SiteListView.as_view(), name="site-list"),
    path(f"{project}sites/<int:pk>/", views.SiteDetailView.as_view(), name="site-detail"),
    path(f"{project}sites/<int:pk>/approve/", views.SiteApproveView.as_view(), name="site-approve"),
    path(f"{project}sites/<int:pk>/deny/", views.SiteDenyView.as_view(), name="site-deny"),
    path(
        f"{project}sites/<int:pk>/enrolment-token/",
        views.SiteEnrolmentTokenView.as_view(),
        name="site-enrolment-token",
    ),
    path(f"{project}sites/<int:pk>/revoke/", views.SiteRevokeView.as_view(), name="site-revoke"),
    path(f"{project}certificates/", views.CertificateListView.as_view(), name="certificate-list"),
    path(
        f"{project}certificates/<int:pk>/",
        views.CertificateDetailView.as_view(),
        name="certificate-detail",
    ),
    path(
        f"{project}certificates/<int:pk>/revoke/",
        views.CertificateRevokeView.as_view(),
        name="certificate-revoke",
    ),
    path(
        f"{project}audit-events/",
        views.ProjectAuditEventListView.as_view(),
        name="project-audit-event-list",
    ),
    path("audit-events/", views.AuditEventListView.as_view(), name="audit-event-list"),
    path("api-tokens/", views.ApiTokenListView.as_view(), name="api-token-list"),
    path("api-tokens/<int:pk>/", views.ApiTokenDetailView.as_view(), name="api-token-detail"),
    path(
        "api-tokens/<int:pk>/revoke/", views.ApiTokenRevokeView.as_view(), name="api-token-revoke"
    ),
    path("enrol/", views.EnrolView.as_view(), name="enrol"),
    path("enrol/check/", views.EnrolCheckView.as_view(), name="enrol-check"),
    path("agent/whoami/", views.WhoamiView.as_view(), name="agent-whoami"),
    path(
        "agent/privacy-policy/",
        views.AgentPrivacyPolicyView.as_view(),
        name="agent-privacy-policy",
    ),
]
