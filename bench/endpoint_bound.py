"""The SQS endpoint's own limit: raw boto3 batch calls with no Celery, no API and no disk.

These numbers bound what any client can get from the local endpoint on this machine,
so the table can show how far enqueue.py and the worker are from it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

#: Entries per SendMessageBatch or DeleteMessageBatch call; SQS accepts at most 10.
BATCH = 10

#: Bytes in each raw message body, about the size of one encoded `fetch_phrase` message.
BODY_BYTES = 1_500


def send_raw(make_client: Callable[[], Any], queue_url: str, count: int, threads: int) -> float:
    """Send `count` messages in batches of 10 from `threads` threads; return the seconds taken."""
    body = "x" * BODY_BYTES
    batches = [min(BATCH, count - start) for start in range(0, count, BATCH)]
    local = threading.local()

    def send(size: int) -> None:
        if not hasattr(local, "client"):
            local.client = make_client()
        entries = [{"Id": str(index), "MessageBody": body} for index in range(size)]
        local.client.send_message_batch(QueueUrl=queue_url, Entries=entries)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(send, batches))
    return time.monotonic() - started


def drain_raw(make_client: Callable[[], Any], queue_url: str, count: int, threads: int) -> float:
    """Receive and batch-delete `count` messages from `threads` threads; return the seconds taken.

    Each thread stops when the total reaches `count` or a receive comes back empty.
    """
    lock = threading.Lock()
    done = [0]

    def drain() -> None:
        client = make_client()
        while True:
            with lock:
                if done[0] >= count:
                    return
            reply = client.receive_message(
                QueueUrl=queue_url, MaxNumberOfMessages=BATCH, WaitTimeSeconds=0
            )
            messages = reply.get("Messages", [])
            if not messages:
                return
            entries = [
                {"Id": str(index), "ReceiptHandle": message["ReceiptHandle"]}
                for index, message in enumerate(messages)
            ]
            client.delete_message_batch(QueueUrl=queue_url, Entries=entries)
            with lock:
                done[0] += len(messages)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for future in [pool.submit(drain) for _ in range(threads)]:
            future.result()
    return time.monotonic() - started
