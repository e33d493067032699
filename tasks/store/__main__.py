"""Command line for the result store: ``verify`` checks it and ``failures`` lists the ledger.

Usage: ``python -m tasks.store {verify,failures} [--store DIR]``. The store directory
defaults to the INGEST_STORE_DIR setting, else ``var/store`` under the current directory.
``verify`` exits 0 when the store is clean, 1 when it is not or cannot be read, and 2 on
a usage error, such as a store directory that does not exist.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import unicodedata
from pathlib import Path
from typing import TextIO

from tasks.settings import get_settings
from tasks.store.ledger import FailureLedger
from tasks.store.worm import ResultStore, StoreError, VerifyReport

#: Maximum characters of a phrase or reason shown per ledger line. Longer text ends in "…".
DISPLAY_MAX_CHARS = 80

EXIT_CLEAN = 0
EXIT_NOT_CLEAN = 1
EXIT_USAGE = 2


def default_store_dir() -> Path:
    """Return the store directory of the settings (INGEST_STORE_DIR, default var/store)."""
    return get_settings().store_dir


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with the ``verify`` and ``failures`` subcommands."""
    parser = argparse.ArgumentParser(
        prog="python -m tasks.store",
        description="Check the write-once result store, or list the rows recorded as failed.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    store_help = "store directory (default: INGEST_STORE_DIR, else var/store)"
    verify = commands.add_parser("verify", help="check every stored file against the manifest")
    verify.add_argument("--store", type=Path, metavar="DIR", help=store_help)
    failures = commands.add_parser("failures", help="list the rows recorded as failed")
    failures.add_argument("--store", type=Path, metavar="DIR", help=store_help)
    return parser


def print_report(report: VerifyReport, out: TextIO) -> None:
    """Print one line per finding, then the summary line."""
    sections = (
        ("altered", report.altered),
        ("missing", report.missing),
        ("unlisted", report.unlisted),
        ("malformed", report.malformed),
        ("leftover temp file", report.leftover),
    )
    for label, findings in sections:
        for finding in findings:
            print(f"{label}: {finding}", file=out)

    summary = (
        f"verified {report.checked} files: {report.ok} ok, {len(report.altered)} altered, "
        f"{len(report.missing)} missing, {len(report.unlisted)} unlisted"
    )
    if report.malformed:
        summary += f", {len(report.malformed)} malformed manifest lines"
    if report.leftover:
        summary += f", {len(report.leftover)} leftover temp files"
    print(summary, file=out)


def printable(text: object) -> str:
    """Return ``text`` on one line: control characters escaped and cut to DISPLAY_MAX_CHARS."""
    text = str(text)
    head = text[:DISPLAY_MAX_CHARS]
    escaped = "".join(
        char.encode("unicode_escape").decode("ascii")
        if unicodedata.category(char).startswith("C")
        else char
        for char in head
    )
    return escaped + ("…" if len(text) > DISPLAY_MAX_CHARS else "")


def run_verify(store_dir: Path) -> int:
    """Verify the store, print the findings and return the exit status."""
    try:
        report = ResultStore(store_dir).verify()
    except StoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_NOT_CLEAN

    print_report(report, sys.stdout)
    return EXIT_CLEAN if report.clean else EXIT_NOT_CLEAN


def run_failures(store_dir: Path) -> int:
    """Print each ledger entry as ``file:line  phrase  reason`` and return the exit status."""
    try:
        for entry in FailureLedger(store_dir).entries():
            location = f"{printable(entry.get('file'))}:{entry.get('line')}"
            print(f"{location}  {printable(entry.get('phrase'))}  {printable(entry.get('reason'))}")
    except StoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_NOT_CLEAN

    return EXIT_CLEAN


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return the exit status."""
    args = build_parser().parse_args(argv)
    store_dir = args.store or default_store_dir()

    if not store_dir.is_dir():
        print(
            f"store directory not found: {store_dir} (pass --store DIR or set INGEST_STORE_DIR)",
            file=sys.stderr,
        )
        return EXIT_USAGE

    if args.command == "verify":
        return run_verify(store_dir)
    return run_failures(store_dir)


def _exit_quietly_on_closed_pipe() -> None:
    """Exit without a traceback when the reader of stdout stops early, as `| head` does.

    The status is the shell's for a process ended by SIGPIPE (141), never 0, because
    the command stopped before it could tell whether the store is clean.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # Python would report the failed final flush
    sys.exit(128 + signal.SIGPIPE)


if __name__ == "__main__":
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:
        _exit_quietly_on_closed_pipe()
    sys.exit(status)
