"""Tests for the phrase API stand-in, against real servers on 127.0.0.1.

Most tests run PhraseApiServer on a thread in this process. The CLI tests start
``python -m stack.phrase_api`` as a subprocess and read its ready line.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from stack.phrase_api import (
    API_KEY_ENV_VAR,
    DEFAULT_PER_PAGE,
    Faults,
    PhraseApiServer,
    choose_step,
    parse_script,
    phrase_results,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key-4f9c21"  # a made-up key that only these tests use
ENDPOINT = "/phrases/legislator.json"
READY_TIMEOUT_S = 10.0  # seconds a CLI server may take to print its ready line
EXIT_TIMEOUT_S = 5.0  # seconds a CLI server may take to exit after SIGTERM
CLIENT_TIMEOUT_S = 5.0  # seconds, the read timeout of requests that expect a response
BURST_SIZE = 50
BURST_LATENCY_MS = 200
BURST_MAX_SECONDS = 1.0


@pytest.fixture
def start_server() -> Iterator[Callable[..., PhraseApiServer]]:
    """Yield a function that starts an in-process server with the given Faults settings."""
    servers: list[PhraseApiServer] = []

    def start(**fault_settings: object) -> PhraseApiServer:
        server = PhraseApiServer(API_KEY, faults=Faults(**fault_settings)).start()  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield start

    for server in servers:
        server.stop()


def _get_phrase(
    base_url: str,
    phrase: str | None,
    *,
    key: str | None = API_KEY,
    timeout: float = CLIENT_TIMEOUT_S,
    session: requests.Session | None = None,
    **params: object,
) -> requests.Response:
    query = dict(params)
    if phrase is not None:
        query["phrase"] = phrase
    if key is not None:
        query["apikey"] = key

    client = session or requests
    return client.get(base_url + ENDPOINT, params=query, timeout=timeout)


def _root_url(server_url: str) -> str:
    parts = urlsplit(server_url)
    return f"{parts.scheme}://{parts.netloc}"


def _cli_environment(api_key: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(API_KEY_ENV_VAR, None)
    if api_key is not None:
        env[API_KEY_ENV_VAR] = api_key
    return env


def _start_cli(*options: str) -> tuple[subprocess.Popen[str], str]:
    """Start the CLI on a free port and return the process and the URL from its ready line."""
    process = subprocess.Popen(
        [sys.executable, "-m", "stack.phrase_api", "--port", "0", *options],
        cwd=REPO_ROOT,
        env=_cli_environment(API_KEY),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None

    readable, _, _ = select.select([process.stdout], [], [], READY_TIMEOUT_S)
    if not readable:
        process.kill()
        pytest.fail(f"the CLI printed no ready line within {READY_TIMEOUT_S} s")

    line = process.stdout.readline().strip()
    assert line.startswith("phrase-api listening on http://127.0.0.1:"), line
    return process, line.removeprefix("phrase-api listening on ")


def _stop_cli(process: subprocess.Popen[str]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


@pytest.fixture
def cli_server() -> Iterator[str]:
    """Yield the base URL of a CLI server with 200 ms latency and a script for Narnia."""
    process, url = _start_cli(
        "--latency-ms",
        str(BURST_LATENCY_MS),
        "--script",
        "Narnia=503,429,200",
        "--retry-after",
        "3",
    )
    yield url
    _stop_cli(process)


def _run_cli_to_exit(*options: str, api_key: str | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stack.phrase_api", "--port", "0", *options],
        cwd=REPO_ROOT,
        env=_cli_environment(api_key),
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT_S,
    )


def test_results_same_bytes_per_phrase(start_server: Callable[..., PhraseApiServer]) -> None:
    first_server = start_server()
    second_server = start_server()

    first = _get_phrase(first_server.url, "health care")
    again = _get_phrase(first_server.url, "health care")
    elsewhere = _get_phrase(second_server.url, "health care")
    other = _get_phrase(first_server.url, "tax relief")

    assert first.status_code == 200
    assert first.headers["Content-Type"] == "application/json; charset=utf-8"
    assert first.content == again.content
    assert first.content == elsewhere.content
    assert first.content != other.content
    assert first.json() == {"results": phrase_results("health care")}


def test_results_entry_shape(start_server: Callable[..., PhraseApiServer]) -> None:
    server = start_server()

    results = _get_phrase(server.url, "appropriations").json()["results"]

    assert results
    for entry in results:
        assert set(entry) == {"legislator", "count"}
        assert set(entry["legislator"]) == {"name", "bioguide_id", "party", "state", "chamber"}
        assert isinstance(entry["count"], int)
        assert entry["count"] >= 1
    counts = [entry["count"] for entry in results]
    assert counts == sorted(counts, reverse=True)


def test_per_page_limits_results(start_server: Callable[..., PhraseApiServer]) -> None:
    server = start_server()
    phrase = next(
        p for p in (f"budget {i}" for i in range(100)) if len(phrase_results(p, 200)) > 60
    )

    default = _get_phrase(server.url, phrase).json()["results"]
    three = _get_phrase(server.url, phrase, per_page=3).json()["results"]
    large = _get_phrase(server.url, phrase, per_page=1000).json()["results"]

    assert len(default) == DEFAULT_PER_PAGE
    assert len(three) == 3
    assert three == default[:3]
    assert len(large) == len(phrase_results(phrase, 200))


@pytest.mark.parametrize("per_page", ["0", "-1", "abc", "1.5", "9" * 20])
def test_per_page_invalid_400(start_server: Callable[..., PhraseApiServer], per_page: str) -> None:
    server = start_server()

    response = _get_phrase(server.url, "budget", per_page=per_page)

    assert response.status_code == 400
    assert "per_page" in response.json()["error"]


def test_dates_validated(start_server: Callable[..., PhraseApiServer]) -> None:
    server = start_server()

    good = _get_phrase(server.url, "budget", start_date="2010-01-01", end_date="2010-12-31")
    bad_format = _get_phrase(server.url, "budget", start_date="01/01/2010")
    reversed_range = _get_phrase(
        server.url, "budget", start_date="2011-01-01", end_date="2010-01-01"
    )

    assert good.status_code == 200
    assert good.content == _get_phrase(server.url, "budget").content
    assert bad_format.status_code == 400
    assert "start_date" in bad_format.json()["error"]
    assert reversed_range.status_code == 400


@pytest.mark.parametrize("key", ["wrong-key-123", "", None, API_KEY + "x", API_KEY[:-1]])
def test_bad_key_401_without_echo(
    start_server: Callable[..., PhraseApiServer], key: str | None
) -> None:
    server = start_server()

    response = _get_phrase(server.url, "budget", key=key)

    assert response.status_code == 401
    assert "error" in response.json()
    assert API_KEY not in response.text
    if key:
        assert key not in response.text


def test_duplicate_key_param_401(start_server: Callable[..., PhraseApiServer]) -> None:
    server = start_server()

    url = f"{server.url}{ENDPOINT}?phrase=budget&apikey={API_KEY}&apikey=other"
    response = requests.get(url, timeout=CLIENT_TIMEOUT_S)

    assert response.status_code == 401


@pytest.mark.parametrize("phrase", [None, ""])
def test_missing_phrase_400(
    start_server: Callable[..., PhraseApiServer], phrase: str | None
) -> None:
    server = start_server()

    response = _get_phrase(server.url, phrase)

    assert response.status_code == 400
    assert "phrase" in response.json()["error"]


@pytest.mark.parametrize(
    "path", ["/api/1/phrases/other.json", "/api/2" + ENDPOINT, "/", "/api/1/../x"]
)
def test_unknown_path_404(start_server: Callable[..., PhraseApiServer], path: str) -> None:
    server = start_server()

    response = requests.get(
        _root_url(server.url) + path, params={"apikey": API_KEY}, timeout=CLIENT_TIMEOUT_S
    )

    assert response.status_code == 404
    assert "error" in response.json()


def test_wrong_method_405(start_server: Callable[..., PhraseApiServer]) -> None:
    server = start_server()

    post_phrase = requests.post(server.url + ENDPOINT, timeout=CLIENT_TIMEOUT_S)
    get_reset = requests.get(_root_url(server.url) + "/_reset", timeout=CLIENT_TIMEOUT_S)

    assert post_phrase.status_code == 405
    assert post_phrase.headers["Allow"] == "GET"
    assert get_reset.status_code == 405
    assert get_reset.headers["Allow"] == "POST"


def test_script_sequence_then_last(start_server: Callable[..., PhraseApiServer]) -> None:
    server = start_server(scripts={"Narnia": (503, 429, 200), "Atlantis": (404,)})

    narnia = [_get_phrase(server.url, "Narnia") for _ in range(5)]
    atlantis = [_get_phrase(server.url, "Atlantis").status_code for _ in range(3)]

    assert [response.status_code for response in narnia] == [503, 429, 200, 200, 200]
    assert narnia[1].headers["Retry-After"] == "1"
    assert "Retry-After" not in narnia[0].headers
    assert narnia[2].content == narnia[4].content
    assert atlantis == [404, 404, 404]


def test_script_drop_and_slow(start_server: Callable[..., PhraseApiServer]) -> None:
    server = start_server(slow_seconds=0.3, scripts={"Oz": ("drop", "slow", 200)})

    with pytest.raises(requests.exceptions.ConnectionError):
        _get_phrase(server.url, "Oz")
    started = time.monotonic()
    slow = _get_phrase(server.url, "Oz")
    slow_seconds = time.monotonic() - started

    assert slow.status_code == 200
    assert slow_seconds >= 0.3
    assert _get_phrase(server.url, "Oz").status_code == 200


def test_script_ignores_rates(start_server: Callable[..., PhraseApiServer]) -> None:
    server = start_server(error_rate=1.0, scripts={"Narnia": (200,)})

    assert _get_phrase(server.url, "Narnia").status_code == 200
    assert _get_phrase(server.url, "Lilliput").status_code in (500, 503)


def test_cli_script_sequence(cli_server: str) -> None:
    statuses = []
    retry_after = None
    for _ in range(4):
        response = _get_phrase(cli_server, "Narnia")
        statuses.append(response.status_code)
        retry_after = response.headers.get("Retry-After", retry_after)

    assert statuses == [503, 429, 200, 200]
    assert retry_after == "3"


def test_error_rate_roughly_honoured(start_server: Callable[..., PhraseApiServer]) -> None:
    server = start_server(error_rate=0.2)
    session = requests.Session()

    statuses = [
        _get_phrase(server.url, f"phrase {i}", session=session).status_code for i in range(400)
    ]

    errors = [status for status in statuses if status in (500, 503)]
    assert set(statuses) <= {200, 500, 503}
    assert 0.12 <= len(errors) / len(statuses) <= 0.28
    assert 500 in errors
    assert 503 in errors


def test_fault_choice_reproducible(start_server: Callable[..., PhraseApiServer]) -> None:
    settings = {"error_rate": 0.2, "throttle_rate": 0.2}
    phrases = [f"phrase {i % 20}" for i in range(60)]  # three requests per phrase

    runs = []
    for seed in (0, 0, 1):
        server = start_server(seed=seed, **settings)
        runs.append([_get_phrase(server.url, phrase).status_code for phrase in phrases])
    server.reset()
    after_reset = [_get_phrase(server.url, phrase).status_code for phrase in phrases]

    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert after_reset == runs[2]
    expected = [choose_step(Faults(**settings), p, i // 20) for i, p in enumerate(phrases)]  # type: ignore[arg-type]
    assert runs[0] == expected


def test_throttle_sends_retry_after(start_server: Callable[..., PhraseApiServer]) -> None:
    server = start_server(throttle_rate=1.0, retry_after_s=7)

    response = _get_phrase(server.url, "budget")

    assert response.status_code == 429
    assert response.headers["Retry-After"] == "7"


def test_drop_gives_connection_error(start_server: Callable[..., PhraseApiServer]) -> None:
    server = start_server(drop_rate=1.0)

    with pytest.raises(requests.exceptions.ConnectionError):
        _get_phrase(server.url, "budget")

    assert server.stats()["by_status"] == {"drop": 1}


def test_slow_exceeds_client_timeout(start_server: Callable[..., PhraseApiServer]) -> None:
    server = start_server(slow_rate=1.0, slow_seconds=2)

    started = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        _get_phrase(server.url, "budget", timeout=0.5)
    waited = time.monotonic() - started

    assert waited < 1.5
    stop_started = time.monotonic()
    server.stop()
    assert time.monotonic() - stop_started < 1.0


def test_latency_added(start_server: Callable[..., PhraseApiServer]) -> None:
    server = start_server(latency_ms=150)

    started = time.monotonic()
    response = _get_phrase(server.url, "budget")
    elapsed = time.monotonic() - started

    assert response.status_code == 200
    assert elapsed >= 0.15


def test_stats_counts_and_reset(start_server: Callable[..., PhraseApiServer]) -> None:
    server = start_server(scripts={"Narnia": (503, 200)})
    stats_url = _root_url(server.url) + "/_stats"
    for phrase in ("budget", "budget", "budget", "Narnia", "Narnia"):
        _get_phrase(server.url, phrase)
    _get_phrase(server.url, "budget", key="wrong")

    stats = requests.get(stats_url, timeout=CLIENT_TIMEOUT_S).json()
    reset = requests.post(_root_url(server.url) + "/_reset", timeout=CLIENT_TIMEOUT_S)
    after_reset = requests.get(stats_url, timeout=CLIENT_TIMEOUT_S).json()

    assert stats["requests"] == 6
    assert stats["by_phrase"] == {"budget": 3, "Narnia": 2}
    assert stats["by_status"] == {"200": 4, "401": 1, "503": 1}
    assert reset.status_code == 200
    assert after_reset == {"requests": 0, "by_phrase": {}, "by_status": {}}
    assert _get_phrase(server.url, "Narnia").status_code == 503


@pytest.mark.parametrize(
    "phrase",
    [
        "café au lait",
        "😀 emoji 🇺🇸",
        "../../etc/passwd",
        "a&b=c#d",
        "100% ?x=y",
        "  spaced  ",
        "'; --",
    ],
)
def test_unusual_phrases_get_200(start_server: Callable[..., PhraseApiServer], phrase: str) -> None:
    server = start_server()

    first = _get_phrase(server.url, phrase)
    second = _get_phrase(server.url, phrase)

    assert first.status_code == 200
    assert first.content == second.content
    assert first.json() == {"results": phrase_results(phrase)}
    assert server.stats()["by_phrase"] == {phrase: 2}


def test_keep_alive_reuses_connection(start_server: Callable[..., PhraseApiServer]) -> None:
    server = start_server()
    parts = urlsplit(server.url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=CLIENT_TIMEOUT_S)
    path = f"{parts.path}{ENDPOINT}?phrase=budget&apikey={API_KEY}"

    connection.request("GET", path)
    first = connection.getresponse()
    first_body = first.read()
    first_socket = connection.sock
    connection.request("GET", path)
    second = connection.getresponse()
    second_body = second.read()
    connection.close()

    assert first.status == 200
    assert second.status == 200
    assert first_socket is not None
    assert connection.sock is None  # closed by us, not by the server
    assert first_body == second_body
    assert int(first.headers["Content-Length"]) == len(first_body)


def test_malformed_request_json_error(start_server: Callable[..., PhraseApiServer]) -> None:
    server = start_server()
    parts = urlsplit(server.url)

    with socket.create_connection((parts.hostname, parts.port), timeout=CLIENT_TIMEOUT_S) as sock:
        sock.sendall(f"GET /api/1{ENDPOINT}?apikey={API_KEY} extra HTTP/1.1\r\n\r\n".encode())
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk

    assert reply.startswith(b"HTTP/1.1 400")
    assert API_KEY.encode() not in reply
    assert b'{"error":' in reply


def test_logs_never_contain_key(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="stack.phrase_api")
    server = PhraseApiServer(API_KEY, access_log=True).start()
    parts = urlsplit(server.url)
    try:
        _get_phrase(server.url, "budget")
        _get_phrase(server.url, "budget", key="wrong-key-123")
        with socket.create_connection(
            (parts.hostname, parts.port), timeout=CLIENT_TIMEOUT_S
        ) as sock:
            sock.sendall(f"GET /api/1{ENDPOINT}?apikey={API_KEY} extra HTTP/1.1\r\n\r\n".encode())
            sock.recv(4096)
    finally:
        server.stop()

    assert "-> 200" in caplog.text
    assert API_KEY not in caplog.text
    assert "wrong-key-123" not in caplog.text


def test_cli_burst_with_latency(cli_server: str) -> None:
    _get_phrase(cli_server, "warm-up")
    barrier = threading.Barrier(BURST_SIZE + 1)
    statuses: list[int] = []
    lock = threading.Lock()

    def fetch(index: int) -> None:
        barrier.wait()
        status = _get_phrase(cli_server, f"burst {index}").status_code
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(BURST_SIZE)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.monotonic()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started

    assert statuses == [200] * BURST_SIZE
    assert elapsed < BURST_MAX_SECONDS, f"{BURST_SIZE} requests took {elapsed:.2f} s"


def test_cli_sigterm_exits_zero() -> None:
    process, url = _start_cli()

    response = _get_phrase(url, "budget")
    return_code = _stop_cli(process)

    assert response.status_code == 200
    assert return_code == 0


def test_cli_without_key_exits() -> None:
    result = _run_cli_to_exit(api_key=None)

    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert API_KEY_ENV_VAR in result.stderr


@pytest.mark.parametrize(
    "options",
    [
        ("--error-rate", "0.6", "--throttle-rate", "0.5"),
        ("--drop-rate", "1.5"),
        ("--script", "Narnia=503,teapot"),
        ("--script", "Narnia=302"),
        ("--script", "A=503", "--script", "A=200"),
    ],
)
def test_cli_invalid_options_exit(options: tuple[str, ...]) -> None:
    result = _run_cli_to_exit(*options, api_key=API_KEY)

    assert result.returncode == 2
    assert result.stdout == ""
    assert "error:" in result.stderr
    assert API_KEY not in result.stderr


def test_faults_rejects_rate_sum() -> None:
    with pytest.raises(ValueError, match="at most 1"):
        Faults(drop_rate=0.5, slow_rate=0.3, error_rate=0.3)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Narnia=503,429,200", ("Narnia", (503, 429, 200))),
        ("a=b=drop, slow", ("a=b", ("drop", "slow"))),
        ("Atlantis=404", ("Atlantis", (404,))),
    ],
)
def test_parse_script_valid(text: str, expected: tuple[str, tuple[object, ...]]) -> None:
    assert parse_script(text) == expected


@pytest.mark.parametrize(
    "text", ["Narnia", "=503", "Narnia=", "Narnia=100", "Narnia=301", "Narnia=x"]
)
def test_parse_script_invalid(text: str) -> None:
    with pytest.raises(ValueError):
        parse_script(text)


def test_stats_json_is_valid(start_server: Callable[..., PhraseApiServer]) -> None:
    server = start_server()
    _get_phrase(server.url, "😀")

    raw = requests.get(_root_url(server.url) + "/_stats", timeout=CLIENT_TIMEOUT_S).content

    assert json.loads(raw.decode("utf-8"))["by_phrase"] == {"😀": 1}
