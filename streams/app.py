"""The Faust app: topics, the profiles table, the ingest agent and the web views.

One agent consumes the four input topics together, in batches (``take_events``: the batch is
acknowledged only after it is fully processed, so a crash re-delivers it, and de-duplication makes
the replay harmless). Per batch it parses and folds events into profiles (``streams.ingest``),
sends rejects to the dead-letter topic, writes each changed profile once to the changelog-backed
table and once to Redis in a single pipeline.

Build it with :func:`create_app`; ``persona worker`` runs it.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import faust
import orjson
from faust.streams import _current_event
from faust.types import EventT

from connectors.redis_cache import ProfileCache
from connectors.segment import dead_letter_record
from models.features import summary
from streams.api import add_routes
from streams.ingest import Record, ingest_batch
from streams.metrics import Metrics
from streams.settings import Settings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Persona:
    """Everything one worker holds: the Faust app and the parts its agents use."""

    app: faust.App
    settings: Settings
    metrics: Metrics
    cache: ProfileCache
    profiles: Any  # faust Table[bytes, bytes]
    watermark: float = 0.0
    """Largest event time this worker has seen: the "now" of profile summaries."""


@contextlib.contextmanager
def _as_current_event(event: EventT) -> Iterator[None]:
    """Make ``event`` Faust's current event, so table writes go to its partition.

    Faust picks the changelog partition (and the RocksDB partition store) of a table write from
    the stream's current event. A batch mixes partitions, so each write names its own.
    """
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


def create_app(settings: Settings) -> Persona:
    """Build the Faust app for ``settings``."""
    app = faust.App(
        settings.app_id,
        broker=settings.broker_url,
        store=settings.store,
        datadir=f"{settings.data_dir}/{settings.app_id}-data",
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_s,
        consumer_auto_offset_reset="earliest",
        web_enabled=True,
        web_host=settings.web_host,
        web_bind=settings.web_host,
        web_port=settings.web_port,
        autodiscover=False,
        stream_wait_empty=False,
    )
    metrics = Metrics()
    cache = ProfileCache(settings.redis_url)
    profiles = app.Table(
        "profiles", partitions=settings.partitions, key_type=bytes, value_type=bytes
    )
    persona = Persona(app, settings, metrics, cache, profiles)

    inputs = app.topic(
        *settings.input_topics.values(),
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.partitions,
    )
    deadletter = app.topic(
        settings.topics["deadletter"], key_serializer="raw", value_serializer="raw"
    )

    @app.agent(inputs, name="ingest")
    async def ingest(stream: faust.StreamT[bytes]) -> None:
        async for events in stream.take_events(settings.batch_size, settings.batch_within_s):
            await process_batch(persona, deadletter, events)

    add_routes(app, cache=cache, metrics=metrics, segment_definitions=list)

    @app.service
    class RedisCloser(faust.Service):  # type: ignore[misc]
        async def on_stop(self) -> None:
            await cache.close()

    return persona


async def process_batch(persona: Persona, deadletter: faust.TopicT, events: list[EventT]) -> None:
    """Ingest one batch of Faust events end to end: table, Redis, dead letters, metrics."""
    started = time.perf_counter()
    settings, metrics, profiles = persona.settings, persona.metrics, persona.profiles
    records = [
        Record(e.message.topic, e.message.partition, e.message.offset, e.key, e.value)
        for e in events
    ]

    def load(user_id: str) -> dict[str, Any] | None:
        raw = profiles.get(user_id.encode())
        return orjson.loads(raw) if raw else None

    result = ingest_batch(
        records,
        load,
        now=time.time(),
        max_event_bytes=settings.max_event_bytes,
        max_future_s=settings.max_future_s,
        dedupe_window=settings.dedupe_window,
        affinity_half_life_s=settings.affinity_half_life_days * 86400.0,
    )

    for record, rejection in result.rejected:
        await deadletter.send(
            key=record.key,
            value=dead_letter_record(
                record.value,
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                reason=rejection.reason,
                detail=rejection.detail,
                at=time.time(),
            ),
        )
        metrics.deadletters.labels(reason=rejection.reason).inc()

    persona.watermark = max(persona.watermark, result.max_ts)
    if result.changed:
        event_of_partition = {e.message.partition: e for e in events}
        for user_id, profile in result.changed.items():
            with _as_current_event(event_of_partition[result.partition_of[user_id]]):
                profiles[user_id.encode()] = orjson.dumps(profile)
        summaries = {
            user_id: summary(profile, now=persona.watermark)
            for user_id, profile in result.changed.items()
        }
        errors_before = persona.cache.write_errors
        redis_started = time.perf_counter()
        await persona.cache.write_profiles(summaries)
        metrics.redis_write_seconds.observe(time.perf_counter() - redis_started)
        metrics.redis_errors.inc(persona.cache.write_errors - errors_before)
        metrics.profile_writes.inc(len(summaries))

    for (topic, outcome), count in result.counts.items():
        metrics.events.labels(topic=topic, outcome=outcome).inc(count)
    metrics.event_time_watermark.set(persona.watermark)
    metrics.batch_events.observe(len(events))
    metrics.batch_seconds.observe(time.perf_counter() - started)
