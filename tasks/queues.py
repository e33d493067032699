"""The SQS task queue and its dead-letter queue: creation, redrive and worker-side handling.

- `ensure_queues` creates both queues with the attributes the system needs.
- `move_dead_letters` sends dead-lettered task messages back to the task queue.
- `ReturnPoisonMessages` (a Celery consumer step) and `install_receive_recovery` change
  how a worker treats messages it cannot run and failed receives; `tasks.fetch` installs
  both in every worker.
"""

from __future__ import annotations

import base64
import binascii
import functools
import inspect
import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import boto3
import kombu
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from celery import bootsteps
from kombu.transport import SQS
from vine import ensure_promise, promise

from tasks.settings import Settings, get_settings

logger = logging.getLogger(__name__)

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


# -- Dead letters back to the task queue. --

#: Seconds a dead-letter message stays hidden while `move_dead_letters` handles it.
MOVE_VISIBILITY_TIMEOUT_S = 60

#: Long-poll seconds of each receive from the dead-letter queue. A short poll (0) can come
#: back empty from real SQS while messages are still there.
MOVE_RECEIVE_WAIT_S = 1


@dataclass
class DeadLetterMove:
    """The outcome of `move_dead_letters`."""

    moved: int = 0
    #: Messages that are not task messages of the named task, left in the dead-letter queue.
    left: int = 0


def move_dead_letters(settings: Settings, task_name: str) -> DeadLetterMove:
    """Move every `task_name` message from the dead-letter queue back to the task queue.

    Each message is sent again with the same body and message attributes, then deleted
    from the dead-letter queue, so SQS counts its receives from zero. Messages that are
    not task messages of `task_name` (garbage, undecodable bodies, other tasks) stay in
    the dead-letter queue and are visible again when this returns. Raises botocore's
    ClientError or BotoCoreError when SQS fails, after moving what it could.

    NOTE: a crash between the send and the delete leaves the message in both queues, so
    the task runs twice, and `fetch_phrase` makes the second run a no-op.
    """
    client = sqs_client(settings)
    source = client.get_queue_url(QueueName=dead_letter_queue_name(settings))["QueueUrl"]
    target = client.get_queue_url(QueueName=settings.queue_name)["QueueUrl"]
    outcome = DeadLetterMove()
    left_handles: list[str] = []

    while True:
        messages = client.receive_message(
            QueueUrl=source,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=MOVE_RECEIVE_WAIT_S,
            VisibilityTimeout=MOVE_VISIBILITY_TIMEOUT_S,
            MessageAttributeNames=["All"],
        ).get("Messages", [])
        if not messages:
            break

        movable = []
        for message in messages:
            if task_name_of(message["Body"]) == task_name:
                movable.append(message)
            else:
                left_handles.append(message["ReceiptHandle"])
        outcome.moved += _move_batch(client, source, target, movable)

    for handle in left_handles:
        client.change_message_visibility(QueueUrl=source, ReceiptHandle=handle, VisibilityTimeout=0)
    outcome.left = len(left_handles)
    return outcome


def task_name_of(body: str) -> str | None:
    """Return the task name of a Celery task message body as SQS stores it, or None.

    None means the body is not a task message that a worker can decode: not (base64 of)
    a kombu JSON envelope, no task header, or a task body that is not JSON.
    """
    envelope = _json_or_none(_unbase64(body))
    if not isinstance(envelope, dict) or not isinstance(envelope.get("headers"), dict):
        return None

    task_body = envelope.get("body")
    if envelope.get("properties", {}).get("body_encoding") == "base64":
        task_body = _unbase64(task_body) if isinstance(task_body, str) else None
    if envelope.get("content-type") != "application/json" or _json_or_none(task_body) is None:
        return None

    name = envelope["headers"].get("task")
    return name if isinstance(name, str) else None


def _unbase64(text: str) -> str:
    try:
        return base64.b64decode(text, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return text


def _json_or_none(text: str | None) -> Any:
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None


def _move_batch(client: Any, source: str, target: str, messages: list[dict[str, Any]]) -> int:
    """Send up to ten messages to `target`, delete the sent ones from `source`; return the count."""
    if not messages:
        return 0

    entries = []
    for number, message in enumerate(messages):
        entry = {"Id": str(number), "MessageBody": message["Body"]}
        if message.get("MessageAttributes"):
            entry["MessageAttributes"] = message["MessageAttributes"]
        entries.append(entry)
    reply = client.send_message_batch(QueueUrl=target, Entries=entries)

    sent = {item["Id"] for item in reply.get("Successful", [])}
    for item in reply.get("Failed", []):
        logger.warning("dead letter not moved, SQS rejected it: %s", item.get("Message"))
    deletions = [
        {"Id": str(number), "ReceiptHandle": message["ReceiptHandle"]}
        for number, message in enumerate(messages)
        if str(number) in sent
    ]
    if deletions:
        client.delete_message_batch(QueueUrl=source, Entries=deletions)
    return len(deletions)


# -- Worker: messages that cannot run as a task go back to SQS, not to the bin. --

#: Seconds a message that is not a usable task message stays hidden before SQS delivers it
#: again. Every delivery counts toward INGEST_MAX_RECEIVES, so SQS moves such a message
#: to the dead-letter queue after about INGEST_MAX_RECEIVES times this delay.
POISON_REDELIVERY_DELAY_S = 1


class ReturnPoisonMessages(bootsteps.Step):
    """Consumer step: hand messages the worker cannot run back to SQS's redrive policy.

    Celery 5.7.0's consumer acknowledges, and so deletes, a message whose body it cannot
    decode (`Consumer.on_decode_error`), and rejects one that is no task message or an
    invalid one, which on SQS leaves it hidden for the whole visibility timeout. This step
    makes the three handlers log the message id and make the message visible again after
    POISON_REDELIVERY_DELAY_S, so that SQS moves it to the dead-letter queue after
    INGEST_MAX_RECEIVES deliveries. With INGEST_MAX_RECEIVES=0 there is no dead-letter
    queue and Celery's handlers stay.
    """

    name = "tasks.queues.ReturnPoisonMessages"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        max_receives = get_settings().max_receives
        if max_receives == 0:
            return

        handle = functools.partial(_return_poison, parent, max_receives)
        parent.on_decode_error = lambda message, exc: handle(message, f"cannot be decoded: {exc!r}")
        parent.on_unknown_message = lambda body, message: handle(message, "is not a task message")
        parent.on_invalid_task = lambda body, message, exc: handle(message, f"is invalid: {exc!r}")


def _return_poison(consumer: Any, max_receives: int, message: Any, reason: str) -> None:
    info = message.delivery_info
    sqs_message = info.get("sqs_message") or {}
    receives = sqs_message.get("Attributes", {}).get("ApproximateReceiveCount", "?")
    logger.error(
        "SQS message %s %s; returned to the queue (receive %s; SQS moves it to the "
        "dead-letter queue after %d)",
        sqs_message.get("MessageId", "(no id)"),
        reason,
        receives,
        max_receives,
    )

    try:
        message.channel.sqs().change_message_visibility(
            QueueUrl=info["sqs_queue"],
            ReceiptHandle=sqs_message["ReceiptHandle"],
            VisibilityTimeout=POISON_REDELIVERY_DELAY_S,
        )
    except (KeyError, ClientError, BotoCoreError) as exc:
        logger.warning(
            "could not make it visible again, SQS delivers it after the timeout: %r", exc
        )

    # kombu 5.7.0 deletes a rejected message only from a queue without a redrive policy,
    # so this releases the worker's prefetch slot and leaves the message in SQS.
    message.reject_log_error(logger, consumer.connection_errors)


# -- Worker: a failed receive must not stop the polling. --

#: Seconds before the next receive on a queue whose last receive failed.
RECEIVE_RETRY_DELAY_S = 2.0

#: Consecutive failed receives on a queue between two warnings, after the first warning.
RECEIVE_FAILURES_PER_WARNING = 10

#: The kombu version whose SQS `Channel._get_async` `install_receive_recovery` replaces.
RECOVERY_KOMBU_VERSION = "5.7.0"

_STOCK_GET_ASYNC = SQS.Channel._get_async


def install_receive_recovery() -> None:
    """Make kombu's SQS channel keep polling a queue after a receive fails.

    In kombu 5.7.0 each asynchronous ReceiveMessage schedules the next one from its
    callback. A network error, timeout or HTTP 5xx makes the callback fail with
    AttributeError (kombu passes [] where it expects a dict), and any other HTTP error
    raises, so the worker stays up but never receives again. The replacement
    `_get_async` logs the failure and polls again after RECEIVE_RETRY_DELAY_S.
    Raises RuntimeError for another kombu version or a changed `_get_async`.
    """
    if SQS.Channel._get_async is _get_async_with_recovery:
        return

    expected = ["self", "queue", "count", "callback"]
    found = list(inspect.signature(_STOCK_GET_ASYNC).parameters)
    if kombu.__version__ != RECOVERY_KOMBU_VERSION or found != expected:
        raise RuntimeError(
            f"tasks.queues.install_receive_recovery was written for kombu "
            f"{RECOVERY_KOMBU_VERSION} with Channel._get_async{tuple(expected)}, but kombu "
            f"{kombu.__version__} is installed, with Channel._get_async{tuple(found)}: check "
            "kombu/transport/SQS before upgrading"
        )
    SQS.Channel._get_async = _get_async_with_recovery


def _get_async_with_recovery(
    self: SQS.Channel, queue: str, count: int = 1, callback: Any = None
) -> Any:
    # Same request as kombu's _get_async, with a callback that reschedules on any failure.
    queue_url = self._new_queue(queue)
    queue_name = self.canonical_queue_name(queue)
    next_poll = ensure_promise(callback)

    def on_reply(reply: Any) -> None:
        if self.closed:
            _release_after_close(self, queue_url, queue_name, reply)
            return
        if not isinstance(reply, dict):
            _receive_failed(
                self, queue_name, "no reply (network error, timeout or HTTP 5xx)", next_poll
            )
            return
        _receive_succeeded(self, queue_name)
        next_poll(self._on_messages_ready(queue_url, queue, reply))

    def on_error(exc: BaseException) -> None:
        if self.closed:
            logger.debug("receive from SQS queue %s ended after shutdown: %r", queue_name, exc)
            return
        _receive_failed(self, queue_name, repr(exc), next_poll)

    return self._get_from_sqs(
        queue_name=queue_name,
        queue_url=queue_url,
        count=count,
        connection=self.asynsqs(queue=queue_name),
        callback=promise(on_reply, on_error=on_error),
    )


def _release_after_close(channel: SQS.Channel, queue_url: str, queue_name: str, reply: Any) -> None:
    """Make visible again the messages of a receive that returned after its channel closed.

    Without this they stay invisible until the visibility timeout.

    NOTE: a worker that exits before its outstanding long poll returns never receives the
    reply, so SQS (moto, at least) still hands up to ten messages to the closed poll.
    They come back after the visibility timeout: delayed, not lost.
    """
    messages = reply.get("Messages") if isinstance(reply, dict) else None
    if not messages:
        return
    try:
        channel._release_messages(queue_url, queue_name, messages)
    except Exception as exc:  # best effort: the messages return after the timeout anyway
        logger.info("failed to release %d message(s) received at shutdown: %r", len(messages), exc)


def _failure_counts(channel: SQS.Channel) -> Counter[str]:
    return channel.__dict__.setdefault("_receive_failures", Counter())


def _receive_failed(channel: SQS.Channel, queue_name: str, reason: str, next_poll: Any) -> None:
    failures = _failure_counts(channel)
    failures[queue_name] += 1
    if failures[queue_name] % RECEIVE_FAILURES_PER_WARNING == 1:
        logger.warning(
            "receive from SQS queue %s failed %d time(s) in a row (%s); next try in %.0f s",
            queue_name,
            failures[queue_name],
            reason,
            RECEIVE_RETRY_DELAY_S,
        )
    channel.hub.call_later(RECEIVE_RETRY_DELAY_S, next_poll, 0)


def _receive_succeeded(channel: SQS.Channel, queue_name: str) -> None:
    failures = _failure_counts(channel)
    if failures[queue_name]:
        logger.info(
            "receive from SQS queue %s works again after %d failed tries",
            queue_name,
            failures.pop(queue_name),
        )
