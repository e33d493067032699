"""The benchmark cases, run one after another against one local stack.

Each case uses its own SQS queue, store and run journals, so no case sees another's
messages or files. Every worker runs with INGEST_EVENTS=off: the cost of task events
is measured separately.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import endpoint_bound
from bench.measure import (
    PROGRESS_POLL_S,
    cpu_seconds,
    run_with_peak_rss,
    tasks_ended,
    window_counts,
)
from stack.processes import HOST, ROOT, LocalStack, free_port, wait_for_port

#: Results per page in every request, ours and the original's, so both fetch the same answer.
PER_PAGE = "20"

#: Milliseconds of latency the stand-in adds in the API-latency cases.
API_LATENCY_MS = 200

#: Threads sending or draining in the endpoint-bound measurements (as many as BatchSender uses).
RAW_THREADS = 8

#: Long-poll wait of the workers, in seconds. It matters only once a queue is empty, so a
#: short one only lets a worker stop quickly between cases.
BENCH_POLL_WAIT_S = "1"

#: Targets shown beside each result.
TARGET_ENQUEUE_RATIO = 10.0
TARGET_DRAIN_RATIO = 5.0
TARGET_BOUND_SHARE = 0.90
TARGET_PEAK_RSS_MIB = 100.0
#: Most the peak RSS may grow from the smaller to the larger memory run to count as flat.
FLAT_GROWTH_MIB = 10.0
TARGET_RATE_PER_S = 10.0
TARGET_RATE_MIN_PER_S = 9.5


@dataclass(frozen=True)
class Sizes:
    """How many rows or tasks each case handles."""

    enqueue_rows: int
    original_rows: int
    latency_process_tasks: int
    latency_thread_tasks: int
    rate_tasks: int
    memory_rows: tuple[int, int]
    events_tasks: int


FULL = Sizes(10_000, 2_000, 200, 1_000, 300, (100_000, 1_000_000), 2_000)
QUICK = Sizes(2_000, 500, 100, 300, 100, (10_000, 100_000), 500)


@dataclass
class Row:
    """One line of the result table, already formatted."""

    case: str
    variant: str
    size: str
    result: str
    compared: str = ""
    target: str = ""
    verdict: str = ""


@dataclass
class Bench:
    """The local stack and the state the cases share; run the cases with `run_all`."""

    stack: LocalStack
    work_dir: Path
    sizes: Sizes
    baseline: Path | None
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    api_urls: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        """Start the SQS endpoint and the stand-ins: no latency, no latency without key, 200 ms."""
        command = [
            sys.executable,
            "bench/sqs_endpoint.py",
            "-H",
            HOST,
            "-p",
            str(self.stack.sqs_port),
        ]
        process = self.stack.spawn("sqs", command, self.stack.env())
        wait_for_port(self.stack.sqs_port, process)

        self.api_urls["plain"] = self._start_stand_in("api-plain")
        self.api_urls["open"] = self._start_stand_in("api-open", "--accept-missing-key")
        self.api_urls["slow"] = self._start_stand_in("api-slow", f"--latency-ms={API_LATENCY_MS}")

    def _start_stand_in(self, name: str, *options: str) -> str:
        port = free_port()
        command = [sys.executable, "-m", "stack.phrase_api", "--host", HOST, "--port", str(port)]
        process = self.stack.spawn(name, [*command, *options], self.stack.env())
        wait_for_port(port, process)
        return f"http://{HOST}:{port}/api/1"

    def case_env(self, name: str, api: str = "plain", **extra: str) -> dict[str, str]:
        """Return the environment of one case: its own queue, store and journals."""
        return self.stack.env(
            INGEST_QUEUE=f"bench-{name}",
            INGEST_STORE_DIR=str(self.work_dir / "stores" / name),
            INGEST_RUNS_DIR=str(self.work_dir / "runs" / name),
            INGEST_API_URL=self.api_urls[api],
            INGEST_EVENTS="off",
            INGEST_PER_PAGE=PER_PAGE,
            INGEST_POLL_WAIT_S=BENCH_POLL_WAIT_S,
            **extra,
        )

    def data_dir(self, rows: int) -> Path:
        """Return a directory with one CSV of `rows` distinct phrases, written on first use."""
        directory = self.work_dir / "data" / str(rows)
        path = directory / "phrases.csv"
        if not path.exists():
            directory.mkdir(parents=True, exist_ok=True)
            with path.open("w", encoding="utf-8") as handle:
                handle.write("phrase\n")
                handle.writelines(f"bench phrase {index}\n" for index in range(rows))
        return directory

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def enqueue_ours(
        self, name: str, rows: int, *options: str, env: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Run `python enqueue.py` on `rows` rows; return its seconds and RSS in MiB."""
        command = [sys.executable, "enqueue.py", str(self.data_dir(rows)), *options]
        status, elapsed, peak, sampler, output = run_with_peak_rss(
            command, env or self.case_env(name), ROOT, timeout_s=900
        )
        if status != 0:
            raise RuntimeError(f"enqueue.py for case {name} exited with status {status}: {output}")

        own = re.search(r"elapsed:\s+([\d.]+) s", output)
        return {
            "seconds": elapsed,
            "own_seconds": float(own.group(1)) if own else elapsed,
            "peak_mib": peak,
            "rss_quarter_mib": sampler.at_fraction(0.25),
            "rss_end_mib": sampler.at_fraction(1.0),
        }

    def drain_ours(
        self,
        name: str,
        expected: int,
        concurrency: int,
        *worker_options: str,
        env: dict[str, str],
        timeout_s: float,
    ) -> dict[str, Any]:
        """Start one worker, wait until `expected` tasks ended in the case's store, stop it.

        The clock starts when the worker logs "ready."; tasks that ended before that are
        subtracted. Returns the rate, the seconds, and the CPU seconds of the worker
        (all its processes), the SQS endpoint and the stand-ins during the wait.
        """
        store = Path(env["INGEST_STORE_DIR"])
        worker = self.stack.start_worker(f"worker-{name}", concurrency, *worker_options, env=env)
        counters = self._cpu_counters(worker.pid)
        started, ended_before = time.monotonic(), tasks_ended(store)

        ended = ended_before
        while ended < expected and time.monotonic() - started < timeout_s:
            time.sleep(PROGRESS_POLL_S)
            ended = tasks_ended(store)
        elapsed = time.monotonic() - started

        cpu = {
            key: cpu_seconds(pid, children) - before
            for key, (pid, children, before) in counters.items()
        }
        self.stack.stop_process(f"worker-{name}")
        done = ended - ended_before
        return {
            "tasks": done,
            "seconds": elapsed,
            "rate": done / elapsed if elapsed > 0 else 0.0,
            "timed_out": ended < expected,
            "cpu_ms_per_task": {key: 1000 * value / max(done, 1) for key, value in cpu.items()},
        }

    def _cpu_counters(self, worker_pid: int) -> dict[str, tuple[int, bool, float]]:
        processes = {
            "worker": (worker_pid, True),
            "sqs endpoint": (self.stack.processes["sqs"].pid, False),
        }
        for name in ("api-plain", "api-slow"):
            processes[f"stand-in {name[4:]}"] = (self.stack.processes[name].pid, False)
        return {
            key: (pid, children, cpu_seconds(pid, children))
            for key, (pid, children) in processes.items()
        }

    def run_original(self, mode: str, name: str, rows: int, timeout_s: float) -> dict[str, Any]:
        """Run the original algorithm in `mode` (enqueue or work); return its count and seconds."""
        assert self.baseline is not None
        command = [
            sys.executable,
            str(self.baseline),
            mode,
            "--endpoint",
            self.stack.sqs_endpoint,
            "--queue",
            f"bench-{name}",
            "--data",
            str(self.data_dir(rows)),
            "--api",
            self.api_urls["open"] + "/phrases/legislator.json",
            "--store",
            str(self.work_dir / "stores" / name),
        ]
        started = time.monotonic()
        finished = subprocess.run(
            command,
            cwd=ROOT,
            env=self.stack.env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        wall = time.monotonic() - started
        if finished.returncode != 0:
            raise RuntimeError(
                f"original {mode} exited with status {finished.returncode}: {finished.stderr[-800:]}"
            )

        found = re.search(r"(\d+) \w+ in ([\d.]+) s", finished.stdout)
        if found is None:
            raise RuntimeError(f"original {mode} printed no count: {finished.stdout!r}")
        return {
            "count": int(found.group(1)),
            "own_seconds": float(found.group(2)),
            "wall_seconds": wall,
        }

    def queue_url(self, name: str) -> str:
        client = self.stack.sqs_client()
        return client.get_queue_url(QueueName=f"bench-{name}")["QueueUrl"]

    def case_enqueue(self) -> None:
        """Enqueue: rows/s of enqueue.py, of the original's serial sender and of the raw endpoint."""
        rows = self.sizes.enqueue_rows
        self.log(f"enqueue: ours, {rows:,} rows")
        ours = self.enqueue_ours("drain", rows)
        ours["rate"] = rows / ours["own_seconds"]
        self.data["enqueue_ours"] = ours

        compared, verdict = "", "no original"
        if self.baseline is not None:
            count = self.sizes.original_rows
            self.log(f"enqueue: original, {count:,} rows")
            original = self.run_original("enqueue", "original", count, timeout_s=600)
            original["rate"] = original["count"] / original["own_seconds"]
            self.data["enqueue_original"] = original
            ratio = ours["rate"] / original["rate"]
            compared = f"original {original['rate']:,.0f} rows/s ({count:,} rows): {ratio:.1f}x"
            verdict = _verdict(ratio >= TARGET_ENQUEUE_RATIO)

        self.log(f"enqueue: endpoint bound, {rows:,} raw messages")
        client = self.stack.sqs_client()
        url = client.create_queue(QueueName="bench-raw")["QueueUrl"]
        seconds = endpoint_bound.send_raw(self.stack.sqs_client, url, rows, RAW_THREADS)
        bound = rows / seconds
        self.data["enqueue_bound"] = {"seconds": seconds, "rate": bound}

        self.rows.append(
            Row(
                "Enqueue",
                "ours: enqueue.py",
                f"{rows:,} rows",
                f"{ours['rate']:,.0f} rows/s",
                compared,
                f">= {TARGET_ENQUEUE_RATIO:g}x",
                verdict,
            )
        )
        self.rows.append(
            Row(
                "Enqueue",
                f"endpoint bound: raw SendMessageBatch, {RAW_THREADS} threads",
                f"{rows:,} msgs",
                f"{bound:,.0f} msgs/s",
                f"ours is {ours['rate'] / bound:.0%} of it",
            )
        )

    def case_drain(self) -> None:
        """Drain: tasks/s of one worker (prefork and threads, 4), the original's and the raw endpoint's."""
        rows = self.sizes.enqueue_rows
        pools = {"prefork": self._drain_pool("drain", "prefork", rows)}
        self.enqueue_ours("drain-threads", rows)  # the enqueue case filled only the first queue
        pools["threads"] = self._drain_pool("drain-threads", "threads", rows, "--pool=threads")

        original = None
        if self.baseline is not None and "enqueue_original" in self.data:
            self.log(f"drain: original worker, {self.sizes.original_rows:,} tasks")
            original = self.run_original(
                "work", "original", self.sizes.original_rows, timeout_s=600
            )
            original["rate"] = original["count"] / original["own_seconds"]
            self.data["drain_original"] = original

        for pool, ours in pools.items():
            self.rows.append(self._drain_row(pool, ours, original))

        self.log(f"drain: endpoint bound, {rows:,} raw messages")
        seconds = endpoint_bound.drain_raw(self.stack.sqs_client, self.queue_url("raw"), rows, 4)
        bound = rows / seconds
        self.data["drain_bound"] = {"seconds": seconds, "rate": bound}
        best = max(ours["rate"] for ours in pools.values())
        self.rows.append(
            Row(
                "Drain, no API latency",
                "endpoint bound: raw receive 10 + DeleteMessageBatch, 4 threads",
                f"{rows:,} msgs",
                f"{bound:,.0f} msgs/s",
                f"ours is {best / bound:.0%} of it",
            )
        )

    def _drain_pool(self, name: str, pool: str, rows: int, *options: str) -> dict[str, Any]:
        self.log(f"drain: ours, {pool} pool, concurrency 4, {rows:,} tasks")
        ours = self.drain_ours(name, rows, 4, *options, env=self.case_env(name), timeout_s=420)
        self.data[f"drain_ours_{pool}"] = ours
        cpu = ", ".join(
            f"{key} {value:.1f}" for key, value in ours["cpu_ms_per_task"].items() if value >= 0.05
        )
        self.notes.append(f"Drain, ours ({pool}): CPU milliseconds per task: {cpu}.")
        return ours

    @staticmethod
    def _drain_row(pool: str, ours: dict[str, Any], original: dict[str, Any] | None) -> Row:
        compared, verdict = "", "no original"
        if original is not None:
            ratio = ours["rate"] / original["rate"]
            compared = (
                f"original {original['rate']:,.1f} tasks/s ({original['count']:,}): {ratio:.1f}x"
            )
            verdict = _verdict(ratio >= TARGET_DRAIN_RATIO and not ours["timed_out"])

        option = " --pool=threads" if pool == "threads" else ""
        return Row(
            "Drain, no API latency",
            f"ours: worker --concurrency=4{option} ({pool})",
            f"{ours['tasks']:,} tasks" + (" (timed out)" if ours["timed_out"] else ""),
            f"{ours['rate']:,.1f} tasks/s",
            compared,
            f">= {TARGET_DRAIN_RATIO:g}x",
            verdict,
        )

    def case_events(self) -> None:
        """Events: tasks/s of one prefork worker (4) with INGEST_EVENTS off, then on."""
        tasks = self.sizes.events_tasks
        rates = {}
        for setting in ("off", "on"):
            name = f"events-{setting}"
            env = self.case_env(name)
            env["INGEST_EVENTS"] = setting
            self.enqueue_ours(name, tasks, env=env)
            self.log(f"events {setting}: prefork, concurrency 4, {tasks:,} tasks")
            result = self.drain_ours(name, tasks, 4, env=env, timeout_s=300)
            self.data[name] = result
            rates[setting] = result["rate"]
            size = f"{result['tasks']:,} tasks" + (" (timed out)" if result["timed_out"] else "")
            self.rows.append(
                Row(
                    "Drain, events",
                    f"ours: INGEST_EVENTS={setting}, prefork, concurrency 4",
                    size,
                    f"{result['rate']:,.1f} tasks/s",
                    "" if setting == "off" else f"{result['rate'] / rates['off']:.0%} of off",
                )
            )

    def case_latency(self) -> None:
        """API latency 200 ms: requests/s of a prefork worker (4) and a thread-pool worker (50)."""
        variants = (
            (
                "latency-processes",
                4,
                (),
                self.sizes.latency_process_tasks,
                "prefork, concurrency 4",
            ),
            (
                "latency-threads",
                50,
                ("--pool=threads",),
                self.sizes.latency_thread_tasks,
                "--pool=threads --concurrency=50",
            ),
        )
        for name, concurrency, options, tasks, label in variants:
            env = self.case_env(name, api="slow")
            self.enqueue_ours(name, tasks, env=env)
            self.log(f"latency {API_LATENCY_MS} ms: {label}, {tasks:,} tasks")
            result = self.drain_ours(name, tasks, concurrency, *options, env=env, timeout_s=240)
            bound = concurrency / (API_LATENCY_MS / 1000)
            share = result["rate"] / bound
            self.data[name] = dict(result, bound=bound)
            cpu = ", ".join(
                f"{key} {value:.1f}"
                for key, value in result["cpu_ms_per_task"].items()
                if value >= 0.05
            )
            self.notes.append(f"API latency, {label}: CPU milliseconds per task: {cpu}.")
            self.rows.append(
                Row(
                    f"API latency {API_LATENCY_MS} ms",
                    f"ours: {label}",
                    f"{result['tasks']:,} tasks" + (" (timed out)" if result["timed_out"] else ""),
                    f"{result['rate']:,.1f} req/s",
                    f"bound {concurrency} / {API_LATENCY_MS / 1000:g} s = {bound:g} req/s: {share:.0%}",
                    f">= {TARGET_BOUND_SHARE:.0%}",
                    _verdict(share >= TARGET_BOUND_SHARE),
                )
            )

    def case_memory(self) -> None:
        """Memory: peak RSS of enqueue.py --dry-run at two sizes, and of the real send above."""
        peaks = []
        for rows in self.sizes.memory_rows:
            self.log(f"memory: enqueue.py --dry-run, {rows:,} rows")
            result = self.enqueue_ours(f"memory-{rows}", rows, "--dry-run")
            self.data[f"memory_dry_run_{rows}"] = result
            peaks.append(result["peak_mib"])
            self.rows.append(
                Row(
                    "Enqueue memory",
                    "ours: enqueue.py --dry-run (reads, checks, journals; sends nothing)",
                    f"{rows:,} rows",
                    f"peak {result['peak_mib']:.0f} MiB",
                    f"RSS at 25 %: {result['rss_quarter_mib']:.0f} MiB, at end: {result['rss_end_mib']:.0f} MiB",
                    f"< {TARGET_PEAK_RSS_MIB:g} MB, flat",
                    _verdict(
                        result["peak_mib"] < TARGET_PEAK_RSS_MIB
                        and peaks[-1] - peaks[0] <= FLAT_GROWTH_MIB
                    ),
                )
            )

        sent = self.data.get("enqueue_ours")
        if sent is not None:
            self.rows.append(
                Row(
                    "Enqueue memory",
                    "ours: enqueue.py sending to SQS (the enqueue case)",
                    f"{self.sizes.enqueue_rows:,} rows",
                    f"peak {sent['peak_mib']:.0f} MiB",
                    f"RSS at 25 %: {sent['rss_quarter_mib']:.0f} MiB, at end: {sent['rss_end_mib']:.0f} MiB",
                    f"< {TARGET_PEAK_RSS_MIB:g} MB",
                    _verdict(sent["peak_mib"] < TARGET_PEAK_RSS_MIB),
                )
            )

    def case_rate_limit(self) -> None:
        """Rate limit 10/s: achieved rate and the most tasks that ended in any one second."""
        tasks = self.sizes.rate_tasks
        env = self.case_env("rate", INGEST_RATE_LIMIT=f"{TARGET_RATE_PER_S:g}/s")
        self.enqueue_ours("rate", tasks, env=env)
        self.log(f"rate limit {TARGET_RATE_PER_S:g}/s: prefork, concurrency 4, {tasks:,} tasks")

        in_flight = _InFlightSampler(self.stack.sqs_client(), self.queue_url("rate"))
        result = self.drain_ours(
            "rate", tasks, 4, env=env, timeout_s=tasks / TARGET_RATE_PER_S * 2 + 30
        )
        in_flight.stop()

        times = _request_times(Path(env["INGEST_STORE_DIR"]))
        span = max(times) - min(times) if len(times) > 1 else 0.0
        rate = (len(times) - 1) / span if span > 0 else 0.0
        busiest = window_counts(times)
        self.data["rate"] = dict(
            result, fetched_rate=rate, max_per_second=busiest, max_in_flight=in_flight.peak
        )
        self.notes.append(
            f"Rate limit: at most {in_flight.peak} messages were in flight (received, not yet "
            "deleted) at once; the worker holds at most concurrency x worker_prefetch_multiplier."
        )
        self.rows.append(
            Row(
                f"Rate limit {TARGET_RATE_PER_S:g}/s",
                "ours: INGEST_RATE_LIMIT, prefork, concurrency 4",
                f"{len(times):,} tasks" + (" (timed out)" if result["timed_out"] else ""),
                f"{rate:.2f} tasks/s",
                f"most in any 1 s window: {busiest}",
                f">= {TARGET_RATE_MIN_PER_S:g}/s, never > {TARGET_RATE_PER_S:g} in 1 s",
                _verdict(rate >= TARGET_RATE_MIN_PER_S and busiest <= TARGET_RATE_PER_S),
            )
        )

    def run_all(self, cases: list[str]) -> None:
        """Run the named cases in the standard order."""
        for name in CASE_ORDER:
            if name in cases:
                getattr(self, f"case_{name}")()


CASE_ORDER = ("enqueue", "drain", "events", "latency", "rate_limit", "memory")


def _verdict(met: bool) -> str:
    return "met" if met else "missed"


def _request_times(store_dir: Path) -> list[float]:
    """Return the `requested_at` times of every stored record, in epoch seconds."""
    from datetime import datetime

    times = []
    for path in (store_dir / "results").glob("*/*.json"):
        record = json.loads(path.read_text(encoding="utf-8"))
        times.append(datetime.fromisoformat(record["requested_at"]).timestamp())
    return times


class _InFlightSampler:
    """Record the most in-flight messages of a queue, sampled on a thread until `stop()`."""

    def __init__(self, client: Any, queue_url: str, interval_s: float = 0.5) -> None:
        self.peak = 0
        self._client, self._url, self._interval = client, queue_url, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        name = "ApproximateNumberOfMessagesNotVisible"
        while not self._stop.wait(self._interval):
            found = self._client.get_queue_attributes(QueueUrl=self._url, AttributeNames=[name])
            self.peak = max(self.peak, int(found["Attributes"].get(name, 0)))


def raise_interrupt(signum: int, frame: object) -> None:
    """Turn SIGTERM into KeyboardInterrupt, so that every started process is stopped."""
    raise KeyboardInterrupt


def install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, raise_interrupt)
