"""Flower, `celery inspect` and `celery control` on the SQS broker, with real processes.

One stack for the whole module, on its own moto server so that its queue and
subscription counts are not disturbed by other tests: the SQS/SNS endpoint, the
phrase-API stand-in, one worker (concurrency 4) and one Flower on 127.0.0.1.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
import requests

from stack.processes import HOST, ROOT, LocalStack, free_port, wait_for_log, wait_for_port

#: Made-up AWS credentials; moto accepts any, and no Flower page may show them.
AWS_KEY_ID = "AKIAMONITORTEST00042"
AWS_SECRET = "monitoring-test-secret-7c1d0e"

WORKER_NAME = "monitored"
CONCURRENCY = 4
TASK_COUNT = 20

#: Seconds to wait for Flower to show something, or for the endpoint to settle.
WAIT_S = 30.0

#: Seconds `celery inspect ping` may take. Without the cap on the reply queue's long poll,
#: the SQS wait (10 s by default) would be added to it.
PING_MAX_S = 10.0

#: Seconds a `celery` command may run.
COMMAND_TIMEOUT_S = 60.0

#: Celery task states after which a task changes no more, as Flower shows them.
FINAL_STATES = {"SUCCESS", "FAILURE", "REJECTED", "REVOKED"}

#: Flower starts and `celery inspect ping` calls in the leak test.
LEAK_ROUNDS = 20

SEND_SCRIPT = """
import json, sys
import tasks
from tasks.application import settings
from tasks.queues import ensure_queues

ensure_queues(settings)
ids = [tasks.fetch_phrase.delay(f"monitoring {n}", "data/x.csv", n).id for n in range(int(sys.argv[1]))]
print(json.dumps(ids))
"""

EVENT_EXCHANGE_SCRIPT = """
import tasks
from celery.events import receiver
print(receiver.get_exchange(tasks.app.connection()).type)
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """Yield a running stack: the SQS/SNS endpoint, the stand-in and one worker."""
    base = tmp_path_factory.mktemp("monitoring")
    local = LocalStack(log_dir=base / "logs")
    local.settings.update(
        INGEST_STORE_DIR=str(base / "store"),
        INGEST_QUEUE="monitoring",
        AWS_ACCESS_KEY_ID=AWS_KEY_ID,
        AWS_SECRET_ACCESS_KEY=AWS_SECRET,
        FLOWER_UNAUTHENTICATED_API="true",
    )
    with local:
        local.start_sqs()
        local.start_phrase_api()
        local.start_worker(WORKER_NAME, CONCURRENCY)
        yield local


@pytest.fixture(scope="module")
def flower(stack: LocalStack) -> str:
    """Start Flower for the module; return its base URL."""
    port = free_port()
    stack.start_flower(port)
    return f"http://{HOST}:{port}"


def _worker_node() -> str:
    return f"{WORKER_NAME}@{socket.gethostname()}"


def _clients(stack: LocalStack) -> tuple[Any, Any]:
    options = {
        "region_name": "us-east-1",
        "endpoint_url": stack.sqs_endpoint,
        "aws_access_key_id": AWS_KEY_ID,
        "aws_secret_access_key": AWS_SECRET,
    }
    return boto3.client("sqs", **options), boto3.client("sns", **options)


def _queue_names(stack: LocalStack) -> set[str]:
    sqs, _ = _clients(stack)
    return {url.rsplit("/", 1)[-1] for url in sqs.list_queues().get("QueueUrls", [])}


def _subscriptions(stack: LocalStack) -> list[dict[str, str]]:
    _, sns = _clients(stack)
    found = []
    for topic in sns.list_topics().get("Topics", []):
        found.extend(sns.list_subscriptions_by_topic(TopicArn=topic["TopicArn"])["Subscriptions"])
    return found


def _counts(stack: LocalStack) -> tuple[int, int]:
    return len(_queue_names(stack)), len(_subscriptions(stack))


def _celery(stack: LocalStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tasks", *args],
        cwd=ROOT,
        env=stack.env(),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )


def _python(
    stack: LocalStack, script: str, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env=stack.env(**env),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )


def _wait_for(condition: Callable[[], Any], failure: str, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.5)
    pytest.fail(f"{failure} after {timeout_s:.0f} s")


def _get_json(url: str) -> Any:
    response = requests.get(url, timeout=10)
    response.raise_for_status()
    return response.json()


def _start_extra_flower(stack: LocalStack, name: str) -> None:
    """Start another Flower and wait until its event receiver has subscribed its queue."""
    port = free_port()
    flower = ["celery", "-A", "tasks", "flower", f"--address={HOST}", f"--port={port}"]
    process = stack.spawn(name, [sys.executable, "-m", *flower], stack.env())
    wait_for_port(port, process)

    # kombu logs "Create subscription ... for SQS queue '<arn>:celeryev-<id>' ...".
    wait_for_log(stack.log_dir / f"{name}.log", ":celeryev-", process)


def _event_queues_subscribed(stack: LocalStack) -> set[str]:
    endpoints = {
        subscription["Endpoint"].rsplit(":", 1)[-1] for subscription in _subscriptions(stack)
    }
    return {name for name in endpoints if name.startswith("celeryev-")}


def _is_reply_queue(name: str) -> bool:
    """Return whether `name` is a caller's reply queue, which lives only while it waits."""
    return name.endswith("-reply-celery-pidbox")


def _settled_counts(stack: LocalStack) -> tuple[int, int]:
    """Return the queue and subscription counts once no `celery inspect` reply queue exists.

    A reply queue lives about a second, so a count taken at any moment may include one.
    """

    def reply_queues() -> set[str]:
        return {name for name in _queue_names(stack) if _is_reply_queue(name)}

    deadline = time.monotonic() + WAIT_S
    while reply_queues() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not reply_queues(), f"reply queues left after {WAIT_S:.0f} s"
    return _counts(stack)


def test_flower_lists_worker_concurrency(stack: LocalStack, flower: str) -> None:
    def worker_stats() -> dict[str, Any]:
        workers = _get_json(f"{flower}/api/workers?refresh=1")
        return workers.get(_worker_node(), {}).get("stats", {})

    stats = _wait_for(worker_stats, f"Flower did not list {_worker_node()}")

    assert stats["pool"]["max-concurrency"] == CONCURRENCY


def test_flower_lists_every_task(stack: LocalStack, flower: str) -> None:
    sent = _python(stack, SEND_SCRIPT, str(TASK_COUNT))
    assert sent.returncode == 0, sent.stderr
    ids = json.loads(sent.stdout)

    def final_states() -> dict[str, str] | None:
        tasks = _get_json(f"{flower}/api/tasks")
        states = {task_id: tasks[task_id]["state"] for task_id in ids if task_id in tasks}
        finished = len(states) == len(ids) and set(states.values()) <= FINAL_STATES
        return states if finished else None

    states = _wait_for(final_states, "Flower did not show every task in a final state")

    assert len(ids) == TASK_COUNT
    assert set(states.values()) == {"SUCCESS"}
    tasks = _get_json(f"{flower}/api/tasks")
    assert {tasks[task_id]["name"] for task_id in ids} == {"fetch_phrase"}
    assert {tasks[task_id]["worker"] for task_id in ids} == {_worker_node()}


def test_inspect_ping_answers(stack: LocalStack) -> None:
    started = time.monotonic()
    result = _celery(stack, "inspect", "ping", "--json")
    elapsed_s = time.monotonic() - started

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {_worker_node(): {"ok": "pong"}}
    assert elapsed_s < PING_MAX_S


def test_control_rate_limit_applies(stack: LocalStack) -> None:
    result = _celery(stack, "control", "rate_limit", "fetch_phrase", "5/s", "--json")
    registered = _celery(stack, "inspect", "registered", "rate_limit", "--json")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        {_worker_node(): {"ok": "new rate limit set successfully"}}
    ]
    assert registered.returncode == 0, registered.stderr
    assert json.loads(registered.stdout) == {_worker_node(): ["fetch_phrase [rate_limit=5/s]"]}


def test_flower_shows_no_secret(stack: LocalStack, flower: str) -> None:
    tasks = _wait_for(lambda: _get_json(f"{flower}/api/tasks"), "Flower listed no task")
    task_id = next(iter(tasks))
    paths = [
        "/api/workers?refresh=1",
        "/api/tasks",
        f"/api/task/info/{task_id}",
        "/",
        "/tasks",
        f"/task/{task_id}",
        f"/worker/{_worker_node()}",
        "/broker",
    ]
    pages = {path: requests.get(flower + path, timeout=10).text for path in paths}
    broker_urls = _broker_urls(pages)

    for path, text in pages.items():
        assert stack.api_key not in text, path
        assert AWS_KEY_ID not in text, path
        assert AWS_SECRET not in text, path
    assert broker_urls
    for url in broker_urls:
        parts = urlsplit(url)
        assert not parts.username, url
        assert not parts.password or set(parts.password) == {"*"}, url


def _broker_urls(pages: dict[str, str]) -> list[str]:
    urls = []
    for text in pages.values():
        start = text.find("sqs://")
        while start >= 0:
            end = min(i for i in (text.find(c, start) for c in "\"'< \n") if i >= 0)
            urls.append(text[start:end])
            start = text.find("sqs://", end)
    return urls


@pytest.mark.parametrize(("events", "expected"), [("on", "fanout"), ("off", "topic")])
def test_event_exchange_follows_setting(stack: LocalStack, events: str, expected: str) -> None:
    result = _python(stack, EVENT_EXCHANGE_SCRIPT, INGEST_EVENTS=events)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_start_fails_on_other_kombu(stack: LocalStack) -> None:
    result = _python(stack, "import kombu; kombu.__version__ = '5.8.0'; import tasks")

    assert result.returncode != 0
    assert "kombu 5.8.0 is installed" in result.stderr


def test_cleanup_removes_killed_flower(stack: LocalStack, flower: str) -> None:
    live_queues = {name for name in _queue_names(stack) if not _is_reply_queue(name)}
    _start_extra_flower(stack, "flower-killed")
    stack.stop_process("flower-killed", signal.SIGKILL)
    orphans = _queue_names(stack) - live_queues
    sqs, _ = _clients(stack)
    an_hour_ago = str(int(time.time()) - 3600)
    for name in orphans:
        url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
        sqs.tag_queue(QueueUrl=url, Tags={"celery-monitor-heartbeat": an_hour_ago})
    orphan_subscription = _subscribe_deleted_queue(stack, "celeryev-orphan")

    result = subprocess.run(
        [sys.executable, "-m", "tasks.sqs_events", "cleanup"],
        cwd=ROOT,
        env=stack.env(),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    remaining = _queue_names(stack)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert any(name.startswith("celeryev-") for name in orphans)
    assert not orphans & remaining
    assert not orphans & _event_queues_subscribed(stack)
    assert live_queues <= remaining
    assert f"removed subscription {orphan_subscription}" in result.stdout
    assert orphan_subscription not in {entry["SubscriptionArn"] for entry in _subscriptions(stack)}
    assert _celery(stack, "inspect", "ping").returncode == 0


def _subscribe_deleted_queue(stack: LocalStack, name: str) -> str:
    """Subscribe a new queue to the event topic, delete the queue, return the subscription."""
    sqs, sns = _clients(stack)
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
    topic_arn = sns.create_topic(Name="celeryev")["TopicArn"]
    subscription = sns.subscribe(
        TopicArn=topic_arn,
        Protocol="sqs",
        Endpoint=queue_arn["Attributes"]["QueueArn"],
        ReturnSubscriptionArn=True,
    )
    sqs.delete_queue(QueueUrl=url)
    return subscription["SubscriptionArn"]


@pytest.mark.trial
def test_restarts_leave_no_queues(stack: LocalStack, flower: str) -> None:
    def restart_flowers(first: int, last: int) -> None:
        for round_number in range(first, last):
            _start_extra_flower(stack, f"flower-{round_number}")
            stack.stop_process(f"flower-{round_number}")

    def ping(times: int) -> None:
        for _ in range(times):
            result = _celery(stack, "inspect", "ping")
            assert result.returncode == 0, result.stderr

    restart_flowers(0, 1)
    ping(1)
    after_one = _settled_counts(stack)
    with ThreadPoolExecutor(max_workers=3) as lanes:
        half = LEAK_ROUNDS // 2
        runs = [
            lanes.submit(restart_flowers, 1, half),
            lanes.submit(restart_flowers, half, LEAK_ROUNDS),
            lanes.submit(ping, LEAK_ROUNDS - 1),
        ]
        for run in runs:
            run.result()
    after_all = _settled_counts(stack)

    assert after_all[0] <= after_one[0]
    assert after_all[1] <= after_one[1]
