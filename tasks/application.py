"""The Celery application; `celery -A tasks worker` finds it as `tasks.app`."""

from __future__ import annotations

import logging
import sys

from celery import Celery
from celery.signals import after_setup_logger, after_setup_task_logger, worker_init

from tasks.errors import SettingError
from tasks.queues import ReturnPoisonMessages, install_receive_recovery
from tasks.redact import install_redaction
from tasks.settings import Settings, get_settings
from tasks.sqs_events import enable_sqs_monitoring
from tasks.worker_steps import RunAllDueTimers


def _settings_or_exit() -> Settings:
    """Return the settings, or stop the program with the one-line reason they are invalid."""
    try:
        return get_settings()
    except SettingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


settings = _settings_or_exit()

app = Celery("tasks")
app.config_from_object("celeryconfig")
app.steps["worker"].add(RunAllDueTimers)
# Dead-letter messages a worker cannot run instead of deleting them, and keep polling SQS
# after a failed receive (see tasks.queues).
app.steps["consumer"].add(ReturnPoisonMessages)
try:
    enable_sqs_monitoring(app, settings)  # first, because it names the kombu version installed
    install_receive_recovery()
except RuntimeError as exc:
    print(f"error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None


#: Loggers whose INFO lines repeat what the task logs itself (received, succeeded, retry)
#: or say nothing useful per task (botocore's "Found credentials" in every process).
QUIET_LOGGERS = ("celery.app.trace", "celery.worker.strategy", "botocore.credentials")


@after_setup_logger.connect
@after_setup_task_logger.connect
def _configure_logs(**_: object) -> None:
    install_redaction((settings.api_key,))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@worker_init.connect
def _check_worker_settings(**_: object) -> None:
    try:
        settings.require_api_key()
    except SettingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
