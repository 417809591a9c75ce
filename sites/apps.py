from django.apps import AppConfig


class SitesConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "sites"
    verbose_name = "Projects and sites"

    def ready(self) -> None:
        from django.contrib.auth import get_user_model
        from django.contrib.auth.signals import user_logged_out
        from django.db.models.signals import post_delete, post_save

        from sites import checks, receivers  # noqa: F401  (checks registers system checks)
        from sites.models import Certificate, Project, Site
        from sites.signed_cache import certificates_changed

        user = get_user_model()
        user_logged_out.connect(receivers.on_logged_out, dispatch_uid="sites.logged_out")
        post_save.connect(receivers.on_user_saved, sender=user, dispatch_uid="sites.user_saved")
        post_delete.connect(
            receivers.on_user_deleted, sender=user, dispatch_uid="sites.user_deleted"
        )
        post_delete.connect(
            receivers.on_project_deleted, sender=Project, dispatch_uid="sites.project_deleted"
        )
        # The signed-request check keeps verified certificates with their site and project:
        # any change of one of those rows ends what it kept (a revocation, a site's state).
        for model in (Certificate, Site, Project):
            for signal in (post_save, post_delete):
                signal.connect(
                    certificates_changed,
                    sender=model,
                    dispatch_uid=f"sites.certificates_changed.{model.__name__}.{id(signal)}",
                )
