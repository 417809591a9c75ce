"""The dashboard's pages. Projects by slug, jobs by uid, as in the REST API."""

from django.contrib.auth import views as auth_views
from django.urls import URLPattern, path

from dashboard.views import (
    account,
    approvals,
    bundle_views,
    compare,
    job_records,
    jobs,
    people,
    projects,
    sites,
)

app_name = "dashboard"

project = "projects/<str:slug>/"
job = "jobs/<uuid:uid>/"

urlpatterns: list[URLPattern] = [
    path(
        "login/",
        auth_views.LoginView.as_view(redirect_authenticated_user=True),
        name="login",
    ),
    path("logout/", auth_views.LogoutView.as_view(next_page="dashboard:login"), name="logout"),
    path("new-project/", people.project_new, name="project-new"),
    path(project, projects.project_detail, name="project"),
    path(f"{project}settings/", people.project_settings, name="project-settings"),
    path(f"{project}organizations/", people.organization_list, name="organizations"),
    path(
        f"{project}organizations/<int:pk>/",
        people.organization_rename,
        name="organization-rename",
    ),
    path(f"{project}members/", people.member_list, name="members"),
    path(f"{project}members/<int:pk>/role/", people.member_role, name="member-role"),
    path(f"{project}members/<int:pk>/remove/", people.member_remove, name="member-remove"),
    path(f"{project}invitations/", people.invitation_list, name="invitations"),
    path(
        f"{project}invitations/<int:pk>/revoke/",
        people.invitation_revoke,
        name="invitation-revoke",
    ),
    path("invitations/accept/", people.invitation_accept, name="invitation-accept"),
    path(f"{project}sites-status/", projects.project_sites_fragment, name="project-sites-rows"),
    path(f"{project}jobs-rows/", projects.project_jobs_fragment, name="project-jobs-rows"),
    path(f"{project}sites/", sites.site_list, name="sites"),
    path(f"{project}sites/request/", sites.site_request, name="site-request"),
    path(f"{project}sites/<int:pk>/", sites.site_detail, name="site"),
    path(f"{project}sites/<int:pk>/settings/", sites.site_settings, name="site-settings"),
    path(f"{project}sites/<int:pk>/approve/", sites.site_approve, name="site-approve"),
    path(f"{project}sites/<int:pk>/deny/", sites.site_deny, name="site-deny"),
    path(f"{project}sites/<int:pk>/token/", sites.site_token, name="site-token"),
    path(
        f"{project}certificates/<int:pk>/revoke/",
        sites.certificate_revoke,
        name="certificate-revoke",
    ),
    path(f"{project}jobs/new/", jobs.job_submit_view, name="job-submit"),
    path(f"{project}jobs/upload/", bundle_views.bundle_upload_view, name="job-bundle"),
    path(
        f"{project}jobs/upload/<str:token>/",
        bundle_views.bundle_preview_view,
        name="job-bundle-preview",
    ),
    path(f"{project}approvals/", approvals.approval_list, name="approvals"),
    path(f"{project}approvals/decide/", approvals.approval_bulk, name="approvals-decide"),
    path(f"{project}compare/", compare.compare_view, name="compare"),
    path(job, jobs.job_detail, name="job"),
    path(f"{job}rounds/", jobs.job_rounds_fragment, name="job-rounds"),
    path(f"{job}models/", jobs.job_models_fragment, name="job-models"),
    path(f"{job}logs/", jobs.job_logs_fragment, name="job-logs"),
    path(f"{job}metrics.json", jobs.job_metrics, name="job-metrics"),
    path(f"{job}metrics.csv", jobs.job_metrics_csv, name="job-metrics-csv"),
    path(f"{job}sites/<str:site_name>/log.txt", job_records.job_site_log, name="job-site-log"),
    path(f"{job}logs/search/", job_records.job_log_search, name="job-log-search"),
    path(f"{job}metric-table.csv", job_records.job_metric_table_csv, name="job-metric-table"),
    path(f"{job}round-sites/", job_records.job_round_sites_fragment, name="job-round-sites"),
    path(f"{job}record.json", job_records.job_record, name="job-record"),
    path(f"{project}lagging/", job_records.project_lagging_fragment, name="project-lagging"),
    path(f"{job}abort/", jobs.job_abort_view, name="job-abort"),
    path(f"{job}labels/", compare.job_labels_view, name="job-labels"),
    path(f"{job}sites/<str:site_name>/review/", approvals.approval_review, name="approval"),
    path(f"{job}sites/<str:site_name>/decide/", approvals.approval_decide, name="approval-decide"),
    path("audit/", account.audit_log, name="audit"),
    path("api-tokens/", account.api_tokens, name="api-tokens"),
    path("api-tokens/<int:pk>/revoke/", account.api_token_revoke, name="api-token-revoke"),
]
