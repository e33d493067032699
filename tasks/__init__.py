"""The Celery app package: settings, the `fetch_phrase` task, its source and its store."""

from tasks.application import app
from tasks.fetch import fetch_phrase

__all__ = ["app", "fetch_phrase"]
