"""tasks.dispatch: messages copied from a template equal Celery's own, and a run stores every row.

The comparison sends the same rows twice from one process against the session's SQS
endpoint: once through Celery's `send_task` and kombu's own SQS `_put`, and once through
a `BatchSender`, whose first message is the template for the others. The test then
receives both sets with boto3 and compares the texts after swapping the ids.
"""

from __future__ import annotations

import base64
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from celery.utils.saferepr import saferepr

from stack.processes import ROOT, LocalStack
from support import run_enqueue
from tasks.dispatch import format_argsrepr

#: A phrase of exactly 1024 UTF-8 bytes, the longest a row may have, with spaces where
#: saferepr's truncation cuts.
PHRASE_1024 = ("long phrase " * 86)[:1024]

#: Phrases that JSON, base64 and saferepr treat differently from plain text.
HARD_PHRASES = [
    'say "hi", it\'s',
    "back\\slash \\n and \\\\ two",
    "emoji \U0001f30d\U0001f3f3\ufe0f\u200d\U0001f308",
    "nul\x00inside",
    PHRASE_1024,
    "quote ' at \" both",
]

#: A script that sends the rows of a JSON file through send_task, then through a
#: BatchSender, and prints the task ids of both as JSON.
SEND_BOTH_WAYS = """
import json, sys
from tasks.application import app, settings
from tasks.dispatch import BatchSender
from tasks.queues import ensure_queues

ensure_queues(settings)
rows = [tuple(row) for row in json.load(open(sys.argv[1], encoding="utf-8"))]
with app.connection_for_write() as connection:
    reference = [app.send_task("fetch_phrase", args=row, connection=connection).id for row in rows]
with BatchSender(app) as sender:
    copied = [sender.send("fetch_phrase", row) for row in rows]
    templated = sender.has_template("fetch_phrase")
print(json.dumps({"reference": reference, "copied": copied, "templated": templated}))
"""


def run_script(stack: LocalStack, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -c script args` against `stack`; fail the test unless it exits 0."""
    finished = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env=stack.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 0, finished.stderr
    return finished


def receive_all(stack: LocalStack, expected: int) -> dict[str, str]:
    """Receive and delete `expected` messages; return each envelope's JSON text by task id."""
    client = stack.sqs_client()
    url = client.get_queue_url(QueueName=stack.settings["INGEST_QUEUE"])["QueueUrl"]
    texts: dict[str, str] = {}
    for _ in range(expected):
        reply = client.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        for message in reply.get("Messages", []):
            text = base64.b64decode(message["Body"]).decode("utf-8")
            texts[json.loads(text)["headers"]["id"]] = text
            client.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        if len(texts) >= expected:
            break
    return texts


def send_both_ways(stack: LocalStack, tmp_path: Path, rows: list[list]) -> dict:
    rows_path = tmp_path / "rows.json"
    rows_path.write_text(json.dumps(rows), encoding="utf-8")
    finished = run_script(stack, SEND_BOTH_WAYS, str(rows_path))
    assert "cannot serve as a template" not in finished.stderr, finished.stderr
    return json.loads(finished.stdout.splitlines()[-1])


def test_template_copies_equal_send_task(stack: LocalStack, tmp_path: Path) -> None:
    source = str(tmp_path / "data" / "phrases.csv")
    phrases = ["first row, the template", *HARD_PHRASES, "last"]
    rows = [[phrase, source, line] for line, phrase in enumerate(phrases, start=2)]

    ids = send_both_ways(stack, tmp_path, rows)
    texts = receive_all(stack, 2 * len(rows))

    assert ids["templated"] is True
    assert len(texts) == 2 * len(rows)
    for row, reference_id, copied_id in zip(rows, ids["reference"], ids["copied"]):
        reference, copied = json.loads(texts[reference_id]), json.loads(texts[copied_id])
        reference_tag = reference["properties"]["delivery_tag"]
        copied_tag = copied["properties"]["delivery_tag"]
        assert copied["headers"]["root_id"] == copied_id
        assert copied["properties"]["correlation_id"] == copied_id
        assert copied_tag != reference_tag

        expected = texts[reference_id].replace(reference_id, copied_id)
        expected = expected.replace(reference_tag, copied_tag)
        assert texts[copied_id] == expected, row[0]

        args, kwargs, _ = json.loads(base64.b64decode(copied["body"]))
        assert args == row
        assert kwargs == {}


def test_long_phrase_argsrepr_truncated(stack: LocalStack, tmp_path: Path) -> None:
    rows = [["short", "a.csv", 2], [PHRASE_1024, "a.csv", 3]]

    ids = send_both_ways(stack, tmp_path, rows)
    texts = receive_all(stack, 2 * len(rows))

    copied = json.loads(texts[ids["copied"][1]])
    assert copied["headers"]["argsrepr"] == saferepr(tuple(rows[1]), 1024, maxlevels=3)
    assert copied["headers"]["argsrepr"].endswith("phrase...', ...)")


def test_options_bypass_template(stack: LocalStack, tmp_path: Path) -> None:
    script = """
import json
from tasks.application import app, settings
from tasks.dispatch import BatchSender
from tasks.queues import ensure_queues

ensure_queues(settings)
with BatchSender(app) as sender:
    delayed = sender.send("fetch_phrase", ("later", "a.csv", 2), countdown=60)
    after_delayed = sender.has_template("fetch_phrase")
    first = sender.send("fetch_phrase", ("now", "a.csv", 3))
    copied = sender.send("fetch_phrase", ("also now", "a.csv", 4))
    expires = sender.send("fetch_phrase", ("expiring", "a.csv", 5), expires=600)
    print(json.dumps([delayed, first, copied, expires, after_delayed,
                      sender.has_template("fetch_phrase")]))
"""
    finished = run_script(stack, script)
    delayed, first, copied, expires, after_delayed, templated = json.loads(finished.stdout)
    texts = receive_all(stack, 4)

    assert after_delayed is False
    assert templated is True
    assert len(texts) == 4
    assert json.loads(texts[delayed])["headers"]["eta"] is not None
    assert json.loads(texts[first])["headers"]["eta"] is None
    assert json.loads(texts[copied])["headers"]["eta"] is None
    assert json.loads(texts[expires])["headers"]["expires"] is not None
    assert json.loads(texts[copied])["headers"]["expires"] is None


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("one",),
        (7,),
        ("it's", "a\\b", 3),
        ("x" * 1017,),
        ("x" * 1018,),
        ("x" * 1019,),
        ("x" * 1020,),
        ("word " * 300, "a.csv", 2),
        ("a", True, 2),
        ("a", 2.5),
        ("a", None),
        ("a", ["nested", ("tuple",)]),
        (b"bytes",),
        ("nul\x00", "\U0001f30d", -12),
    ],
)
def test_format_argsrepr_equals_saferepr(args: tuple) -> None:
    assert format_argsrepr(args, 1024, 3) == saferepr(args, 1024, maxlevels=3)


def test_format_argsrepr_list_equals_saferepr() -> None:
    args = ["a", 1]

    assert format_argsrepr(args, 1024, 3) == saferepr(args, 1024, maxlevels=3)


def test_run_stores_every_row(stack: LocalStack, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    phrases = [*HARD_PHRASES, *(f"plain phrase {index}" for index in range(37))]
    with (data / "rows.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["phrase"])
        writer.writerows([phrase] for phrase in phrases)
    store = Path(stack.settings["INGEST_STORE_DIR"])
    stack.start_phrase_api()
    stack.start_worker("worker", 4)

    result = run_enqueue(stack, str(data))
    assert result.returncode == 0, result.stderr
    assert f"tasks sent:       {len(phrases)}" in result.stdout
    stack.wait_until_drained()

    records = [json.loads(path.read_text()) for path in (store / "results").rglob("*.json")]
    stored = sorted((record["phrase"], record["source"]["line"]) for record in records)
    expected = sorted((phrase, line) for line, phrase in enumerate(phrases, start=2))
    assert stored == expected
    assert not (store / "failures.jsonl").exists()
    verify = subprocess.run(
        [sys.executable, "-m", "tasks.store", "verify"],
        cwd=ROOT,
        env=stack.env(),
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout
