"""Report on an enqueue run: sent, stored, failed, and what is still waiting or in flight.

Works from the run journal, the store, the failure ledger and the queue's attributes,
so it needs neither Flower nor a running worker.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tasks.journal import RunJournal
from tasks.queues import queue_depth, sqs_client
from tasks.settings import Settings
from tasks.store import FailureLedger, ResultStore

#: Seconds between two reports with --wait.
WAIT_INTERVAL_S = 2.0


@dataclass(frozen=True)
class RunStatus:
    """Counts for one run; `waiting`, `in_flight` and `delayed` are the whole queue's."""

    run_id: str
    state: str
    sent: int
    stored: int
    failed: int
    waiting: int
    in_flight: int
    delayed: int

    @property
    def done(self) -> bool:
        return (
            self.stored + self.failed >= self.sent
            and self.waiting + self.in_flight + self.delayed == 0
        )

    def lines(self) -> list[str]:
        return [
            f"run:        {self.run_id} ({self.state})",
            f"sent:       {self.sent:,}",
            f"stored:     {self.stored:,}",
            f"failed:     {self.failed:,} (python -m tasks.store failures)",
            f"waiting:    {self.waiting:,} in the queue",
            f"in flight:  {self.in_flight:,} held by workers, {self.delayed:,} delayed",
        ]


def find_journal(settings: Settings, run_id: str | None) -> Path:
    """Return the journal of `run_id`, or the newest one; raise FileNotFoundError if none."""
    if run_id:
        path = settings.runs_dir / f"{run_id}.sqlite"
        if not path.exists():
            raise FileNotFoundError(f"run {run_id} not found in {settings.runs_dir}")
        return path

    latest = RunJournal.latest(settings.runs_dir)
    if latest is None:
        raise FileNotFoundError(f"no run found in {settings.runs_dir}; run python enqueue.py first")
    return latest


def run_status(settings: Settings, journal_path: Path) -> RunStatus:
    """Count the run's sent requests that are stored or in the ledger, and read the queue depth."""
    journal = RunJournal(journal_path)
    try:
        store = ResultStore(settings.store_dir)
        sent = stored = 0
        for key, phrase in journal.sent_requests():
            sent += 1
            stored += store.exists(phrase, key)

        failed = sum(
            1
            for entry in FailureLedger(settings.store_dir).entries()
            if journal.has_row(entry.get("file", ""), entry.get("line", 0))
        )
        state = journal.meta().get("state", "unknown")
    finally:
        journal.close()

    depth = queue_depth(sqs_client(settings), settings.queue_name)
    return RunStatus(journal_path.stem, state, sent, stored, failed, **depth)


def report(settings: Settings, run_id: str | None, wait: bool, out: TextIO = sys.stdout) -> int:
    """Print a run's status; with `wait`, redraw it until nothing is left. Return an exit status."""
    try:
        path = find_journal(settings, run_id)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    status = run_status(settings, path)
    while wait and not status.done:
        ended = status.stored + status.failed
        share = ended / status.sent if status.sent else 1.0
        print(
            f"{ended:,} of {status.sent:,} ended ({share:.0%}), {status.waiting:,} waiting, {status.in_flight:,} in flight",
            file=out,
        )
        time.sleep(WAIT_INTERVAL_S)
        status = run_status(settings, path)

    print("\n".join(status.lines()), file=out)
    return 0 if status.failed == 0 else 1
