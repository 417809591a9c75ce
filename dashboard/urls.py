"""The dashboard's pages. Projects by slug, jobs by uid, as in the REST API."""

from django.contrib.auth import views as auth_views
from django.urls import URLPattern, path

from dashboard.views import account, approvals, compare, jobs, projects, sites

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
    path(project, projects.project_detail, name="project"),
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
    path(f"{project}approvals/", approvals.approval_list, name="approvals"),
    path(f"{project}approvals/decide/", approvals.approval_bulk, name="approvals-decide"),
    path(f"{project}compare/", compare.compare_view, name="compare"),
    path(job, jobs.job_detail, name="job"),
    path(f"{job}rounds/", jobs.job_rounds_fragment, name="job-rounds"),
    path(f"{job}models/", jobs.job_models_fragment, name="job-models"),
    path(f"{job}logs/", jobs.job_logs_fragment, name="job-logs"),
    path(f"{job}metrics.json", jobs.job_metrics, name="job-metrics"),
    path(f"{job}metrics.csv", jobs.job_metrics_csv, name="job-metrics-csv"),
    path(f"{job}abort/", jobs.job_abort_view, name="job-abort"),
    path(f"{job}labels/", compare.job_labels_view, name="job-labels"),
    path(f"{job}sites/<str:site_name>/review/", approvals.approval_review, name="approval"),
    path(f"{job}sites/<str:site_name>/decide/", approvals.approval_decide, name="approval-decide"),
    path("audit/", account.audit_log, name="audit"),
    path("api-tokens/", account.api_tokens, name="api-tokens"),
    path("api-tokens/<int:pk>/revoke/", account.api_token_revoke, name="api-token-revoke"),
]
