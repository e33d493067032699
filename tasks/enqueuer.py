"""Turn the rows of every CSV file in a directory into `fetch_phrase` tasks.

Each good row becomes one task, unless its answer is already stored or the same
request was already seen in this run. Every row ends in exactly one count of
`EnqueueSummary`, so a run accounts for all of its input.
"""

from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from tasks.application import app, settings
from tasks.dispatch import BatchSender
from tasks.journal import SENT, RunJournal
from tasks.progress import Progress
from tasks.rows import InputFileError, ReadOptions, Row, RowProblem, find_input_files, read_rows
from tasks.sources.phrase_api import request_identity
from tasks.store import ResultStore, result_key

#: Duplicate rows reported one by one; the rest are only counted.
MAX_DUPLICATES_SHOWN = 20

#: Accepted messages collected before the journal records and commits them.
RECORD_ACCEPTED_EVERY = 200

#: Bytes read from the start of each file to estimate its row count for the progress bar.
SAMPLE_BYTES = 65_536


@dataclass
class EnqueueSummary:
    """Outcome counts for every row of a run."""

    files: int = 0
    files_failed: int = 0
    files_ignored: int = 0
    rows_read: int = 0
    refused: int = 0
    already_stored: int = 0
    duplicates: int = 0
    sent_before: int = 0
    sent: int = 0
    problems: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Return every count, without the messages."""
        return {name: value for name, value in vars(self).items() if isinstance(value, int)}

    @property
    def ok(self) -> bool:
        return self.refused == 0 and self.files_failed == 0


class Enqueuer:
    """One enqueue run over a data directory, recorded in `journal`.

    With `dry_run`, every row is read and checked against the store and the journal,
    and nothing is sent.
    """

    def __init__(
        self,
        data_dir: Path,
        options: ReadOptions,
        journal: RunJournal,
        dry_run: bool = False,
        out: TextIO = sys.stderr,
    ) -> None:
        self._data_dir = data_dir
        self._options = options
        self._journal = journal
        self._dry_run = dry_run
        self._out = out
        self._store = ResultStore(settings.store_dir)
        self._accepted: deque[str] = deque()
        self.summary = EnqueueSummary()
        self.position = "before the first row"

    def run(self) -> EnqueueSummary:
        """Read, check and send every row; raise `DispatchError` if SQS rejects messages."""
        files, ignored = find_input_files(self._data_dir)
        for entry in ignored:
            self._warn(f"{entry}: ignored, not a .csv file")
        self.summary.files_ignored = len(ignored)
        self.summary.files = len(files)

        progress = Progress("enqueue", estimate_rows(files), self._out)
        if self._dry_run:
            self._read_all(files, progress, sender=None)
        else:
            with BatchSender(app, on_sent=self._accepted.extend) as sender:
                self._read_all(files, progress, sender)
                sender.flush()
            self.record_accepted()
        progress.finish()
        return self.summary

    def _read_all(self, files: list[Path], progress: Progress, sender: BatchSender | None) -> None:
        for path in files:
            try:
                for item in read_rows(path, self._options):
                    self._handle(item, sender)
                    progress.advance()
            except InputFileError as exc:
                self.summary.files_failed += 1
                self._warn(f"error: {exc}")
            self.record_accepted()

    def _handle(self, item: Row | RowProblem, sender: BatchSender | None) -> None:
        self.summary.rows_read += 1
        if isinstance(item, RowProblem):
            self.summary.refused += 1
            self._warn(str(item))
            return

        self.position = f"{item.file}:{item.line}"
        key = result_key(request_identity(item.phrase, settings))
        if self._store.exists(item.phrase, key):
            self.summary.already_stored += 1
            # A resumed run may list this row as pending because SQS's confirmation was
            # lost; its stored result proves the message went out.
            self._accepted.append(key)
            return
        first = self._journal.claim(key, item.phrase, item.file, item.line)
        if first is not None and (first.file, first.line) != (item.file, item.line):
            self.summary.duplicates += 1
            if self.summary.duplicates <= MAX_DUPLICATES_SHOWN:
                print(
                    f"{item.file}:{item.line}: duplicate of {first.file}:{first.line}, not sent again",
                    file=self._out,
                )
            return
        if first is not None and first.state == SENT:
            self.summary.sent_before += 1
            return

        if sender is not None:
            sender.send("fetch_phrase", (item.phrase, item.file, item.line), tag=key)
        self.summary.sent += 1

        if len(self._accepted) >= RECORD_ACCEPTED_EVERY:
            self.record_accepted()

    def record_accepted(self) -> None:
        """Commit to the journal the messages SQS accepted since the last call."""
        keys = []
        while self._accepted:
            keys.append(self._accepted.popleft())
        self._journal.mark_sent(keys)

    def _warn(self, message: str) -> None:
        self.summary.problems.append(message)
        print(message, file=self._out)


def estimate_rows(files: list[Path]) -> int | None:
    """Estimate the total row count from file sizes and the line length in each file's start."""
    total = 0
    for path in files:
        try:
            size = path.stat().st_size
            with path.open("rb") as handle:
                sample = handle.read(SAMPLE_BYTES)
        except OSError:
            continue
        lines = max(1, sample.count(b"\n"))
        header_rows = 1
        total += max(0, round(size / (len(sample) / lines)) - header_rows) if sample else 0
    return total or None
