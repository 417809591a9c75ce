from django.apps import AppConfig


class JobsConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "jobs"
    verbose_name = "Jobs"

    def ready(self) -> None:
        from jobs.services.rounds import on_site_heartbeat
        from sites.authentication import site_heartbeat

        site_heartbeat.connect(on_site_heartbeat, dispatch_uid="jobs.site_heartbeat")
