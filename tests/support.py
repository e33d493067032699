"""Helpers shared by the tests that drive a local stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from stack.processes import ROOT, LocalStack


def run_enqueue(
    stack: LocalStack, *args: str, timeout_s: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run `python enqueue.py ARGS` against `stack`; return the finished process."""
    return subprocess.run(
        [sys.executable, "enqueue.py", *args],
        cwd=ROOT,
        env=stack.env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def write_csv(directory: Path, name: str, text: str) -> Path:
    """Write a CSV file into `directory` (created if needed) and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path
