"""Reliability trials: crashes, stops, API faults, a broker outage, duplicate and poison
messages, and tampering. Each ends with the same invariant (`trial_support.check_invariant`).

Every trial runs real processes on 127.0.0.1: moto as SQS, the phrase-API stand-in,
Celery workers and enqueue.py, with all SQS traffic of workers and enqueue.py going
through `stack.tcp_proxy`, which also records it for the API-key scan. Run them with
`python -m pytest -m trial tests/test_trials.py -s` to see the figures each prints.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from stack.phrase_api import Faults, choose_step
from stack.processes import ROOT, LocalStack
from stack.tcp_proxy import TcpProxy
from trial_support import (
    DRAIN_TIMEOUT_S,
    Figures,
    Trial,
    check_invariant,
    copy_countries,
    in_flight,
    kill_group,
    ledger_entries,
    row_phrases,
    task_lines,
    wait_for,
    write_generated,
)

pytestmark = pytest.mark.trial

COUNTRY_ROWS = 197

#: The minimum visibility timeout the settings allow; trials that wait for it use it.
SHORT_VISIBILITY_TIMEOUT_S = 60

#: Maximum retry wait with that timeout: the settings require at most the timeout minus 30 s.
SHORT_BACKOFF_MAX_S = 5

#: Milliseconds the stand-in adds to each response, so that workers hold tasks long enough
#: to be stopped or killed in the middle of them.
SLOW_API_MS = "300"

#: Seconds a stalled API is left before the kill, so that a task which had its response
#: before the stall has finished storing it.
STALL_SETTLE_S = 1.5

#: Seconds a stopped worker may take to exit.
STOP_TIMEOUT_S = 60.0

#: Seconds the broker outage lasts.
OUTAGE_S = 30.0

#: Seconds after the outage by which the workers, never restarted, store again.
RESUME_MAX_S = 20.0

#: Rows of the outage trial: enough that enqueue.py is still sending when the outage starts.
OUTAGE_ROWS = 1_500

#: Receives before SQS dead-letters a message, in the poison trial.
POISON_MAX_RECEIVES = 3

#: Tasks in flight per SendMessageBatch call, times enqueue.py's sender threads: the most
#: rows whose send SQS may have done without enqueue.py learning it at the outage.
MAX_UNCONFIRMED_ROWS = 10 * 8

DELAY_SCRIPT = """
import json, sys
import tasks
for phrase, file, line in json.loads(sys.argv[1]):
    tasks.fetch_phrase.delay(phrase, file, line)
"""


@pytest.fixture
def trial(stack: LocalStack, tmp_path: Path) -> Iterator[Trial]:
    """A stack whose workers and enqueue.py reach SQS through a recording TCP proxy."""
    capture = tmp_path / "sqs-capture"
    proxy = TcpProxy(stack.sqs_port, capture_dir=capture).start()
    stack.settings["INGEST_SQS_ENDPOINT"] = proxy.url
    yield Trial(
        stack=stack,
        proxy=proxy,
        data_dir=tmp_path / "data",
        store_dir=Path(stack.settings["INGEST_STORE_DIR"]),
        runs_dir=Path(stack.settings["INGEST_RUNS_DIR"]),
        capture_dir=capture,
    )
    stack.stop()
    proxy.stop()


def report(name: str, figures: Figures, **measured: object) -> None:
    """Print one line of figures, shown by `pytest -s`."""
    extra = ", ".join(f"{key} {value}" for key, value in measured.items())
    print(
        f"\n[{name}] rows {figures.rows}, stored {figures.stored}, "
        f"open failures {figures.open_failures}, lost 0, double-stored 0, "
        f"executions {figures.executions}, duplicate deliveries {figures.duplicate_deliveries}, "
        f"max executions per row {figures.max_executions_per_row}; {extra}"
    )


def summary_values(stdout: str) -> dict[str, str]:
    """Return the summary lines of enqueue.py ("label:   value") as label -> value."""
    values = {}
    for line in stdout.splitlines():
        label, colon, value = line.partition(":")
        if colon:
            values[label.strip()] = value.strip()
    return values


def forget(trial: Trial, *names: str) -> None:
    """Drop stopped workers from the stack, so that waiting for the queue does not fail on them."""
    for name in names:
        trial.stack.processes.pop(name, None)


def stores_by(trial: Trial, worker: str) -> int:
    return sum(
        1 for line in task_lines(trial.stack.log_dir) if line.worker == worker and line.is_store
    )


# -- 1. Hard kill. --


def test_hard_kill_survivor_finishes(trial: Trial) -> None:
    trial.set(
        INGEST_VISIBILITY_TIMEOUT_S=str(SHORT_VISIBILITY_TIMEOUT_S),
        INGEST_RETRY_BACKOFF_MAX_S=str(SHORT_BACKOFF_MAX_S),
    )
    copy_countries(trial.data_dir)
    with TcpProxy(trial.stack.api_port) as api_proxy:
        trial.set(INGEST_API_URL=f"{api_proxy.url}/api/1")
        trial.stack.start_phrase_api("--latency-ms", SLOW_API_MS)
        assert trial.enqueue().returncode == 0
        doomed = trial.start_worker("doomed")
        survivor = trial.start_worker("survivor")
        wait_for(lambda: stores_by(trial, "doomed") >= 8, 60, "the doomed worker to store 8 rows")
        wait_for(lambda: bool(in_flight(task_lines(trial.stack.log_dir), "doomed")), 10, "a task")

        # With every API response held, each task of the doomed worker waits on its API call,
        # so the kill cannot land between a store write and its manifest line.
        api_proxy.stall()
        time.sleep(STALL_SETTLE_S)
        held = in_flight(task_lines(trial.stack.log_dir), "doomed")
        killed_at = datetime.now()
        kill_group(doomed)
        doomed.wait(timeout=10)
        api_proxy.restore()
        forget(trial, "doomed")

        wait_for(lambda: trial.stored_count() == COUNTRY_ROWS, DRAIN_TIMEOUT_S, "every row stored")
        trial.wait_until_drained()

    lines = task_lines(trial.stack.log_dir)
    held_rows = {line.row for line in lines if line.task_id in held}
    redone = [line for line in lines if line.row in held_rows and line.worker == "survivor"]
    recovery_s = (max(line.at for line in redone) - killed_at).total_seconds()
    figures = check_invariant(trial)

    assert held, "the doomed worker held no task when it was killed"
    assert {line.row for line in redone if line.is_store} == held_rows
    assert survivor.poll() is None
    assert recovery_s <= SHORT_VISIBILITY_TIMEOUT_S + 15
    report("hard kill", figures, held_by_killed_worker=len(held), recovery_s=round(recovery_s, 1))


# -- 2. Graceful stop. --


def test_graceful_stop_loses_nothing(trial: Trial) -> None:
    copy_countries(trial.data_dir)
    trial.stack.start_phrase_api("--latency-ms", SLOW_API_MS)
    assert trial.enqueue().returncode == 0

    # `kill PID`, `docker stop` and supervisord: SIGTERM to the main process, a warm shutdown.
    first = trial.start_worker("first")
    held_by_first, first_exit, first_stop_s = _stop_mid_run(trial, first, "first", signal.SIGTERM)

    # Ctrl+C in a terminal: SIGINT to the whole foreground process group.
    second = trial.start_worker("second")
    held_by_second, second_exit, second_stop_s = _stop_mid_run(
        trial, second, "second", signal.SIGINT
    )

    third = trial.start_worker("third")
    trial.wait_until_drained()

    lines = task_lines(trial.stack.log_dir)
    figures = check_invariant(trial)
    assert first_exit == 0
    assert second_exit >= 0, "the second worker was killed by a signal"
    assert held_by_first and held_by_second, "a worker held no task when it was stopped"
    assert in_flight(lines, "first") == set(), "a task of the first worker did not finish"
    assert in_flight(lines, "second") == set(), "a task of the second worker did not finish"
    assert figures.stored == COUNTRY_ROWS
    assert figures.duplicate_deliveries == 0
    assert third.poll() is None
    report(
        "graceful stop",
        figures,
        held_at_sigterm=len(held_by_first),
        sigterm_stop_s=round(first_stop_s, 1),
        held_at_sigint=len(held_by_second),
        sigint_stop_s=round(second_stop_s, 1),
    )


def _stop_mid_run(
    trial: Trial, worker: subprocess.Popen, name: str, sig: int
) -> tuple[set[str], int, float]:
    """Signal `worker` after it stored 8 rows; return its tasks then in flight, exit status, stop time."""

    def busy() -> bool:
        return stores_by(trial, name) >= 8 and bool(
            in_flight(task_lines(trial.stack.log_dir), name)
        )

    wait_for(busy, 60, f"worker {name} to store 8 rows and hold a task")
    held = in_flight(task_lines(trial.stack.log_dir), name)
    signalled = time.monotonic()
    if sig == signal.SIGINT:
        kill_group(worker, sig)
    else:
        worker.send_signal(sig)
    status = worker.wait(timeout=STOP_TIMEOUT_S)
    forget(trial, name)
    return held, status, time.monotonic() - signalled


# -- 3. A failing API. --


FAULT_OPTIONS = {
    "error_rate": 0.2,
    "throttle_rate": 0.1,
    "retry_after_s": 1,
    "slow_rate": 0.05,
    "slow_seconds": 3.0,
    "drop_rate": 0.05,
}
MAX_RETRIES = 8


def predicted_calls(phrase: str) -> int:
    """Return the API calls the stand-in's faults make one phrase need: failures + 1.

    A slow response counts as a failure, because it takes longer than INGEST_READ_TIMEOUT_S.
    """
    faults = Faults(**FAULT_OPTIONS)
    calls = 1
    while choose_step(faults, phrase, calls - 1) != 200:
        calls += 1
    return calls


def test_failing_api_all_stored(trial: Trial) -> None:
    copy_countries(trial.data_dir)
    trial.set(
        INGEST_READ_TIMEOUT_S="1",
        INGEST_MAX_RETRIES=str(MAX_RETRIES),
        INGEST_RETRY_BACKOFF_MAX_S="2",
    )
    trial.stack.start_phrase_api(
        "--error-rate", "0.2",
        "--throttle-rate", "0.1",
        "--retry-after", "1",
        "--slow-rate", "0.05",
        "--slow-seconds", "3",
        "--drop-rate", "0.05",
    )  # fmt: skip
    trial.start_worker("first")
    trial.start_worker("second")
    assert trial.enqueue().returncode == 0
    trial.wait_until_drained()

    figures = check_invariant(trial)
    calls = trial.api_calls()
    expected = {phrase: predicted_calls(phrase) for phrase in row_phrases(trial.data_dir).values()}
    assert figures.stored == COUNTRY_ROWS
    assert max(calls.values()) <= MAX_RETRIES + 1
    assert calls == expected
    report(
        "failing API", figures, api_calls=sum(calls.values()), max_calls_per_row=max(calls.values())
    )


def test_retry_after_beyond_visibility_runs_once(trial: Trial) -> None:
    copy_countries(trial.data_dir)
    trial.set(
        INGEST_VISIBILITY_TIMEOUT_S=str(SHORT_VISIBILITY_TIMEOUT_S),
        INGEST_RETRY_BACKOFF_MAX_S=str(SHORT_BACKOFF_MAX_S),
    )
    trial.stack.start_phrase_api("--script", "France=429,200", "--retry-after", "2000")
    trial.start_worker("worker")
    assert trial.enqueue().returncode == 0
    trial.wait_until_drained()

    figures = check_invariant(trial)
    france_row = _row_of(trial, "France")
    france = [line for line in task_lines(trial.stack.log_dir) if line.row == france_row]
    starts = [line for line in france if line.message.startswith("start, attempt")]
    waited_s = (starts[-1].at - starts[0].at).total_seconds()
    cap_s = SHORT_VISIBILITY_TIMEOUT_S - 30
    assert trial.api_calls()["France"] == 2
    assert [line.message for line in starts] == ["start, attempt 1 of 6", "start, attempt 2 of 6"]
    assert len({line.task_id for line in france}) == 1
    assert any(line.message.startswith(f"retry in {cap_s:.1f} s") for line in france)
    assert cap_s - 1 <= waited_s < SHORT_VISIBILITY_TIMEOUT_S
    assert figures.duplicate_deliveries == 0
    report("Retry-After 2000 s", figures, france_calls=2, retried_after_s=round(waited_s, 1))


def _row_of(trial: Trial, phrase: str) -> tuple[str, int]:
    return next(row for row, text in row_phrases(trial.data_dir).items() if text == phrase)


# -- 4. A broker outage. --


def test_broker_outage_resumes(trial: Trial) -> None:
    write_generated(trial.data_dir, OUTAGE_ROWS)
    trial.set(
        INGEST_VISIBILITY_TIMEOUT_S=str(SHORT_VISIBILITY_TIMEOUT_S),
        INGEST_RETRY_BACKOFF_MAX_S=str(SHORT_BACKOFF_MAX_S),
    )
    trial.stack.start_phrase_api()
    trial.ensure_queues()
    workers = [trial.start_worker("first"), trial.start_worker("second")]
    enqueue = trial.start_enqueue()
    wait_for(lambda: trial.stored_count() >= 5, 120, "5 rows stored before the outage")
    assert enqueue.poll() is None, "enqueue.py finished before the outage; raise OUTAGE_ROWS"

    trial.proxy.cut(refuse=True)
    outage_started = time.monotonic()
    stored_at_cut = trial.stored_count()
    time.sleep(OUTAGE_S)
    stored_during = trial.stored_count() - stored_at_cut
    trial.proxy.restore()
    restored_at = datetime.now()
    outage_s = time.monotonic() - outage_started

    out, err = enqueue.communicate(timeout=300)
    trial.outputs.append(out + err)
    journal = _journal_counts(trial)
    unconfirmed_rows = _journal_rows(trial, "pending")
    rerun = trial.enqueue()
    trial.wait_until_drained()

    lines = task_lines(trial.stack.log_dir)
    first_store = min(line.at for line in lines if line.is_store and line.at > restored_at)
    resumed_s = (first_store - restored_at).total_seconds()
    task_ids = {
        row: {line.task_id for line in lines if line.row == row}
        for row in {line.row for line in lines}
    }
    sent_twice = [row for row, ids in task_ids.items() if len(ids) > 1]
    logs = "".join(path.read_text() for path in trial.stack.log_dir.glob("*.log"))
    figures = check_invariant(trial)

    stopped = re.search(r"([\d,]+) rows read; .*?([\d,]+) confirmed by SQS and ([\d,]+) not", err)
    assert enqueue.returncode == 3, err
    assert stopped is not None, err
    rows_read, confirmed, unconfirmed = (_count(group) for group in stopped.groups())
    assert (confirmed, unconfirmed) == (journal["sent"], journal["pending"])
    assert rows_read == confirmed + unconfirmed
    assert rows_read < OUTAGE_ROWS or unconfirmed > 0, "the outage stopped nothing"
    assert rerun.returncode == 0, rerun.stderr
    resent = _count(summary_values(rerun.stdout)["tasks sent"])
    stored_before_rerun = _count(summary_values(rerun.stdout)["already stored"])
    sent_before = _count(summary_values(rerun.stdout)["sent before"])
    assert resent + stored_before_rerun + sent_before == OUTAGE_ROWS
    assert resent <= OUTAGE_ROWS - confirmed
    assert set(sent_twice) <= unconfirmed_rows, "a row confirmed by SQS was sent again"
    assert _journal_counts(trial) == {"pending": 0, "sent": OUTAGE_ROWS}
    assert all(worker.poll() is None for worker in workers), "a worker stopped"
    assert "failed 1 time(s) in a row" in logs
    assert "works again after" in logs
    assert resumed_s <= RESUME_MAX_S
    assert len(sent_twice) <= MAX_UNCONFIRMED_ROWS
    assert figures.stored == OUTAGE_ROWS
    report(
        "broker outage",
        figures,
        outage_s=round(outage_s, 1),
        stored_during_outage=stored_during,
        first_store_after_outage_s=round(resumed_s, 1),
        rows_read_before_stop=rows_read,
        confirmed_before_stop=confirmed,
        sent_by_rerun=resent,
        rows_sent_twice=len(sent_twice),
    )


def _count(value: str) -> int:
    """Return the number that starts a summary value such as "1,234 (by ...)"."""
    return int(value.split()[0].replace(",", ""))


def _journal_counts(trial: Trial) -> dict[str, int]:
    return {state: len(_journal_rows(trial, state)) for state in ("pending", "sent")}


def _journal_rows(trial: Trial, state: str) -> set[tuple[str, int]]:
    """Return (file, line) of the requests in `state` in the run journal of enqueue.py."""
    [path] = sorted(trial.runs_dir.glob("*.sqlite"))
    with sqlite3.connect(path) as db:
        query = "SELECT file, line FROM requests WHERE state = ?"
        return set(db.execute(query, (state,)).fetchall())


# -- 5. Duplicate delivery. --


def test_duplicate_delivery_is_noop(trial: Trial) -> None:
    copy_countries(trial.data_dir)
    trial.stack.start_phrase_api()
    assert trial.enqueue().returncode == 0
    phrases = row_phrases(trial.data_dir)
    twice = [(phrases[row], *row) for row in sorted(phrases)[:3]]
    _delay(trial, twice * 2)
    client = trial.stack.sqs_client()
    [message] = client.receive_message(QueueUrl=trial.queue_url(), MaxNumberOfMessages=1)[
        "Messages"
    ]
    client.change_message_visibility(
        QueueUrl=trial.queue_url(), ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
    )
    trial.start_worker("first")
    trial.start_worker("second")
    trial.wait_until_drained()

    files = sorted((trial.store_dir / "results").rglob("*.json"))
    before = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in files}
    manifest = (trial.store_dir / "manifest.jsonl").read_bytes()
    trial.send_raw(message["Body"])
    trial.send_raw(message["Body"])
    _delay(trial, twice[:1])
    trial.wait_until_drained()

    lines = task_lines(trial.stack.log_dir)
    figures = check_invariant(trial)
    after = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in files}
    assert after == before
    assert (trial.store_dir / "manifest.jsonl").read_bytes() == manifest
    assert figures.stored == COUNTRY_ROWS
    assert figures.duplicate_deliveries >= 3 * 2 + 2 + 1
    assert sum(1 for line in lines if line.message == "already stored, nothing to fetch") >= 3
    report("duplicate delivery", figures)


def _delay(trial: Trial, calls: list[tuple[str, str, int]]) -> None:
    """Send fetch_phrase tasks with `delay`, as a client program would."""
    subprocess.run(
        [sys.executable, "-c", DELAY_SCRIPT, json.dumps(calls)],
        cwd=ROOT,
        env=trial.stack.env(),
        check=True,
        timeout=60,
    )


# -- 6. Poison messages. --


def test_poison_messages_dead_lettered_then_retried(trial: Trial) -> None:
    from tasks.settings import Settings
    from tasks.sources.phrase_api import request_identity
    from tasks.store import result_key

    copy_countries(trial.data_dir)
    phrases = row_phrases(trial.data_dir)
    shard = result_key(request_identity("Chad", Settings()))[:2]
    blocked = {
        row
        for row, phrase in phrases.items()
        if result_key(request_identity(phrase, Settings())).startswith(shard)
    }
    rejected = ["France", "Spain"]
    assert not {_row_of(trial, phrase) for phrase in rejected} & blocked
    trial.set(INGEST_MAX_RECEIVES=str(POISON_MAX_RECEIVES))
    trial.stack.start_phrase_api(
        *[arg for phrase in rejected for arg in ("--script", f"{phrase}=404")]
    )

    # A file where the shard directory of "Chad" belongs: every store write of that shard
    # fails with an OSError, as on a broken disk, and that is unexpected to the task.
    (trial.store_dir / "results").mkdir(parents=True)
    (trial.store_dir / "results" / shard).write_text("not a directory\n")
    assert trial.enqueue().returncode == 0
    trial.send_raw("this is not a task {{{")
    trial.send_raw(_undecodable_envelope(trial.stack.settings["INGEST_QUEUE"]))
    trial.start_worker("worker")
    trial.wait_until_drained()
    wait_for(lambda: trial.queue_size(dead_letter=True) == len(blocked) + 2, 60, "the dead letters")

    calls = trial.api_calls()
    logs = (trial.stack.log_dir / "worker.log").read_text()
    failed = {(entry["file"], entry["line"]) for entry in ledger_entries(trial.store_dir)}
    assert failed == {_row_of(trial, phrase) for phrase in rejected}
    assert [calls[phrases[row]] for row in blocked] == [POISON_MAX_RECEIVES] * len(blocked)
    assert logs.count("is not a task message; returned to the queue") == POISON_MAX_RECEIVES
    assert logs.count("cannot be decoded: ") == POISON_MAX_RECEIVES

    # The user fixes both causes, then sends the failed rows and the dead letters again,
    # twice before any worker runs, and once more after.
    trial.stack.stop_process("worker")
    (trial.store_dir / "results" / shard).unlink()
    trial.stack.stop_process("phrase-api")
    trial.stack.start_phrase_api()
    first = trial.enqueue("--retry-failed", "--dead-letters")
    second = trial.enqueue("--retry-failed", "--dead-letters")
    queued = trial.queue_size()
    trial.start_worker("worker")
    trial.wait_until_drained()
    third = trial.enqueue("--retry-failed")
    trial.wait_until_drained()

    figures = check_invariant(trial)
    assert first.returncode == 0, first.stderr
    assert summary_values(first.stdout)["sent again"] == "2"
    assert summary_values(first.stdout)["dead letters"].startswith(f"{len(blocked)} moved, 2 left")
    assert second.returncode == 0, second.stderr
    assert summary_values(second.stdout)["sent again"] == "0"
    assert summary_values(second.stdout)["sent before"].startswith("2 ")
    assert summary_values(second.stdout)["dead letters"].startswith("0 moved, 2 left")
    assert queued == len(rejected) + len(blocked)
    assert third.returncode == 0, third.stderr
    assert summary_values(third.stdout)["sent again"] == "0"
    assert summary_values(third.stdout)["already stored"] == "2"
    assert figures.stored == COUNTRY_ROWS
    assert figures.open_failures == 0
    assert trial.queue_size(dead_letter=True) == 2
    report(
        "poison messages",
        figures,
        dead_lettered=len(blocked) + 2,
        calls_per_poison_row=POISON_MAX_RECEIVES,
    )


def _undecodable_envelope(queue: str) -> str:
    """Return an SQS body in kombu's format whose JSON task body is not JSON."""
    envelope = {
        "body": base64.b64encode(b"{not json").decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {},
        "properties": {
            "body_encoding": "base64",
            "delivery_info": {"exchange": "", "routing_key": queue},
            "delivery_tag": "poison",
        },
    }
    return base64.b64encode(json.dumps(envelope).encode()).decode()


# -- 7. Tampering. --


def test_tampering_named_by_verify(trial: Trial) -> None:
    copy_countries(trial.data_dir)
    trial.stack.start_phrase_api()
    trial.start_worker("worker")
    assert trial.enqueue().returncode == 0
    trial.wait_until_drained()
    figures = check_invariant(trial)

    changed, deleted = sorted((trial.store_dir / "results").rglob("*.json"))[:2]
    changed.chmod(0o644)
    content = bytearray(changed.read_bytes())
    content[len(content) // 2] ^= 0x01
    changed.write_bytes(bytes(content))
    deleted.unlink()
    added = trial.store_dir / "results" / "zz" / "added-by-hand.json"
    added.parent.mkdir(exist_ok=True)
    added.write_text('{"phrase": "forged"}\n')

    result = trial.verify()
    assert result.returncode == 1
    assert f"altered: {changed.relative_to(trial.store_dir)}" in result.stdout
    assert f"missing: {deleted.relative_to(trial.store_dir)}" in result.stdout
    assert f"unlisted: {added.relative_to(trial.store_dir)}" in result.stdout
    assert "1 altered, 1 missing, 1 unlisted" in result.stdout
    report("tampering", figures, verify_exit=result.returncode)
