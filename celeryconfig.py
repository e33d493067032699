"""Celery settings, built from the deployment settings in `tasks.settings`.

Edit the `INGEST_*` environment variables (or `.env`), not this file: see the
README's "Settings" table. What is here is the fixed behaviour of the system.
"""

from __future__ import annotations

from tasks.settings import get_settings as _get_settings

_settings = _get_settings()

# The broker: SQS. With INGEST_SQS_ENDPOINT empty, boto3 finds AWS credentials the
# standard way (environment, ~/.aws, instance role) and real SQS is used. The URL
# never holds credentials, so Flower and the logs cannot show any.
broker_url = (
    f"sqs://{_settings.sqs_endpoint.split('://', 1)[-1]}"
    if _settings.uses_local_endpoint
    else "sqs://"
)
broker_transport_options = {
    "region": _settings.sqs_region,
    "is_secure": _settings.sqs_endpoint.startswith("https://"),
    # NOTE: every retry countdown must stay below this, or SQS hands the waiting
    # message to a second worker; `tasks.settings` refuses settings that break it.
    "visibility_timeout": _settings.visibility_timeout_s,
    "wait_time_seconds": _settings.poll_wait_s,
    # Seconds before the next receive when the last one found nothing or the worker's
    # prefetch slots were full. An empty queue is waited on by SQS long polling
    # (INGEST_POLL_WAIT_S), so this only paces a busy worker: kombu's default of 1 s
    # capped a worker at one prefetch window (4 tasks) per second.
    "polling_interval": 0.05,
    # SNS fan-out for Celery events and remote control; see tasks/sqs_events.py.
    "supports_fanout": True,
}
broker_connection_retry_on_startup = True
broker_connection_max_retries = None

task_default_queue = _settings.queue_name
task_serializer = "json"
accept_content = ["json"]
task_ignore_result = True

# A message is deleted only after its task ends, so the messages of a killed worker
# come back after the visibility timeout. A pool process lost mid-task puts its
# message back at once.
task_acks_late = True
task_reject_on_worker_lost = True
# Messages a worker may hold per pool slot. With 4 a receive fetches up to 10 messages
# instead of the one slot that just freed, which cut the SQS calls per task and raised
# the drain rate (bench/run.py, docs/performance.md). A held message waits at most a
# few task durations, far below the visibility timeout.
worker_prefetch_multiplier = 4

worker_send_task_events = _settings.events
# No "task-sent" events: enqueue.py would publish one SNS message per row, which held it
# near 30 rows/s. Flower still shows every task from the worker's "received" event on.
task_send_sent_event = False

worker_task_log_format = (
    "[%(asctime)s: %(levelname)s/%(processName)s] %(task_name)s[%(task_id)s]: %(message)s"
)
