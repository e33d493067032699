"""Tests of the write-once result store, its manifest, verify, the ledger and the CLI.

Every test works on real files under tmp_path, and the concurrency tests use real
processes (forked with multiprocessing) that share one store directory.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from tasks.store import FailureLedger, ResultStore, result_key
from tasks.store.worm import TEMP_PREFIX

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Seconds a worker process may take before the test fails.
PROCESS_TIMEOUT_S = 120

#: Worker processes in the concurrency tests.
PROCESS_COUNT = 8

#: Distinct keys each worker stores in the parallel-writers test.
KEYS_PER_PROCESS = 200

#: Ledger lines each worker appends in the parallel-ledger test.
RECORDS_PER_PROCESS = 50

HOSTILE_PHRASES = [
    "../../etc/passwd",
    "/abs",
    "a\x00b",
    "\n\r\t",
    "🙂🚀",
    "x" * 1_000_000,
    "../" * 350_000,
    "Côte d'Ivoire",
    "A/B",
    "A-B",
    "a b",
    "",
    ".",
    "..",
    "\udc80",
]


def identity(phrase: str) -> dict[str, str]:
    return {"phrase": phrase, "per_page": "20", "start_date": "", "end_date": ""}


def key_of(phrase: str) -> str:
    return result_key(identity(phrase))


def manifest_lines(root: Path) -> list[dict]:
    lines = (root / "manifest.jsonl").read_bytes().splitlines()
    return [json.loads(line) for line in lines]


def run_processes(target: Callable[..., None], argument_lists: list[tuple]) -> list[Any]:
    """Run one forked process per argument tuple and return what each put on the queue."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    processes = [context.Process(target=target, args=(results, *args)) for args in argument_lists]

    for process in processes:
        process.start()

    collected = [results.get(timeout=PROCESS_TIMEOUT_S) for _ in processes]

    for process in processes:
        process.join(PROCESS_TIMEOUT_S)
        assert process.exitcode == 0

    return collected


def put_after_barrier(results: Any, root: Path, barrier: Any, writer: int) -> None:
    phrase = "race"
    barrier.wait(PROCESS_TIMEOUT_S)
    written = ResultStore(root).put(phrase, key_of(phrase), {"writer": writer})
    results.put((writer, written))


def put_many(results: Any, root: Path, writer: int) -> None:
    store = ResultStore(root)
    for index in range(KEYS_PER_PROCESS):
        phrase = f"writer {writer} phrase {index}"
        assert store.put(phrase, key_of(phrase), {"writer": writer, "index": index})
    results.put(writer)


def record_many(results: Any, root: Path, writer: int) -> None:
    ledger = FailureLedger(root)
    for index in range(RECORDS_PER_PROCESS):
        phrase = f"{writer}-{index}-" + "é" * 3000
        ledger.record(file="data/x.csv", line=index, phrase=phrase, reason="HTTP 404", task_id=None)
    results.put(writer)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tasks.store", *args],
        cwd=REPO_ROOT,
        env=env or os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT_S,
    )


def stored_path(root: Path, phrase: str, record: dict | None = None) -> Path:
    store = ResultStore(root)
    assert store.put(phrase, key_of(phrase), record or {"phrase": phrase})
    return store.path_for(phrase, key_of(phrase))


def make_writable(path: Path) -> None:
    path.chmod(0o644)


# result_key


def test_result_key_canonical_json() -> None:
    canonical = '{"end_date":"","per_page":"20","phrase":"Côte","start_date":""}'

    assert result_key(identity("Côte")) == hashlib.sha256(canonical.encode()).hexdigest()


def test_result_key_ignores_order() -> None:
    forward = {"phrase": "a", "per_page": "20"}
    backward = {"per_page": "20", "phrase": "a"}

    assert result_key(forward) == result_key(backward)


def test_result_key_rejects_credential() -> None:
    with pytest.raises(ValueError, match="apikey") as raised:
        result_key({"phrase": "a", "apikey": "s3cret-value"})

    assert "s3cret-value" not in str(raised.value)


def test_result_key_rejects_non_str() -> None:
    with pytest.raises(TypeError):
        result_key({"phrase": "a", "per_page": 20})  # type: ignore[dict-item]


# put, exists, get


def test_put_get_round_trip(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    key = key_of("Chad")
    record = {"phrase": "Chad", "response": {"items": [1, 2]}, "note": "ünïcode"}

    assert not store.exists("Chad", key)
    assert store.get("Chad", key) is None
    assert store.put("Chad", key, record)
    assert store.exists("Chad", key)
    assert store.get("Chad", key) == record

    path = store.path_for("Chad", key)
    data = path.read_bytes()
    assert data.endswith(b"}\n")
    assert "ünïcode".encode() in data
    assert stat.S_IMODE(path.stat().st_mode) == 0o444

    entries = manifest_lines(tmp_path)
    assert len(entries) == 1
    assert entries[0]["path"] == path.relative_to(tmp_path).as_posix()
    assert entries[0]["sha256"] == hashlib.sha256(data).hexdigest()
    assert entries[0]["bytes"] == len(data)
    assert entries[0]["stored_at"].endswith("+00:00")


def test_put_second_time_keeps_first(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    key = key_of("Chad")
    store.put("Chad", key, {"version": 1})
    path = store.path_for("Chad", key)
    before = path.read_bytes()
    mtime_before = path.stat().st_mtime_ns

    assert not store.put("Chad", key, {"version": 2})

    assert path.read_bytes() == before
    assert path.stat().st_mtime_ns == mtime_before
    assert len(manifest_lines(tmp_path)) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_put_rejects_nan(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)

    with pytest.raises(ValueError):
        store.put("Chad", key_of("Chad"), {"score": float("nan")})

    assert not store.exists("Chad", key_of("Chad"))


def test_put_race_one_winner(tmp_path: Path) -> None:
    barrier = multiprocessing.get_context("fork").Barrier(PROCESS_COUNT)
    arguments = [(tmp_path, barrier, writer) for writer in range(PROCESS_COUNT)]

    outcomes = run_processes(put_after_barrier, arguments)

    winners = [writer for writer, written in outcomes if written]
    assert len(winners) == 1

    store = ResultStore(tmp_path)
    assert store.get("race", key_of("race")) == {"writer": winners[0]}

    path = store.path_for("race", key_of("race"))
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]

    entries = manifest_lines(tmp_path)
    assert len(entries) == 1
    assert entries[0]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_put_parallel_writers_manifest(tmp_path: Path) -> None:
    arguments = [(tmp_path, writer) for writer in range(PROCESS_COUNT)]

    run_processes(put_many, arguments)

    raw_lines = (tmp_path / "manifest.jsonl").read_bytes().split(b"\n")
    assert raw_lines[-1] == b""
    entries = [json.loads(line) for line in raw_lines[:-1]]
    assert len(entries) == PROCESS_COUNT * KEYS_PER_PROCESS
    assert len({entry["path"] for entry in entries}) == len(entries)
    assert all(set(entry) == {"path", "sha256", "bytes", "stored_at"} for entry in entries)

    report = ResultStore(tmp_path).verify()
    assert report.clean
    assert report.ok == PROCESS_COUNT * KEYS_PER_PROCESS


# path_for


def test_path_for_hostile_phrases(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    results = (tmp_path / "results").resolve()
    names = set()

    for phrase in HOSTILE_PHRASES:
        key = key_of(phrase)
        path = store.path_for(phrase, key)

        assert path.resolve().parent.parent == results, repr(phrase[:20])
        assert len(path.name.encode()) < 120, repr(phrase[:20])
        assert path.name.isascii(), repr(phrase[:20])
        assert not path.name.startswith("-")
        names.add(path.name)

        assert store.put(phrase, key, {"phrase": phrase})
        assert store.get(phrase, key) == {"phrase": phrase}

    assert len(names) == len(HOSTILE_PHRASES)
    assert ResultStore(tmp_path).verify().clean


def test_path_for_slug_examples(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    key = key_of("x")

    assert store.path_for("Côte d'Ivoire", key).name == f"c-te-d-ivoire-{key[:32]}.json"
    assert store.path_for("🙂", key).name == f"{key[:32]}.json"
    assert store.path_for("  A/B  ", key).name == f"a-b-{key[:32]}.json"
    assert store.path_for("ab " * 100, key).name == f"{'ab-' * 13}a-{key[:32]}.json"
    assert store.path_for("x", key).parent.name == key[:2]


def test_path_for_rejects_bad_key(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)

    for key in ["../" + "a" * 61, "A" * 64, "a" * 63, ""]:
        with pytest.raises(ValueError):
            store.path_for("phrase", key)


# verify


def test_verify_clean_store(tmp_path: Path) -> None:
    for phrase in ["a", "b", "c"]:
        stored_path(tmp_path, phrase)

    report = ResultStore(tmp_path).verify()

    assert report.clean
    assert report.ok == 3
    assert report.checked == 3


def test_verify_empty_store(tmp_path: Path) -> None:
    report = ResultStore(tmp_path).verify()

    assert report.clean
    assert report.ok == 0


def test_verify_changed_byte(tmp_path: Path) -> None:
    path = stored_path(tmp_path, "Chad", {"count": 1})
    stored_path(tmp_path, "Mali")
    make_writable(path)
    data = bytearray(path.read_bytes())
    data[data.index(b"1")] = ord("2")
    path.write_bytes(bytes(data))

    report = ResultStore(tmp_path).verify()

    relative = path.relative_to(tmp_path).as_posix()
    assert not report.clean
    assert report.ok == 1
    assert len(report.altered) == 1
    assert report.altered[0].startswith(relative)
    assert hashlib.sha256(bytes(data)).hexdigest() in report.altered[0]


def test_verify_deleted_file(tmp_path: Path) -> None:
    path = stored_path(tmp_path, "Chad")
    path.unlink()

    report = ResultStore(tmp_path).verify()

    assert not report.clean
    assert len(report.missing) == 1
    assert report.missing[0].startswith(path.relative_to(tmp_path).as_posix())


def test_verify_unlisted_file(tmp_path: Path) -> None:
    stored_path(tmp_path, "Chad")
    extra = tmp_path / "results" / "zz" / "planted.json"
    extra.parent.mkdir()
    extra.write_text("{}\n")

    report = ResultStore(tmp_path).verify()

    assert not report.clean
    assert report.ok == 1
    assert len(report.unlisted) == 1
    assert report.unlisted[0].startswith("results/zz/planted.json")
    assert "interrupted write" in report.unlisted[0]


def test_verify_leftover_temp_file(tmp_path: Path) -> None:
    path = stored_path(tmp_path, "Chad")
    (path.parent / f"{TEMP_PREFIX}abc.part").write_text("{")

    report = ResultStore(tmp_path).verify()

    assert report.clean
    assert report.ok == 1
    assert len(report.leftover) == 1
    assert report.unlisted == []


def test_verify_conflicting_entries(tmp_path: Path) -> None:
    path = stored_path(tmp_path, "Chad")
    entry = manifest_lines(tmp_path)[0]
    entry["sha256"] = "0" * 64
    with (tmp_path / "manifest.jsonl").open("a") as manifest:
        manifest.write(json.dumps(entry) + "\n")

    report = ResultStore(tmp_path).verify()

    assert not report.clean
    assert report.ok == 0
    assert len(report.altered) == 1
    assert report.altered[0].startswith(path.relative_to(tmp_path).as_posix())
    assert "listed twice" in report.altered[0]


def test_verify_torn_manifest_line(tmp_path: Path) -> None:
    stored_path(tmp_path, "Chad")
    manifest = tmp_path / "manifest.jsonl"
    first_line = manifest.read_bytes()
    manifest.write_bytes(b'{"path":"results/ab/cut-sho')
    with manifest.open("ab") as stream:
        stream.write(first_line)

    report = ResultStore(tmp_path).verify()

    assert report.malformed == ["manifest.jsonl line 1 (not a valid entry)"]
    assert report.ok == 1
    assert report.unlisted == []


def test_verify_rejects_escaping_path(tmp_path: Path) -> None:
    stored_path(tmp_path, "Chad")
    entry = {"path": "results/../../etc/passwd", "sha256": "0" * 64, "bytes": 1, "stored_at": ""}
    with (tmp_path / "manifest.jsonl").open("a") as manifest:
        manifest.write(json.dumps(entry) + "\n")

    report = ResultStore(tmp_path).verify()

    assert report.malformed == ["manifest.jsonl line 2 (not a valid entry)"]
    assert report.missing == []
    assert report.ok == 1


# CLI


def test_cli_verify_clean_exit_zero(tmp_path: Path) -> None:
    stored_path(tmp_path, "Chad")
    stored_path(tmp_path, "Mali")

    completed = run_cli("verify", "--store", str(tmp_path))

    assert completed.returncode == 0
    assert completed.stdout == "verified 2 files: 2 ok, 0 altered, 0 missing, 0 unlisted\n"


def test_cli_verify_problems_exit_one(tmp_path: Path) -> None:
    altered = stored_path(tmp_path, "Chad")
    make_writable(altered)
    altered.write_bytes(altered.read_bytes() + b" ")
    missing = stored_path(tmp_path, "Mali")
    missing.unlink()
    stored_path(tmp_path, "Niger")

    completed = run_cli("verify", "--store", str(tmp_path))

    lines = completed.stdout.splitlines()
    assert completed.returncode == 1
    assert lines[0].startswith(f"altered: {altered.relative_to(tmp_path).as_posix()} (sha256")
    assert lines[1].startswith(f"missing: {missing.relative_to(tmp_path).as_posix()}")
    assert lines[-1] == "verified 3 files: 1 ok, 1 altered, 1 missing, 0 unlisted"


def test_cli_verify_env_store(tmp_path: Path) -> None:
    stored_path(tmp_path, "Chad")
    env = os.environ.copy()
    env["INGEST_STORE_DIR"] = str(tmp_path)

    completed = run_cli("verify", env=env)

    assert completed.returncode == 0
    assert "1 ok" in completed.stdout


def test_cli_missing_store_exit_two(tmp_path: Path) -> None:
    completed = run_cli("verify", "--store", str(tmp_path / "absent"))

    assert completed.returncode == 2
    assert "store directory not found" in completed.stderr


def test_cli_usage_error_exit_two() -> None:
    assert run_cli().returncode == 2
    assert run_cli("unknown").returncode == 2


def test_cli_failures_lines(tmp_path: Path) -> None:
    ledger = FailureLedger(tmp_path)
    ledger.record(file="data/a.csv", line=3, phrase="Chad", reason="HTTP 404", task_id="t1")
    ledger.record(file="data/a.csv", line=4, phrase="a\nb", reason="timed out", task_id=None)

    completed = run_cli("failures", "--store", str(tmp_path))

    assert completed.returncode == 0
    assert completed.stdout.splitlines() == [
        "data/a.csv:3  Chad  HTTP 404",
        "data/a.csv:4  a\\nb  timed out",
    ]


# ledger


def test_ledger_round_trip(tmp_path: Path) -> None:
    ledger = FailureLedger(tmp_path / "new")
    ledger.record(
        file="data/a.csv", line=7, phrase="Chad", reason="HTTP 404", task_id="t1", attempts=3
    )

    entries = list(ledger.entries())

    assert len(entries) == 1
    assert entries[0]["file"] == "data/a.csv"
    assert entries[0]["line"] == 7
    assert entries[0]["phrase"] == "Chad"
    assert entries[0]["reason"] == "HTTP 404"
    assert entries[0]["task_id"] == "t1"
    assert entries[0]["attempts"] == 3
    assert entries[0]["at"].endswith("+00:00")
    assert "phrase_sha256" not in entries[0]


def test_ledger_missing_file_empty(tmp_path: Path) -> None:
    assert list(FailureLedger(tmp_path).entries()) == []


def test_ledger_long_phrase_shortened(tmp_path: Path) -> None:
    ledger = FailureLedger(tmp_path)
    phrase = "é" * 1_000_000

    ledger.record(file="f.csv", line=1, phrase=phrase, reason="HTTP 414", task_id=None)

    entry = next(ledger.entries())
    assert entry["phrase"] == "é" * 512
    assert entry["phrase_sha256"] == hashlib.sha256(phrase.encode()).hexdigest()
    assert (tmp_path / "failures.jsonl").stat().st_size < 2048


def test_ledger_redacts_credentials(tmp_path: Path) -> None:
    ledger = FailureLedger(tmp_path)
    reason = "GET https://api.example/search?q=a&apikey=SECRET1 failed; Bearer SECRET2"

    ledger.record(file="f.csv", line=1, phrase="a", reason=reason, task_id=None)

    text = (tmp_path / "failures.jsonl").read_text()
    assert "SECRET1" not in text
    assert "SECRET2" not in text
    assert "apikey=REDACTED" in text


def test_ledger_parallel_appends(tmp_path: Path) -> None:
    run_processes(record_many, [(tmp_path, writer) for writer in range(PROCESS_COUNT)])

    lines = (tmp_path / "failures.jsonl").read_bytes().splitlines()
    entries = [json.loads(line) for line in lines]
    assert len(entries) == PROCESS_COUNT * RECORDS_PER_PROCESS
    assert all("phrase_sha256" in entry for entry in entries)
