"""Measuring helpers for the benchmarks: the machine, CPU time, memory, counts and rates."""

from __future__ import annotations

import bisect
import os
import platform
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

#: Packages whose versions the benchmark prints.
REPORTED_PACKAGES = ("celery", "kombu", "boto3", "moto", "requests")

#: Seconds between two RSS samples of a running process.
RSS_SAMPLE_S = 0.2

#: Seconds between two looks at the store while waiting for tasks to end.
PROGRESS_POLL_S = 0.2


def machine_summary() -> list[str]:
    """Return lines that name the CPU, core count, memory, load and software versions."""
    versions = ", ".join(f"{name} {metadata.version(name)}" for name in REPORTED_PACKAGES)
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return [
        f"cpu:      {_cpu_model()}, {os.cpu_count()} cores",
        f"memory:   {_memory_gib():.1f} GiB",
        f"load:     {load} (1, 5, 15 min averages before the run)",
        f"python:   {platform.python_version()} on {platform.system()} {platform.release()}",
        f"packages: {versions}",
    ]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def cpu_seconds(pid: int, with_children: bool = False) -> float:
    """Return the user+system CPU seconds a live process (and its direct children) used.

    Returns 0.0 for a process that is gone. Linux only: reads /proc.
    """
    total = _own_cpu_seconds(pid)
    if with_children:
        total += sum(_own_cpu_seconds(child) for child in _children(pid))
    return total


def _own_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(word) for word in text.split()]


def count_lines(path: Path) -> int:
    """Return the number of newline characters in a file, 0 if it does not exist."""
    try:
        with path.open("rb") as handle:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def tasks_ended(store_dir: Path) -> int:
    """Return how many tasks ended in a store: result files listed plus ledger entries."""
    return count_lines(store_dir / "manifest.jsonl") + count_lines(store_dir / "failures.jsonl")


@dataclass
class RssSampler:
    """Sample a process's resident set size (RSS) on a thread until `stop()`.

    `samples` contains (seconds since start, RSS in MiB) pairs.
    """

    pid: int
    samples: list[tuple[float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._started = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return max((rss for _, rss in self.samples), default=0.0)

    def at_fraction(self, fraction: float) -> float:
        """Return the RSS in MiB of the sample nearest to `fraction` (0..1) of the run."""
        if not self.samples:
            return 0.0
        index = min(len(self.samples) - 1, int(fraction * (len(self.samples) - 1)))
        return self.samples[index][1]

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = _rss_mib(self.pid)
            if rss is None:
                return
            self.samples.append((time.monotonic() - self._started, rss))
            self._stop.wait(RSS_SAMPLE_S)


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_with_peak_rss(
    command: Sequence[str], env: dict[str, str], cwd: Path, timeout_s: float
) -> tuple[int, float, float, RssSampler, str]:
    """Run a command; return (exit status, wall seconds, peak RSS MiB, sampler, output tail).

    The peak comes from the kernel's maximum RSS for the child (`wait4`), so a short
    spike between two samples still counts. Raises subprocess.TimeoutExpired after
    `timeout_s`, with the process killed.
    """
    started = time.monotonic()
    process = subprocess.Popen(
        list(command),
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    sampler = RssSampler(process.pid)
    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.append(process.stdout.read()), daemon=True)
    reader.start()

    deadline = started + timeout_s
    while True:
        finished_pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if finished_pid:
            break
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            sampler.stop()
            raise subprocess.TimeoutExpired(list(command), timeout_s)
        time.sleep(0.05)

    elapsed = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    sampler.stop()
    reader.join()
    text = b"".join(output).decode(errors="replace")
    peak = max(usage.ru_maxrss / 1024, sampler.peak_mib)
    return process.returncode, elapsed, peak, sampler, text[-2000:]


def window_counts(timestamps: Sequence[float], window_s: float = 1.0) -> int:
    """Return the most events in any window of `window_s` seconds that starts at an event.

    Every window with the maximum count can be shifted to start at one of its events, so
    this is the maximum over all windows of that length.
    """
    ordered = sorted(timestamps)
    best = 0
    for index, start in enumerate(ordered):
        end = bisect.bisect_left(ordered, start + window_s)
        best = max(best, end - index)
    return best
