"""Helpers for the reliability trials: a stack whose SQS traffic goes through a TCP proxy,
worker-log parsing, and the end-of-run invariant that every trial checks.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import requests

from stack.processes import ROOT, LocalStack
from stack.tcp_proxy import TcpProxy

COUNTRIES = ROOT / "data" / "countries.csv"

#: Seconds a trial waits for the queue to drain after its last disturbance.
DRAIN_TIMEOUT_S = 240.0

#: Seconds one `enqueue.py` or `python -m tasks.store` run may take.
COMMAND_TIMEOUT_S = 300.0

#: Depth of base64 inside base64 decoded when scanning SQS traffic. An SQS body is base64
#: of kombu's JSON envelope, whose task body is base64 again.
BASE64_DEPTH = 3

#: Shortest run of base64 characters worth decoding when scanning SQS traffic.
BASE64_MIN_CHARS = 16

_BASE64_RUN = re.compile(rb"[A-Za-z0-9+/]{%d,}={0,2}" % BASE64_MIN_CHARS)

# One task log line: "fetch_phrase[<task id>]: <file>:<line>: <message>".
_TASK_LINE = re.compile(
    r"^\[(?P<at>[\d-]+ [\d:,]+): \w+/[\w-]+\] fetch_phrase\[(?P<task>[0-9a-f-]+)\]: "
    r"(?P<file>.+):(?P<line>\d+): (?P<message>.*)$"
)


@dataclass
class Trial:
    """A local stack whose workers and enqueue.py reach SQS through `proxy`."""

    stack: LocalStack
    proxy: TcpProxy
    data_dir: Path
    store_dir: Path
    runs_dir: Path
    capture_dir: Path
    #: Outputs of enqueue.py runs, scanned for the API key by `check_invariant`.
    outputs: list[str] = field(default_factory=list)

    def set(self, **settings: str) -> None:
        """Set INGEST_* settings for the processes started after this call."""
        self.stack.settings.update(settings)

    def start_worker(self, name: str, concurrency: int = 4) -> subprocess.Popen:
        return self.stack.start_worker(name, concurrency)

    def enqueue(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `python enqueue.py ARGS`, or `python enqueue.py DATA_DIR` without ARGS."""
        command = [sys.executable, "enqueue.py", *(args or (str(self.data_dir),))]
        result = subprocess.run(
            command,
            cwd=ROOT,
            env=self.stack.env(),
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
        self.outputs.append(result.stdout + result.stderr)
        return result

    def start_enqueue(self) -> subprocess.Popen[str]:
        """Start `python enqueue.py DATA_DIR` in the background; read it with `communicate`."""
        return subprocess.Popen(
            [sys.executable, "enqueue.py", str(self.data_dir)],
            cwd=ROOT,
            env=self.stack.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def queue_url(self, dead_letter: bool = False) -> str:
        name = self.stack.settings["INGEST_QUEUE"] + ("-dead-letter" if dead_letter else "")
        return self.stack.sqs_client().get_queue_url(QueueName=name)["QueueUrl"]

    def queue_size(self, dead_letter: bool = False) -> int:
        """Return the waiting plus in-flight plus delayed messages, read past the proxy."""
        names = [
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed",
        ]
        found = self.stack.sqs_client().get_queue_attributes(
            QueueUrl=self.queue_url(dead_letter), AttributeNames=names
        )["Attributes"]
        return sum(int(found.get(name, 0)) for name in names)

    def send_raw(self, body: str) -> None:
        """Send one message body to the task queue as it is, past the proxy."""
        self.stack.sqs_client().send_message(QueueUrl=self.queue_url(), MessageBody=body)

    def ensure_queues(self) -> None:
        """Create the task queue and its dead-letter queue as enqueue.py does."""
        script = (
            "from tasks.application import settings\n"
            "from tasks.queues import ensure_queues\n"
            "ensure_queues(settings)\n"
        )
        subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            env=self.stack.env(),
            check=True,
            timeout=COMMAND_TIMEOUT_S,
        )

    def api_calls(self) -> dict[str, int]:
        """Return the stand-in's count of phrase requests by phrase (GET /_stats by_phrase)."""
        url = f"http://127.0.0.1:{self.stack.api_port}/_stats"
        return requests.get(url, timeout=5).json()["by_phrase"]

    def stored_count(self) -> int:
        results = self.store_dir / "results"
        return sum(1 for _ in results.rglob("*.json")) if results.is_dir() else 0

    def verify(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tasks.store", "verify"],
            cwd=ROOT,
            env=self.stack.env(),
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )

    def wait_until_drained(self, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        self.stack.wait_until_drained(timeout_s=timeout_s)


def copy_countries(data_dir: Path) -> Path:
    """Copy data/countries.csv (197 rows) into `data_dir`; return the copy."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(COUNTRIES, data_dir / "countries.csv"))


def write_generated(data_dir: Path, rows: int) -> Path:
    """Write a one-column CSV of `rows` distinct phrases into `data_dir`; return its path."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "generated.csv"
    path.write_text("phrase\n" + "".join(f"generated phrase {n:05d}\n" for n in range(rows)))
    return path


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll `condition` every 0.2 s; return the seconds it took, or fail naming `what`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)
    return time.monotonic() - started


def kill_group(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send `sig` to the process group of `process` (the worker and its pool children)."""
    os.killpg(process.pid, sig)


# -- Worker logs. --


@dataclass(frozen=True)
class TaskLine:
    """One `fetch_phrase` log line of a worker."""

    at: datetime
    worker: str
    task_id: str
    row: tuple[str, int]
    message: str

    @property
    def is_execution(self) -> bool:
        """True for the one line every execution of the task logs first."""
        return self.message.startswith(("start, attempt", "already stored, nothing to fetch"))

    @property
    def is_store(self) -> bool:
        return self.message.startswith("stored ")

    @property
    def is_duplicate(self) -> bool:
        """True when this execution found the row already stored and stored nothing."""
        return self.message.startswith("already stored")


def task_lines(log_dir: Path) -> list[TaskLine]:
    """Return every `fetch_phrase` line of every worker log in `log_dir`, in time order."""
    lines = []
    for path in sorted(log_dir.glob("*.log")):
        for text in path.read_text(errors="replace").splitlines():
            match = _TASK_LINE.match(text)
            if match is None:
                continue
            lines.append(
                TaskLine(
                    at=datetime.strptime(match["at"], "%Y-%m-%d %H:%M:%S,%f"),
                    worker=path.stem,
                    task_id=match["task"],
                    row=(match["file"], int(match["line"])),
                    message=match["message"],
                )
            )
    return sorted(lines, key=lambda line: line.at)


def in_flight(lines: Iterable[TaskLine], worker: str) -> set[str]:
    """Return the task ids `worker` started and logged no end for."""
    started: set[str] = set()
    for line in lines:
        if line.worker != worker:
            continue
        if line.message.startswith("start, attempt"):
            started.add(line.task_id)
        else:
            started.discard(line.task_id)
    return started


# -- The invariant. --


@dataclass
class Figures:
    """The figures a trial measured, for its report line."""

    rows: int
    stored: int
    open_failures: int
    executions: int
    duplicate_deliveries: int
    max_executions_per_row: int


def row_phrases(data_dir: Path) -> dict[tuple[str, int], str]:
    """Return the phrase of every good row of every CSV in `data_dir` by (file, line).

    The rows are read with enqueue.py's reader, so (file, line) is what workers log and store.
    """
    from tasks.rows import ReadOptions, Row, find_input_files, read_rows

    files, _ = find_input_files(data_dir)
    phrases = {}
    for path in files:
        for item in read_rows(path, ReadOptions()):
            if isinstance(item, Row):
                phrases[(item.file, item.line)] = item.phrase
    return phrases


def ledger_entries(store_dir: Path) -> list[dict[str, Any]]:
    path = store_dir / "failures.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def ledger_entry_id(entry: dict[str, Any]) -> str:
    """Return the id under which `enqueue.py --retry-failed` records a ledger entry as sent."""
    return f"{entry.get('at')} {entry.get('task_id')} {entry.get('file')}:{entry.get('line')}"


def resent_ledger_ids(runs_dir: Path) -> set[str]:
    """Return the ledger entry ids that `enqueue.py --retry-failed` sent again."""
    path = runs_dir / "retry-failed" / "journal.sqlite"
    if not path.exists():
        return set()
    with sqlite3.connect(path) as db:
        return {key for (key,) in db.execute("SELECT key FROM requests WHERE state = 'sent'")}


def check_invariant(trial: Trial) -> Figures:
    """Assert the end state every trial must reach, and return what was measured.

    Every row is stored once or recorded as an open failure, never both and never
    neither. No result file was written twice: one manifest line per path and one
    "stored" log line per row. `python -m tasks.store verify` is clean. The API key is in
    no log, stored file, ledger, run journal, enqueue.py output or SQS traffic.
    """
    rows = set(row_phrases(trial.data_dir))
    stored = _stored_rows(trial.store_dir)
    resent = resent_ledger_ids(trial.runs_dir)
    failed = Counter(
        (entry["file"], entry["line"])
        for entry in ledger_entries(trial.store_dir)
        if ledger_entry_id(entry) not in resent
    )

    assert not [row for row, paths in stored.items() if len(paths) > 1], "a row has two files"
    assert set(stored) | set(failed) == rows, f"lost: {sorted(rows - set(stored) - set(failed))}"
    assert not set(stored) & set(failed), f"stored and failed: {sorted(set(stored) & set(failed))}"
    assert not [row for row, count in failed.items() if count > 1], "a row failed twice"

    manifest = _manifest_counts(trial.store_dir)
    assert [path for path, count in manifest.items() if count > 1] == [], "a path listed twice"
    assert len(manifest) == len(stored)

    lines = task_lines(trial.stack.log_dir)
    store_lines = Counter(line.row for line in lines if line.is_store)
    assert [row for row, count in store_lines.items() if count > 1] == [], "a row stored twice"
    assert sum(store_lines.values()) == len(stored)

    verify = trial.verify()
    assert verify.returncode == 0, verify.stdout + verify.stderr

    _assert_key_absent(trial)

    executions = Counter(line.row for line in lines if line.is_execution)
    return Figures(
        rows=len(rows),
        stored=len(stored),
        open_failures=len(failed),
        executions=sum(executions.values()),
        duplicate_deliveries=sum(1 for line in lines if line.is_duplicate),
        max_executions_per_row=max(executions.values(), default=0),
    )


def _stored_rows(store_dir: Path) -> dict[tuple[str, int], list[Path]]:
    stored: dict[tuple[str, int], list[Path]] = defaultdict(list)
    results = store_dir / "results"
    for path in sorted(results.rglob("*.json")) if results.is_dir() else []:
        source = json.loads(path.read_text())["source"]
        stored[(source["file"], source["line"])].append(path)
    return stored


def _manifest_counts(store_dir: Path) -> Counter[str]:
    path = store_dir / "manifest.jsonl"
    if not path.exists():
        return Counter()
    return Counter(json.loads(line)["path"] for line in path.read_text().splitlines())


def _assert_key_absent(trial: Trial) -> None:
    key = trial.stack.api_key.encode()
    places = [trial.stack.log_dir, trial.store_dir, trial.runs_dir]
    for place in places:
        for path in place.rglob("*") if place.is_dir() else []:
            if path.is_file():
                assert key not in path.read_bytes(), f"API key in {path}"

    for output in trial.outputs:
        assert trial.stack.api_key not in output, "API key in enqueue.py output"

    captured = sorted(trial.capture_dir.glob("*.bin"))
    assert captured, "no SQS traffic captured"
    for path in captured:
        assert not contains_secret(path.read_bytes(), key), f"API key in SQS traffic {path.name}"


def contains_secret(data: bytes, secret: bytes, depth: int = BASE64_DEPTH) -> bool:
    """Return True if `secret` is in `data`, URL-decoded, or in base64 runs inside it."""
    if secret in data or secret in unquote_to_bytes(data):
        return True
    if depth == 0:
        return False

    for run in _BASE64_RUN.findall(unquote_to_bytes(data)):
        try:
            decoded = base64.b64decode(run + b"=" * (-len(run) % 4))
        except (binascii.Error, ValueError):
            continue
        if contains_secret(decoded, secret, depth - 1):
            return True
    return False
