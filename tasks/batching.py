"""Send acks and events to AWS ten at a time, from a thread, off the worker's event loop.

kombu 5.7 acknowledges each SQS message with its own blocking DeleteMessage call, made
by the worker's main process. With a prefork pool every pool process's acks wait in
that one process, and each costs the SQS endpoint a full request. Each Celery event
(three per task, with INGEST_EVENTS on) is likewise one blocking SNS Publish call.

`BatchingChannel` frees a message's prefetch slot at once and hands its receipt handle
to a `Batcher`, whose thread sends DeleteMessageBatch calls of up to ten entries. Events
go the same way into SNS PublishBatch calls, in the order they were sent. Remote-control
messages, which also use SNS, are still published one by one.

An item waits at most FLUSH_S before its batch goes out. A delete can fail to reach
SQS: the process is killed, or SQS stays unreachable through every try. The message
then comes back after the visibility timeout, and its task finds the result already
stored and does nothing, as for any duplicate delivery. A lost event is only missing
from Flower.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from celery.events.event import EVENT_EXCHANGE_NAME
from kombu.transport import SQS
from kombu.utils.json import dumps

logger = logging.getLogger(__name__)

#: Entries per DeleteMessageBatch or PublishBatch call; SQS and SNS accept at most 10.
BATCH_SIZE = 10

#: Seconds an item may wait for its batch to fill before the batch is sent anyway.
FLUSH_S = 0.05

#: Tries of one batch call that raised (connection refused, throttling).
ATTEMPTS = 3

#: Seconds before the first retry of a failed call; doubled for each further one.
RETRY_S = 0.5

#: Bytes of messages per PublishBatch call: SNS rejects a batch whose messages add up to more.
SNS_BATCH_BYTES = 262_144

#: Seconds `close()` waits for the sender thread to send what is pending.
CLOSE_WAIT_S = 10.0


#: Sends one batch: `send(client, target, items)`, with at most BATCH_SIZE items.
SendBatch = Callable[[Any, str, list[str]], None]


@dataclass(frozen=True)
class _Item:
    client: Any
    value: str


class Batcher:
    """Collect items per target (a queue URL or a topic ARN) and send them in batches.

    Thread-safe: `add` may be called from any thread. Items of one target keep their
    order. The sender thread starts on the first `add`, so a process that forks before
    adding anything has no thread. `send` must not raise.
    """

    def __init__(self, send: SendBatch, thread_name: str) -> None:
        self._send_batch = send
        self._thread_name = thread_name
        self._pending: dict[str, list[_Item]] = defaultdict(list)
        self._count = 0
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def add(self, client: Any, target: str, value: str) -> None:
        """Queue one item for `target`, to be sent with `client` (a boto3 client)."""
        with self._wake:
            if self._closed:
                self._send_batch(client, target, [value])
                return
            self._pending[target].append(_Item(client, value))
            self._count += 1
            if self._thread is None:
                self._start()
            if self._count in (1, BATCH_SIZE):
                self._wake.notify()  # the first starts the flush timer, a full batch ends it

    def close(self) -> None:
        """Send everything pending and stop the thread; later adds are sent at once."""
        with self._wake:
            self._closed = True
            self._wake.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(CLOSE_WAIT_S)
        self._send(self._take_all())

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._count or self._closed)
                self._wake.wait_for(lambda: self._count >= BATCH_SIZE or self._closed, FLUSH_S)
                batches = self._take_all()
                closing = self._closed
            self._send(batches)
            if closing:
                return

    def _take_all(self) -> list[tuple[str, list[_Item]]]:
        with self._wake:
            batches = list(self._pending.items())
            self._pending.clear()
            self._count = 0
        return batches

    def _send(self, batches: list[tuple[str, list[_Item]]]) -> None:
        for target, items in batches:
            for start in range(0, len(items), BATCH_SIZE):
                chunk = items[start : start + BATCH_SIZE]
                self._send_batch(chunk[0].client, target, [item.value for item in chunk])


def delete_messages(client: Any, queue_url: str, receipt_handles: list[str]) -> None:
    """Delete up to ten messages with one DeleteMessageBatch call; log what failed."""
    entries = [{"Id": str(n), "ReceiptHandle": handle} for n, handle in enumerate(receipt_handles)]
    reply = _call(client.delete_message_batch, QueueUrl=queue_url, Entries=entries)
    if reply is None:
        logger.warning(
            "failed to delete %d acknowledged message(s) from %s. SQS delivers them again "
            "after the visibility timeout",
            len(entries),
            queue_url,
        )
        return
    _log_failed(
        reply.get("Failed", []), "SQS did not delete %d acknowledged message(s) from %s", queue_url
    )


def publish_events(client: Any, topic_arn: str, messages: list[str]) -> None:
    """Publish up to ten event messages, in order, with PublishBatch calls; log what failed.

    One call takes all of them unless together they pass SNS_BATCH_BYTES.
    """
    chunk: list[str] = []
    for message in messages:
        if chunk and _utf8_bytes(chunk) + _utf8_bytes([message]) > SNS_BATCH_BYTES:
            _publish_chunk(client, topic_arn, chunk)
            chunk = []
        chunk.append(message)
    _publish_chunk(client, topic_arn, chunk)


def _utf8_bytes(messages: list[str]) -> int:
    return sum(len(message.encode("utf-8")) for message in messages)


def _publish_chunk(client: Any, topic_arn: str, messages: list[str]) -> None:
    entries = [{"Id": str(n), "Message": message} for n, message in enumerate(messages)]
    reply = _call(client.publish_batch, TopicArn=topic_arn, PublishBatchRequestEntries=entries)
    if reply is None:
        logger.warning("failed to publish %d event(s) to %s", len(entries), topic_arn)
        return
    _log_failed(reply.get("Failed", []), "SNS did not publish %d event(s) to %s", topic_arn)


def _call(method: Callable[..., Any], **parameters: Any) -> dict[str, Any] | None:
    """Call a boto3 method with ATTEMPTS tries; return its reply, or None after logging why."""
    for attempt in range(ATTEMPTS):
        try:
            return method(**parameters)
        except (BotoCoreError, ClientError, OSError) as exc:
            if attempt + 1 == ATTEMPTS:
                logger.warning("%s failed %d times: %s", method.__name__, ATTEMPTS, exc)
                return None
            time.sleep(RETRY_S * 2**attempt)
    return None


def _log_failed(failed: list[dict[str, Any]], template: str, target: str) -> None:
    """Log the entries a batch call reported as failed; `template` takes a count and `target`."""
    if not failed:
        return
    codes = sorted({item.get("Code", "unknown") for item in failed})
    logger.warning(template + " (%s)", len(failed), target, ", ".join(codes))


class BatchingChannel(SQS.Channel):
    """kombu's SQS channel, deleting acked messages and publishing events in batches."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acks = Batcher(delete_messages, "sqs-acks")
        self._events = Batcher(publish_events, "sns-events")
        atexit.register(self._close_batchers)

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        try:
            info = self.qos.get(delivery_tag).delivery_info
            receipt_handle = info["sqs_message"]["ReceiptHandle"]
            queue_url = info["sqs_queue"]
        except KeyError:
            super().basic_ack(delivery_tag, multiple)
            return

        queue = self.canonical_queue_name(info["routing_key"]) if "routing_key" in info else None
        self._acks.add(self.sqs(queue=queue), queue_url, receipt_handle)
        self.qos.ack(delivery_tag)

    def _put_fanout(self, exchange: str, message: dict, routing_key: str, **kwargs: Any) -> None:
        properties = message.get("properties", {})
        if exchange != EVENT_EXCHANGE_NAME or properties.get("message_attributes"):
            super()._put_fanout(exchange, message, routing_key, **kwargs)
            return

        topic_arn = self.fanout._get_or_create_topic(exchange)
        self._events.add(self.fanout.get_client(exchange), topic_arn, dumps(message))

    def close(self) -> None:
        self._close_batchers()
        atexit.unregister(self._close_batchers)
        super().close()

    def _close_batchers(self) -> None:
        self._events.close()
        self._acks.close()
