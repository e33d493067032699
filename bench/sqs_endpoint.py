"""Run moto's SQS server with its per-message scans made cheap, for the benchmarks only.

    python bench/sqs_endpoint.py -H 127.0.0.1 -p PORT

moto 5.2.5 keeps a queue as one Python list and looks at every message in it on each
SendMessage (to compute the approximate counts for `Queue.attributes`), ReceiveMessage
and DeleteMessage, and each look reads the clock through `datetime`. A send into a
queue of n messages therefore costs about 70 microseconds times n: 10,000 rows take
about an hour to enqueue, whatever the client does. Real SQS has no such cost, so a
benchmark on stock moto measures moto, not the client.

This launcher replaces four moto internals with equivalent, cheaper code before it
starts `moto.server`: the clock, the visible-message filter, the approximate counts and
the receipt-handle search of a delete. A count is computed at most every COUNT_CACHE_S,
because real SQS counts are approximate too. Scans remain where moto's data layout needs
them, but they compare plain attributes. Every other behaviour is moto's own.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import moto
import moto.server
from moto.sqs import models
from moto.sqs.exceptions import ReceiptHandleIsInvalid

#: The moto version whose `moto.sqs.models` internals this module replaces.
TESTED_MOTO = "5.2.5"

#: Seconds an approximate queue count may be reused before it is computed again.
COUNT_CACHE_S = 0.2

_stock_unix_time = models.unix_time


def _now_s(dt: Any = None) -> float:
    return time.time() if dt is None else _stock_unix_time(dt)


def _now_ms(dt: Any = None) -> float:
    return _now_s(dt) * 1000.0


def _visible_messages(queue: models.Queue) -> list[models.Message]:
    now = _now_ms()
    return [m for m in queue._messages if m.visible_at < now and m.delayed_until <= now]


def _cached_count(name: str, count: Callable[[models.Queue], int]) -> property:
    """Return a property that reuses `count(queue)` for COUNT_CACHE_S seconds."""
    slot = f"_bench_{name}"

    def get(queue: models.Queue) -> int:
        cached = queue.__dict__.get(slot)
        now = time.monotonic()
        if cached is None or now - cached[1] > COUNT_CACHE_S:
            cached = (count(queue), now)
            queue.__dict__[slot] = cached
        return cached[0]

    return property(get)


def _count_delayed(queue: models.Queue) -> int:
    now = _now_ms()
    return sum(1 for m in queue._messages if m.delayed_until > now)


def _count_not_visible(queue: models.Queue) -> int:
    now = _now_ms()
    return sum(1 for m in queue._messages if m.visible_at >= now)


def _delete_message(queue: models.Queue, receipt_handle: str) -> None:
    """Delete the message that has or had `receipt_handle`, as moto does, in one pass."""
    if receipt_handle in queue.deleted_messages:
        return

    messages = queue._messages
    for index, message in enumerate(messages):
        if (
            message.receipt_handle == receipt_handle
            or receipt_handle in message._old_receipt_handles
        ):
            break
    else:
        raise ReceiptHandleIsInvalid()

    # A new list, as moto builds one, so that a receive iterating the old one is unaffected.
    queue._messages = messages[:index] + messages[index + 1 :]
    queue.pending_messages.discard(message)
    queue.deleted_messages.update(message.all_receipt_handles)


def install() -> None:
    """Replace the moto internals named in the module docstring; raise RuntimeError on another moto."""
    if moto.__version__ != TESTED_MOTO:
        raise RuntimeError(
            f"moto {moto.__version__} is installed but bench/sqs_endpoint.py replaces internals "
            f"of moto {TESTED_MOTO}: check moto/sqs/models.py, then update TESTED_MOTO"
        )

    models.unix_time = _now_s
    models.unix_time_millis = _now_ms
    models.Message.visible = property(lambda message: _now_ms() > message.visible_at)
    models.Message.delayed = property(lambda message: _now_ms() < message.delayed_until)
    models.Queue.messages = property(_visible_messages)
    models.Queue.approximate_number_of_messages = _cached_count(
        "visible", lambda queue: len(_visible_messages(queue))
    )
    models.Queue.approximate_number_of_messages_delayed = _cached_count("delayed", _count_delayed)
    models.Queue.approximate_number_of_messages_not_visible = _cached_count(
        "not_visible", _count_not_visible
    )
    models.Queue.delete_message = _delete_message


def main(argv: list[str] | None = None) -> None:
    """Install the replacements and run `moto.server` with the same command-line options."""
    install()
    moto.server.main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
