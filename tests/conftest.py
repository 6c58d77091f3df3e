"""Shared fixtures: the real embedded broker and Redis, and workers started against them.

Every process a fixture starts is stopped by its finalizer, on failure too; the servers also die
with the test process (parent-death signal) if pytest itself is killed.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from connectors.embedded import EmbeddedBroker, EmbeddedRedis, free_port
from streams.settings import Settings
from streams.worker import WorkerProcess, ensure_topics

REPO = Path(__file__).resolve().parents[1]


def _datasets() -> Path:
    """The shared datasets: ``../shared/datasets`` from the project root (``PERSONA_DATASETS``
    overrides; a clone elsewhere, e.g. in a temporary folder, finds the workplace copy)."""
    candidates = [os.environ.get("PERSONA_DATASETS"), REPO.parent / "shared" / "datasets",
                  "/work/shared/datasets"]  # fmt: skip
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return REPO.parent / "shared" / "datasets"


DATASETS = _datasets()

_ids = itertools.count()


def wait_until(
    predicate: Callable[[], Any],
    *,
    timeout: float = 30.0,
    interval: float = 0.2,
    what: str,
    detail: Callable[[], str] | None = None,
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail with ``what`` after ``timeout``.

    ``detail()``, asked only on failure, adds what the system was doing (counters, positions).
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    more = f"; {detail()}" if detail is not None else ""
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last value: {last!r}{more})")


@pytest.fixture(scope="session")
def servers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def broker(servers_dir: Path) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(servers_dir) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server(servers_dir: Path) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(servers_dir) as server:
        yield server


def engine_settings(
    broker: EmbeddedBroker, redis_server: EmbeddedRedis, data_dir: Path, **overrides: Any
) -> Settings:
    """Settings for one isolated engine: own topics, consumer group and Redis database."""
    n = next(_ids)
    prefix = f"t{os.getpid()}-{n}-"
    values: dict[str, Any] = {
        "broker_url": broker.url,
        "redis_url": redis_server.url,
        "app_id": f"{prefix}persona",
        "topic_prefix": prefix,
        "partitions": 4,
        "data_dir": str(data_dir),
        "web_port": free_port(),
        "session_timeout_s": 2.0,
        "heartbeat_s": 0.5,
        "batch_within_s": 0.02,
    }
    values.update(overrides)
    settings = Settings.from_env({}, **values)
    asyncio.run(ensure_topics(settings))
    return settings


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[[Settings], WorkerProcess]]:
    """Start ``persona worker`` processes; all are stopped when the test ends."""
    workers: list[WorkerProcess] = []

    def start(settings: Settings, name: str = "worker") -> WorkerProcess:
        worker = WorkerProcess(settings, tmp_path / f"{name}-{len(workers)}.log").start()
        workers.append(worker)
        worker.wait_serving()
        return worker

    yield start
    for worker in workers:
        worker.stop()
