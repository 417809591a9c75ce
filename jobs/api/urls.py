"""URLs under /api/v1/ for the jobs app.

People: a project's jobs under ``projects/<project>/jobs/`` (the project's slug, as in the
sites API, or its id); a job under ``jobs/<uid>/``. Site agents: ``agent/jobs/…``, their own
site's jobs only. Round numbers count from 0; a model is named by the rounds completed when it
was made (0: the initial model), so round ``n`` starts from model ``n``.
"""

from django.urls import URLPattern, path

from jobs.api import tracking_views, views

app_name = "jobs-api"

job = "jobs/<uuid:uid>/"
agent_job = "agent/jobs/<uuid:uid>/"
agent_round = f"{agent_job}rounds/<int:number>/"

# The agents' paths first: Django tries the patterns in order, and every agent calls them
# every round, the upload first (it came after the people's patterns, tried against each).
urlpatterns: list[URLPattern] = [
    path(f"{agent_round}update/", views.AgentRoundUpdateView.as_view(), name="agent-round-update"),
    path("agent/jobs/", views.AgentJobListView.as_view(), name="agent-job-list"),
    path(f"{agent_job}decision/", views.AgentJobDecisionView.as_view(), name="agent-job-decision"),
    path(f"{agent_job}spec/", views.AgentJobSpecView.as_view(), name="agent-job-spec"),
    path(f"{agent_job}bundle/", views.AgentJobBundleView.as_view(), name="agent-job-bundle"),
    path(f"{agent_round}model/", views.AgentRoundModelView.as_view(), name="agent-round-model"),
    path(f"{agent_round}status/", views.AgentRoundStatusView.as_view(), name="agent-round-status"),
    path(f"{agent_round}secure/", views.AgentSecureView.as_view(), name="agent-round-secure"),
    path(
        f"{agent_round}secure/total/",
        views.AgentSecureTotalView.as_view(),
        name="agent-round-secure-total",
    ),
    path(
        f"{agent_round}secure/<str:phase>/",
        views.AgentSecureMessageView.as_view(),
        name="agent-round-secure-message",
    ),
    path(f"{agent_job}metrics/", views.AgentMetricsView.as_view(), name="agent-job-metrics"),
    path(
        "projects/<str:project>/jobs/", views.ProjectJobListView.as_view(), name="project-job-list"
    ),
    path(job, views.JobDetailView.as_view(), name="job-detail"),
    path(f"{job}rounds/", views.JobRoundListView.as_view(), name="job-round-list"),
    path(f"{job}sites/", views.JobSiteListView.as_view(), name="job-site-list"),
    path(
        f"{job}sites/<str:site_name>/decision/",
        views.JobSiteDecisionView.as_view(),
        name="job-site-decision",
    ),
    path(f"{job}metrics/", views.JobMetricListView.as_view(), name="job-metric-list"),
    path(f"{job}metrics.csv", tracking_views.JobMetricsCsvView.as_view(), name="job-metrics-csv"),
    path(
        f"{job}tracking/tensorboard.zip",
        tracking_views.JobTensorBoardExportView.as_view(),
        name="job-tracking-tensorboard",
    ),
    path(
        f"{job}tracking/mlflow.zip",
        tracking_views.JobMlflowExportView.as_view(),
        name="job-tracking-mlflow",
    ),
    path(f"{job}cross-site/", views.JobCrossSiteView.as_view(), name="job-cross-site"),
    path(f"{job}models/", views.JobModelListView.as_view(), name="job-model-list"),
    path(
        f"{job}models/<int:round_number>/download/",
        views.JobModelDownloadView.as_view(),
        name="job-model-download",
    ),
    path(f"{job}abort/", views.JobAbortView.as_view(), name="job-abort"),
]
