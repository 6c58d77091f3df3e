"""``persona backtest``: what would Persona have done on this log?

Runs the whole engine (ingest, profiles, models, triggers) on the embedded broker and Redis over a
log in event time: the log is produced to the input topics, a real worker consumes it with the
wall clock switched off (``PERSONA_LIVE_CLOCK=false``), and when every message has been consumed
the worker is stopped (flushing what it produced) and everything it wrote is dumped:
``DIR/<topic kind>.jsonl`` per output topic (one message value per line, dead letters included)
and ``DIR/profiles.jsonl`` with the final Redis profile of every user. Marketers use it to try a
config on last month's events before going live; the determinism tests use it too.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from aiokafka import ConsumerRecord, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from connectors.kafka import probe_consumer, produce_all, send_to_partitions
from connectors.redis_cache import ProfileCache, user_of_key
from connectors.replay import ReplayMessage, read_log, stream_of
from connectors.segment import Rejection, parse_event
from streams.app import end_of_log_ticks
from streams.demo import EngineStats
from streams.local import LocalStack, local_stack
from streams.settings import Settings


def run_backtest(
    path: Path,
    fmt: str,
    out_dir: Path,
    *,
    config_path: Path | None = None,
    partitions: int = 4,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Backtest the log at ``path``; return counts per output file."""
    log = read_log(path, fmt)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(tempfile.mkdtemp(prefix="persona-backtest-"))
    overrides: dict[str, Any] = {
        "app_id": "persona-backtest",
        "partitions": partitions,
        "live_clock": False,
        "max_future_s": 10 * 365 * 86400.0,  # an old log replayed today is not "in the future"
    }
    if config_path is not None:
        overrides["config_path"] = str(config_path)

    def produce_log(settings: Settings) -> None:
        topics = settings.input_topics
        messages = [(topics[stream_of(m)], m.key or None, m.value) for m in log.messages]
        asyncio.run(produce_all(settings.broker_url, messages))

    with local_stack(data_dir, preload=produce_log, **overrides) as stack:
        settings = stack.settings
        expected = len(log.messages)
        deadline = time.monotonic() + timeout_s
        consumed = 0
        while time.monotonic() < deadline:
            _check_alive(stack)
            text = stack.worker.scrape()
            consumed = EngineStats.from_exposition(text).consumed if text else consumed
            if consumed >= expected:
                break
            time.sleep(0.2)
        else:
            raise TimeoutError(
                f"backtest: worker consumed {consumed} of {expected} messages "
                f"in {timeout_s:.0f}s; see {stack.worker.log_path}"
            )
        # The log is over: event time reached its last event on every partition.
        end_of_log = last_valid_event_time(log.messages, settings)
        asyncio.run(send_to_partitions(settings.broker_url, end_of_log_ticks(settings, end_of_log)))
        while time.monotonic() < deadline:
            _check_alive(stack)
            text = stack.worker.scrape() or ""
            if _watermarks_reached(text, settings.partitions, end_of_log):
                break
            time.sleep(0.2)
        else:
            raise TimeoutError(
                f"backtest: end-of-log ticks not processed; see {stack.worker.log_path}"
            )
        stack.worker.stop()  # graceful: the worker flushes what it produced
        counts = asyncio.run(_dump(settings, out_dir))
    counts["rows"] = log.rows
    counts["events"] = len(log.messages)
    counts["rejected_rows"] = dict(log.rejected)
    return counts


def last_valid_event_time(messages: list[ReplayMessage], settings: Settings) -> float:
    """The latest event time the engine accepted: the end of the log in event time (a hostile
    line's absurd timestamp, dead-lettered by the engine, must not move the clocks)."""
    now = time.time()
    latest = 0.0
    for message in messages:
        event = parse_event(
            message.value,
            now=now,
            max_bytes=settings.max_event_bytes,
            max_future_s=settings.max_future_s,
        )
        if not isinstance(event, Rejection):
            latest = max(latest, event["ts"])
    return latest


def _check_alive(stack: LocalStack) -> None:
    if not stack.worker.running:
        raise RuntimeError(
            f"backtest: the worker stopped; last log lines:\n{stack.worker.log_tail()}"
        )


def _watermarks_reached(exposition: str, partitions: int, event_time: float) -> bool:
    reached = set()
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == "persona_watermark_seconds" and sample.value >= event_time:
                reached.add(sample.labels["partition"])
    return len(reached) >= partitions


async def _dump(settings: Settings, out_dir: Path) -> dict[str, Any]:
    counts: dict[str, Any] = {}
    for kind, topic in settings.output_topics.items():
        values = await read_whole_topic(settings.broker_url, topic)
        with (out_dir / f"{kind}.jsonl").open("wb") as out:
            for value in values:
                out.write(value + b"\n")
        counts[kind] = len(values)
    cache = ProfileCache(settings.redis_url)
    try:
        profiles = []
        async for key in cache.client.scan_iter(match="persona:profile:*", count=1000):
            user_id = user_of_key(key)
            profiles.append(await cache.read_profile(user_id))
        profiles.sort(key=lambda p: p.get("user_id", ""))
        with (out_dir / "profiles.jsonl").open("wb") as out:
            for profile in profiles:
                out.write(orjson.dumps(profile, option=orjson.OPT_SORT_KEYS) + b"\n")
        counts["profiles"] = len(profiles)
    finally:
        await cache.close()
    return counts


async def read_whole_topic(broker_url: str, topic: str) -> list[bytes]:
    """Every message value of ``topic``, partition by partition, from the start to the end."""
    return [record.value for record in await read_topic_records(broker_url, topic)]


async def read_topic_records(broker_url: str, topic: str) -> list[ConsumerRecord[Any, Any]]:
    """Every record (key, value, partition, offset) of ``topic``, in (partition, offset) order."""
    consumer = await probe_consumer(broker_url, auto_offset_reset="latest")
    try:
        await consumer.topics()  # refreshes the cluster metadata
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        # The embedded broker can report an end offset short of the true end (the start of the
        # last batch + 1), so read each partition until a fetch comes back empty past it.
        end = await consumer.end_offsets(tps)
        records: list[ConsumerRecord[Any, Any]] = []
        for tp in tps:
            while True:
                batch = await consumer.getmany(tp, timeout_ms=500)
                got = batch.get(tp, [])
                records += got
                if not got and await consumer.position(tp) >= end[tp]:
                    break
        return records
    finally:
        await consumer.stop()
