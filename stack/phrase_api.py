"""Serve a local stand-in for the Capitol Words phrase-search API, with fault injection.

The server responds to ``GET {base}/phrases/legislator.json?phrase=...&apikey=...`` with JSON
results derived from a SHA-256 hash of the phrase, so one phrase and ``per_page`` always get
the same bytes. Injected faults (500/503, 429, slow responses, dropped connections and scripted
status sequences) are chosen from a hash of the seed, the phrase and the number of earlier
requests for that phrase. A rerun against a fresh or reset server therefore gets the same
faults in the same order.

Command line: ``INGEST_API_KEY=... python -m stack.phrase_api --port 8080``. When ready it
prints ``phrase-api listening on http://HOST:PORT/api/1`` to stdout, and SIGTERM or SIGINT
stop it. Tests and benchmarks can run :class:`PhraseApiServer` in-process instead.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import signal
import socket
import socketserver
import sys
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, MappingProxyType
from typing import Literal
from urllib.parse import parse_qs, urlsplit

logger = logging.getLogger(__name__)

API_KEY_ENV_VAR = "INGEST_API_KEY"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_CLI_PORT = 8080
MAX_PORT = 65535
DEFAULT_BASE_PATH = "/api/1"
PHRASES_ENDPOINT = "/phrases/legislator.json"
STATS_PATH = "/_stats"
RESET_PATH = "/_reset"
JSON_CONTENT_TYPE = "application/json; charset=utf-8"

DEFAULT_PER_PAGE = 50  # results per response when the request has no per_page
DEFAULT_RETRY_AFTER_S = 1  # seconds, sent in the Retry-After header of injected 429s
DEFAULT_SLOW_SECONDS = (
    30.0  # seconds a slow response waits, meant to exceed the client read timeout
)
RATE_SUM_TOLERANCE = 1e-9  # slack for float rounding when the fault rates must add up to <= 1

# Pending connections the kernel queues before accept(). Linux caps it at net.core.somaxconn.
LISTEN_BACKLOG = 512
IDLE_TIMEOUT_S = 60.0  # seconds a keep-alive connection may wait for its next request
SHUTDOWN_POLL_INTERVAL_S = 0.05  # seconds between the checks of serve_forever for stop()
STOP_JOIN_TIMEOUT_S = 5.0  # seconds stop() waits for the serving thread to exit
SIGNAL_POLL_INTERVAL_S = 0.5  # seconds between checks for SIGTERM/SIGINT in the CLI
MAX_REQUEST_BODY_BYTES = 64 * 1024  # larger request bodies get 413 and the connection closes
MAX_QUERY_FIELDS = 64  # more query fields than this get 400
RESULTS_CACHE_SIZE = 4096  # encoded results bodies kept in memory, keyed by (phrase, per_page)

LEGISLATOR_POOL_SIZE = 200  # synthetic legislators a phrase can match
MAX_MENTION_COUNT = 5000  # upper bound of the per-legislator count in a result
EMPTY_RESULT_ODDS = 20  # about one phrase in this many matches no legislator

DROP: Literal["drop"] = "drop"
SLOW: Literal["slow"] = "slow"
OK_STATUS = 200
THROTTLE_STATUS = 429
ERROR_STATUSES = (500, 503)

# One step of a fault script: an HTTP status to send (200 is the normal response), DROP to
# close the connection without a response, or SLOW to wait slow_seconds and then send 200.
Step = int | Literal["drop", "slow"]

_FIRST_NAMES = (
    "Ada", "Bernard", "Carmen", "Dolores", "Elliot", "Frances", "Gordon", "Harriet", "Ivan",
    "Josephine", "Kenneth", "Lucille", "Marcus", "Nadia", "Oscar", "Patricia", "Quentin",
    "Rosa", "Samuel", "Theresa",
)  # fmt: skip
_LAST_NAMES = (
    "Abbott", "Brennan", "Castillo", "Delgado", "Ellison", "Fairbanks", "Gallagher",
    "Hollister", "Iverson", "Jennings",
)  # fmt: skip
_STATES = (
    "AL", "AK", "AZ", "AR", "CA", "CO", "CT", "DE", "FL", "GA", "HI", "ID", "IL", "IN", "IA",
    "KS", "KY", "LA", "ME", "MD", "MA", "MI", "MN", "MS", "MO", "MT", "NE", "NV", "NH", "NJ",
    "NM", "NY", "NC", "ND", "OH", "OK", "OR", "PA", "RI", "SC", "SD", "TN", "TX", "UT", "VT",
    "VA", "WA", "WV", "WI", "WY",
)  # fmt: skip
_API_KEY_IN_TEXT = re.compile(r"(apikey=)[^&\s\"']*", re.IGNORECASE)


@dataclass(frozen=True)
class Faults:
    """Fault injection settings of a PhraseApiServer.

    Each rate is the fraction (0 to 1) of phrase requests that get that fault. For each
    request one uniform draw from a hash of (seed, phrase, earlier requests for the phrase)
    is compared with the rates in the fixed order drop, slow, throttle, error, so the rates
    must add up to at most 1. A phrase in ``scripts`` ignores the rates: its n-th request
    gets step n of its script, and requests after the end repeat the last step.
    ``latency_ms`` is added before every response outside /_stats and /_reset, faults included.
    """

    seed: int = 0
    latency_ms: float = 0.0
    drop_rate: float = 0.0
    slow_rate: float = 0.0
    slow_seconds: float = DEFAULT_SLOW_SECONDS
    throttle_rate: float = 0.0
    retry_after_s: int = DEFAULT_RETRY_AFTER_S
    error_rate: float = 0.0
    scripts: Mapping[str, Sequence[Step]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Raise ValueError on an out-of-range setting or an invalid script step."""
        for name in ("drop_rate", "slow_rate", "throttle_rate", "error_rate"):
            _check_fraction(name, getattr(self, name))

        _check_non_negative("latency_ms", self.latency_ms)
        _check_non_negative("slow_seconds", self.slow_seconds)
        if isinstance(self.retry_after_s, bool) or not isinstance(self.retry_after_s, int):
            raise ValueError(
                f"retry_after_s must be a whole number of seconds, got {self.retry_after_s!r}"
            )
        _check_non_negative("retry_after_s", self.retry_after_s)

        rate_sum = self.drop_rate + self.slow_rate + self.throttle_rate + self.error_rate
        if rate_sum > 1 + RATE_SUM_TOLERANCE:
            raise ValueError(
                f"the drop, slow, throttle and error rates add up to {rate_sum:g}, "
                "but their sum must be at most 1"
            )

        scripts = {phrase: _validate_steps(phrase, steps) for phrase, steps in self.scripts.items()}
        object.__setattr__(self, "scripts", MappingProxyType(scripts))


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{name} (--{name.replace('_', '-')}) must be between 0 and 1, got {value!r}"
        )


def _check_non_negative(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _validate_steps(phrase: str, steps: Sequence[Step]) -> tuple[Step, ...]:
    if not steps:
        raise ValueError(f"the script for phrase {phrase!r} has no steps")

    for step in steps:
        if step in (DROP, SLOW):
            continue
        is_status = isinstance(step, int) and not isinstance(step, bool)
        if not (is_status and (step == OK_STATUS or 400 <= step <= 599)):
            raise ValueError(
                f"invalid step {step!r} in the script for phrase {phrase!r}: "
                "use 200, a status from 400 to 599, 'drop' or 'slow'"
            )

    return tuple(steps)


def parse_script(text: str) -> tuple[str, tuple[Step, ...]]:
    """Parse a ``PHRASE=STEP,STEP,...`` script into the phrase and its steps.

    A step is an HTTP status (200 or 400 to 599), ``drop`` or ``slow``. The phrase ends at
    the last ``=``, so it may itself contain ``=``. Raises ValueError on invalid text.
    """
    phrase, separator, step_list = text.rpartition("=")
    if not separator or not phrase:
        raise ValueError(f"invalid script {text!r}: expected PHRASE=STATUS,STATUS,...")

    steps: list[Step] = []
    for word in step_list.split(","):
        word = word.strip().lower()
        if word in (DROP, SLOW):
            steps.append(word)
        elif word.isdigit():
            steps.append(int(word))
        else:
            raise ValueError(
                f"invalid step {word!r} in script {text!r}: use an HTTP status, 'drop' or 'slow'"
            )

    return phrase, _validate_steps(phrase, steps)


def _digest(label: str, *parts: object) -> bytes:
    """Hash the label and parts unambiguously, so that no two part lists collide by accident."""
    payload = json.dumps([label, *parts], ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode("ascii")).digest()


def choose_step(faults: Faults, phrase: str, index: int) -> Step:
    """Return the step for request number ``index`` (0-based) for ``phrase``.

    The choice depends only on the arguments, so tests and benchmarks can predict it.
    """
    script = faults.scripts.get(phrase)
    if script is not None:
        return script[min(index, len(script) - 1)]

    digest = _digest("fault", faults.seed, phrase, index)
    draw = int.from_bytes(digest[:8], "big") / 2**64
    threshold = 0.0
    for step, rate in (
        (DROP, faults.drop_rate),
        (SLOW, faults.slow_rate),
        (THROTTLE_STATUS, faults.throttle_rate),
    ):
        threshold += rate
        if draw < threshold:
            return step

    threshold += faults.error_rate
    if draw < threshold:
        return ERROR_STATUSES[digest[8] & 1]

    return OK_STATUS


def _build_legislator_pool() -> tuple[dict[str, str], ...]:
    pool = []
    for index in range(LEGISLATOR_POOL_SIZE):
        first = _FIRST_NAMES[index % len(_FIRST_NAMES)]
        last = _LAST_NAMES[(index // len(_FIRST_NAMES)) % len(_LAST_NAMES)]
        traits = _digest("legislator", index)
        party = "I"  # about 5 % independents, the rest split evenly
        if traits[0] < 122:
            party = "D"
        elif traits[0] < 244:
            party = "R"

        pool.append(
            {
                "name": f"{first} {last}",
                "bioguide_id": f"{last[0]}{index + 1:06d}",
                "party": party,
                "state": _STATES[traits[1] % len(_STATES)],
                "chamber": "senate" if traits[2] < 48 else "house",
            }
        )

    return tuple(pool)


_LEGISLATORS = _build_legislator_pool()


def phrase_results(phrase: str, per_page: int = DEFAULT_PER_PAGE) -> list[dict[str, object]]:
    """Build the result list the server sends for ``phrase``, at most ``per_page`` long.

    Each entry is ``{"legislator": {name, bioguide_id, party, state, chamber}, "count": N}``,
    sorted by count (highest first) and then by bioguide_id. Only hashlib is used, so the
    list is the same on every run and Python version.
    """
    phrase_digest = _digest("results", phrase)
    if int.from_bytes(phrase_digest[:4], "big") % EMPTY_RESULT_ODDS == 0:
        return []

    match_count = 1 + int.from_bytes(phrase_digest[4:8], "big") % LEGISLATOR_POOL_SIZE
    ranked = sorted(
        (hashlib.sha256(phrase_digest + person["bioguide_id"].encode()).digest(), person)
        for person in _LEGISLATORS
    )
    counted = [
        (1 + int.from_bytes(score[:4], "big") % MAX_MENTION_COUNT, person)
        for score, person in ranked[:match_count]
    ]
    counted.sort(key=lambda item: (-item[0], item[1]["bioguide_id"]))
    return [{"legislator": dict(person), "count": count} for count, person in counted[:per_page]]


@functools.lru_cache(maxsize=RESULTS_CACHE_SIZE)
def _results_body(phrase: str, per_page: int) -> bytes:
    return _encode_json({"results": phrase_results(phrase, per_page)})


def _encode_json(document: object) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _error_body(message: str) -> bytes:
    return _encode_json({"error": message})


class _RequestCounters:
    """Thread-safe request counts that /_stats reports and /_reset clears."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests = 0
        self._by_phrase: Counter[str] = Counter()
        self._by_status: Counter[str] = Counter()

    def claim_index(self, phrase: str) -> int:
        """Count one request for the phrase and return how many came before it."""
        with self._lock:
            index = self._by_phrase[phrase]
            self._by_phrase[phrase] = index + 1
        return index

    def record_outcome(self, outcome: str) -> None:
        with self._lock:
            self._requests += 1
            self._by_status[outcome] += 1

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {
                "requests": self._requests,
                "by_phrase": dict(self._by_phrase),
                "by_status": dict(sorted(self._by_status.items())),
            }

    def reset(self) -> None:
        with self._lock:
            self._requests = 0
            self._by_phrase.clear()
            self._by_status.clear()


class _InvalidQueryError(Exception):
    """A phrase request with a missing or invalid query parameter."""


def _parse_phrase_params(params: Mapping[str, list[str]]) -> tuple[str, int]:
    """Return (phrase, per_page) from the query. Raise _InvalidQueryError naming a bad parameter."""
    phrase = params.get("phrase", [""])[0]
    if not phrase:
        raise _InvalidQueryError("missing required query parameter: phrase")

    per_page_text = params.get("per_page", [str(DEFAULT_PER_PAGE)])[0]
    if not re.fullmatch(r"[0-9]{1,9}", per_page_text) or int(per_page_text) < 1:
        message = (
            f"invalid per_page {per_page_text[:40]!r}: expected an integer from 1 to 999999999"
        )
        raise _InvalidQueryError(message)
    per_page = min(int(per_page_text), LEGISLATOR_POOL_SIZE)  # no phrase matches more

    # The dates must be ISO dates, but they do not change the results.
    start = _parse_date_param(params, "start_date")
    end = _parse_date_param(params, "end_date")
    if start is not None and end is not None and start > end:
        raise _InvalidQueryError(f"start_date {start} is after end_date {end}")

    return phrase, per_page


def _parse_date_param(params: Mapping[str, list[str]], name: str) -> date | None:
    text = params.get(name, [""])[0]
    if not text:
        return None

    try:
        return date.fromisoformat(text)
    except ValueError:
        raise _InvalidQueryError(f"invalid {name} {text[:40]!r}: expected YYYY-MM-DD") from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _PhraseApiHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive handler for the phrase endpoint and the /_stats and /_reset paths."""

    protocol_version = "HTTP/1.1"
    server_version = "phrase-api"
    timeout = IDLE_TIMEOUT_S
    disable_nagle_algorithm = True
    server: _PhraseApiHTTPServer

    def version_string(self) -> str:
        """Return the Server header value without the Python version."""
        return self.server_version

    def do_GET(self) -> None:
        if not self._discard_request_body():
            return

        url = urlsplit(self.path)
        if url.path == STATS_PATH:
            self._serve_control(self.server.counters.snapshot)
        elif url.path == RESET_PATH:
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, _error_body("use POST"), {"Allow": "POST"})
        elif url.path == self.server.phrases_path:
            self._serve_phrases(url.query)
        else:
            self._serve_unknown_path()

    def do_POST(self) -> None:
        if not self._discard_request_body():
            return

        url = urlsplit(self.path)
        if url.path == RESET_PATH:
            self._serve_control(self._reset_counters)
        elif url.path in (STATS_PATH, self.server.phrases_path):
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, _error_body("use GET"), {"Allow": "GET"})
        else:
            self._serve_unknown_path()

    def _reset_counters(self) -> dict[str, object]:
        self.server.counters.reset()
        return {"reset": True}

    def _serve_control(self, action: Callable[[], object]) -> None:
        if not _is_loopback(self.client_address[0]):
            self._send(
                HTTPStatus.FORBIDDEN, _error_body("control paths accept loopback clients only")
            )
            return

        document = action()
        self._send(HTTPStatus.OK, _encode_json(document))

    def _serve_unknown_path(self) -> None:
        if not self._wait_latency():
            return

        message = f"not found, use GET {self.server.phrases_path}"
        self._send(HTTPStatus.NOT_FOUND, _error_body(message), counted=True)

    def _serve_phrases(self, query: str) -> None:
        if not self._wait_latency():
            return

        try:
            params = parse_qs(query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
        except ValueError:
            self._send(
                HTTPStatus.BAD_REQUEST, _error_body("too many query parameters"), counted=True
            )
            return

        if not self._has_valid_key(params):
            body = _error_body("invalid or missing API key in query parameter apikey")
            self._send(HTTPStatus.UNAUTHORIZED, body, counted=True)
            return

        try:
            phrase, per_page = _parse_phrase_params(params)
        except _InvalidQueryError as exc:
            self._send(HTTPStatus.BAD_REQUEST, _error_body(str(exc)), counted=True)
            return

        faults = self.server.faults
        step = choose_step(faults, phrase, self.server.counters.claim_index(phrase))
        self._perform_step(step, phrase, per_page)

    def _has_valid_key(self, params: Mapping[str, list[str]]) -> bool:
        keys = params.get("apikey", [])
        if not keys and self.server.accept_missing_key:
            return True
        if len(keys) != 1:
            return False

        return hmac.compare_digest(keys[0].encode("utf-8"), self.server.api_key)

    def _perform_step(self, step: Step, phrase: str, per_page: int) -> None:
        if step == SLOW and not self._wait(self.server.faults.slow_seconds):
            return

        if step == DROP:
            self.server.counters.record_outcome(DROP)
            self.close_connection = True
            self._log_access(DROP)
        elif step in (SLOW, OK_STATUS):
            self._send(HTTPStatus.OK, _results_body(phrase, per_page), counted=True)
        elif step == THROTTLE_STATUS:
            headers = {"Retry-After": str(self.server.faults.retry_after_s)}
            body = _error_body("rate limit exceeded (injected fault)")
            self._send(THROTTLE_STATUS, body, headers, counted=True)
        else:
            reason = self.responses.get(step, ("error",))[0].lower()
            self._send(step, _error_body(f"{reason} (injected fault)"), counted=True)

    def _wait_latency(self) -> bool:
        return self._wait(self.server.faults.latency_ms / 1000)

    def _wait(self, seconds: float) -> bool:
        """Sleep. Return False, with the connection marked for closing, if stop() came first."""
        if seconds > 0 and self.server.stopping.wait(seconds):
            self.close_connection = True
            return False

        return True

    def _discard_request_body(self) -> bool:
        """Read and drop a request body, so that the next keep-alive request parses cleanly."""
        if "Transfer-Encoding" in self.headers:
            self.send_error(HTTPStatus.LENGTH_REQUIRED)
            return False

        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0:
            self.send_error(HTTPStatus.BAD_REQUEST)
            return False
        if length > MAX_REQUEST_BODY_BYTES:
            self.send_error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            return False

        if length:
            self.rfile.read(length)
        return True

    def _send(
        self,
        status: int,
        body: bytes,
        headers: Mapping[str, str] | None = None,
        *,
        counted: bool = False,
    ) -> None:
        """Send one JSON response. ``counted`` adds it to the /_stats counts."""
        if counted:
            self.server.counters.record_outcome(str(int(status)))

        self.send_response(status)
        self.send_header("Content-Type", JSON_CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        elif self.request_version == "HTTP/1.0":
            self.send_header("Connection", "keep-alive")
        self.end_headers()

        if self.command != "HEAD":
            self.wfile.write(body)
        if counted:
            self._log_access(str(int(status)))

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Send a JSON error for a request the base class rejects, and close the connection.

        The body names only the status, because the base class's message can quote the
        request line, which can contain the API key.
        """
        self.close_connection = True
        reason = self.responses.get(code, ("error",))[0].lower()
        self._send(code, _error_body(reason))

    def _log_access(self, outcome: str) -> None:
        if self.server.access_log:
            logger.info("%s %s -> %s", self.command, urlsplit(self.path).path, outcome)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Log nothing here, because the request line contains the API key."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base class name
        """Send the base class's messages to the module logger at DEBUG, API key removed."""
        message = _API_KEY_IN_TEXT.sub(r"\1***", format % args)
        logger.debug("%s: %s", self.address_string(), message)


class _PhraseApiHTTPServer(ThreadingHTTPServer):
    """Threaded HTTP server that carries the settings and counters the handlers share."""

    daemon_threads = True
    block_on_close = False  # stop() closes live connections itself instead of joining threads
    request_queue_size = LISTEN_BACKLOG
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        api_key: str,
        faults: Faults,
        base_path: str,
        access_log: bool,
        accept_missing_key: bool = False,
    ) -> None:
        self.api_key = api_key.encode("utf-8")
        self.faults = faults
        self.phrases_path = base_path + PHRASES_ENDPOINT
        self.access_log = access_log
        self.accept_missing_key = accept_missing_key
        self.counters = _RequestCounters()
        self.stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _PhraseApiHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), which can block on a DNS lookup.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request: socket.socket, client_address: tuple[str, int]) -> None:  # type: ignore[override]
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_open_connections(self) -> None:
        """Shut down every live connection, so that idle keep-alive handlers exit."""
        with self._connections_lock:
            connections = list(self._connections)

        for connection in connections:
            with contextlib.suppress(OSError):  # the client or the handler closed it first
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: object, client_address: tuple[str, int]) -> None:  # type: ignore[override]
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            # Clients that time out or disconnect mid-response are expected under fault injection.
            logger.debug("connection from %s ended early: %r", client_address, error)
            return

        logger.exception("unexpected error while serving %s", client_address)


class PhraseApiServer:
    """In-process phrase API server on a background thread, usable as a context manager.

    ``port=0`` picks a free port, and ``url`` then contains the real one. The server accepts
    only requests whose ``apikey`` query parameter equals ``key``, and with
    ``accept_missing_key`` also requests that have no ``apikey`` parameter at all.
    """

    def __init__(
        self,
        key: str,
        host: str = DEFAULT_HOST,
        port: int = 0,
        faults: Faults | None = None,
        *,
        base_path: str = DEFAULT_BASE_PATH,
        access_log: bool = False,
        accept_missing_key: bool = False,
    ) -> None:
        """Store the settings, so start() binds the port. Raises ValueError on an invalid one."""
        if not key:
            raise ValueError("the API key must not be empty")
        normalized_base = base_path.rstrip("/")
        if normalized_base and not normalized_base.startswith("/"):
            raise ValueError(f"base_path must start with '/', got {base_path!r}")

        self._key = key
        self._host = host
        self._port = port
        self.faults = faults or Faults()
        self.base_path = normalized_base
        self._access_log = access_log
        self._accept_missing_key = accept_missing_key
        self._httpd: _PhraseApiHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> PhraseApiServer:
        """Bind the port and serve on a daemon thread. Raises OSError if the bind fails."""
        if self._httpd is not None:
            raise RuntimeError("the phrase API server is already running")

        httpd = _PhraseApiHTTPServer(
            (self._host, self._port),
            self._key,
            self.faults,
            self.base_path,
            self._access_log,
            self._accept_missing_key,
        )
        thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": SHUTDOWN_POLL_INTERVAL_S},
            name="phrase-api",
            daemon=True,
        )
        thread.start()
        self._httpd, self._thread = httpd, thread
        logger.info("phrase API serving on %s with %s", self.url, self.faults)
        return self

    @property
    def port(self) -> int:
        """Port the server listens on. Raises RuntimeError before start()."""
        return self._running_server().server_address[1]

    @property
    def url(self) -> str:
        """Base URL of the API, for example ``http://127.0.0.1:8080/api/1``."""
        return f"http://{self._host}:{self.port}{self.base_path}"

    def stats(self) -> dict[str, object]:
        """Return the counts that GET /_stats sends.

        ``requests`` counts every response and dropped connection outside /_stats and /_reset.
        ``by_phrase`` counts only requests that passed the key and parameter checks, and
        ``by_status`` maps each status code, or ``"drop"``, to its count.
        """
        return self._running_server().counters.snapshot()

    def reset(self) -> None:
        """Clear the counts, as POST /_reset does, so faults restart from request 0."""
        self._running_server().counters.reset()

    def stop(self) -> None:
        """Stop serving, wake waiting handlers and close live connections. Safe to repeat.

        Requests that are waiting for latency or a slow fault get no response, because their
        connection is closed.
        """
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return

        httpd.stopping.set()
        httpd.shutdown()
        httpd.server_close()
        httpd.close_open_connections()
        thread.join(STOP_JOIN_TIMEOUT_S)
        self._httpd, self._thread = None, None
        logger.info("phrase API stopped")

    def _running_server(self) -> _PhraseApiHTTPServer:
        if self._httpd is None:
            raise RuntimeError("the phrase API server is not running, call start() first")
        return self._httpd

    def __enter__(self) -> PhraseApiServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _fraction_arg(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _non_negative_float_arg(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _non_negative_int_arg(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _port_arg(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"must be from 0 to {MAX_PORT}, got {text}")
    return value


def _script_arg(text: str) -> tuple[str, tuple[Step, ...]]:
    try:
        return parse_script(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stack.phrase_api",
        description=(
            "Serve a local stand-in for the Capitol Words phrase API with deterministic faults. "
            f"The expected API key is read from the environment variable {API_KEY_ENV_VAR}."
        ),
    )
    _add_server_options(parser)
    _add_fault_options(parser)
    return parser


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=DEFAULT_HOST, help="IPv4 address or host name to bind")
    parser.add_argument(
        "--port",
        type=_port_arg,
        default=DEFAULT_CLI_PORT,
        help="TCP port to bind, 0 picks a free one",
    )
    parser.add_argument("--base-path", default=DEFAULT_BASE_PATH, help="URL path prefix of the API")
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="log one line per API request to stderr (the API key is never logged)",
    )
    parser.add_argument(
        "--accept-missing-key",
        action="store_true",
        help=(
            "also accept phrase requests without an apikey parameter (a wrong key still "
            "gets 401), for clients that send none, such as the benchmark's baseline"
        ),
    )


def _add_fault_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault choice")
    parser.add_argument(
        "--latency-ms",
        type=_non_negative_float_arg,
        default=0.0,
        help="milliseconds added before every API response",
    )
    parser.add_argument(
        "--error-rate",
        type=_fraction_arg,
        default=0.0,
        help="fraction of phrase requests that get 500 or 503",
    )
    parser.add_argument(
        "--throttle-rate",
        type=_fraction_arg,
        default=0.0,
        help="fraction of phrase requests that get 429 with Retry-After",
    )
    parser.add_argument(
        "--retry-after",
        type=_non_negative_int_arg,
        default=DEFAULT_RETRY_AFTER_S,
        help="seconds sent in the Retry-After header of 429 responses",
    )
    parser.add_argument(
        "--slow-rate",
        type=_fraction_arg,
        default=0.0,
        help="fraction of phrase requests that wait --slow-seconds before the 200 response",
    )
    parser.add_argument(
        "--slow-seconds",
        type=_non_negative_float_arg,
        default=DEFAULT_SLOW_SECONDS,
        help="seconds a slow response waits before it is sent",
    )
    parser.add_argument(
        "--drop-rate",
        type=_fraction_arg,
        default=0.0,
        help="fraction of phrase requests whose connection is closed without a response",
    )
    parser.add_argument(
        "--script",
        type=_script_arg,
        action="append",
        default=[],
        metavar="PHRASE=STEP,...",
        help=(
            "exact steps for one phrase, repeatable. A step is an HTTP status, drop or slow, "
            "and the last step repeats (example: Narnia=503,429,200)."
        ),
    )


def _faults_from_args(args: argparse.Namespace) -> Faults:
    """Build Faults from parsed options. Raises ValueError on a conflict between options."""
    scripts: dict[str, tuple[Step, ...]] = {}
    for phrase, steps in args.script:
        if phrase in scripts:
            raise ValueError(f"phrase {phrase!r} has more than one --script")
        scripts[phrase] = steps

    return Faults(
        seed=args.seed,
        latency_ms=args.latency_ms,
        drop_rate=args.drop_rate,
        slow_rate=args.slow_rate,
        slow_seconds=args.slow_seconds,
        throttle_rate=args.throttle_rate,
        retry_after_s=args.retry_after,
        error_rate=args.error_rate,
        scripts=scripts,
    )


def _install_stop_handlers() -> threading.Event:
    """Install SIGTERM and SIGINT handlers that log the signal and set the returned event."""
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        logger.info("received %s, stopping", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop_requested


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server from the command line until SIGTERM or SIGINT and return the exit code.

    Exits 2 with a one-line message if INGEST_API_KEY is unset or an option is invalid, and
    1 if the port cannot be bound.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)

    api_key = os.environ.get(API_KEY_ENV_VAR, "")
    if not api_key:
        print(
            f"phrase-api: environment variable {API_KEY_ENV_VAR} is missing or empty. "
            "Set it to the API key that clients send as apikey.",
            file=sys.stderr,
        )
        return 2

    try:
        faults = _faults_from_args(args)
        server = PhraseApiServer(
            api_key,
            args.host,
            args.port,
            faults,
            base_path=args.base_path,
            access_log=args.access_log,
            accept_missing_key=args.accept_missing_key,
        )
    except ValueError as exc:
        parser.error(str(exc))

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop_requested = _install_stop_handlers()  # before the ready line, so no signal is missed
    try:
        server.start()
    except OSError as exc:
        address = f"{args.host}:{args.port}"
        print(
            f"phrase-api: failed to listen on {address}: {exc}. Choose another --port.",
            file=sys.stderr,
        )
        return 1

    print(f"phrase-api listening on {server.url}", flush=True)
    while not stop_requested.wait(SIGNAL_POLL_INTERVAL_S):
        pass

    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
