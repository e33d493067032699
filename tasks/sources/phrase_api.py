"""The phrase-search REST source: `GET {base}/phrases/legislator.json` for one phrase.

The request is the one the Capitol Words API answered: query parameters `phrase`,
`per_page`, `start_date`, `end_date` and `apikey`, and a JSON answer with a `results`
list of legislators and counts. Faults are sorted here, once, into `RetryableError`
and `PermanentError`; the task decides what to do with each.

The API key only ever travels in the query string of the outgoing request. Every
text this module produces (exception messages, request parameters kept as
provenance) is built without it, and requests' own exception texts, which contain
the full URL, are scrubbed before they leave.
"""

from __future__ import annotations

import email.utils
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from tasks.errors import PermanentError, RetryableError
from tasks.redact import redact
from tasks.settings import Settings

#: Path of the phrase search under the API base URL.
PHRASE_PATH = "/phrases/legislator.json"

#: Connections kept open to the API per worker process; at least the thread-pool concurrency.
HTTP_POOL_SIZE = 64

#: Characters of an unexpected answer body quoted in an error message.
BODY_EXCERPT_CHARS = 200

_session_lock = threading.Lock()
_session: requests.Session | None = None
_session_pid: int | None = None


@dataclass(frozen=True)
class PhraseAnswer:
    """One successful answer: the parsed JSON and what is needed to prove where it came from."""

    status: int
    body: dict[str, Any]
    elapsed_s: float
    #: When the request was sent: UTC, ISO 8601 with milliseconds.
    requested_at: str


def request_identity(phrase: str, settings: Settings) -> dict[str, str]:
    """Return the request parameters that decide the answer, without the API key.

    The store names a result after these, so two rows with the same identity share
    one stored answer, and changing `per_page` or the dates makes new ones.
    """
    return {
        "phrase": phrase,
        "per_page": str(settings.per_page),
        "start_date": settings.start_date,
        "end_date": settings.end_date,
    }


def phrase_url(settings: Settings) -> str:
    """Return the full URL of the phrase search, without any query string."""
    return settings.api_url + PHRASE_PATH


def fetch_phrase_answer(phrase: str, settings: Settings) -> PhraseAnswer:
    """Request one phrase and return the parsed answer.

    Raises `RetryableError` for connection errors, timeouts, 5xx and 429 (with the
    `Retry-After` delay in seconds when the API sent one), and `PermanentError` for
    any other non-200 status or a body that is not the expected JSON.
    """
    params = dict(request_identity(phrase, settings), apikey=settings.api_key)
    requested_at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    started = time.monotonic()

    try:
        response = _http_session(settings).get(
            phrase_url(settings),
            params=params,
            timeout=(settings.connect_timeout_s, settings.read_timeout_s),
        )
    except requests.Timeout as exc:
        raise RetryableError(f"timed out: {_scrub(exc, settings.api_key)}") from None
    except requests.RequestException as exc:
        raise RetryableError(f"connection failed: {_scrub(exc, settings.api_key)}") from None

    elapsed = time.monotonic() - started
    _raise_for_status(response)
    return PhraseAnswer(
        status=response.status_code,
        body=_parse_body(response),
        elapsed_s=elapsed,
        requested_at=requested_at,
    )


def _raise_for_status(response: requests.Response) -> None:
    status = response.status_code
    if status == 200:
        return

    if status == 429:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        raise RetryableError("throttled: HTTP 429", status=status, retry_after_s=retry_after)
    if status >= 500:
        raise RetryableError(f"server error: HTTP {status}", status=status)
    if status in (401, 403):
        raise PermanentError(
            f"API key rejected: HTTP {status}; check INGEST_API_KEY", status=status
        )
    raise PermanentError(f"request rejected: HTTP {status}", status=status)


def _parse_body(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None

    if not isinstance(body, dict) or not isinstance(body.get("results"), list):
        excerpt = response.text[:BODY_EXCERPT_CHARS]
        raise PermanentError(
            f"answer is not the expected JSON with a 'results' list: {excerpt!r}",
            status=response.status_code,
        )
    return body


def parse_retry_after(value: str | None) -> float | None:
    """Return the delay in seconds that a `Retry-After` header asks for, or None.

    The header holds either whole seconds or an HTTP date; a date in the past is 0.
    """
    if not value:
        return None

    value = value.strip()
    if value.isdigit():
        return float(value)

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _http_session(settings: Settings) -> requests.Session:
    """Return this process's session, made anew after a fork so no socket is shared.

    The proxy and CA-bundle variables of the environment are read once, when the session
    is made. requests would otherwise read them again on every request, which cost about
    a fifth of a worker's CPU time per task.
    """
    global _session, _session_pid

    with _session_lock:
        if _session is None or _session_pid != os.getpid():
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=HTTP_POOL_SIZE)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            _read_environment_once(session, phrase_url(settings))
            _session, _session_pid = session, os.getpid()
        return _session


def _read_environment_once(session: requests.Session, url: str) -> None:
    """Copy the proxies for `url` and the CA bundle from the environment into `session`."""
    session.proxies.update(requests.utils.get_environ_proxies(url))
    ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if ca_bundle:
        session.verify = ca_bundle
    # NOTE: environment changes after the session is made reach new worker processes only.
    session.trust_env = False


def _scrub(exc: BaseException, secret: str) -> str:
    """Return the exception text with the key masked, since requests quotes whole URLs."""
    return redact(f"{type(exc).__name__}: {exc}", (secret,))
