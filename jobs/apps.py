from typing import Any

from django.apps import AppConfig

from fedportal.events import job_group
from sites import events


def _on_job_deleted(*, instance: Any, **_: Any) -> None:
    events.access_changed(reason=events.DELETED, groups=[job_group(instance.pk)])


def _on_site_heartbeat(**kwargs: Any) -> None:
    # Imported when a heartbeat comes, not at start-up: the rounds service imports torch
    # (~1 s), which commands such as `migrate` or PocEnv's `poc_setup` never need.
    from jobs.services.rounds import on_site_heartbeat

    on_site_heartbeat(**kwargs)


class JobsConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "jobs"
    verbose_name = "Jobs"

    def ready(self) -> None:
        from django.db.models.signals import post_delete

        from jobs.models import Job
        from sites.authentication import site_heartbeat

        site_heartbeat.connect(_on_site_heartbeat, dispatch_uid="jobs.site_heartbeat")
        # The pages of a deleted job close (their socket finds the job gone).
        post_delete.connect(_on_job_deleted, sender=Job, dispatch_uid="jobs.job_deleted")
