"""Settings: defaults, .env, and one clear line for each missing or malformed value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stack.processes import ROOT
from tasks.errors import SettingError
from tasks.fetch import retry_countdown
from tasks.settings import SQS_MAX_DELAY_S, load_settings

NO_ENV_FILE = Path("/nonexistent/.env")


def test_defaults_use_real_aws() -> None:
    settings = load_settings({}, NO_ENV_FILE)

    assert settings.sqs_endpoint == ""
    assert not settings.uses_local_endpoint
    assert settings.queue_name == "phrases"
    assert settings.api_key == ""


def test_env_file_read_and_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("INGEST_QUEUE=from-file\nINGEST_RATE_LIMIT=5/s\n")

    settings = load_settings({"INGEST_QUEUE": "from-env"}, env_file)

    assert settings.queue_name == "from-env"
    assert settings.rate_limit == "5/s"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("INGEST_VISIBILITY_TIMEOUT_S", "abc", "whole seconds from 60 to 43200"),
        ("INGEST_VISIBILITY_TIMEOUT_S", "10", "whole seconds from 60 to 43200"),
        ("INGEST_SQS_ENDPOINT", "localhost:9324", "an http(s) URL"),
        ("INGEST_RATE_LIMIT", "ten per second", "a rate above 0 such as 10/s"),
        ("INGEST_RATE_LIMIT", "0/s", "a rate above 0 such as 10/s"),
        ("INGEST_RATE_LIMIT", "0.0/m", "a rate above 0 such as 10/s"),
        ("INGEST_QUEUE", "bad name!", "1-80 letters, digits"),
        ("INGEST_EVENTS", "maybe", "on or off"),
        ("INGEST_START_DATE", "2020/01/01", "a date YYYY-MM-DD"),
        ("INGEST_POLL_WAIT_S", "30", "whole seconds from 0 to 20"),
        ("INGEST_START_DATE", "2021-02-30", "a date YYYY-MM-DD"),
        ("INGEST_STORE_DIR", "", "a directory path"),
    ],
)
def test_malformed_value_named(name: str, value: str, expected: str) -> None:
    with pytest.raises(SettingError) as raised:
        load_settings({name: value}, NO_ENV_FILE)

    message = str(raised.value)
    assert message.startswith(f"{name}={value!r} is invalid")
    assert expected in message


def test_backoff_must_fit_visibility_timeout() -> None:
    environ = {"INGEST_VISIBILITY_TIMEOUT_S": "60", "INGEST_RETRY_BACKOFF_MAX_S": "45"}

    with pytest.raises(SettingError) as raised:
        load_settings(environ, NO_ENV_FILE)

    assert "INGEST_RETRY_BACKOFF_MAX_S=45 is invalid: expected at most 30 s" in str(raised.value)


def test_key_value_never_in_error() -> None:
    settings = load_settings({"INGEST_API_KEY": "sekrit-value"}, NO_ENV_FILE)

    assert "sekrit-value" not in repr(settings)


def test_retry_countdown_capped_below_visibility() -> None:
    for retries in range(12):
        assert retry_countdown(retries, retry_after_s=None) <= SQS_MAX_DELAY_S
    assert retry_countdown(0, retry_after_s=5000) <= SQS_MAX_DELAY_S


def test_worker_without_key_stops_with_one_line() -> None:
    environ = {"PATH": "/usr/bin:/bin", "INGEST_API_KEY": ""}

    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--loglevel=INFO"],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert "error: INGEST_API_KEY is missing" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_setting_stops_enqueue_with_one_line() -> None:
    environ = {"PATH": "/usr/bin:/bin", "INGEST_VISIBILITY_TIMEOUT_S": "soon"}

    result = subprocess.run(
        [sys.executable, "enqueue.py", "--dry-run"],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: INGEST_VISIBILITY_TIMEOUT_S='soon' is invalid: expected whole seconds from 60 to 43200"
    )
