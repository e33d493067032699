"""INGEST_RATE_LIMIT on a real worker: the rate is reached and never exceeded."""

from __future__ import annotations

import json
from collections import Counter
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
    times = sorted(datetime.fromisoformat(record["fetched_at"]) for record in records)
    assert len(times) == TASKS

    per_second = Counter(moment.replace(microsecond=0) for moment in times)
    assert max(per_second.values()) <= 10
    achieved = (len(times) - 1) / (times[-1] - times[0]).total_seconds()
    assert achieved >= 9.5
