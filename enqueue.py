"""Send one `fetch_phrase` task for every row of every CSV file in a directory.

    python enqueue.py [DATA_DIR] [--column NAME] [--encoding NAME] [--delimiter CHAR] [--dry-run]
    python enqueue.py status [RUN_ID] [--wait]
    python enqueue.py --retry-failed [--dead-letters]

Exit status: 0 when every row was sent or accounted for, 1 when a row or a file was
refused (the other rows still ran), 2 for invalid settings or arguments, 3 when
sending stopped part-way (a re-run resumes where it stopped).
"""

from __future__ import annotations

import argparse
import signal
import json
import sys
import tempfile
import time
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from tasks.application import app, settings
from tasks.dispatch import BatchSender
from tasks.enqueuer import Enqueuer, EnqueueSummary
from tasks.errors import DispatchError
from tasks.journal import SENT, RunInUseError, RunJournal
from tasks.queues import dead_letter_queue_name, ensure_queues, move_dead_letters
from tasks.rows import ReadOptions, parse_delimiter
from tasks import status

#: Characters before the values in the summary, so that the columns line up.
SUMMARY_LABEL_WIDTH = 18

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Send one fetch_phrase task per CSV row.")
    parser.add_argument(
        "data_dir",
        nargs="?",
        default="data",
        type=Path,
        help="directory of *.csv files (default: data)",
    )
    parser.add_argument(
        "--column", help="phrase column (default: the only column, else the one named 'phrase')"
    )
    parser.add_argument(
        "--encoding",
        help="text encoding of the files, such as cp1252 (default: UTF-8, with or without BOM)",
    )
    parser.add_argument(
        "--delimiter",
        type=parse_delimiter,
        help="field delimiter: one character, or tab, comma, semicolon, pipe (default: detected from the header)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="read and check every row, send nothing"
    )
    parser.add_argument(
        "--new-run",
        action="store_true",
        help="start a new run even if the last one was interrupted",
    )
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help=(
            "instead of reading DATA_DIR, send again the rows of the failure ledger "
            "(python -m tasks.store failures), once the cause is fixed. Each ledger entry is "
            f"sent once: entries sent are recorded in INGEST_RUNS_DIR/{RETRY_JOURNAL}, so a "
            "second --retry-failed skips them, and rows stored since are skipped too"
        ),
    )
    parser.add_argument(
        "--dead-letters",
        action="store_true",
        help=(
            "move the fetch_phrase messages of the dead-letter queue back to the task queue, "
            "once the cause is fixed; other messages (undecodable ones) stay there. "
            "Alone or with --retry-failed"
        ),
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:
        return status_main(argv[1:])

    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run_command(args)
    except (BotoCoreError, ClientError) as exc:
        return report_sqs_error(exc)
    except RunInUseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def run_command(args: argparse.Namespace) -> int:
    """Run the enqueue, retry or dry-run command that `args` selects."""
    if args.retry_failed or args.dead_letters:
        return retry_main(args.retry_failed, args.dead_letters)
    if not args.data_dir.is_dir():
        problem = "is not a directory" if args.data_dir.exists() else "not found"
        print(f"error: data directory {args.data_dir} {problem}", file=sys.stderr)
        return EXIT_USAGE

    try:
        options = ReadOptions(column=args.column, encoding=args.encoding, delimiter=args.delimiter)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    started = time.monotonic()

    if args.dry_run:
        with tempfile.TemporaryDirectory() as scratch:
            journal = RunJournal.create(Path(scratch), args.data_dir)
            summary = Enqueuer(args.data_dir, options, journal, dry_run=True).run()
            journal.close()
        print_summary(summary, time.monotonic() - started, dry_run=True)
        return EXIT_OK if summary.ok else EXIT_REFUSED

    journal = open_journal(args.data_dir, args.new_run)  # first: a busy run stops this one at once
    ensure_queues(settings)
    enqueuer = Enqueuer(args.data_dir, options, journal)
    try:
        summary = enqueuer.run()
    except (DispatchError, KeyboardInterrupt) as exc:
        # Enqueuer.run stops before it records the batches SQS confirmed last. Without
        # them the journal would list those rows as pending, so a re-run would resend them.
        enqueuer.record_accepted()
        journal.set_meta("state", "interrupted")
        counts = journal.counts()
        journal.close()
        report_interruption(enqueuer, journal, exc, counts)
        return EXIT_INTERRUPTED

    journal.set_meta("state", "finished")
    journal.set_meta("summary", json.dumps(summary.counts()))
    journal.close()
    print_summary(summary, time.monotonic() - started, dry_run=False, run_id=journal.run_id)
    return EXIT_OK if summary.ok else EXIT_REFUSED


def report_sqs_error(exc: Exception) -> int:
    """Print one line for an SQS call that failed, naming the endpoint; return the exit status."""
    endpoint = settings.sqs_endpoint or f"AWS SQS in {settings.sqs_region}"
    print(f"error: SQS request to {endpoint} failed: {exc}", file=sys.stderr)
    return EXIT_INTERRUPTED


def _interrupt(signum: int, frame: object) -> None:
    """Turn SIGTERM into KeyboardInterrupt, so a stopped run records how far it got."""
    raise KeyboardInterrupt


def status_main(argv: list[str]) -> int:
    """Run `python enqueue.py status [RUN_ID] [--wait]`."""
    parser = argparse.ArgumentParser(
        prog="enqueue.py status",
        description="Show a run's sent, stored, failed, waiting and in-flight counts.",
    )
    parser.add_argument("run_id", nargs="?", help="run to show (default: the newest)")
    parser.add_argument(
        "--wait", action="store_true", help="repeat every 2 s until nothing is left"
    )
    args = parser.parse_args(argv)
    try:
        return status.report(settings, args.run_id, args.wait)
    except (BotoCoreError, ClientError) as exc:
        return report_sqs_error(exc)


def open_journal(data_dir: Path, new_run: bool) -> RunJournal:
    """Resume the newest run if it was interrupted on the same directory, else start one."""
    latest = RunJournal.latest(settings.runs_dir)
    if latest is not None and not new_run:
        reader = RunJournal(latest)
        meta = reader.meta()
        reader.close()
        if meta.get("state") != "finished" and meta.get("data_dir") == str(data_dir.resolve()):
            journal = RunJournal(latest, lock=True)  # raises RunInUseError while it is being sent
            print(f"resuming interrupted run {journal.run_id}", file=sys.stderr)
            journal.set_meta("state", "running")
            return journal
    return RunJournal.create(settings.runs_dir, data_dir)


def report_interruption(
    enqueuer: Enqueuer, journal: RunJournal, exc: BaseException, counts: dict[str, int]
) -> None:
    """Print how far the run got: rows read, and requests confirmed by SQS or not."""
    reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
    summary = enqueuer.summary
    print(
        f"error: sending stopped after reading up to {enqueuer.position} ({reason}).\n"
        f"  {summary.rows_read:,} rows read; of the distinct requests of run {journal.run_id}, "
        f"{counts[SENT]:,} confirmed by SQS and {counts['pending']:,} not confirmed.\n"
        f"  Run the same command again to resume: it sends the unconfirmed ones only.",
        file=sys.stderr,
    )


#: The journal of `--retry-failed` under INGEST_RUNS_DIR: the ledger entries it sent.
RETRY_JOURNAL = "retry-failed/journal.sqlite"


def retry_main(retry_failed: bool, dead_letters: bool) -> int:
    """Run `--retry-failed` and/or `--dead-letters`; return the exit status."""
    ensure_queues(settings)
    lines = []
    if retry_failed:
        try:
            counts = send_failed_again()
        except DispatchError as exc:
            print(f"error: {exc}. Run the same command again to send the rest.", file=sys.stderr)
            return EXIT_INTERRUPTED
        lines += [
            ("ledger entries", f"{counts['entries']:,}"),
            ("sent again", f"{counts['sent']:,}"),
            ("sent before", f"{counts['sent_before']:,} (by an earlier --retry-failed)"),
            ("already stored", f"{counts['already_stored']:,}"),
            ("not sendable", f"{counts['shortened']:,} (phrase shortened in the ledger)"),
        ]
    if dead_letters:
        moved = move_dead_letters(settings, "fetch_phrase")
        queue = dead_letter_queue_name(settings)
        left = f"{moved.left:,} left (not fetch_phrase task messages, see {queue})"
        lines.append(("dead letters", f"{moved.moved:,} moved, {left}"))
    print("\n".join(f"{label + ':':<{SUMMARY_LABEL_WIDTH}}{value}" for label, value in lines))
    return EXIT_OK


def ledger_entry_id(entry: dict) -> str:
    """Return the id under which the retry journal records a ledger entry."""
    return f"{entry.get('at')} {entry.get('task_id')} {entry.get('file')}:{entry.get('line')}"


def send_failed_again() -> dict[str, int]:
    """Send one fetch_phrase task per failure-ledger entry not yet sent again or stored.

    Returns the count of each outcome. Raises DispatchError if SQS rejected messages;
    the entries it confirmed are recorded, so that a re-run sends only the others.
    """
    from tasks.sources.phrase_api import request_identity
    from tasks.store import FailureLedger, ResultStore, result_key

    journal_path = settings.runs_dir / RETRY_JOURNAL
    journal_path.parent.mkdir(parents=True, exist_ok=True)
    journal = RunJournal(journal_path, lock=True)
    store = ResultStore(settings.store_dir)
    counts = dict.fromkeys(["entries", "sent", "sent_before", "already_stored", "shortened"], 0)
    entry_ids: dict[str, list[str]] = {}  # request key -> the ledger entries its task covers
    accepted: list[str] = []
    try:
        with BatchSender(app, on_sent=accepted.extend) as sender:
            for entry in FailureLedger(settings.store_dir).entries():
                counts["entries"] += 1
                phrase, file, line = entry["phrase"], entry["file"], entry["line"]
                key = result_key(request_identity(phrase, settings))
                if "phrase_sha256" in entry:
                    counts["shortened"] += 1
                    continue
                if store.exists(phrase, key):
                    counts["already_stored"] += 1
                    continue
                first = journal.claim(ledger_entry_id(entry), phrase, file, line)
                if first is not None and first.state == SENT:
                    counts["sent_before"] += 1
                    continue
                if key not in entry_ids:
                    sender.send("fetch_phrase", (phrase, file, line), tag=key)
                    counts["sent"] += 1
                entry_ids.setdefault(key, []).append(ledger_entry_id(entry))
    finally:
        journal.mark_sent(entry_id for key in accepted for entry_id in entry_ids[key])
        journal.close()
    return counts


def print_summary(
    summary: EnqueueSummary, elapsed_s: float, dry_run: bool, run_id: str = ""
) -> None:
    """Print one line per outcome, so that every row read is accounted for."""
    rate = summary.rows_read / elapsed_s if elapsed_s > 0 else 0.0
    files = f"{summary.files} read, {summary.files_failed} failed, {summary.files_ignored} ignored"
    rows = [
        ("files", files),
        ("rows read", f"{summary.rows_read:,}"),
        ("tasks would send" if dry_run else "tasks sent", f"{summary.sent:,}"),
        ("already stored", f"{summary.already_stored:,}"),
        ("duplicates", f"{summary.duplicates:,} (same request as an earlier row, not sent again)"),
        ("sent before", f"{summary.sent_before:,} (by the interrupted run this one resumed)"),
        ("refused", f"{summary.refused:,} (see the messages above)"),
        ("elapsed", f"{elapsed_s:.2f} s ({rate:,.0f} rows/s)"),
    ]
    if run_id:
        rows.append(("run", run_id))
    print("\n".join(f"{label + ':':<{SUMMARY_LABEL_WIDTH}}{value}" for label, value in rows))


if __name__ == "__main__":
    sys.exit(main())
