"""Send `fetch_phrase` messages to SQS fast: in batches of ten, several batches at once.

Celery and kombu still build every message, so workers receive the standard Celery
task format. Only the last step differs: instead of one SendMessage call per task,
the kombu channel's `_put` is replaced by one that collects the encoded SQS bodies,
and full batches go out through SendMessageBatch on a small thread pool.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import kombu
from celery import Celery
from kombu.asynchronous.aws.sqs.message import AsyncMessage
from kombu.utils.json import dumps

from tasks.errors import DispatchError

#: Entries per SendMessageBatch call; SQS accepts at most 10.
SQS_BATCH_SIZE = 10

#: SendMessageBatch calls in flight at once.
SEND_THREADS = 8

#: Tries for entries that SQS reports as failed inside a batch.
BATCH_ATTEMPTS = 5

#: kombu versions whose SQS channel `_put` and body encoding this module reproduces.
SUPPORTED_KOMBU = ("5.7.",)


class BatchSender:
    """Publish task messages through Celery, sending them to SQS in concurrent batches.

    Use as a context manager; `close()` waits for every batch and raises
    `DispatchError` if any message could not be sent. `on_sent(tags)` is called from
    a sender thread with the tags of the messages SQS accepted, batch by batch.
    """

    def __init__(self, app: Celery, on_sent: Callable[[list[Any]], None] | None = None) -> None:
        if not kombu.__version__.startswith(SUPPORTED_KOMBU):
            raise DispatchError(
                f"kombu {kombu.__version__} is not supported by tasks.dispatch "
                f"(written for {', '.join(SUPPORTED_KOMBU)}x); check SQS channel _put before upgrading"
            )

        self._app = app
        self._on_sent = on_sent or (lambda tags: None)
        self._tag: Any = None
        self._connection = app.connection_for_write()
        self._producer = app.producer_or_acquire(None).__enter__()
        self._channel = self._producer.channel
        self._base64 = self._channel.sqs_base64_encoding
        self._channel._put = self._collect

        self._pending: list[dict[str, Any]] = []
        self._queue_url: str | None = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=SEND_THREADS, thread_name_prefix="sqs-send")
        self._futures: list[Future[None]] = []
        self._errors: list[str] = []

    def __enter__(self) -> BatchSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def send(self, task_name: str, args: tuple[Any, ...], tag: Any = None) -> str:
        """Queue one task message; return its task id. `tag` comes back through `on_sent`."""
        self._tag = tag
        result = self._app.send_task(task_name, args=args, producer=self._producer)
        return result.id

    def flush(self) -> None:
        """Send whatever is pending, even a partial batch."""
        with self._lock:
            batch, self._pending = self._pending, []
        if batch:
            self._submit(batch)

    def close(self) -> None:
        """Send the rest, wait for every batch and raise `DispatchError` on any failure."""
        self.flush()
        for future in self._futures:
            future.result()
        self._pool.shutdown(wait=True)
        self._producer.__exit__(None, None, None)
        self._connection.release()

        if self._errors:
            shown = "; ".join(self._errors[:5])
            raise DispatchError(f"{len(self._errors)} message(s) could not be sent to SQS: {shown}")

    def _collect(self, queue: str, message: dict[str, Any], **_: Any) -> None:
        if self._queue_url is None:
            self._queue_url = self._channel._new_queue(queue)

        text = dumps(message)
        body = AsyncMessage().encode(text) if self._base64 else text
        with self._lock:
            entry = {"Id": str(len(self._pending)), "MessageBody": body, "tag": self._tag}
            self._pending.append(entry)
            if len(self._pending) < SQS_BATCH_SIZE:
                return
            batch, self._pending = self._pending, []
        self._submit(batch)

    def _submit(self, batch: list[dict[str, Any]]) -> None:
        self._futures = [future for future in self._futures if not future.done()]
        self._futures.append(self._pool.submit(self._send_batch, batch))

    def _send_batch(self, batch: list[dict[str, Any]]) -> None:
        client = self._channel.sqs()
        entries = batch

        for attempt in range(1, BATCH_ATTEMPTS + 1):
            request = [
                {"Id": entry["Id"], "MessageBody": entry["MessageBody"]} for entry in entries
            ]
            try:
                reply = client.send_message_batch(QueueUrl=self._queue_url, Entries=request)
            except Exception as exc:  # boto3 raises many types; every one fails the batch
                failed_reason = f"{type(exc).__name__}: {exc}"
                failed_ids = {entry["Id"] for entry in entries}
            else:
                failed = reply.get("Failed", [])
                failed_ids = {item["Id"] for item in failed}
                failed_reason = "; ".join(
                    item.get("Message", item.get("Code", "")) for item in failed
                )

            self._on_sent([entry["tag"] for entry in entries if entry["Id"] not in failed_ids])
            if not failed_ids:
                return
            entries = [entry for entry in entries if entry["Id"] in failed_ids]
            time.sleep(0.2 * 2**attempt)

        with self._lock:
            self._errors.append(f"{len(entries)} after {BATCH_ATTEMPTS} tries: {failed_reason}")
