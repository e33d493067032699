"""Start and stop the local stack's processes: SQS endpoint, phrase-API stand-in, workers, Flower.

Used by `make demo`, `make up`, the tests and the benchmarks, so that all of them
run the same commands. Every server binds to 127.0.0.1.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3

#: Repository root: the working directory of every process started here.
ROOT = Path(__file__).resolve().parent.parent

HOST = "127.0.0.1"

#: Seconds to wait for a server to accept connections.
START_TIMEOUT_S = 30.0

#: Seconds a process gets to stop after SIGTERM before it is killed.
STOP_TIMEOUT_S = 15.0

#: Dummy credentials for the local SQS endpoint, which accepts any.
LOCAL_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "local",
    "AWS_SECRET_ACCESS_KEY": "local",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def port_in_use(port: int) -> bool:
    """Return whether something accepts connections on 127.0.0.1:`port`."""
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(
    port: int, process: subprocess.Popen | None = None, timeout_s: float = START_TIMEOUT_S
) -> None:
    """Wait until 127.0.0.1:`port` accepts connections; raise RuntimeError if it never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"process {process.args!r} exited with status {process.returncode} before listening"
            )
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {HOST}:{port} after {timeout_s:.0f} s")


def new_api_key() -> str:
    """Return a random key for the phrase-API stand-in, new for each stack."""
    return "local-" + secrets.token_urlsafe(18)


@dataclass
class LocalStack:
    """The processes of one local stack, stopped together by `stop()` or on leaving a `with`."""

    log_dir: Path
    sqs_port: int = field(default_factory=free_port)
    api_port: int = field(default_factory=free_port)
    api_key: str = field(default_factory=new_api_key)
    settings: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def sqs_endpoint(self) -> str:
        return f"http://{HOST}:{self.sqs_port}"

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.api_port}/api/1"

    def env(self, **overrides: str) -> dict[str, str]:
        """Return the environment for a process of this stack: the settings and dummy AWS credentials."""
        env = dict(os.environ)
        env.update(LOCAL_AWS_ENV)
        env.update(
            INGEST_SQS_ENDPOINT=self.sqs_endpoint,
            INGEST_API_URL=self.api_url,
            INGEST_API_KEY=self.api_key,
            PYTHONUNBUFFERED="1",
        )
        env.update(self.settings)
        env.update(overrides)
        return env

    def start_sqs(self) -> None:
        """Start moto's standalone server as the SQS (and SNS) endpoint."""
        command = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.sqs_port)]
        process = self.spawn("sqs", command, self.env())
        wait_for_port(self.sqs_port, process)

    def start_phrase_api(self, *fault_options: str) -> None:
        """Start the phrase-API stand-in, with optional fault options such as `--error-rate 0.2`."""
        command = [
            sys.executable,
            "-m",
            "stack.phrase_api",
            "--host",
            HOST,
            "--port",
            str(self.api_port),
            *fault_options,
        ]
        process = self.spawn("phrase-api", command, self.env())
        wait_for_port(self.api_port, process)

    def start_worker(
        self,
        name: str = "worker",
        concurrency: int = 4,
        *extra: str,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen:
        """Start `celery -A tasks worker` and wait until it is ready to consume."""
        log_path = self.log_dir / f"{name}.log"
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tasks",
            "worker",
            f"--concurrency={concurrency}",
            "--loglevel=INFO",
            f"--hostname={name}@%h",
            *extra,
        ]
        written_before = log_path.stat().st_size if log_path.exists() else 0
        process = self.spawn(name, command, self.env(**dict(env or {})))
        wait_for_log(log_path, "ready.", process, after_byte=written_before)
        return process

    def start_flower(self, port: int = 5555) -> subprocess.Popen:
        """Start Flower on 127.0.0.1:`port`, its API open without login as it is loopback-only."""
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tasks",
            "flower",
            f"--address={HOST}",
            f"--port={port}",
        ]
        process = self.spawn("flower", command, self.env(FLOWER_UNAUTHENTICATED_API="true"))
        wait_for_port(port, process)
        return process

    def spawn(self, name: str, command: list[str], env: Mapping[str, str]) -> subprocess.Popen:
        """Start a process in its own process group, logging to `log_dir/<name>.log`."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.processes[name] = process
        return process

    def wait_until_drained(self, timeout_s: float = 300.0, empty_polls: int = 3) -> None:
        """Wait until the task queue has no waiting, in-flight or delayed message.

        The queue must look empty on `empty_polls` looks in a row, one second apart,
        because SQS's counts are approximate. Raises RuntimeError on timeout or when a
        process of the stack has stopped.
        """
        from tasks.queues import queue_depth

        client = self.sqs_client()
        queue = self.ingest_settings().queue_name
        deadline = time.monotonic() + timeout_s
        seen_empty = 0
        while seen_empty < empty_polls:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"tasks still queued after {timeout_s:.0f} s: {queue_depth(client, queue)}"
                )
            stopped = [
                name for name, process in self.processes.items() if process.poll() is not None
            ]
            if stopped:
                raise RuntimeError(f"{', '.join(stopped)} stopped early; see {self.log_dir}")
            time.sleep(1.0)
            seen_empty = seen_empty + 1 if sum(queue_depth(client, queue).values()) == 0 else 0

    def ingest_settings(self) -> Any:
        """Return the `tasks.settings.Settings` that this stack's processes read, .env included."""
        from tasks.settings import load_settings

        return load_settings(self.env(), ROOT / ".env")

    def sqs_client(self) -> Any:
        """Return a boto3 SQS client for this stack's endpoint."""
        return boto3.client(
            "sqs",
            endpoint_url=self.sqs_endpoint,
            region_name=LOCAL_AWS_ENV["AWS_DEFAULT_REGION"],
            aws_access_key_id=LOCAL_AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=LOCAL_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        )

    def stop_process(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Send `sig` to a process's group and wait for it, killing it after STOP_TIMEOUT_S."""
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        _signal_group(process, sig)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()

    def stop(self) -> None:
        """Stop every process this stack started, workers first."""
        for name in sorted(self.processes, key=lambda name: name in ("sqs", "phrase-api")):
            self.stop_process(name)


def wait_for_log(
    path: Path,
    text: str,
    process: subprocess.Popen,
    timeout_s: float = START_TIMEOUT_S,
    after_byte: int = 0,
) -> None:
    """Wait until `text` appears in the log at `path` after its first `after_byte` bytes.

    Raises RuntimeError if the process dies first or `timeout_s` passes. Pass the log's
    size before the process started, so that an earlier run's lines do not count.
    """
    deadline = time.monotonic() + timeout_s
    expected = text.encode()
    while time.monotonic() < deadline:
        if path.exists() and expected in _read_from(path, after_byte):
            return
        if process.poll() is not None:
            raise RuntimeError(
                f"{process.args[3:6]} exited with status {process.returncode}; see {path}"
            )
        time.sleep(0.2)
    raise RuntimeError(f"{text!r} not in {path} after {timeout_s:.0f} s")


def _read_from(path: Path, offset: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
