"""Batched deletes and event publishes (tasks/batching.py), against the session's moto server."""

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
from tasks.batching import FLUSH_S, Batcher, delete_messages, publish_events
from tasks.queues import queue_depth
from support import run_enqueue, write_csv


def _client(endpoint: str, service: str = "sqs") -> Any:
    return boto3.client(
        service,
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
    batcher = Batcher(delete_messages, "test-acks")

    for handle in handles:
        batcher.add(client, url, handle)
    batcher.close()

    assert queue_depth(client, name) == {"waiting": 0, "in_flight": 0, "delayed": 0}


def test_single_ack_sent_without_close(queue: tuple[Any, str, str]) -> None:
    client, name, url = queue
    batcher = Batcher(delete_messages, "test-acks")

    for handle in _receive_all(client, url, 2):
        batcher.add(client, url, handle)
        time.sleep(FLUSH_S * 4)  # each ack alone, after the sender went back to waiting
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
    batcher = Batcher(delete_messages, "test-acks")

    with caplog.at_level(logging.WARNING, logger="tasks.batching"):
        for handle in [*handles, "not-a-receipt-handle"]:
            batcher.add(client, url, handle)
        batcher.close()

    assert queue_depth(client, name)["in_flight"] == 0
    assert "did not delete 1 acknowledged message(s)" in caplog.text


def test_unreachable_endpoint_logged(caplog: pytest.LogCaptureFixture, sqs_port: int) -> None:
    dead = _client(f"http://127.0.0.1:{free_port()}")
    batcher = Batcher(delete_messages, "test-acks")

    with caplog.at_level(logging.WARNING, logger="tasks.batching"):
        batcher.add(dead, "http://127.0.0.1/queue", "handle")
        batcher.close()

    assert "failed to delete 1 acknowledged message(s)" in caplog.text
    assert "delete_message_batch failed 3 times" in caplog.text


def test_worker_leaves_queue_empty(stack: LocalStack, tmp_path: Path) -> None:
    rows = "".join(f"phrase {number}\n" for number in range(23))
    write_csv(tmp_path / "data", "rows.csv", "phrase\n" + rows)
    stack.start_phrase_api()
    stack.start_worker("worker", 2)

    assert run_enqueue(stack, str(tmp_path / "data")).returncode == 0
    stack.wait_until_drained(timeout_s=60)

    assert "failed to delete" not in (stack.log_dir / "worker.log").read_text()


def test_events_all_delivered(queue: tuple[Any, str, str], sqs_port: int) -> None:
    client, _name, url = queue
    sns = _client(f"http://127.0.0.1:{sqs_port}", "sns")
    topic = sns.create_topic(Name=f"events-{uuid.uuid4().hex[:12]}")["TopicArn"]
    queue_arn = client.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
    sns.subscribe(
        TopicArn=topic,
        Protocol="sqs",
        Endpoint=queue_arn["Attributes"]["QueueArn"],
        Attributes={"RawMessageDelivery": "true"},
    )
    batcher = Batcher(publish_events, "test-events")

    for number in range(25):
        batcher.add(sns, topic, f'{{"n": {number}}}')
    batcher.close()

    bodies: list[str] = []
    while len(bodies) < 25:
        reply = client.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        if not reply.get("Messages"):
            break
        bodies += [message["Body"] for message in reply["Messages"]]
    assert sorted(bodies, key=lambda body: int(body[6:-1])) == [
        f'{{"n": {number}}}' for number in range(25)
    ]


def test_large_events_split_by_size(queue: tuple[Any, str, str], sqs_port: int) -> None:
    sns = _client(f"http://127.0.0.1:{sqs_port}", "sns")
    topic = sns.create_topic(Name=f"events-{uuid.uuid4().hex[:12]}")["TopicArn"]
    calls: list[int] = []
    original = sns.publish_batch

    def counting(**parameters: Any) -> Any:
        calls.append(len(parameters["PublishBatchRequestEntries"]))
        return original(**parameters)

    sns.publish_batch = counting  # counts the calls to the real endpoint; sends them unchanged
    publish_events(sns, topic, ["x" * 100_000] * 5)

    assert calls == [2, 2, 1]
