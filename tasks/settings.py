"""Deployment settings, read once from the environment (and an optional `.env`).

Every value that differs between a laptop demo and a production run lives here,
under one `INGEST_*` variable each. `load_settings()` checks them all and raises
`SettingError` naming the variable, the bad value and what is expected, so a
program stops at start with one readable line instead of failing later.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Callable, Mapping, TypeVar
from urllib.parse import urlsplit

from dotenv import dotenv_values

from tasks.errors import SettingError

T = TypeVar("T")

#: SQS refuses a visibility timeout above 12 hours (43,200 s).
SQS_MAX_VISIBILITY_TIMEOUT_S = 43_200

#: SQS refuses a message delay above 15 minutes (900 s).
SQS_MAX_DELAY_S = 900

#: Seconds kept between the longest retry countdown and the visibility timeout, so that a
#: message waiting for its retry is never handed to a second worker before it runs.
VISIBILITY_MARGIN_S = 30

_RATE_LIMIT = re.compile(r"^\d+(\.\d+)?/[smh]$")


@dataclass(frozen=True)
class Settings:
    """All deployment settings; see README "Settings" for each variable."""

    #: SQS endpoint URL; empty means real AWS SQS, found the standard boto3 way.
    sqs_endpoint: str = ""
    sqs_region: str = "us-east-1"
    queue_name: str = "phrases"
    #: Seconds a received message stays hidden from other workers; also the limit of
    #: every retry countdown (see `max_countdown_s`).
    visibility_timeout_s: int = 300
    #: Receives before SQS moves a message to the dead-letter queue; 0 turns redrive off.
    max_receives: int = 5
    #: SQS long-poll wait in seconds (0..20).
    poll_wait_s: int = 10
    #: True publishes task events (for Flower) through SNS fan-out.
    events: bool = True

    api_url: str = "http://127.0.0.1:8080/api/1"
    api_key: str = field(default="", repr=False)
    per_page: int = 50
    start_date: str = ""
    end_date: str = ""
    connect_timeout_s: float = 3.05
    read_timeout_s: float = 10.0

    #: Celery rate limit for each worker node, such as "10/s"; empty means none.
    rate_limit: str = ""
    max_retries: int = 5
    #: First retry delay in seconds; each later retry doubles it, up to `retry_backoff_max_s`.
    retry_backoff_s: float = 1.0
    retry_backoff_max_s: float = 120.0

    store_dir: Path = Path("var/store")
    #: Where enqueue.py keeps one journal file per run.
    runs_dir: Path = Path("var/runs")

    @property
    def max_countdown_s(self) -> float:
        """Return the longest retry delay that still runs before the message reappears."""
        return min(self.visibility_timeout_s - VISIBILITY_MARGIN_S, SQS_MAX_DELAY_S)

    def require_api_key(self) -> None:
        """Raise `SettingError` unless an API key is set; workers need one, enqueue.py does not."""
        if not self.api_key:
            raise SettingError(
                "INGEST_API_KEY is missing: expected the phrase API key in the environment or .env"
            )

    @property
    def uses_local_endpoint(self) -> bool:
        return bool(self.sqs_endpoint)


@functools.cache
def get_settings() -> Settings:
    """Return this process's settings, read on first use (see `load_settings`)."""
    return load_settings()


def load_settings(
    environ: Mapping[str, str] | None = None, env_file: Path = Path(".env")
) -> Settings:
    """Read and check every `INGEST_*` setting.

    Values in `environ` (default: the process environment) win over those in `env_file`.
    Raises `SettingError` for the first missing or malformed setting.
    """
    values = {key: value for key, value in dotenv_values(env_file).items() if value is not None}
    values.update(os.environ if environ is None else environ)
    reader = _Reader(values)
    defaults = Settings()

    settings = Settings(
        sqs_endpoint=reader.get(
            "INGEST_SQS_ENDPOINT",
            defaults.sqs_endpoint,
            _url_or_empty,
            "an http(s) URL, or empty for AWS",
        ),
        sqs_region=reader.get(
            "INGEST_SQS_REGION", defaults.sqs_region, _nonempty, "an AWS region such as us-east-1"
        ),
        queue_name=reader.get(
            "INGEST_QUEUE", defaults.queue_name, _queue_name, "1-80 letters, digits, - or _"
        ),
        visibility_timeout_s=reader.get(
            "INGEST_VISIBILITY_TIMEOUT_S",
            defaults.visibility_timeout_s,
            _int_range(60, SQS_MAX_VISIBILITY_TIMEOUT_S),
            "whole seconds from 60 to 43200",
        ),
        max_receives=reader.get(
            "INGEST_MAX_RECEIVES",
            defaults.max_receives,
            _int_range(0, 1000),
            "a whole number from 0 (no dead-letter queue) to 1000",
        ),
        poll_wait_s=reader.get(
            "INGEST_POLL_WAIT_S",
            defaults.poll_wait_s,
            _int_range(0, 20),
            "whole seconds from 0 to 20",
        ),
        events=reader.get("INGEST_EVENTS", defaults.events, _boolean, "on or off"),
        api_url=reader.get(
            "INGEST_API_URL",
            defaults.api_url,
            _url,
            "an http(s) URL such as http://127.0.0.1:8080/api/1",
        ),
        api_key=reader.get("INGEST_API_KEY", "", str, "the phrase API key", secret=True),
        per_page=reader.get(
            "INGEST_PER_PAGE",
            defaults.per_page,
            _int_range(1, 10_000),
            "a whole number from 1 to 10000",
        ),
        start_date=reader.get(
            "INGEST_START_DATE", defaults.start_date, _date_or_empty, "a date YYYY-MM-DD, or empty"
        ),
        end_date=reader.get(
            "INGEST_END_DATE", defaults.end_date, _date_or_empty, "a date YYYY-MM-DD, or empty"
        ),
        connect_timeout_s=reader.get(
            "INGEST_CONNECT_TIMEOUT_S",
            defaults.connect_timeout_s,
            _float_range(0.1, 120),
            "seconds from 0.1 to 120",
        ),
        read_timeout_s=reader.get(
            "INGEST_READ_TIMEOUT_S",
            defaults.read_timeout_s,
            _float_range(0.1, 600),
            "seconds from 0.1 to 600",
        ),
        rate_limit=reader.get(
            "INGEST_RATE_LIMIT",
            defaults.rate_limit,
            _rate_limit,
            "a rate above 0 such as 10/s, 600/m or 36000/h, or empty for none",
        ),
        max_retries=reader.get(
            "INGEST_MAX_RETRIES",
            defaults.max_retries,
            _int_range(0, 100),
            "a whole number from 0 to 100",
        ),
        retry_backoff_s=reader.get(
            "INGEST_RETRY_BACKOFF_S",
            defaults.retry_backoff_s,
            _float_range(0, 900),
            "seconds from 0 to 900",
        ),
        retry_backoff_max_s=reader.get(
            "INGEST_RETRY_BACKOFF_MAX_S",
            defaults.retry_backoff_max_s,
            _float_range(0, 900),
            "seconds from 0 to 900",
        ),
        store_dir=reader.get("INGEST_STORE_DIR", defaults.store_dir, _path, "a directory path"),
        runs_dir=reader.get("INGEST_RUNS_DIR", defaults.runs_dir, _path, "a directory path"),
    )
    _check_retry_window(settings)
    _check_date_range(settings)
    return settings


def _check_date_range(settings: Settings) -> None:
    if settings.start_date and settings.end_date and settings.start_date > settings.end_date:
        raise SettingError(
            f"INGEST_START_DATE={settings.start_date} is invalid: expected a date on or before "
            f"INGEST_END_DATE={settings.end_date}"
        )


def _check_retry_window(settings: Settings) -> None:
    """Keep every retry countdown shorter than the visibility timeout.

    NOTE: on SQS a message that waits for its retry longer than the visibility timeout
    reappears and runs a second time, so the longest backoff must fit inside it.
    """
    if settings.retry_backoff_max_s > settings.max_countdown_s:
        raise SettingError(
            f"INGEST_RETRY_BACKOFF_MAX_S={settings.retry_backoff_max_s:g} is invalid: expected at most "
            f"{settings.max_countdown_s:g} s (INGEST_VISIBILITY_TIMEOUT_S={settings.visibility_timeout_s} minus "
            f"{VISIBILITY_MARGIN_S} s, and never above SQS's {SQS_MAX_DELAY_S} s delay limit)"
        )


class _Reader:
    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = values

    def get(
        self,
        name: str,
        default: T | None,
        parse: Callable[[str], T],
        expected: str,
        secret: bool = False,
    ) -> T:
        raw = self._values.get(name)
        if raw is None:
            if default is None:
                raise SettingError(f"{name} is missing: expected {expected}")
            return default

        try:
            return parse(raw.strip())
        except ValueError:
            shown = "(hidden)" if secret else repr(raw)
            raise SettingError(f"{name}={shown} is invalid: expected {expected}") from None


def _nonempty(value: str) -> str:
    if not value:
        raise ValueError(value)
    return value


def _url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(value)
    return value.rstrip("/")


def _url_or_empty(value: str) -> str:
    return _url(value) if value else ""


def _queue_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,80}", value):
        raise ValueError(value)
    return value


def _int_range(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        number = int(value)
        if not low <= number <= high:
            raise ValueError(value)
        return number

    return parse


def _float_range(low: float, high: float) -> Callable[[str], float]:
    def parse(value: str) -> float:
        number = float(value)
        if not low <= number <= high:
            raise ValueError(value)
        return number

    return parse


def _boolean(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "on", "true", "yes"):
        return True
    if lowered in ("0", "off", "false", "no"):
        return False
    raise ValueError(value)


def _date_or_empty(value: str) -> str:
    if value and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        raise ValueError(value)
    if value:
        date.fromisoformat(value)
    return value


def _path(value: str) -> Path:
    return Path(_nonempty(value))


def _rate_limit(value: str) -> str:
    if value and not _RATE_LIMIT.fullmatch(value):
        raise ValueError(value)
    if value and float(value.partition("/")[0]) <= 0:
        raise ValueError(value)  # Celery reads a rate of 0 as no limit at all
    return value
