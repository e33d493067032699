"""Make Flower, `celery events` and `celery inspect/control` work on the SQS broker.

On SQS, stock Celery 5.7.0 and kombu 5.7.0 send no events, and workers reply to no
remote-control command. `enable_sqs_monitoring(app, settings)` fixes that with five
narrow adaptations:

1. The transport option `supports_fanout: True` (set in celeryconfig.py) makes kombu map
   fanout exchanges to SNS topics and subscribe each consuming SQS queue to its topic.
2. The event exchange `celeryev` is declared as fanout instead of topic, as Celery
   already does for Redis, so events reach every receiver through SNS. Only with
   INGEST_EVENTS on; with it off, events never leave the process that sends them.
3. The SQS transport declares that it implements fanout exchanges, so the worker
   starts its remote-control (pidbox) consumer.
4. A reply to a `reply.<namespace>.pidbox` exchange goes to the caller's reply queue,
   `<routing key>.<exchange>`. The binding exists only in the caller's process, so
   kombu's in-process routing drops every reply a worker sends.
5. A process without a kombu event loop (Flower, `celery events`, `celery inspect`)
   deletes received no-ack messages with the blocking boto3 client, because kombu's
   asynchronous client needs the loop and raises AttributeError without one. Such a
   process also long-polls a reply queue for at most CLIENT_REPLY_WAIT_S.

Queues declared with `auto_delete=True` (event receivers, reply queues, each worker's
mailbox) are unsubscribed from SNS and deleted when their process exits, as AMQP does.
A killed process leaves them behind, so each owner refreshes a heartbeat tag on its
queues and `python -m tasks.sqs_events cleanup` removes those whose heartbeat stopped.

Each adaptation relies on kombu or Celery internals, so `enable_sqs_monitoring` raises
RuntimeError at start unless the installed versions are the tested ones and every
internal it relies on is still there.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import inspect
import logging
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import celery
import celery.events
import celery.events.dispatcher
import celery.events.event
import celery.events.receiver
import kombu
import kombu.transport
from botocore.exceptions import BotoCoreError, ClientError
from celery import Celery
from kombu.pidbox import Mailbox
from kombu.transport import SQS

from tasks.batching import BatchingChannel
from tasks.settings import Settings

logger = logging.getLogger(__name__)

#: The versions whose internals this module was checked against; any other fails at start.
TESTED_VERSIONS = {"celery": "5.7.0", "kombu": "5.7.0"}

#: Queue tag whose value is the Unix time (whole seconds) its owner last marked it as in use.
HEARTBEAT_TAG = "celery-monitor-heartbeat"

#: Seconds between two heartbeat tags on each queue a process owns.
HEARTBEAT_INTERVAL_S = 60.0

#: Seconds without a heartbeat after which `cleanup` removes a monitoring queue: five
#: heartbeat intervals, so that a slow owner, or one whose clock is a little behind, keeps it.
STALE_AFTER_S = 300.0

#: Maximum long-poll wait, in seconds, on a reply queue in a process without an event loop.
#: `celery inspect` drains until a receive comes back empty, so the full SQS wait
#: (INGEST_POLL_WAIT_S) would otherwise be added to every command.
CLIENT_REPLY_WAIT_S = 1

#: SQS error codes for a queue that does not exist (JSON and query protocol).
QUEUE_MISSING_CODES = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})

#: SNS error code for a topic or subscription that does not exist.
SNS_MISSING_CODE = "NotFound"

_STOCK_SQS_TRANSPORT = "kombu.transport.SQS:Transport"
_MONITORING_TRANSPORT = f"{__name__}:MonitoringTransport"


# -- Adaptations 3, 4 and 5, and owned auto-delete queues: the SQS transport. --


class MonitoringChannel(BatchingChannel):
    """kombu's SQS channel with pidbox reply routing, blocking deletes and owned queues.

    Its base, `tasks.batching.BatchingChannel`, deletes acked messages and publishes
    events in batches.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not hasattr(self, "hub"):
            raise RuntimeError(
                "kombu's SQS channel no longer sets self.hub: review tasks/sqs_events.py"
            )

    def queue_declare(self, queue: str | None = None, passive: bool = False, **kwargs: Any) -> Any:
        if not kwargs.get("auto_delete") or passive:
            return super().queue_declare(queue, passive, **kwargs)

        with _owned_queues.unless_exiting():
            declared = super().queue_declare(queue, passive, **kwargs)
            name = self.canonical_queue_name(declared.queue)
            _owned_queues.add(name, self._new_queue(declared.queue), self.sqs())
        return declared

    def basic_consume(
        self, queue: str, no_ack: bool, callback: Any, consumer_tag: str, *args: Any, **kwargs: Any
    ) -> Any:
        if not _owned_queues.owns(self.canonical_queue_name(queue)):
            return super().basic_consume(queue, no_ack, callback, consumer_tag, *args, **kwargs)

        # kombu subscribes the queue to its SNS topic here. Doing that after delete_all
        # leaves a subscription to a deleted queue, and moto then rejects each publish to it.
        with _owned_queues.unless_exiting():
            return super().basic_consume(queue, no_ack, callback, consumer_tag, *args, **kwargs)

    def queue_bind(
        self,
        queue: str,
        exchange: str | None = None,
        routing_key: str = "",
        arguments: Any = None,
        **kwargs: Any,
    ) -> None:
        super().queue_bind(queue, exchange, routing_key, arguments, **kwargs)
        if exchange and self.supports_fanout and self.typeof(exchange).type == "fanout":
            topic = self.canonical_queue_name(exchange)
            _owned_queues.add_topic(
                self.canonical_queue_name(queue), topic, self.fanout.get_client()
            )

    def queue_delete(
        self, queue: str, if_unused: bool = False, if_empty: bool = False, **kwargs: Any
    ) -> None:
        super().queue_delete(queue, if_unused, if_empty, **kwargs)
        if if_unused or if_empty:
            return  # kombu may have kept the queue, so this process still owns it

        # kombu drops the URL from its cache under the AMQP name, but the cache is keyed by the
        # SQS name. A queue declared again under this name would then get the deleted URL.
        name = self.canonical_queue_name(queue)
        self._queue_cache.pop(name, None)
        _owned_queues.discard(name)

    def _lookup(self, exchange: str, routing_key: str, default: str | None = None) -> Any:
        queues = super()._lookup(exchange, routing_key, default)
        if queues or not exchange or not _REPLY_EXCHANGE.fullmatch(exchange):
            return queues

        reply_queue = f"{routing_key}.{exchange}"
        if not self._queue_exists(reply_queue):
            # The caller stopped waiting and deleted its queue, and sending would create it again.
            logger.info("dropped a remote-control reply: queue %s no longer exists", reply_queue)
            return []
        return [reply_queue]

    def _queue_exists(self, queue: str) -> bool:
        # NOTE: the caller may delete its queue between this check and the send, and kombu's
        # send then creates it again. `cleanup` removes such a queue once it is stale.
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
        client = self.sqs(queue=queue_name)
        client.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])

    def _receive_message(
        self, queue: str, max_number_of_messages: int = 1, wait_time_seconds: int | None = None
    ) -> Any:
        if self.hub is None and _REPLY_QUEUE.fullmatch(queue):
            wait_time_seconds = min(
                wait_time_seconds or self.wait_time_seconds, CLIENT_REPLY_WAIT_S
            )
        return super()._receive_message(queue, max_number_of_messages, wait_time_seconds)


class MonitoringTransport(SQS.Transport):
    """kombu's SQS transport, declaring fanout support when `supports_fanout` is on."""

    Channel = MonitoringChannel

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        if client.transport_options.get("supports_fanout"):
            # Celery's worker starts its remote-control consumer only on a transport that
            # implements fanout. With this option, kombu routes fanout exchanges through SNS.
            stock = SQS.Transport.implements
            self.implements = stock.extend(exchange_type=stock.exchange_type | {"fanout"})


#: `reply.<namespace>.pidbox`: the exchange that kombu's Mailbox sends replies to.
_REPLY_EXCHANGE = re.compile(re.escape(Mailbox.reply_exchange_fmt).replace("%s", r"[^.]+"))

#: `<oid>.reply.<namespace>.pidbox`: the AMQP name of a caller's reply queue.
_REPLY_QUEUE = re.compile(r"[0-9a-f-]+\." + _REPLY_EXCHANGE.pattern)


# -- Adaptation 2: the event exchange. --

_stock_get_exchange = celery.events.event.get_exchange

#: The modules that imported `get_exchange` by name, so each needs the fanout version.
_GET_EXCHANGE_USERS = (
    celery.events,
    celery.events.event,
    celery.events.dispatcher,
    celery.events.receiver,
)


def _fanout_event_exchange(conn: Any, name: str = celery.events.event.EVENT_EXCHANGE_NAME) -> Any:
    """Return Celery's event exchange, made fanout on an SQS connection with SNS fan-out."""
    exchange = _stock_get_exchange(conn, name)
    if conn.transport.driver_type == "sqs" and conn.transport_options.get("supports_fanout"):
        exchange.type = "fanout"
    return exchange


# -- Queues owned by this process: heartbeat while alive, deletion at exit. --


@dataclass
class _OwnedQueue:
    name: str
    url: str
    sqs_client: Any
    sns_client: Any = None
    topics: set[str] = field(default_factory=set)


class ProcessExitingError(RuntimeError):
    """This process is deleting its queues at exit, so it declares and subscribes no more."""


class _OwnedQueues:
    """The auto-delete queues this process declared: tagged while it runs, deleted at exit."""

    def __init__(self) -> None:
        self._queues: dict[str, _OwnedQueue] = {}
        self._lock = threading.Lock()
        self._owner_pid: int | None = None
        # Held while a queue is declared or subscribed and while delete_all runs, so that a
        # daemon thread (Flower's event receiver) cannot create a queue that delete_all misses.
        self._exit_lock = threading.RLock()
        self._exiting = False

    @contextlib.contextmanager
    def unless_exiting(self) -> Iterator[None]:
        """Hold the exit lock for a declaration; raise ProcessExitingError once delete_all began."""
        with self._exit_lock:
            if self._exiting:
                raise ProcessExitingError("the process is exiting and has deleted its queues")
            yield

    def owns(self, name: str) -> bool:
        with self._lock:
            return name in self._queues

    def add(self, name: str, url: str, sqs_client: Any) -> None:
        with self._lock:
            if name in self._queues:
                return
            self._queues[name] = _OwnedQueue(name, url, sqs_client)
            self._start_heartbeat()
        _tag_heartbeat(sqs_client, url)

    def add_topic(self, name: str, topic: str, sns_client: Any) -> None:
        with self._lock:
            owned = self._queues.get(name)
            if owned is not None:
                owned.topics.add(topic)
                owned.sns_client = sns_client

    def discard(self, name: str) -> None:
        with self._lock:
            self._queues.pop(name, None)

    def delete_all(self) -> None:
        """Unsubscribe and delete every queue this process still owns; registered with atexit."""
        if self._owner_pid != os.getpid():
            return  # a forked pool process owns none of its parent's queues

        with self._exit_lock:
            self._exiting = True
            for owned in self._snapshot():
                self._delete(owned)

    def _delete(self, owned: _OwnedQueue) -> None:
        try:
            _unsubscribe_queue(owned.sqs_client, owned.sns_client, owned.url, owned.topics)
            owned.sqs_client.delete_queue(QueueUrl=owned.url)
            logger.info("deleted queue %s at exit", owned.name)
        except ClientError as exc:
            if _error_code(exc) not in QUEUE_MISSING_CODES:
                logger.warning("could not delete queue %s at exit: %s", owned.name, exc)
        except BotoCoreError as exc:
            logger.warning("could not delete queue %s at exit: %s", owned.name, exc)
        self.discard(owned.name)

    def _beat_forever(self) -> None:
        while True:
            time.sleep(HEARTBEAT_INTERVAL_S)
            for owned in self._snapshot():
                self._beat(owned)

    def _beat(self, owned: _OwnedQueue) -> None:
        try:
            _tag_heartbeat(owned.sqs_client, owned.url)
        except ClientError as exc:
            if _error_code(exc) not in QUEUE_MISSING_CODES:
                logger.warning("could not tag queue %s with a heartbeat: %s", owned.name, exc)
                return
            logger.warning("queue %s was deleted by another process", owned.name)
            self.discard(owned.name)
        except BotoCoreError as exc:
            logger.warning("could not tag queue %s with a heartbeat: %s", owned.name, exc)

    def _snapshot(self) -> list[_OwnedQueue]:
        with self._lock:
            return list(self._queues.values())

    def _start_heartbeat(self) -> None:
        if self._owner_pid == os.getpid():
            return

        self._owner_pid = os.getpid()
        thread = threading.Thread(
            target=self._beat_forever, name="sqs-queue-heartbeat", daemon=True
        )
        thread.start()


_owned_queues = _OwnedQueues()


def _tag_heartbeat(sqs_client: Any, url: str) -> None:
    sqs_client.tag_queue(QueueUrl=url, Tags={HEARTBEAT_TAG: str(int(time.time()))})


def _unsubscribe_queue(sqs_client: Any, sns_client: Any, url: str, topics: set[str]) -> int:
    """Remove the SNS subscriptions of the queue at `url` to the named topics; return how many.

    The topics are in the queue's account and region, as kombu creates them.
    """
    if sns_client is None or not topics:
        return 0

    attributes = sqs_client.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
    queue_arn = attributes["Attributes"]["QueueArn"]
    arn_prefix = queue_arn.replace(":sqs:", ":sns:", 1).rsplit(":", 1)[0]

    removed = 0
    for topic in topics:
        for subscription in _subscriptions(sns_client, f"{arn_prefix}:{topic}"):
            if subscription.get("Endpoint") == queue_arn:
                _unsubscribe(sns_client, subscription["SubscriptionArn"])
                removed += 1
    return removed


def _subscriptions(sns_client: Any, topic_arn: str) -> Iterator[dict[str, str]]:
    paginator = sns_client.get_paginator("list_subscriptions_by_topic")
    try:
        for page in paginator.paginate(TopicArn=topic_arn):
            yield from page.get("Subscriptions", [])
    except ClientError as exc:
        if _error_code(exc) != SNS_MISSING_CODE:
            raise


def _unsubscribe(sns_client: Any, subscription_arn: str) -> None:
    try:
        sns_client.unsubscribe(SubscriptionArn=subscription_arn)
    except ClientError as exc:
        if _error_code(exc) != SNS_MISSING_CODE:
            raise


def _error_code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


# -- The cleanup command: queues and subscriptions that a killed process left behind. --


@dataclass
class CleanupReport:
    """Result of `cleanup`: the SQS queues and SNS subscriptions removed, and the queues kept.

    In a dry run, the removed lists name what would have been removed.
    """

    stale_queues: list[str] = field(default_factory=list)
    live_queues: list[str] = field(default_factory=list)
    removed_subscriptions: list[str] = field(default_factory=list)


def cleanup(
    app: Celery, stale_after_s: float = STALE_AFTER_S, dry_run: bool = False
) -> CleanupReport:
    """Remove the monitoring queues and SNS subscriptions that no live process uses.

    A monitoring queue is an event receiver's `celeryev-<id>` queue, a caller's
    `<oid>-reply-celery-pidbox` queue or a worker's `<node>-celery-pidbox` mailbox (with
    the configured queue name prefix and exchange names). It is stale when its
    HEARTBEAT_TAG is older than `stale_after_s` seconds, or when it has no such tag and
    was created more than `stale_after_s` seconds ago. A stale queue loses its SNS
    subscriptions first, then is deleted. A subscription of the event or remote-control
    topic whose queue no longer exists is removed too. With `dry_run`, nothing changes.
    Raises botocore's ClientError when SQS or SNS rejects a request.
    """
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        sqs_client, sns_client = channel.sqs(), channel.fanout.get_client()
        naming = _MonitoringNames(app, channel.canonical_queue_name)

        report = CleanupReport()
        queues = _list_queue_urls(sqs_client, naming.queue_name_prefix)
        arns_by_url = {}
        for url in queues:
            name = url.rsplit("/", 1)[-1]
            if not naming.is_monitoring_queue(name):
                continue
            attributes = _queue_attributes(sqs_client, url)
            if attributes is None:
                continue
            if _is_stale(sqs_client, url, attributes, stale_after_s):
                report.stale_queues.append(name)
                arns_by_url[url] = attributes["QueueArn"]
            else:
                report.live_queues.append(name)

        existing = {url.rsplit("/", 1)[-1] for url in queues}
        stale_arns = set(arns_by_url.values())
        for topic_arn in _topic_arns(sns_client, naming.topics):
            for subscription in _subscriptions(sns_client, topic_arn):
                if _is_removable(sqs_client, subscription, stale_arns, existing, topic_arn):
                    report.removed_subscriptions.append(subscription["SubscriptionArn"])
                    if not dry_run:
                        _unsubscribe(sns_client, subscription["SubscriptionArn"])

        if not dry_run:
            for url in arns_by_url:
                _delete_queue(sqs_client, url)
        return report


class _MonitoringNames:
    """The SQS names of the monitoring queues and topics for the app's configuration."""

    def __init__(self, app: Celery, canonical: Callable[[str], str]) -> None:
        conf = app.conf
        self.queue_name_prefix = canonical("")
        self.event_queue_start = canonical(f"{conf.event_queue_prefix}.")
        self.mailbox_end = canonical(f".{conf.control_exchange}.pidbox")
        self.topics = {
            canonical(conf.event_exchange),
            canonical(Mailbox.exchange_fmt % conf.control_exchange),
        }

    def is_monitoring_queue(self, name: str) -> bool:
        return name.startswith(self.event_queue_start) or (
            name.startswith(self.queue_name_prefix) and name.endswith(self.mailbox_end)
        )


def _list_queue_urls(sqs_client: Any, prefix: str) -> list[str]:
    paginator = sqs_client.get_paginator("list_queues")
    urls: list[str] = []
    for page in paginator.paginate(QueueNamePrefix=prefix, PaginationConfig={"PageSize": 1000}):
        urls.extend(page.get("QueueUrls", []))
    return urls


def _queue_attributes(sqs_client: Any, url: str) -> dict[str, str] | None:
    try:
        response = sqs_client.get_queue_attributes(
            QueueUrl=url, AttributeNames=["QueueArn", "CreatedTimestamp"]
        )
    except ClientError as exc:
        if _error_code(exc) in QUEUE_MISSING_CODES:
            return None  # deleted since it was listed
        raise
    return response["Attributes"]


def _is_stale(sqs_client: Any, url: str, attributes: dict[str, str], stale_after_s: float) -> bool:
    tags = sqs_client.list_queue_tags(QueueUrl=url).get("Tags", {})
    try:
        last_seen = float(tags[HEARTBEAT_TAG])
    except (KeyError, ValueError):
        last_seen = float(attributes["CreatedTimestamp"])
    return time.time() - last_seen > stale_after_s


def _topic_arns(sns_client: Any, topic_names: set[str]) -> list[str]:
    arns = []
    for page in sns_client.get_paginator("list_topics").paginate():
        for topic in page.get("Topics", []):
            if topic["TopicArn"].rsplit(":", 1)[-1] in topic_names:
                arns.append(topic["TopicArn"])
    return arns


def _is_removable(
    sqs_client: Any,
    subscription: dict[str, str],
    stale_arns: set[str],
    existing: set[str],
    topic_arn: str,
) -> bool:
    if subscription.get("Protocol", "").lower() != "sqs":
        return False

    endpoint = subscription.get("Endpoint", "")
    if endpoint in stale_arns:
        return True

    # ARNs are arn:<partition>:<service>:<region>:<account>:<name>. This client cannot look
    # up a queue outside the topic's region and account, so such a subscription is kept.
    queue_parts, topic_parts = endpoint.split(":"), topic_arn.split(":")
    if len(queue_parts) != 6 or queue_parts[3:5] != topic_parts[3:5]:
        return False
    queue_name = queue_parts[5]
    if queue_name in existing:
        return False

    # Not listed: ask directly, since a new queue can be missing from ListQueues for a while.
    try:
        sqs_client.get_queue_url(QueueName=queue_name)
    except ClientError as exc:
        if _error_code(exc) in QUEUE_MISSING_CODES:
            return True
        raise
    return False


def _delete_queue(sqs_client: Any, url: str) -> None:
    try:
        sqs_client.delete_queue(QueueUrl=url)
    except ClientError as exc:
        if _error_code(exc) not in QUEUE_MISSING_CODES:
            raise


# -- Installation and its checks. --

_installed = False


def enable_sqs_monitoring(app: Celery, settings: Settings) -> None:
    """Install the SQS monitoring adaptations in this process; see the module docstring.

    Does nothing unless the broker URL is `sqs://`. The event exchange becomes fanout only
    when `settings.events` is on; remote control and the queue deletion at exit are always
    installed. Call it before the app connects. Raises RuntimeError when the installed
    Celery or kombu differ from TESTED_VERSIONS, when an internal relied on is missing,
    or when the `supports_fanout` transport option is not on.
    """
    global _installed

    if _installed or not str(app.conf.broker_url or "").startswith("sqs://"):
        return

    check_compatibility()
    if not app.conf.broker_transport_options.get("supports_fanout"):
        raise RuntimeError(
            "broker_transport_options['supports_fanout'] is not True: SQS monitoring and remote "
            "control need kombu's SNS fan-out, so set it in celeryconfig.py"
        )

    kombu.transport.TRANSPORT_ALIASES["sqs"] = _MONITORING_TRANSPORT
    if kombu.transport.get_transport_cls("sqs") is not MonitoringTransport:
        raise RuntimeError("kombu loaded its SQS transport before enable_sqs_monitoring was called")

    if settings.events:
        for module in _GET_EXCHANGE_USERS:
            module.get_exchange = _fanout_event_exchange

    atexit.register(_owned_queues.delete_all)
    _installed = True


def check_compatibility() -> None:
    """Raise RuntimeError unless Celery and kombu are the tested versions with every internal used."""
    installed = {"celery": celery.__version__, "kombu": kombu.__version__}
    for package, version in installed.items():
        if version != TESTED_VERSIONS[package]:
            raise RuntimeError(
                f"{package} {version} is installed, but tasks/sqs_events.py was checked against "
                f"{package} {TESTED_VERSIONS[package]}: review each adaptation against the new "
                "version, then update TESTED_VERSIONS"
            )

    problems = [problem for check in _INTERNAL_CHECKS if (problem := check())]
    if problems:
        raise RuntimeError(
            "tasks/sqs_events.py no longer fits kombu or Celery: " + "; ".join(problems)
        )


def _signature_check(
    owner: Any, name: str, parameters: tuple[str, ...]
) -> Callable[[], str | None]:
    """Return a check that `owner.name` exists and starts with `parameters`."""

    def check() -> str | None:
        method = getattr(owner, name, None)
        if method is None:
            return f"{owner.__name__}.{name} is missing"
        found = tuple(inspect.signature(method).parameters)[: len(parameters)]
        if found != parameters:
            return f"{owner.__name__}.{name} takes {found}, expected {parameters}"
        return None

    return check


def _check_get_exchange_users() -> str | None:
    for module in _GET_EXCHANGE_USERS:
        if getattr(module, "get_exchange", None) not in (
            _stock_get_exchange,
            _fanout_event_exchange,
        ):
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
        return f"kombu's pidbox reply queue {reply_queue.name!r} is not named '<oid>.<exchange>'"
    if not _REPLY_QUEUE.fullmatch(reply_queue.name):
        return (
            f"kombu's pidbox reply queue {reply_queue.name!r} does not match {_REPLY_QUEUE.pattern}"
        )
    return None


def _check_channel_attributes() -> str | None:
    for name in ("supports_fanout", "fanout", "_queue_cache", "typeof"):
        if not hasattr(SQS.Channel, name):
            return f"kombu.transport.SQS.Channel.{name} is missing"
    return None


_INTERNAL_CHECKS: tuple[Callable[[], str | None], ...] = (
    _check_get_exchange_users,
    _check_sqs_alias,
    _check_reply_queue_name,
    _check_channel_attributes,
    _signature_check(celery.events.event, "get_exchange", ("conn", "name")),
    _signature_check(SQS.Channel, "_lookup", ("self", "exchange", "routing_key", "default")),
    _signature_check(SQS.Channel, "_delete_message", ("self", "queue_name", "message")),
    _signature_check(
        SQS.Channel,
        "_receive_message",
        ("self", "queue", "max_number_of_messages", "wait_time_seconds"),
    ),
    _signature_check(SQS.Channel, "_new_queue", ("self", "queue")),
    _signature_check(SQS.Channel, "basic_ack", ("self", "delivery_tag", "multiple")),
    _signature_check(SQS.Channel, "_put_fanout", ("self", "exchange", "message", "routing_key")),
    _signature_check(SQS.Channel, "queue_declare", ("self", "queue", "passive")),
    _signature_check(
        SQS.Channel, "queue_bind", ("self", "queue", "exchange", "routing_key", "arguments")
    ),
    _signature_check(SQS.Channel, "queue_delete", ("self", "queue", "if_unused", "if_empty")),
    _signature_check(
        SQS.Channel, "basic_consume", ("self", "queue", "no_ack", "callback", "consumer_tag")
    ),
)


# -- Command line. --


def main(argv: list[str] | None = None) -> int:
    """Run `python -m tasks.sqs_events cleanup [--stale-after SECONDS] [--dry-run]`."""
    parser = argparse.ArgumentParser(
        prog="python -m tasks.sqs_events",
        description="Remove the monitoring queues and SNS subscriptions left by killed processes.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    clean = commands.add_parser("cleanup", help="remove stale monitoring queues and subscriptions")
    clean.add_argument(
        "--stale-after",
        type=float,
        default=STALE_AFTER_S,
        metavar="SECONDS",
        help=f"seconds without a heartbeat before a queue counts as stale (default: {STALE_AFTER_S:g})",
    )
    clean.add_argument(
        "--dry-run", action="store_true", help="list what would be removed, remove nothing"
    )
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from tasks.application import app

    report = cleanup(app, stale_after_s=args.stale_after, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for name in report.stale_queues:
        print(f"{verb} queue {name}")
    for arn in report.removed_subscriptions:
        print(f"{verb} subscription {arn}")
    print(
        f"{verb} {len(report.stale_queues)} stale queues and {len(report.removed_subscriptions)} "
        f"subscriptions; kept {len(report.live_queues)} live monitoring queues"
    )
    return 0


# `python -m tasks.sqs_events` imports the package `tasks` first, and with it this module
# (the app installs it), before running this file again as __main__. runpy warns about that
# second copy, so the warning is silenced here and __main__ hands over to the first copy.
warnings.filterwarnings(
    "ignore", message=rf"'{re.escape(__name__)}' found in sys.modules", category=RuntimeWarning
)

if __name__ == "__main__":
    from tasks.sqs_events import main as package_main

    sys.exit(package_main())
