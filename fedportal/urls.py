"""Top-level URL configuration: the dashboard (browser pages), the REST API, admin, schema."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from dashboard.views.projects import home
from fedportal.api_root import ApiRootView
from fedportal.views import favicon, healthz

# Under /api/ errors are JSON; elsewhere the templates' pages (fedportal.views).
handler400 = "fedportal.views.bad_request"
handler403 = "fedportal.views.permission_denied"
handler404 = "fedportal.views.page_not_found"
handler500 = "fedportal.views.server_error"

urlpatterns = [
    path("", home, name="home"),
    path("healthz", healthz, name="healthz"),
    path("admin/", admin.site.urls),
    # Browsers ask for /favicon.ico whatever the page links; the icon is a static SVG.
    path("favicon.ico", favicon, name="favicon"),
    path("api/v1/", ApiRootView.as_view(), name="api-root"),
    # The jobs API first: it holds what every agent calls every round (its uploads).
    path("api/v1/", include("jobs.api.urls")),
    path("api/v1/", include("sites.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    # Swagger UI from the portal's own static files; its set-up script is a file too (?script),
    # so that the Content-Security-Policy needs no inline script.
    path(
        "api/docs/",
        SpectacularSwaggerSplitView.as_view(
            url_name="schema", template_name="fedportal/swagger_ui.html"
        ),
        name="api-docs",
    ),
    path("", include("dashboard.urls")),
]
