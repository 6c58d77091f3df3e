"""Faust's own floor for ``persona bench``: a Faust app whose one agent only counts events.

``python -m streams.bench_count`` runs a minimal Faust worker (no table, no web server, no Redis)
that reads the given topics with ``take_events(1000, within)`` and counts what it gets: the most
any Faust agent reading those topics in batches can do on this broker, before doing any work. It
is configured by environment variables and reports through a JSON file (written atomically, about
once a second and when the count reaches ``PERSONA_BENCH_EXPECTED``):
``{"count", "first_at", "first_count", "last_at", "done", "events_per_s", "cpu_cores"}``: times
from the system-wide monotonic clock, ``events_per_s`` = (count - first_count) / (last_at -
first_at), i.e. from the end of the first batch to the end of the batch that completed the count
(the definition ``streams.bench`` uses for every contender); ``cpu_cores`` is this process's CPU
time over that window, in cores.

| variable | meaning |
|---|---|
| ``PERSONA_BENCH_BROKER_URL`` | broker, Faust form (``kafka://host:port``) |
| ``PERSONA_BENCH_APP_ID`` | Faust app id, hence consumer group |
| ``PERSONA_BENCH_TOPICS`` | comma-separated topics to read |
| ``PERSONA_BENCH_PARTITIONS`` | partitions of those topics |
| ``PERSONA_BENCH_EXPECTED`` | events after which the count is done |
| ``PERSONA_BENCH_OUT`` | the JSON report file |
| ``PERSONA_BENCH_DATA_DIR`` | Faust data directory |
| ``PERSONA_BENCH_BATCH`` / ``PERSONA_BENCH_WITHIN_S`` | take_events size (1000) and wait (0.05) |
| ``PERSONA_BENCH_SESSION_TIMEOUT_S`` / ``PERSONA_BENCH_HEARTBEAT_S`` | 2.0 and 0.5 |

Nothing happens at import: the app is built in :func:`main`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson


def _write(path: Path, report: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(orjson.dumps(report))
    os.replace(tmp, path)


def main(env: Mapping[str, str] | None = None) -> None:
    import faust

    from streams.settings import SETTINGS
    from streams.worker import execute_worker, tune_gc, use_uvloop

    use_uvloop()
    env = os.environ if env is None else env
    topics = [t for t in env["PERSONA_BENCH_TOPICS"].split(",") if t]
    expected = int(env["PERSONA_BENCH_EXPECTED"])
    out = Path(env["PERSONA_BENCH_OUT"])
    batch = int(env.get("PERSONA_BENCH_BATCH", "1000"))
    within = float(env.get("PERSONA_BENCH_WITHIN_S", "0.05"))
    app = faust.App(
        env["PERSONA_BENCH_APP_ID"],
        broker=env["PERSONA_BENCH_BROKER_URL"],
        store="memory://",
        datadir=env.get("PERSONA_BENCH_DATA_DIR", "/tmp/persona-bench-count"),
        topic_partitions=int(env["PERSONA_BENCH_PARTITIONS"]),
        broker_session_timeout=float(env.get("PERSONA_BENCH_SESSION_TIMEOUT_S", "2.0")),
        broker_heartbeat_interval=float(env.get("PERSONA_BENCH_HEARTBEAT_S", "0.5")),
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        autodiscover=False,
        stream_wait_empty=False,
    )
    source = app.topic(*topics, key_serializer="raw", value_serializer="raw")
    report: dict[str, Any] = {
        "count": 0, "first_at": None, "first_count": 0, "last_at": None,
        "done": False, "events_per_s": None, "cpu_cores": None,
    }  # fmt: skip
    cpu_first = 0.0
    written_at = 0.0

    @app.agent(source, name="count")
    async def count(stream: Any) -> None:
        nonlocal written_at, cpu_first
        async for events in stream.take_events(batch, within):
            now = time.monotonic()
            report["count"] += len(events)
            if report["first_at"] is None:
                report["first_at"], report["first_count"] = now, report["count"]
                cpu_first = time.process_time()
            report["last_at"] = now
            if not report["done"] and report["count"] >= expected:
                report["done"] = True
                span = now - report["first_at"]
                counted = report["count"] - report["first_count"]
                report["events_per_s"] = counted / span if span > 0 else None
                report["cpu_cores"] = (time.process_time() - cpu_first) / span if span > 0 else None
                _write(out, report)
            elif now - written_at >= 1.0:
                written_at = now
                _write(out, report)

    tune_gc(SETTINGS["gc_gen0_threshold"].default)  # as the worker does
    execute_worker(app, "warning")


if __name__ == "__main__":
    main()
