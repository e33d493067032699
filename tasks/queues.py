"""Create the SQS task queue and its dead-letter queue, with the attributes the system needs."""

from __future__ import annotations

import json
from typing import Any

import boto3
from botocore.config import Config

from tasks.settings import Settings

#: Suffix of the dead-letter queue's name after the task queue's.
DEAD_LETTER_SUFFIX = "-dead-letter"

#: Seconds SQS keeps a message in the dead-letter queue (14 days, the SQS maximum).
DEAD_LETTER_RETENTION_S = 1_209_600


def sqs_client(settings: Settings) -> Any:
    """Return a boto3 SQS client for the configured endpoint (real AWS when none is set)."""
    config = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3})
    endpoint = settings.sqs_endpoint or None
    return boto3.client(
        "sqs", region_name=settings.sqs_region, endpoint_url=endpoint, config=config
    )


def dead_letter_queue_name(settings: Settings) -> str:
    return settings.queue_name + DEAD_LETTER_SUFFIX


def ensure_queues(settings: Settings) -> str:
    """Create or update the task queue (and its dead-letter queue); return the queue URL.

    The task queue gets the configured visibility timeout and, unless
    INGEST_MAX_RECEIVES is 0, a redrive policy that moves a message to the
    dead-letter queue after that many receives.
    """
    client = sqs_client(settings)
    attributes = {"VisibilityTimeout": str(settings.visibility_timeout_s)}

    if settings.max_receives > 0:
        dead_letter_url = _create_or_update(
            client,
            dead_letter_queue_name(settings),
            {"MessageRetentionPeriod": str(DEAD_LETTER_RETENTION_S)},
        )
        arn = client.get_queue_attributes(QueueUrl=dead_letter_url, AttributeNames=["QueueArn"])[
            "Attributes"
        ]["QueueArn"]
        attributes["RedrivePolicy"] = json.dumps(
            {"deadLetterTargetArn": arn, "maxReceiveCount": str(settings.max_receives)}
        )

    return _create_or_update(client, settings.queue_name, attributes)


def queue_depth(client: Any, queue_name: str) -> dict[str, int]:
    """Return the approximate counts of waiting, in-flight and delayed messages in a queue."""
    url = client.get_queue_url(QueueName=queue_name)["QueueUrl"]
    names = [
        "ApproximateNumberOfMessages",
        "ApproximateNumberOfMessagesNotVisible",
        "ApproximateNumberOfMessagesDelayed",
    ]
    found = client.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"]
    return {
        "waiting": int(found.get(names[0], 0)),
        "in_flight": int(found.get(names[1], 0)),
        "delayed": int(found.get(names[2], 0)),
    }


def _create_or_update(client: Any, name: str, attributes: dict[str, str]) -> str:
    try:
        url = client.get_queue_url(QueueName=name)["QueueUrl"]
    except client.exceptions.QueueDoesNotExist:
        return client.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]

    client.set_queue_attributes(QueueUrl=url, Attributes=attributes)
    return url
