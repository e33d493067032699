"""Run the local stack: `python -m stack demo` or `python -m stack up`.

demo  starts the SQS endpoint, the phrase-API stand-in and one worker, enqueues
      data/, waits until every task has ended, prints a summary and stops it all.
up    starts the same plus Flower on 127.0.0.1:5555 and keeps them running until
      Ctrl+C; `make enqueue` (or `python enqueue.py` with var/local.env loaded)
      feeds it from another terminal.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from stack.processes import LOCAL_AWS_ENV, ROOT, LocalStack, port_in_use

#: Where the demo and `up` keep logs, the store and run journals (relative to the repository).
VAR_DIR = ROOT / "var"

#: Fixed ports of `up`, so that another terminal can reach the stack.
UP_SQS_PORT, UP_API_PORT, UP_FLOWER_PORT = 9324, 8080, 5555


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack")
    parser.add_argument("command", choices=["demo", "up"])
    parser.add_argument(
        "--data", default="data", help="data directory for the demo (default: data)"
    )
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, _raise_interrupt)
    # Also when SIGINT was inherited as ignored, as by `make up &` from a script.
    signal.signal(signal.SIGINT, _raise_interrupt)
    try:
        return run_demo(Path(args.data)) if args.command == "demo" else run_up()
    except KeyboardInterrupt:
        print("\nstopped", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run_demo(data_dir: Path) -> int:
    """Run the whole job once on `data_dir` against a fresh local stack."""
    started = time.monotonic()
    with LocalStack(log_dir=VAR_DIR / "logs") as stack:
        store_dir = stack.ingest_settings().store_dir
        counts_before = _store_counts(store_dir)
        print(f"starting SQS endpoint, phrase-API stand-in and worker (logs in {stack.log_dir})")
        stack.start_sqs()
        stack.start_phrase_api()
        stack.start_worker("worker", 4)

        enqueue = subprocess.run(
            [sys.executable, "enqueue.py", str(data_dir)], cwd=ROOT, env=stack.env()
        )
        if enqueue.returncode not in (0, 1):
            raise RuntimeError(f"enqueue.py exited with status {enqueue.returncode}")

        print("waiting for the worker to finish every task ...")
        stack.wait_until_drained(timeout_s=3600)

    counts_after = _store_counts(store_dir)
    summary = _last_enqueue_summary()
    _print_demo_summary(summary, counts_before, counts_after, time.monotonic() - started, store_dir)
    return 0 if counts_after["failed"] == counts_before["failed"] else 1


def run_up() -> int:
    """Start the local stack with Flower on fixed ports and keep it running until Ctrl+C."""
    for port in (UP_SQS_PORT, UP_API_PORT, UP_FLOWER_PORT):
        if port_in_use(port):
            raise RuntimeError(f"port {port} on 127.0.0.1 is in use: is `make up` already running?")

    stack = LocalStack(log_dir=VAR_DIR / "logs", sqs_port=UP_SQS_PORT, api_port=UP_API_PORT)
    with stack:
        stack.start_sqs()
        stack.start_phrase_api()
        stack.start_worker("worker", 4)
        stack.start_flower(UP_FLOWER_PORT)
        env_file = VAR_DIR / "local.env"
        _write_env_file(stack, env_file)
        try:
            _serve_until_stopped(stack)
        finally:
            env_file.unlink(missing_ok=True)


def _serve_until_stopped(stack: LocalStack) -> None:
    """Print where the stack listens, then wait until Ctrl+C or until a process stops."""
    print(
        f"SQS endpoint   {stack.sqs_endpoint}\n"
        f"phrase API     {stack.api_url} (stand-in)\n"
        f"Flower         http://127.0.0.1:{UP_FLOWER_PORT}\n"
        f"logs           {stack.log_dir}\n"
        "Feed it from another terminal with `make enqueue`. Ctrl+C stops everything."
    )
    while all(process.poll() is None for process in stack.processes.values()):
        time.sleep(1)
    stopped = [name for name, process in stack.processes.items() if process.poll() is not None]
    raise RuntimeError(f"{', '.join(stopped)} stopped; see {stack.log_dir}")


def _store_counts(store_dir: Path) -> dict[str, int]:
    return {
        "stored": _count_lines(store_dir / "manifest.jsonl"),
        "failed": _count_lines(store_dir / "failures.jsonl"),
    }


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as handle:
        return sum(1 for _ in handle)


def _last_enqueue_summary() -> dict[str, int]:
    from tasks.journal import RunJournal

    latest = RunJournal.latest(VAR_DIR / "runs")
    if latest is None:
        return {}
    journal = RunJournal(latest)
    summary = json.loads(journal.meta().get("summary", "{}"))
    journal.close()
    return summary


def _print_demo_summary(
    summary: dict[str, int],
    before: dict[str, int],
    after: dict[str, int],
    elapsed_s: float,
    store_dir: Path,
) -> None:
    stored = after["stored"] - before["stored"]
    failed = after["failed"] - before["failed"]
    sent = summary.get("sent", 0)
    print(
        "\ndemo summary\n"
        f"  rows read:       {summary.get('rows_read', 0):,}\n"
        f"  tasks sent:      {sent:,}\n"
        f"  stored:          {stored:,} new result files ({after['stored']:,} in {store_dir})\n"
        f"  already stored:  {summary.get('already_stored', 0) + max(0, sent - stored - failed):,}\n"
        f"  failed:          {failed:,} (ledger: python -m tasks.store failures)\n"
        f"  refused rows:    {summary.get('refused', 0):,}\n"
        f"  elapsed:         {elapsed_s:.1f} s\n"
        f"Check the store with: python -m tasks.store verify"
    )


def _write_env_file(stack: LocalStack, path: Path) -> None:
    """Write the settings another terminal needs to reach this stack (mode 0600, because it contains the key).

    Every INGEST_* setting of the stack's worker goes in, so that enqueue.py uses the
    same queue, visibility timeout and store as the worker.
    """
    environment = stack.env()
    values = dict(LOCAL_AWS_ENV)
    values.update(
        (name, value) for name, value in environment.items() if name.startswith("INGEST_")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text("".join(f"{name}={shlex.quote(value)}\n" for name, value in values.items()))


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
