"""The `fetch_phrase` task: one CSV row in, one stored answer or one ledger entry out."""

from __future__ import annotations

import random
from datetime import datetime, timezone
from typing import Any

from celery import Task
from celery.exceptions import Reject, Retry
from celery.utils.log import get_task_logger

from tasks.application import app, settings
from tasks.errors import FetchError, PermanentError, RetryableError
from tasks.sources.phrase_api import (
    PhraseAnswer,
    fetch_phrase_answer,
    phrase_url,
    request_identity,
)
from tasks.store import FailureLedger, ResultStore, result_key

logger = get_task_logger(__name__)


#: Share of INGEST_RATE_LIMIT the worker keeps unused. Celery spaces tokens exactly
#: 1/rate apart, but a request reaches the API a few milliseconds after its token, and
#: that delay varies. The spare 2 % of each second (20 ms) absorbs the variation, so no
#: window of one second contains more requests than the limit. Measured with 10/s: 9.6 to
#: 9.7 requests/s, at most 10 in any second (bench/run.py --cases rate_limit).
RATE_LIMIT_HEADROOM = 0.02

#: Outcomes returned by the task, as Flower shows them.
STORED = "stored"
ALREADY_STORED = "already stored"


def paced_rate_limit(limit: str) -> str | None:
    """Return Celery's `rate_limit` for INGEST_RATE_LIMIT (`"10/s"` gives `"9.8/s"`), or None.

    `limit` has been checked by `tasks.settings`: empty, or a number, "/" and s, m or h.
    """
    if not limit:
        return None
    count, _, unit = limit.partition("/")
    return f"{float(count) * (1 - RATE_LIMIT_HEADROOM):.6g}/{unit}"


@app.task(
    bind=True,
    name="fetch_phrase",
    acks_late=True,
    max_retries=settings.max_retries,
    rate_limit=paced_rate_limit(settings.rate_limit),
    throws=(FetchError,),
)
def fetch_phrase(self: Task, phrase: str, source_file: str, line: int) -> str:
    """Fetch the API's answer for one row's phrase and store it once.

    `source_file` and `line` name the CSV row, for logs, provenance and the ledger.
    Returns STORED, or ALREADY_STORED when an earlier delivery stored the same
    request. Transient faults are retried by Celery with backoff; a fault that
    outlasts the retries, or a permanent one, is written to the failure ledger and
    raised as `FetchError`, which ends the task as FAILURE with its message acknowledged.
    An unexpected exception puts the message back in the queue, so SQS's redrive
    policy moves it to the dead-letter queue once it keeps failing.
    """
    row = f"{source_file}:{line}"
    try:
        return _fetch_and_store(self, phrase, source_file, line)
    except (Retry, FetchError):
        raise
    except Exception as exc:
        logger.exception("%s: unexpected error, returning the message to the queue", row)
        # The reason is text, not the exception: Celery pickles it to the worker's main
        # process, and an exception whose __init__ takes other arguments than its message
        # (StoreError) fails to unpickle there, which stops the whole worker.
        raise Reject(f"{type(exc).__name__}: {exc}", requeue=True) from exc


def _fetch_and_store(task: Task, phrase: str, source_file: str, line: int) -> str:
    row = f"{source_file}:{line}"
    key = result_key(request_identity(phrase, settings))
    store = ResultStore(settings.store_dir)

    if store.exists(phrase, key):
        logger.info("%s: already stored, nothing to fetch", row)
        return ALREADY_STORED

    attempt = task.request.retries + 1
    logger.info("%s: start, attempt %d of %d", row, attempt, task.max_retries + 1)

    try:
        answer = fetch_phrase_answer(phrase, settings)
    except RetryableError as exc:
        _retry_or_give_up(task, exc, phrase, row)
    except PermanentError as exc:
        _give_up(task, exc, phrase, row)

    record = _provenance(task, answer, phrase, source_file, line)
    if store.put(phrase, key, record):
        logger.info("%s: stored %s", row, store.path_for(phrase, key).name)
        return STORED

    logger.info("%s: already stored by another delivery, answer discarded", row)
    return ALREADY_STORED


def retry_countdown(retries: int, retry_after_s: float | None) -> float:
    """Return the seconds to wait before the next try, with exponential backoff and jitter.

    The backoff doubles from INGEST_RETRY_BACKOFF_S up to INGEST_RETRY_BACKOFF_MAX_S and
    a random half of it is dropped, so that rows that failed together do not retry
    together. A `Retry-After` from the API raises the wait to at least that long.

    NOTE: the wait is capped at `Settings.max_countdown_s`, below the visibility timeout
    and SQS's 900 s delay limit, because a longer wait would let SQS hand the message
    to a second worker. A `Retry-After` above the cap therefore retries early, and the
    API's next 429 costs one more of the task's tries.
    """
    backoff = min(settings.retry_backoff_max_s, settings.retry_backoff_s * 2**retries)
    delay = random.uniform(backoff / 2, backoff)
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    return min(delay, settings.max_countdown_s)


def _retry_or_give_up(task: Task, exc: RetryableError, phrase: str, row: str) -> None:
    if task.request.retries >= task.max_retries:
        _give_up(task, exc, phrase, row)

    countdown = retry_countdown(task.request.retries, exc.retry_after_s)
    logger.warning("%s: retry in %.1f s: %s", row, countdown, exc)
    raise task.retry(countdown=countdown, exc=exc)


def _give_up(task: Task, exc: FetchError, phrase: str, row: str) -> None:
    attempts = task.request.retries + 1
    source_file, _, line = row.rpartition(":")
    FailureLedger(settings.store_dir).record(
        file=source_file,
        line=int(line),
        phrase=phrase,
        reason=str(exc),
        task_id=task.request.id,
        attempts=attempts,
    )
    logger.error("%s: failed after %d attempt(s), recorded in the ledger: %s", row, attempts, exc)
    raise exc


def _provenance(
    task: Task, answer: PhraseAnswer, phrase: str, source_file: str, line: int
) -> dict[str, Any]:
    """Return the stored record: the answer and where, when and how it was fetched."""
    return {
        "phrase": phrase,
        "source": {"file": source_file, "line": line},
        "request": {"url": phrase_url(settings), "params": request_identity(phrase, settings)},
        "status": answer.status,
        "requested_at": answer.requested_at,
        "fetched_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "elapsed_s": round(answer.elapsed_s, 4),
        "task_id": task.request.id,
        "attempt": task.request.retries + 1,
        "response": answer.body,
    }
