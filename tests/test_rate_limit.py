"""INGEST_RATE_LIMIT on a real worker: the rate is reached, and no second contains more requests."""

from __future__ import annotations

import bisect
import json
from datetime import datetime
from pathlib import Path

from stack.processes import LocalStack
from support import run_enqueue, write_csv

TASKS = 80


def test_rate_limit_held_at_ten_per_second(stack: LocalStack, tmp_path: Path) -> None:
    phrases = "\n".join(f"phrase {number}" for number in range(TASKS))
    write_csv(tmp_path / "data", "many.csv", f"phrase\n{phrases}\n")
    stack.settings.update(INGEST_RATE_LIMIT="10/s", INGEST_EVENTS="off")
    stack.start_phrase_api()
    assert run_enqueue(stack, str(tmp_path / "data")).returncode == 0

    stack.start_worker("worker", 4)
    stack.wait_until_drained(timeout_s=120, empty_polls=1)

    store = Path(stack.settings["INGEST_STORE_DIR"])
    records = [json.loads(path.read_text()) for path in (store / "results").rglob("*.json")]
    times = sorted(datetime.fromisoformat(r["requested_at"]).timestamp() for r in records)
    assert len(times) == TASKS

    assert busiest_second(times) <= 10
    achieved = (len(times) - 1) / (times[-1] - times[0])
    assert achieved >= 9.5


def busiest_second(ordered: list[float]) -> int:
    """Return the most of the sorted times that fall in any one-second window."""
    return max(
        bisect.bisect_left(ordered, start + 1.0) - index for index, start in enumerate(ordered)
    )
