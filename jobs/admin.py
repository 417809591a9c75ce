"""Django admin for the jobs app: an operator's read-only view of jobs, rounds and models.

Nothing here changes a job: its state belongs to the round controller (``jobs.services``), so
jobs, rounds and model versions are viewable only (no add, change or delete, the sites
admin's ``ReadOnlyAdmin``). A job is aborted through the API or the dashboard, which audit who
did it. The admin is for staff; it does not scope objects per project (superusers see all).
"""

from __future__ import annotations

from django.contrib import admin

from jobs.models import Job, ModelVersion, Round
from sites.admin import ReadOnlyAdmin


@admin.register(Job)
class JobAdmin(ReadOnlyAdmin):
    list_display = (
        "name",
        "uid",
        "project",
        "experiment",
        "tags",
        "state",
        "workflow",
        "completed_rounds",
        "num_rounds",
        "submitted_by",
        "created_at",
        "finished_at",
    )
    list_filter = ("state", "workflow", "project")
    search_fields = ("name", "uid", "experiment", "submitted_by__username")
    date_hierarchy = "created_at"
    list_select_related = ("project", "submitted_by")


@admin.register(Round)
class RoundAdmin(ReadOnlyAdmin):
    list_display = ("__str__", "state", "opened_at", "deadline", "closed_at")
    list_filter = ("state", "job__project")
    search_fields = ("job__name", "job__uid")
    list_select_related = ("job",)


@admin.register(ModelVersion)
class ModelVersionAdmin(ReadOnlyAdmin):
    list_display = ("job", "round_number", "is_best", "size", "sha256", "created_at")
    list_filter = ("is_best", "job__project")
    search_fields = ("job__name", "job__uid", "sha256")
    list_select_related = ("job",)
