"""The Celery app. Its settings are the Django settings whose names start with CELERY_."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fedportal.settings.base")

app = Celery("fedportal")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
