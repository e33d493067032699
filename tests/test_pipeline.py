"""End to end: enqueue.py → SQS → a real worker → the phrase-API stand-in → the store."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import requests

from stack.processes import ROOT, LocalStack
from support import run_enqueue, write_csv

COUNTRIES = ROOT / "data" / "countries.csv"


def stored_files(store: Path) -> list[Path]:
    return sorted((store / "results").rglob("*.json"))


def ledger(store: Path) -> list[dict]:
    path = store / "failures.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def snapshot(files: list[Path]) -> dict[Path, tuple[bytes, int]]:
    return {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in files}


def verify(stack: LocalStack) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tasks.store", "verify"],
        cwd=ROOT,
        env=stack.env(),
        capture_output=True,
        text=True,
    )


def test_countries_all_stored_then_rerun_stores_nothing(stack: LocalStack, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(COUNTRIES, data / "countries.csv")
    store = Path(stack.settings["INGEST_STORE_DIR"])
    stack.start_phrase_api()
    stack.start_worker("worker", 4)

    first = run_enqueue(stack, str(data))
    assert first.returncode == 0, first.stderr
    assert "tasks sent:       197" in first.stdout
    stack.wait_until_drained()

    files = stored_files(store)
    assert len(files) == 197
    assert ledger(store) == []
    before = snapshot(files)
    assert verify(stack).returncode == 0

    second = run_enqueue(stack, str(data))
    assert second.returncode == 0, second.stderr
    assert "tasks sent:       0" in second.stdout
    assert "already stored:   197" in second.stdout
    stack.wait_until_drained()
    assert snapshot(stored_files(store)) == before
    assert len((store / "manifest.jsonl").read_text().splitlines()) == 197


def test_stored_record_holds_provenance(stack: LocalStack, tmp_path: Path) -> None:
    write_csv(tmp_path / "data", "one.csv", "phrase\nFrance\n")
    store = Path(stack.settings["INGEST_STORE_DIR"])
    stack.start_phrase_api()
    stack.start_worker("worker", 1)

    assert run_enqueue(stack, str(tmp_path / "data")).returncode == 0
    stack.wait_until_drained()

    [path] = stored_files(store)
    record = json.loads(path.read_text())
    assert record["phrase"] == "France"
    assert record["source"] == {"file": str(tmp_path / "data" / "one.csv"), "line": 2}
    assert record["status"] == 200
    assert record["request"]["params"]["phrase"] == "France"
    assert "apikey" not in record["request"]["params"]
    assert record["task_id"]
    assert record["fetched_at"].endswith("+00:00")
    assert isinstance(record["response"]["results"], list)
    assert path.stat().st_mode & 0o222 == 0


def test_transient_faults_end_stored(stack: LocalStack, tmp_path: Path) -> None:
    write_csv(tmp_path / "data", "one.csv", "phrase\nNarnia\n")
    store = Path(stack.settings["INGEST_STORE_DIR"])
    stack.start_phrase_api("--script", "Narnia=503,429,200", "--retry-after", "1")
    stack.start_worker("worker", 2)

    assert run_enqueue(stack, str(tmp_path / "data")).returncode == 0
    stack.wait_until_drained()

    assert len(stored_files(store)) == 1
    assert ledger(store) == []
    stats = requests.get(f"http://127.0.0.1:{stack.api_port}/_stats", timeout=5).json()
    assert stats["by_phrase"]["Narnia"] == 3
    log = (stack.log_dir / "worker.log").read_text()
    assert "retry in" in log
    assert "server error: HTTP 503" in log
    assert "throttled: HTTP 429" in log


def test_not_found_goes_to_ledger_untried_again(stack: LocalStack, tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "data", "one.csv", "phrase\nAtlantis\nFrance\n")
    store = Path(stack.settings["INGEST_STORE_DIR"])
    stack.start_phrase_api("--script", "Atlantis=404")
    stack.start_worker("worker", 2)

    assert run_enqueue(stack, str(tmp_path / "data")).returncode == 0
    stack.wait_until_drained()

    assert len(stored_files(store)) == 1
    [entry] = ledger(store)
    assert entry["file"] == str(csv_path)
    assert entry["line"] == 2
    assert entry["phrase"] == "Atlantis"
    assert "404" in entry["reason"]
    stats = requests.get(f"http://127.0.0.1:{stack.api_port}/_stats", timeout=5).json()
    assert stats["by_phrase"]["Atlantis"] == 1


def test_status_waits_and_counts(stack: LocalStack, tmp_path: Path) -> None:
    write_csv(tmp_path / "data", "one.csv", "phrase\nAtlantis\nFrance\nSpain\n")
    stack.start_phrase_api("--script", "Atlantis=404", "--latency-ms", "300")
    stack.start_worker("worker", 1)
    assert run_enqueue(stack, str(tmp_path / "data")).returncode == 0

    result = run_enqueue(stack, "status", "--wait", timeout_s=120)

    assert result.returncode == 1, result.stderr
    assert "sent:       3" in result.stdout
    assert "stored:     2" in result.stdout
    assert "failed:     1" in result.stdout
    assert "waiting:    0" in result.stdout


def test_verify_catches_changed_byte_and_deleted_file(stack: LocalStack, tmp_path: Path) -> None:
    write_csv(tmp_path / "data", "three.csv", "phrase\nFrance\nSpain\nItaly\n")
    store = Path(stack.settings["INGEST_STORE_DIR"])
    stack.start_phrase_api()
    stack.start_worker("worker", 2)
    assert run_enqueue(stack, str(tmp_path / "data")).returncode == 0
    stack.wait_until_drained()

    changed, deleted, _ = stored_files(store)
    changed.chmod(0o644)
    content = bytearray(changed.read_bytes())
    content[10] ^= 0x01
    changed.write_bytes(bytes(content))
    deleted.unlink()

    result = verify(stack)
    assert result.returncode == 1
    assert f"altered: {changed.relative_to(store)}" in result.stdout
    assert f"missing: {deleted.relative_to(store)}" in result.stdout


def test_api_key_never_leaves_the_worker(stack: LocalStack, tmp_path: Path) -> None:
    write_csv(tmp_path / "data", "few.csv", "phrase\nFrance\nAtlantis\nNarnia\nDrop\n")
    store = Path(stack.settings["INGEST_STORE_DIR"])
    stack.settings["INGEST_MAX_RETRIES"] = "1"
    stack.start_phrase_api(
        "--script", "Atlantis=401", "--script", "Narnia=503", "--script", "Drop=drop"
    )

    result = run_enqueue(stack, str(tmp_path / "data"))
    assert result.returncode == 0
    bodies = read_raw_messages(stack)
    assert len(bodies) == 4
    for body in bodies:
        assert stack.api_key not in body
        assert stack.api_key not in base64.b64decode(body).decode()

    stack.start_worker("worker", 2)
    stack.wait_until_drained()

    assert len(ledger(store)) == 3
    texts = [path.read_text(errors="replace") for path in stack.log_dir.glob("*.log")]
    texts += [path.read_text() for path in stored_files(store)]
    texts.append((store / "failures.jsonl").read_text())
    texts.append(result.stdout + result.stderr)
    for text in texts:
        assert stack.api_key not in text


def read_raw_messages(stack: LocalStack) -> list[str]:
    """Receive every message without deleting it; they reappear once visibility ends."""
    client = stack.sqs_client()
    url = client.get_queue_url(QueueName=stack.settings["INGEST_QUEUE"])["QueueUrl"]
    bodies: list[str] = []
    for _ in range(5):
        reply = client.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0, WaitTimeSeconds=0
        )
        bodies = [message["Body"] for message in reply.get("Messages", [])]
        if len(bodies) >= 4:
            break
    return bodies
