"""A whole Persona on this machine: embedded broker, embedded Redis, topics and a worker.

``persona demo`` and ``persona backtest`` both run on it: the same ``persona worker`` production
runs, in a child process, against a Tansu broker and a valkey server on free loopback ports, with
the short group session timeout the embedded broker needs. Leaving the ``with`` block stops all
three, on error too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from connectors.embedded import EmbeddedBroker, EmbeddedRedis, free_port
from streams.settings import Settings
from streams.worker import WorkerProcess, ensure_topics


@dataclass(slots=True)
class LocalStack:
    broker: EmbeddedBroker
    redis: EmbeddedRedis
    settings: Settings
    worker: WorkerProcess


@contextlib.contextmanager
def local_stack(
    data_dir: Path, *, preload: Callable[[Settings], None] | None = None, **overrides: Any
) -> Iterator[LocalStack]:
    """Start broker, Redis and one worker; ``overrides`` are settings (``PERSONA_*`` env wins
    for anything not overridden, so a user can still set e.g. the consent default).

    ``preload(settings)`` runs after the topics exist and before the worker starts: a backtest
    loads its whole log there, so the worker sees every topic's true end from its first fetch.
    """
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(EmbeddedBroker(data_dir))
        redis = stack.enter_context(EmbeddedRedis(data_dir))
        values: dict[str, Any] = {
            "broker_url": broker.url,
            "redis_url": redis.url,
            "data_dir": str(data_dir),
            "session_timeout_s": 2.0,
            "heartbeat_s": 0.5,
            "web_port": free_port(),
        }
        values.update(overrides)
        settings = Settings.from_env(os.environ, **values)
        asyncio.run(ensure_topics(settings))
        if preload is not None:
            preload(settings)
        worker = stack.enter_context(WorkerProcess(settings, data_dir / "worker.log"))
        worker.wait_serving()
        yield LocalStack(broker, redis, settings, worker)
