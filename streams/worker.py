"""Running workers: in this process (``persona worker``) or as a child process (demo, tests).

A worker in a child process is exactly what production runs: the same command, configured by the
same environment variables. The child gets its own process group and dies with its parent, so a
demo or a test that is interrupted never leaves a worker behind.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import ctypes.util
import logging
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import orjson

from connectors.embedded import spawn, stop_process_group
from connectors.kafka import create_topics
from streams.settings import Settings


def all_topics(settings: Settings) -> list[str]:
    """Every topic Persona reads or writes, created up front with the configured partitions."""
    internal = (
        f"{settings.app_id}-ticks",
        f"{settings.app_id}-model-snapshots",
        f"{settings.app_id}-identity-links",
    )
    return [*settings.topics.values(), *internal]


async def ensure_topics(settings: Settings) -> list[str]:
    """Create the missing input, output, dead-letter and internal topics."""
    return await create_topics(
        settings.broker_url,
        all_topics(settings),
        partitions=settings.partitions,
        replication_factor=settings.replication_factor,
    )


def check_redis_credentials(url: str) -> None:
    """Fail fast, in one line, when Redis refuses our credentials; a Redis that is merely down
    is not an error at start-up (the worker retries its writes with backoff)."""
    import redis
    from redis.exceptions import AuthenticationError, ResponseError
    from redis.exceptions import ConnectionError as RedisConnectionError

    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    refused = (
        "Redis refused the connection's credentials: it needs a password and "
        "PERSONA_REDIS_URL gives none or a wrong one (redis://:<password>@host:port/db)"
    )
    try:
        client.ping()
    except AuthenticationError:
        raise AuthenticationError(refused) from None
    except ResponseError as exc:
        if any(word in str(exc) for word in ("NOAUTH", "WRONGPASS", "AUTH")):
            raise AuthenticationError(refused) from None
        raise
    except RedisConnectionError:
        logging.getLogger(__name__).warning("Redis is not reachable yet; writes will retry")
    finally:
        client.close()


def tune_gc(gen0_threshold: int) -> None:
    """Collect garbage less often, and never look at what exists now again.

    Python's cyclic collector runs after every 700 net allocations and now and then walks every
    container of the process. A worker allocates a few dicts per event field and keeps a large,
    stable heap (Faust, River models, the modules); with the defaults the collector took about
    a tenth of the worker's CPU in the benchmark, and each full collection paused the event loop
    for about 200 ms. Freezing the start-up heap (:func:`gc.freeze`) takes it out of every later
    collection; a higher young-generation threshold makes the rest rarer. Persona's per-event
    data (parsed events, profiles as JSON trees) has no reference cycles: reference counting
    frees it either way. What does form cycles (some of Faust's in-flight objects) waits longer
    for a collection; a census of a live worker after 100k events found nothing left to free.
    """
    import gc

    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(gen0_threshold, older, oldest)


class MemoryTrimmer:
    """Hands the C allocator's free memory back to the system now and then (glibc only).

    A worker's larger objects (event payloads, decoded profiles, the events a partition holds
    for event-time order) come from the C allocator, which keeps what they freed: after a
    burst, resident memory stays at its peak. ``malloc_trim`` returns the free pages; it took
    0.2 to 7 ms in a worker with 60k profiles, and gave back 32 of the 158 MiB it had grown.
    Where there is no glibc (musl, macOS) it does nothing.

    >>> trimmer = MemoryTrimmer(every_s=10.0)
    >>> first = trimmer.maybe_trim(now=0.0)  # True where there is glibc
    >>> trimmer.maybe_trim(now=5.0), trimmer.maybe_trim(now=10.0) == first
    (False, True)
    >>> MemoryTrimmer(every_s=0.0).maybe_trim(now=100.0)  # turned off
    False
    """

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._trim = _malloc_trim() if every_s > 0 else None
        self._last = -math.inf

    def maybe_trim(self, now: float) -> bool:
        """Trim if ``every_s`` passed since the last time; True if it trimmed."""
        if self._trim is None or now - self._last < self.every_s:
            return False
        self._last = now
        self._trim(0)
        return True


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def use_uvloop() -> None:
    """Run asyncio on uvloop: less overhead per callback and per socket read.

    Every Faust process here (the worker, the benchmark's count-only agent) is event-loop bound:
    Faust's streams, its consumer thread and both producers are asyncio code.
    """
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def execute_worker(app: Any, log_level: str) -> None:
    """Run a Faust ``app`` in this process until SIGTERM or Ctrl-C, logging JSON lines."""
    import faust

    from streams.logs import logging_config

    worker = faust.Worker(
        app,
        loglevel=log_level.upper(),
        logging_config=logging_config(log_level),
        quiet=True,
    )
    # Faust's terminal spinner (kept at log levels from WARNING up) sets the root logger to
    # DEBUG, so every library's debug record is built: about a tenth of the worker's CPU.
    worker.spinner = None
    worker.execute_from_commandline()


def run_worker(settings: Settings) -> None:
    """Run a Persona worker in this process until SIGTERM or Ctrl-C."""
    from streams.app import create_app

    use_uvloop()
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)  # Faust makes only the last level
    check_redis_credentials(settings.redis_url)
    asyncio.run(ensure_topics(settings))
    app = create_app(settings).app
    tune_gc(settings.gc_gen0_threshold)
    execute_worker(app, settings.log_level)


class WorkerProcess:
    """``persona worker`` as a child process, with its log in a file."""

    def __init__(self, settings: Settings, log_path: str | os.PathLike[str]) -> None:
        self.settings = settings
        self.log_path = Path(log_path)
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        env = {**os.environ, **self.settings.as_env()}
        self._proc = spawn([sys.executable, "-m", "streams.cli", "worker"], self.log_path, env)
        atexit.register(self.stop)
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def url(self, path: str) -> str:
        """The worker's web address of ``path`` (e.g. ``/readyz``)."""
        return f"http://{self.settings.web_host}:{self.settings.web_port}{path}"

    def metrics_url(self) -> str:
        return self.url("/metrics")

    def scrape(self, timeout: float = 2.0) -> str | None:
        """The worker's /metrics text, or None while it is not serving."""
        try:
            with urllib.request.urlopen(self.metrics_url(), timeout=timeout) as response:
                return response.read().decode()
        except OSError:
            return None

    def readiness(self, timeout: float = 2.0) -> dict[str, Any] | None:
        """The worker's /readyz body (``ready``, ``partitions_assigned``, ``redis``), or None
        while it is not serving."""
        try:
            with urllib.request.urlopen(self.url("/readyz"), timeout=timeout) as response:
                return orjson.loads(response.read())
        except urllib.error.HTTPError as error:  # 503 while not ready: the body says why
            return orjson.loads(error.read())
        except OSError:
            return None

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the worker has partitions assigned and Redis answers (``/readyz``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"worker exited early; last log lines:\n{self.log_tail()}")
            if (self.readiness() or {}).get("ready"):
                return
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def wait_serving(self, timeout: float = 60.0) -> None:
        """Wait until the worker's web port answers; raise with the log's tail if it died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"worker exited early; last log lines:\n{self.log_tail()}")
            if self.scrape() is not None:
                return
            time.sleep(0.2)
        raise TimeoutError(f"worker not serving after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL the worker's process group: a crash, for fault tests."""
        if self._proc and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()

    def stop(self, timeout: float = 15.0) -> int | None:
        """Graceful stop (SIGTERM, then SIGKILL after ``timeout``); returns the exit code."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        atexit.unregister(self.stop)
        return stop_process_group(proc, timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
