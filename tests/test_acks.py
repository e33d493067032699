"""Batched deletes of acknowledged messages (tasks/acks.py), against the session's moto server."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from stack.processes import LOCAL_AWS_ENV, LocalStack, free_port
from tasks.acks import ACK_FLUSH_S, AckBatcher
from tasks.queues import queue_depth
from support import run_enqueue, write_csv


def _client(endpoint: str) -> Any:
    return boto3.client(
        "sqs",
        endpoint_url=endpoint,
        region_name=LOCAL_AWS_ENV["AWS_DEFAULT_REGION"],
        aws_access_key_id=LOCAL_AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=LOCAL_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2),
    )


@pytest.fixture
def queue(sqs_port: int) -> tuple[Any, str, str]:
    """Create an empty queue; yield its client, name and URL."""
    client = _client(f"http://127.0.0.1:{sqs_port}")
    name = f"acks-{uuid.uuid4().hex[:12]}"
    url = client.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "300"})["QueueUrl"]
    return client, name, url


def _receive_all(client: Any, url: str, count: int) -> list[str]:
    for start in range(0, count, 10):
        entries = [{"Id": str(n), "MessageBody": f"m{start + n}"} for n in range(10)]
        client.send_message_batch(QueueUrl=url, Entries=entries[: count - start])

    handles: list[str] = []
    while len(handles) < count:
        reply = client.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        handles += [message["ReceiptHandle"] for message in reply.get("Messages", [])]
    return handles


def test_close_deletes_all(queue: tuple[Any, str, str]) -> None:
    client, name, url = queue
    handles = _receive_all(client, url, 25)
    batcher = AckBatcher()

    for handle in handles:
        batcher.add(client, url, handle)
    batcher.close()

    assert queue_depth(client, name) == {"waiting": 0, "in_flight": 0, "delayed": 0}


def test_single_ack_sent_without_close(queue: tuple[Any, str, str]) -> None:
    client, name, url = queue
    batcher = AckBatcher()

    for handle in _receive_all(client, url, 2):
        batcher.add(client, url, handle)
        time.sleep(ACK_FLUSH_S * 4)  # each ack alone, after the sender went back to waiting
    deadline = time.monotonic() + 5
    while queue_depth(client, name)["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)

    assert queue_depth(client, name)["in_flight"] == 0
    batcher.close()


def test_bad_handle_logged_others_deleted(
    queue: tuple[Any, str, str], caplog: pytest.LogCaptureFixture
) -> None:
    client, name, url = queue
    handles = _receive_all(client, url, 3)
    batcher = AckBatcher()

    with caplog.at_level(logging.WARNING, logger="tasks.acks"):
        for handle in [*handles, "not-a-receipt-handle"]:
            batcher.add(client, url, handle)
        batcher.close()

    assert queue_depth(client, name)["in_flight"] == 0
    assert "did not delete 1 acknowledged message(s)" in caplog.text


def test_unreachable_endpoint_logged(caplog: pytest.LogCaptureFixture, sqs_port: int) -> None:
    dead = _client(f"http://127.0.0.1:{free_port()}")
    batcher = AckBatcher()

    with caplog.at_level(logging.WARNING, logger="tasks.acks"):
        batcher.add(dead, "http://127.0.0.1/queue", "handle")
        batcher.close()

    assert "failed to delete 1 acknowledged message(s)" in caplog.text


def test_worker_leaves_queue_empty(stack: LocalStack, tmp_path: Path) -> None:
    rows = "".join(f"phrase {number}\n" for number in range(23))
    write_csv(tmp_path / "data", "rows.csv", "phrase\n" + rows)
    stack.start_phrase_api()
    stack.start_worker("worker", 2)

    assert run_enqueue(stack, str(tmp_path / "data")).returncode == 0
    stack.wait_until_drained(timeout_s=60)

    assert "failed to delete" not in (stack.log_dir / "worker.log").read_text()
