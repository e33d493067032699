"""Fixtures that start real processes on 127.0.0.1: the SQS endpoint, the API stand-in, workers.

One moto server serves the whole test session; each test gets its own queue, store
and run journals, so tests cannot see each other's messages or files.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stack.processes import LocalStack


@pytest.fixture(scope="session")
def sqs_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Start one moto server (SQS and SNS) for the session; yield its port."""
    server = LocalStack(log_dir=tmp_path_factory.mktemp("sqs-server"))
    server.start_sqs()
    yield server.sqs_port
    server.stop()


@pytest.fixture
def stack(tmp_path: Path, sqs_port: int) -> Iterator[LocalStack]:
    """A local stack on the session's SQS endpoint, with its own queue, store and journals.

    Retries wait 0.1 to 0.2 s at first so that fault tests end quickly.
    """
    local = LocalStack(log_dir=tmp_path / "logs", sqs_port=sqs_port)
    local.settings.update(
        INGEST_QUEUE=f"test-{uuid.uuid4().hex[:12]}",
        INGEST_STORE_DIR=str(tmp_path / "store"),
        INGEST_RUNS_DIR=str(tmp_path / "runs"),
        INGEST_RETRY_BACKOFF_S="0.2",
        INGEST_POLL_WAIT_S="1",
    )
    yield local
    local.stop()
