"""Make Flower, `celery events` and `celery inspect/control` work on the SQS broker.

Stock Celery 5.7.0 and kombu 5.7.0 on SQS send no events and answer no remote control.
`enable_sqs_monitoring(app, settings)` fixes that with five narrow adaptations:

1. The transport option `supports_fanout: True` (in celeryconfig.py) makes kombu map
   fanout exchanges to SNS topics and subscribe each consuming SQS queue to its topic.
2. The event exchange `celeryev` is declared as fanout instead of topic, as Celery
   already does for Redis, so events reach every receiver through SNS. Only with
   INGEST_EVENTS on; otherwise events stay inside the sending process.
3. The SQS transport declares that it implements fanout exchanges, so the worker
   starts its remote-control (pidbox) consumer.
4. A reply to a `reply.<namespace>.pidbox` exchange goes to the caller's reply queue,
   `<routing key>.<exchange>`. The binding exists only in the caller's process, so
   kombu's in-process routing would drop every reply sent by a worker.
5. A process without a kombu event loop (Flower, `celery events`, `celery inspect`)
   deletes received no-ack messages with the blocking boto3 client, because kombu's
   asynchronous client needs the loop and fails with AttributeError without one.

Queues declared with `auto_delete=True` (event receivers, reply queues, each worker's
mailbox) are deleted with their SNS subscriptions when their process exits, as on AMQP.
A process killed before that leaves them behind, so each owner tags its queues with a
heartbeat, and `python -m tasks.sqs_events cleanup` removes the ones whose heartbeat
stopped (see `cleanup`).

Each adaptation patches kombu or Celery internals, so `enable_sqs_monitoring` raises
`RuntimeError` at start unless the installed versions are the tested ones and every
patched internal is still there.
"""

from __future__ import annotations

import argparse
import atexit
import inspect
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import celery
import celery.events
import celery.events.dispatcher
import celery.events.event
import celery.events.receiver
import kombu
import kombu.transport
from botocore.config import Config
from botocore.exceptions import ClientError
from celery import Celery
from kombu.pidbox import Mailbox
from kombu.transport import SQS

from tasks.settings import Settings

logger = logging.getLogger(__name__)

#: The versions whose internals this module was checked against; any other fails at start.
TESTED_VERSIONS = {"celery": "5.7.0", "kombu": "5.7.0"}

#: Queue tag that holds the Unix time (whole seconds) at which its owner last showed it is alive.
HEARTBEAT_TAG = "celery-monitor-heartbeat"

#: Seconds between two heartbeat tags on each queue a process owns.
HEARTBEAT_INTERVAL_S = 60.0

#: Seconds without a heartbeat after which `cleanup` treats a monitoring queue as stale.
#: Five heartbeat intervals, so that a slow or briefly disconnected owner keeps its queues.
STALE_AFTER_S = 300.0

#: Longest long-poll wait, in seconds, for a reply queue in a process without an event loop.
#: `celery inspect` drains until a poll comes back empty, so the SQS wait (INGEST_POLL_WAIT_S)
#: would otherwise be added to every command.
CLIENT_REPLY_WAIT_S = 1

#: The SQS error codes for a queue that does not exist (the JSON and the query protocol).
QUEUE_MISSING_CODES = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})

#: The SNS error code for a subscription that does not exist.
SUBSCRIPTION_MISSING_CODE = "NotFound"

_STOCK_SQS_TRANSPORT = "kombu.transport.SQS:Transport"
_MONITORING_TRANSPORT = f"{__name__}:MonitoringTransport"


# -- Adaptations 3, 4 and 5, and the deletion of auto-delete queues: the SQS transport. --


class MonitoringChannel(SQS.Channel):
    """kombu's SQS channel with pidbox reply routing, blocking deletes and owned queues."""

    def queue_declare(self, queue: str | None = None, passive: bool = False, **kwargs: Any) -> Any:
        declared = super().queue_declare(queue, passive, **kwargs)
        if kwargs.get("auto_delete") and not passive:
            _owned_queues.add(
                name=self.canonical_queue_name(declared.queue),
                url=self._new_queue(declared.queue),
                sqs_client=self.sqs(),
            )
        return declared

    def queue_bind(
        self, queue: str, exchange: str | None = None, routing_key: str = "", arguments: Any = None, **kwargs: Any
    ) -> None:
        super().queue_bind(queue, exchange, routing_key, arguments, **kwargs)
        if exchange and self.supports_fanout and self.typeof(exchange).type == "fanout":
            _owned_queues.note_topic(
                self.canonical_queue_name(queue),
                self.canonical_queue_name(exchange),
                sns_client=self.fanout.get_client(),
            )

    def queue_delete(self, queue: str, if_unused: bool = False, if_empty: bool = False, **kwargs: Any) -> None:
        super().queue_delete(queue, if_unused, if_empty, **kwargs)

        # kombu forgets the deleted queue's URL under the AMQP name but caches it under the
        # SQS name, so a queue declared again under that name would reuse the dead URL.
        name = self.canonical_queue_name(queue)
        self._queue_cache.pop(name, None)
        _owned_queues.discard(name)

    def _lookup(self, exchange: str, routing_key: str, default: str | None = None) -> Any:
        queues = super()._lookup(exchange, routing_key, default)
        if queues or not exchange or not _REPLY_EXCHANGE.fullmatch(exchange):
            return queues

        reply_queue = f"{routing_key}.{exchange}"
        if not self._queue_exists(reply_queue):
            # The caller stopped waiting and deleted its queue: sending would create it again.
            logger.info("dropped a reply for %s: its queue no longer exists", reply_queue)
            return []
        return [reply_queue]

    def _queue_exists(self, queue: str) -> bool:
        try:
            self.sqs().get_queue_url(QueueName=self.canonical_queue_name(queue))
        except ClientError as exc:
            if _error_code(exc) in QUEUE_MISSING_CODES:
                return False
            raise
        return True

    def _delete_message(self, queue_name: str, message: dict[str, Any]) -> None:
        if self.hub is not None:
            super()._delete_message(queue_name, message)
            return

        url = self._new_queue(queue_name)
        self.sqs(queue=queue_name).delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])

    def _receive_message(
        self, queue: str, max_number_of_messages: int = 1, wait_time_seconds: int | None = None
    ) -> Any:
        if self.hub is None and _REPLY_QUEUE.fullmatch(queue):
            wait_time_seconds = min(wait_time_seconds or self.wait_time_seconds, CLIENT_REPLY_WAIT_S)
        return super()._receive_message(queue, max_number_of_messages, wait_time_seconds)


class MonitoringTransport(SQS.Transport):
    """kombu's SQS transport that declares fanout support when `supports_fanout` is on."""

    Channel = MonitoringChannel

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        if client.transport_options.get("supports_fanout"):
            # Celery starts the worker's remote-control consumer only on a transport that
            # implements fanout; with the option on, kombu routes fanout through SNS.
            self.implements = SQS.Transport.implements.extend(
                exchange_type=SQS.Transport.implements.exchange_type | {"fanout"}
            )


#: `reply.<namespace>.pidbox`, the exchange kombu's Mailbox sends replies to.
_REPLY_EXCHANGE = re.compile(re.escape(Mailbox.reply_exchange_fmt).replace(re.escape("%s"), r"[^.]+"))

#: `<oid>.reply.<namespace>.pidbox`, the AMQP name of a caller's reply queue.
_REPLY_QUEUE = re.compile(r"[0-9a-f-]+\." + _REPLY_EXCHANGE.pattern)


# -- Adaptation 2: the event exchange. --


def _fanout_event_exchange(conn: Any, name: str = celery.events.event.EVENT_EXCHANGE_NAME) -> Any:
    """Return Celery's event exchange, as fanout when the connection is SQS with SNS fan-out."""
    exchange = _stock_get_exchange(conn, name)
    if conn.transport.driver_type == "sqs" and conn.transport_options.get("supports_fanout"):
        exchange.type = "fanout"
    return exchange


_stock_get_exchange = celery.events.event.get_exchange

#: The modules that imported `get_exchange` by name, so each needs the fanout version.
_GET_EXCHANGE_USERS = (celery.events, celery.events.event, celery.events.dispatcher, celery.events.receiver)


# -- Queues owned by this process: heartbeat and deletion at exit. --


@dataclass
class _OwnedQueue:
    name: str
    url: str
    sqs_client: Any
    sns_client: Any = None
    topics: set[str] = field(default_factory=set)


class _OwnedQueues:
    """The auto-delete queues this process declared, tagged while alive and deleted at exit."""

    def __init__(self) -> None:
        self._queues: dict[str, _OwnedQueue] = {}
        self._lock = threading.Lock()
        self._owner_pid: int | None = None
        self._heartbeat: threading.Thread | None = None

    def add(self, name: str, url: str, sqs_client: Any) -> None:
        with self._lock:
            self._queues.setdefault(name, _OwnedQueue(name, url, sqs_client))
            self._start_heartbeat()
        _tag_heartbeat(sqs_client, url)

    def note_topic(self, name: str, topic: str, sns_client: Any) -> None:
        with self._lock:
            owned = self._queues.get(name)
            if owned is not None:
                owned.topics.add(topic)
                owned.sns_client = sns_client

    def discard(self, name: str) -> None:
        with self._lock:
            self._queues.pop(name, None)

    def beat_forever(self) -> None:
        while True:
            time.sleep(HEARTBEAT_INTERVAL_S)
            for owned in self._snapshot():
                try:
                    _tag_heartbeat(owned.sqs_client, owned.url)
                except ClientError as exc:
                    if _error_code(exc) in QUEUE_MISSING_CODES:
                        logger.warning("queue %s was deleted by another process", owned.name)
                        self.discard(owned.name)
                    else:
                        logger.warning("heartbeat tag on queue %s failed: %s", owned.name, exc)

    def delete_all(self) -> None:
        """Unsubscribe and delete every queue this process still owns; run at exit."""
        if self._owner_pid is None or self._owner_pid != _current_pid():
            return  # a forked child (a pool process) owns none of its parent's queues

        for owned in self._snapshot():
            try:
                _unsubscribe_queue(owned.sqs_client, owned.sns_client, owned.url, owned.topics)
                owned.sqs_client.delete_queue(QueueUrl=owned.url)
                logger.info("deleted queue %s at exit", owned.name)
            except ClientError as exc:
                if _error_code(exc) not in QUEUE_MISSING_CODES:
                    logger.warning("could not delete queue %s at exit: %s", owned.name, exc)
            self.discard(owned.name)

    def _snapshot(self) -> list[_OwnedQueue]:
        with self._lock:
            return list(self._queues.values())

    def _start_heartbeat(self) -> None:
        if self._owner_pid == _current_pid():
            return
        self._owner_pid = _current_pid()
        self._heartbeat = threading.Thread(target=self.beat_forever, name="sqs-queue-heartbeat", daemon=True)
        self._heartbeat.start()


_owned_queues = _OwnedQueues()


def _current_pid() -> int:
    import os

    return os.getpid()


def _tag_heartbeat(sqs_client: Any, url: str) -> None:
    sqs_client.tag_queue(QueueUrl=url, Tags={HEARTBEAT_TAG: str(int(time.time()))})


def _unsubscribe_queue(sqs_client: Any, sns_client: Any, url: str, topics: set[str]) -> None:
    """Remove the SNS subscriptions of the queue at `url` on the given topics (SQS names)."""
    if sns_client is None or not topics:
        return

    queue_arn = sqs_client.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    arn_head = queue_arn.replace(":sqs:", ":sns:", 1).rsplit(":", 1)[0]
    for topic in topics:
        for subscription in _subscriptions(sns_client, f"{arn_head}:{topic}"):
            if subscription["Endpoint"] == queue_arn:
                _unsubscribe(sns_client, subscription["SubscriptionArn"])


def _subscriptions(sns_client: Any, topic_arn: str) -> Iterator[dict[str, str]]:
    try:
        for page in sns_client.get_paginator("list_subscriptions_by_topic").paginate(TopicArn=topic_arn):
            yield from page.get("Subscriptions", [])
    except ClientError as exc:
        if _error_code(exc) != SUBSCRIPTION_MISSING_CODE:
            raise


def _unsubscribe(sns_client: Any, subscription_arn: str) -> None:
    try:
        sns_client.unsubscribe(SubscriptionArn=subscription_arn)
    except ClientError as exc:
        if _error_code(exc) != SUBSCRIPTION_MISSING_CODE:
            raise


def _error_code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


# -- Installation and its checks. --

_installed = False


def enable_sqs_monitoring(app: Celery, settings: Settings) -> None:
    """Install the SQS monitoring adaptations for this process; see the module docstring.

    Does nothing unless the broker is SQS. The event exchange turns fanout only when
    `settings.events` is on; remote control and the queue clean-up are always installed.
    Raises RuntimeError when the installed Celery or kombu differ from TESTED_VERSIONS,
    when a patched internal is missing, or when `supports_fanout` is not on.
    """
    global _installed

    if _installed or not str(app.conf.broker_url or "").startswith("sqs://"):
        return

    check_compatibility()
    if not app.conf.broker_transport_options.get("supports_fanout"):
        raise RuntimeError(
            "broker_transport_options['supports_fanout'] is not True: SQS monitoring and remote "
            "control need kombu's SNS fan-out; set it in celeryconfig.py"
        )

    kombu.transport.TRANSPORT_ALIASES["sqs"] = _MONITORING_TRANSPORT
    if kombu.transport.get_transport_cls("sqs") is not MonitoringTransport:
        raise RuntimeError("kombu had already loaded its SQS transport: enable SQS monitoring before connecting")

    if settings.events:
        for module in _GET_EXCHANGE_USERS:
            module.get_exchange = _fanout_event_exchange

    atexit.register(_owned_queues.delete_all)
    _installed = True


def check_compatibility() -> None:
    """Raise RuntimeError unless the installed Celery and kombu have every internal patched here."""
    found = {"celery": celery.__version__, "kombu": kombu.__version__}
    for package, version in found.items():
        if version != TESTED_VERSIONS[package]:
            raise RuntimeError(
                f"{package} {version} is installed but tasks/sqs_events.py was checked against "
                f"{package} {TESTED_VERSIONS[package]}: review each adaptation against the new "
                "version, then update TESTED_VERSIONS"
            )

    problems = [problem for check in _INTERNAL_CHECKS if (problem := check())]
    if problems:
        raise RuntimeError("tasks/sqs_events.py no longer matches kombu or Celery: " + "; ".join(problems))


def _signature_check(owner: Any, name: str, parameters: tuple[str, ...]) -> Callable[[], str | None]:
    def check() -> str | None:
        method = getattr(owner, name, None)
        if method is None:
            return f"{owner.__qualname__}.{name} is missing"
        found = tuple(inspect.signature(method).parameters)[: len(parameters)]
        if found != parameters:
            return f"{owner.__qualname__}.{name} takes {found}, expected {parameters}"
        return None

    return check


def _check_stock_get_exchange() -> str | None:
    for module in _GET_EXCHANGE_USERS:
        if getattr(module, "get_exchange", None) not in (_stock_get_exchange, _fanout_event_exchange):
            return f"{module.__name__}.get_exchange is not celery.events.event.get_exchange"
    return None


def _check_sqs_alias() -> str | None:
    alias = kombu.transport.TRANSPORT_ALIASES.get("sqs")
    if alias not in (_STOCK_SQS_TRANSPORT, _MONITORING_TRANSPORT):
        return f"kombu's 'sqs' transport alias is {alias!r}, expected {_STOCK_SQS_TRANSPORT!r}"
    return None


def _check_reply_queue_name() -> str | None:
    mailbox = Mailbox("probe")
    reply_queue = mailbox.get_reply_queue()
    if reply_queue.name != f"{reply_queue.routing_key}.{mailbox.reply_exchange.name}":
        return f"kombu's pidbox reply queue is named {reply_queue.name!r}, not '<oid>.<reply exchange>'"
    if not _REPLY_QUEUE.fullmatch(reply_queue.name):
        return f"kombu's pidbox reply queue name {reply_queue.name!r} does not match {_REPLY_QUEUE.pattern}"
    return None


def _check_fanout_attributes() -> str | None:
    for name in ("supports_fanout", "fanout", "_queue_cache", "hub"):
        if name == "hub":
            if "self.hub" not in inspect.getsource(SQS.Channel.__init__):
                return "kombu.transport.SQS.Channel no longer sets self.hub"
        elif not hasattr(SQS.Channel, name):
            return f"kombu.transport.SQS.Channel.{name} is missing"
    return None


_INTERNAL_CHECKS: tuple[Callable[[], str | None], ...] = (
    _check_stock_get_exchange,
    _check_sqs_alias,
    _check_reply_queue_name,
    _check_fanout_attributes,
    _signature_check(SQS.Channel, "_lookup", ("self", "exchange", "routing_key", "default")),
    _signature_check(SQS.Channel, "_delete_message", ("self", "queue_name", "message")),
    _signature_check(
        SQS.Channel, "_receive_message", ("self", "queue", "max_number_of_messages", "wait_time_seconds")
    ),
    _signature_check(SQS.Channel, "_new_queue", ("self", "queue")),
    _signature_check(SQS.Channel, "queue_declare", ("self", "queue", "passive")),
    _signature_check(SQS.Channel, "queue_bind", ("self", "queue", "exchange", "routing_key", "arguments")),
    _signature_check(SQS.Channel, "queue_delete", ("self", "queue", "if_unused", "if_empty")),
    _signature_check(celery.events.event, "get_exchange", ("conn", "name")),
)
