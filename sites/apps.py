from django.apps import AppConfig


class SitesConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "sites"
    verbose_name = "Projects and sites"

    def ready(self) -> None:
        from sites import checks  # noqa: F401  (registers the system checks)
