from django.apps import AppConfig


class DashboardConfig(AppConfig):
    """The browser dashboard: server-rendered pages over the sites and jobs services, made live
    by a WebSocket (``dashboard.consumers``). It has no models of its own."""

    name = "dashboard"
    verbose_name = "Dashboard"
