"""enqueue.py on every kind of input a user drops into data/: what it sends, prints and returns.

Each test enqueues into a fresh queue on the session's SQS endpoint, with no worker,
then reads the queue back and decodes the Celery messages to see exactly which rows
were sent.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from stack.processes import LocalStack
from support import run_enqueue
from tasks.journal import RunJournal


def sent_rows(stack: LocalStack) -> list[tuple[str, str, int]]:
    """Receive every message in the stack's queue and return the (phrase, file, line) args."""
    client = stack.sqs_client()
    url = client.get_queue_url(QueueName=stack.settings["INGEST_QUEUE"])["QueueUrl"]
    rows = []
    while True:
        reply = client.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0)
        messages = reply.get("Messages", [])
        if not messages:
            return sorted(rows, key=lambda row: (row[1], row[2]))
        for message in messages:
            envelope = json.loads(base64.b64decode(message["Body"]))
            args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
            rows.append(tuple(args))
            client.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])


def data_dir(tmp_path: Path, files: dict[str, bytes]) -> Path:
    directory = tmp_path / "data"
    directory.mkdir()
    for name, content in files.items():
        (directory / name).write_bytes(content)
    return directory


def test_bom_crlf_and_quoted_fields(stack: LocalStack, tmp_path: Path) -> None:
    content = '\ufeffphrase\r\n"a, b"\r\n"say ""hi"""\r\n"two\r\nlines"\r\nlast\r\n'.encode()
    directory = data_dir(tmp_path, {"x.csv": content})
    path = str(directory / "x.csv")

    result = run_enqueue(stack, str(directory))

    assert result.returncode == 0, result.stderr
    assert sent_rows(stack) == [
        ("a, b", path, 2),
        ('say "hi"', path, 3),
        ("two\r\nlines", path, 4),
        ("last", path, 6),
    ]


def test_latin1_file_needs_encoding(stack: LocalStack, tmp_path: Path) -> None:
    directory = data_dir(tmp_path, {"x.csv": "phrase\nCôte d'Ivoire\n".encode("cp1252")})
    path = str(directory / "x.csv")

    refused = run_enqueue(stack, str(directory))
    assert refused.returncode == 1
    assert "--encoding cp1252" in refused.stderr
    assert "byte" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert sent_rows(stack) == []

    accepted = run_enqueue(stack, str(directory), "--encoding", "cp1252", "--new-run")
    assert accepted.returncode == 0, accepted.stderr
    assert sent_rows(stack) == [("Côte d'Ivoire", path, 2)]


@pytest.mark.parametrize(("delimiter", "option"), [(";", []), ("\t", ["--delimiter", "tab"])])
def test_other_delimiters(
    stack: LocalStack, tmp_path: Path, delimiter: str, option: list[str]
) -> None:
    text = f"id{delimiter}phrase\n1{delimiter}France\n2{delimiter}Spain\n"
    directory = data_dir(tmp_path, {"x.csv": text.encode()})
    path = str(directory / "x.csv")

    result = run_enqueue(stack, str(directory), *option)

    assert result.returncode == 0, result.stderr
    assert sent_rows(stack) == [("France", path, 2), ("Spain", path, 3)]


def test_one_column_header_over_semicolons_refused(stack: LocalStack, tmp_path: Path) -> None:
    text = "phrase\nFrance;Paris;FR\nSpain;Madrid;ES\nItaly;Rome;IT\n"
    directory = data_dir(tmp_path, {"x.csv": text.encode()})

    result = run_enqueue(stack, str(directory))

    assert result.returncode == 1
    assert "--delimiter" in result.stderr
    assert sent_rows(stack) == []


def test_bad_files_do_not_stop_good_ones(stack: LocalStack, tmp_path: Path) -> None:
    directory = data_dir(
        tmp_path,
        {
            "a_good.csv": b"phrase\nFrance\n",
            "b_no_column.csv": b"name,code\nFrance,FR\n",
            "c_header_only.csv": b"phrase\n",
            "d_empty.csv": b"",
            "e_binary.csv": b"PK\x03\x04\x00\x00binary",
            "notes.txt": b"not csv",
        },
    )
    (directory / "subfolder").mkdir()

    result = run_enqueue(stack, str(directory))

    assert result.returncode == 1
    assert sent_rows(stack) == [("France", str(directory / "a_good.csv"), 2)]
    assert "b_no_column.csv" in result.stderr
    assert "name, code" in result.stderr.replace("'", "")
    assert "c_header_only.csv" in result.stderr
    assert "no data rows" in result.stderr
    assert "d_empty.csv" in result.stderr
    assert "empty" in result.stderr
    assert "e_binary.csv" in result.stderr
    assert "notes.txt: ignored" in result.stderr
    assert "subfolder: ignored" in result.stderr
    assert "files:            5 read, 4 failed, 2 ignored" in result.stdout


def test_ragged_and_blank_rows_are_skipped(stack: LocalStack, tmp_path: Path) -> None:
    text = "id,phrase\n1,France\n2\n3,Spain,extra\n4,   \n5,Italy\n"
    directory = data_dir(tmp_path, {"x.csv": text.encode()})
    path = str(directory / "x.csv")

    result = run_enqueue(stack, str(directory))

    assert result.returncode == 1
    assert sent_rows(stack) == [("France", path, 2), ("Italy", path, 6)]
    assert f"{path}:3: skipped" in result.stderr
    assert f"{path}:4: skipped" in result.stderr
    assert f"{path}:5: skipped: blank phrase" in result.stderr
    assert "refused:          3" in result.stdout


def test_hostile_values(stack: LocalStack, tmp_path: Path) -> None:
    long_phrase = "x" * 1_048_576
    phrases = ["../../etc/passwd", "/abs/path", "A/B", "emoji 🎉", "Ελλάδα"]
    text = "phrase\n" + "\n".join(phrases) + f'\n{long_phrase}\n"nul\x00inside"\n'
    directory = data_dir(tmp_path, {"x.csv": text.encode()})
    path = str(directory / "x.csv")

    result = run_enqueue(stack, str(directory))

    assert result.returncode == 1
    sent = sent_rows(stack)
    assert [row[0] for row in sent] == [*phrases, "nul\x00inside"]
    assert f"{path}:7: skipped: phrase is 1048576 bytes; the limit is 1024" in result.stderr


def test_duplicates_sent_once(stack: LocalStack, tmp_path: Path) -> None:
    directory = data_dir(
        tmp_path, {"a.csv": b"phrase\nFrance\nSpain\nFrance\n", "b.csv": b"phrase\nSpain\n"}
    )
    first = str(directory / "a.csv")

    result = run_enqueue(stack, str(directory))

    assert result.returncode == 0
    assert sent_rows(stack) == [("France", first, 2), ("Spain", first, 3)]
    assert f"{first}:4: duplicate of {first}:2" in result.stderr
    assert f"{directory / 'b.csv'}:2: duplicate of {first}:3" in result.stderr
    assert "duplicates:       2" in result.stdout


def test_dry_run_sends_nothing(stack: LocalStack, tmp_path: Path) -> None:
    directory = data_dir(tmp_path, {"x.csv": b'phrase\nFrance\n""\n'})

    result = run_enqueue(stack, str(directory), "--dry-run")

    assert result.returncode == 1
    assert "tasks would send: 1" in result.stdout
    assert "refused:          1" in result.stdout
    client = stack.sqs_client()
    assert stack.settings["INGEST_QUEUE"] not in str(client.list_queues().get("QueueUrls", []))


def test_run_in_use_refused(stack: LocalStack, tmp_path: Path) -> None:
    directory = data_dir(tmp_path, {"a.csv": b"phrase\nOne\nTwo\n"})
    running = RunJournal.create(Path(stack.settings["INGEST_RUNS_DIR"]), directory)

    try:
        second = run_enqueue(stack, str(directory))
    finally:
        running.close()
    after = run_enqueue(stack, str(directory))

    assert second.returncode == 2
    assert f"run {running.run_id} is being sent by another enqueue.py" in second.stderr
    assert after.returncode == 0
    source = str(directory / "a.csv")
    assert sent_rows(stack) == [("One", source, 2), ("Two", source, 3)]


def test_other_directory_runs_beside(stack: LocalStack, tmp_path: Path) -> None:
    busy = data_dir(tmp_path, {"a.csv": b"phrase\nOne\n"})
    other = tmp_path / "other"
    other.mkdir()
    (other / "b.csv").write_bytes(b"phrase\nTwo\n")
    running = RunJournal.create(Path(stack.settings["INGEST_RUNS_DIR"]), busy)

    try:
        result = run_enqueue(stack, str(other))
    finally:
        running.close()

    assert result.returncode == 0, result.stderr
    assert sent_rows(stack) == [("Two", str(other / "b.csv"), 2)]
