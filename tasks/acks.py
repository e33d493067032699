"""Delete acknowledged SQS messages in batches of ten, off the worker's event loop.

kombu 5.7 acknowledges each SQS message with its own blocking DeleteMessage call, made
by the worker's main process. With a prefork pool every pool process's acks wait in
that one process, and each costs the SQS endpoint a full request. `BatchedAckChannel`
frees the message's prefetch slot at once and hands its receipt handle to an
`AckBatcher`, whose thread sends DeleteMessageBatch calls of up to ten entries.

An ack waits at most ACK_FLUSH_S before its batch goes out. A delete that never
reaches SQS (the process is killed, or SQS stays unreachable through every try) leaves
the message to come back after the visibility timeout; its task then finds the result
already stored and does nothing, as for any duplicate delivery.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from kombu.transport import SQS

logger = logging.getLogger(__name__)

#: Entries per DeleteMessageBatch call; SQS accepts at most 10.
ACK_BATCH_SIZE = 10

#: Seconds an ack may wait for its batch to fill before the batch is sent anyway.
ACK_FLUSH_S = 0.05

#: Tries of one DeleteMessageBatch call that raised (connection refused, throttling).
ACK_ATTEMPTS = 3

#: Seconds before the first retry of a failed call; doubled for each further one.
ACK_RETRY_S = 0.5

#: Seconds `close()` waits for the sender thread to send what is pending.
CLOSE_WAIT_S = 10.0


@dataclass(frozen=True)
class _Ack:
    client: Any
    receipt_handle: str


class AckBatcher:
    """Collect receipt handles and delete them from their queues in batches.

    Thread-safe: `add` may be called from any thread. The sender thread starts on the
    first `add`, so a process that forks before acknowledging anything has no thread.
    """

    def __init__(self) -> None:
        self._pending: dict[str, list[_Ack]] = defaultdict(list)
        self._count = 0
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def add(self, client: Any, queue_url: str, receipt_handle: str) -> None:
        """Queue one message for deletion with `client` (a boto3 SQS client)."""
        with self._wake:
            if self._closed:
                self._delete(client, queue_url, [receipt_handle])
                return
            self._pending[queue_url].append(_Ack(client, receipt_handle))
            self._count += 1
            if self._thread is None:
                self._start()
            if self._count in (1, ACK_BATCH_SIZE):
                self._wake.notify()  # the first starts the flush timer, a full batch ends it

    def close(self) -> None:
        """Send every pending delete and stop the thread; later adds are sent at once."""
        with self._wake:
            self._closed = True
            self._wake.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(CLOSE_WAIT_S)
        self._send(self._take_all())

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sqs-ack", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._count or self._closed)
                self._wake.wait_for(
                    lambda: self._count >= ACK_BATCH_SIZE or self._closed, ACK_FLUSH_S
                )
                batches = self._take_all()
                closing = self._closed
            self._send(batches)
            if closing:
                return

    def _take_all(self) -> list[tuple[str, list[_Ack]]]:
        with self._wake:
            batches = list(self._pending.items())
            self._pending.clear()
            self._count = 0
        return batches

    def _send(self, batches: list[tuple[str, list[_Ack]]]) -> None:
        for queue_url, acks in batches:
            for start in range(0, len(acks), ACK_BATCH_SIZE):
                chunk = acks[start : start + ACK_BATCH_SIZE]
                handles = [ack.receipt_handle for ack in chunk]
                self._delete(chunk[0].client, queue_url, handles)

    def _delete(self, client: Any, queue_url: str, handles: list[str]) -> None:
        entries = [{"Id": str(number), "ReceiptHandle": h} for number, h in enumerate(handles)]
        for attempt in range(ACK_ATTEMPTS):
            try:
                reply = client.delete_message_batch(QueueUrl=queue_url, Entries=entries)
            except (BotoCoreError, ClientError, OSError) as exc:
                if attempt + 1 < ACK_ATTEMPTS:
                    time.sleep(ACK_RETRY_S * 2**attempt)
                    continue
                logger.warning(
                    "failed to delete %d acknowledged message(s) from %s: %s. SQS delivers "
                    "them again after the visibility timeout",
                    len(entries),
                    queue_url,
                    exc,
                )
                return
            _log_failed(queue_url, reply.get("Failed", []))
            return


def _log_failed(queue_url: str, failed: list[dict[str, Any]]) -> None:
    if not failed:
        return
    codes = sorted({item.get("Code", "unknown") for item in failed})
    logger.warning(
        "SQS did not delete %d acknowledged message(s) from %s (%s); they come back after "
        "the visibility timeout",
        len(failed),
        queue_url,
        ", ".join(codes),
    )


class BatchedAckChannel(SQS.Channel):
    """kombu's SQS channel, deleting acknowledged messages through an `AckBatcher`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acks = AckBatcher()
        atexit.register(self._acks.close)

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

    def close(self) -> None:
        self._acks.close()
        atexit.unregister(self._acks.close)
        super().close()
