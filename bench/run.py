"""Measure the pipeline's speed against the original algorithm and the machine's limits.

    python bench/run.py [--quick] [--cases enqueue,drain,events,latency,rate_limit,memory]
                        [--baseline PATH] [--work-dir DIR]

Starts its own SQS endpoint (bench/sqs_endpoint.py) and phrase-API stand-ins on
127.0.0.1, runs every case in this one invocation, prints the machine, the versions,
the command and one table with the numbers and ratios, and stops every process it
started. The original algorithm runs from --baseline (default: ../shared/bench/
seed_baseline.py next to the repository); without that file its column is skipped.
Logs, stores and results.json stay in the work directory (default var/bench/<time>).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.cases import CASE_ORDER, FULL, QUICK, Bench, Row, install_signal_handlers  # noqa: E402
from bench.measure import machine_summary  # noqa: E402
from stack.processes import LocalStack  # noqa: E402

#: The original algorithm's script, used when --baseline is not given.
DEFAULT_BASELINE = REPO.parent / "shared" / "bench" / "seed_baseline.py"

TABLE_COLUMNS = ("Case", "Variant", "Size", "Result", "Compared with", "Target", "Verdict")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes: about 3 minutes instead of about 10"
    )
    parser.add_argument(
        "--cases",
        default=",".join(CASE_ORDER),
        help=f"comma-separated cases to run (default: all of {', '.join(CASE_ORDER)}); "
        "drain also runs enqueue, which fills its queue",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=DEFAULT_BASELINE,
        help="the original algorithm's script (default: ../shared/bench/seed_baseline.py)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="directory for logs, stores and results (default: var/bench/<time>)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cases = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = sorted(set(cases) - set(CASE_ORDER))
    if unknown:
        print(
            f"error: unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASE_ORDER)}",
            file=sys.stderr,
        )
        return 2
    if "drain" in cases and "enqueue" not in cases:
        cases.append("enqueue")

    baseline = args.baseline if args.baseline.is_file() else None
    work_dir = args.work_dir or REPO / "var" / "bench" / time.strftime("%Y%m%dT%H%M%S")
    work_dir.mkdir(parents=True, exist_ok=True)

    header = _header(argv, args.quick, baseline, args.baseline, work_dir)
    print("\n".join(header), flush=True)

    install_signal_handlers()
    started = time.monotonic()
    stack = LocalStack(log_dir=work_dir / "logs")
    bench = Bench(stack, work_dir, QUICK if args.quick else FULL, baseline)
    try:
        with stack:
            bench.start()
            bench.run_all(cases)
    except KeyboardInterrupt:
        print("\ninterrupted; every started process was stopped", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"error: {exc} (logs in {work_dir / 'logs'})", file=sys.stderr)
        return 1

    elapsed = time.monotonic() - started
    print()
    print("\n".join(format_table(bench.rows)))
    print()
    for note in bench.notes:
        print(f"- {note}")
    print(f"\nfinished in {elapsed / 60:.1f} min; details in {work_dir}")
    _write_results(work_dir / "results.json", header, bench, elapsed)
    return 0


def _header(
    argv: list[str] | None, quick: bool, baseline: Path | None, asked: Path, work_dir: Path
) -> list[str]:
    command = shlex.join(
        [sys.executable, "bench/run.py", *(sys.argv[1:] if argv is None else argv)]
    )
    original = str(baseline) if baseline else f"not found at {asked}: its column is skipped"
    return [
        "benchmark of the phrase pipeline",
        *machine_summary(),
        f"command:  {command}",
        f"sizes:    {'quick' if quick else 'full'}",
        f"original: {original}",
        "settings: INGEST_EVENTS=off, INGEST_PER_PAGE=20, INGEST_POLL_WAIT_S=1; "
        "SQS endpoint: moto via bench/sqs_endpoint.py",
        "timing:   enqueue.py and the original use their own elapsed time (after imports); "
        "a worker is timed from its 'ready.' line to its last stored task",
        f"work dir: {work_dir}",
    ]


def format_table(rows: list[Row]) -> list[str]:
    """Return the rows as a Markdown table with aligned columns."""
    cells = [list(TABLE_COLUMNS)] + [
        [row.case, row.variant, row.size, row.result, row.compared, row.target, row.verdict]
        for row in rows
    ]
    widths = [max(len(line[column]) for line in cells) for column in range(len(TABLE_COLUMNS))]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(value.ljust(width) for value, width in zip(values, widths)) + " |"

    separator = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return [line(cells[0]), separator, *(line(values) for values in cells[1:])]


def _write_results(path: Path, header: list[str], bench: Bench, elapsed_s: float) -> None:
    document = {
        "header": header,
        "elapsed_s": round(elapsed_s, 1),
        "rows": [vars(row) for row in bench.rows],
        "notes": bench.notes,
        "measurements": bench.data,
    }
    path.write_text(json.dumps(document, indent=1, default=str) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
