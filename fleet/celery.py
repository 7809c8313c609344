"""Celery on Redis. Tasks are thin wrappers over services (STYLE.md); time limits are
global settings (CELERY_TASK_SOFT_TIME_LIMIT / CELERY_TASK_TIME_LIMIT)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fleet.settings")

app = Celery("fleet")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
