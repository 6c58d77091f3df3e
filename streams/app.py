"""The Faust app: topics, the profiles table, the ingest agent, ticks and the web views.

One agent consumes the four input topics (and the internal ticks topic) together, in batches
(from the direct intake, :mod:`streams.intake`; a batch is acknowledged only after everything it
produced is on the broker, so a crash re-delivers it and de-duplication makes the replay
harmless). Per batch it

1. parses and folds events into profiles (``streams.ingest``), rejects to the dead-letter topic,
2. scores the changed profiles on this worker's model replicas (``streams.engine``),
3. advances each partition's event-time watermark,
4. writes each changed profile once to the changelog-backed table and once to Redis (one
   pipeline), and sends the trigger messages: these sends go on, each kind in batch order,
   while the next batches are computed (:func:`_hand_off`), and the batch is acknowledged once
   they are done and the batch before it is acknowledged.

Timers that came due (abandoned carts, label horizons, attribution windows) run between batches
(:func:`run_due_timers`), a chunk at a time, so a burst of deadlines never holds events back.

Ticks are small messages this worker sends to the partitions it owns every
``PERSONA_TICK_INTERVAL_S``: in live mode they advance an idle partition's watermark with the
wall clock (and so its timers). A tick carrying ``event_time`` instead (see
:func:`end_of_log_ticks`) declares that event time reached it: a backtest sends one at the end of
its log.

Build the app with :func:`create_app`; ``persona worker`` runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, partial
from typing import Any

import faust
import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka import TopicPartition as KafkaTopicPartition
from aiokafka.errors import IllegalStateError
from faust.streams import _current_event
from faust.transport.drivers.aiokafka import ensure_aiokafka_TP
from faust.types import TP, EventT, Message

from connectors.kafka import (
    KafkaSecurity,
    bootstrap_servers,
    client_options,
    configure_security,
    log_end_offsets,
)
from connectors.kafka import first_offset_from as first_offset_from_broker
from connectors.partitioner import partitions_for_keys
from connectors.payloads import tombstone
from connectors.redis_cache import ProfileCache
from connectors.segment import dead_letter_record
from models import profile_codec
from models.config import load_config
from models.events import Event
from models.snapshots import SnapshotSignatureError, verify_and_load
from streams.acks import acknowledge, hold
from streams.api import add_routes
from streams.clock import PartitionClocks, TimerIndex
from streams.drain import install_batch_drain
from streams.engine import (
    MODELS,
    TRIGGER_KIND,
    TRIGGERS_KEY,
    Emission,
    Engine,
    EngineOptions,
    Outputs,
    due_limit,
    move_segment,
    now_for,
    segment_sizes,
)
from streams.fastpath import QuietMonitor, RawSchema
from streams.identity import (
    CLAIM,
    MERGE,
    IdentityWork,
    alias_key,
    alias_of,
    erasure_request,
    identity_topic_name,
    internal_entry,
    run_claims,
    run_links,
    run_merges,
    run_unlinks,
)
from streams.ingest import BatchResult, Record, apply_events, parse_records
from streams.intake import Intake
from streams.keyfilter import KeyFilter
from streams.metrics import Metrics
from streams.offsets import DONE, HOLD, OffsetGuard, repair_gaps
from streams.ordering import ReorderBuffer
from streams.outbox import Outbox
from streams.sends import REDIS, Abandoned, SendChain, Turn
from streams.settings import Settings
from streams.training import (
    TrainerState,
    checkpoint,
    group_by_model,
    learn,
    restore,
    should_publish,
)
from streams.worker import MemoryTrimmer

log = logging.getLogger(__name__)

PRODUCE_BATCH_BYTES = 512 * 1024
"""Producer record batch size: under Kafka's default ``message.max.bytes`` (1 MB)."""

WATERMARK_KEY_PREFIX = b"\x00watermark/"
"""Table keys holding each partition's watermark (never a user id: ids are printable)."""
ERASED_KEY_PREFIX = b"\x00erased/"
"""Table keys marking erased users, by keyed hash of the id (the raw id is forgotten)."""
INTERNAL_KEY_PREFIX = b"\x00"
"""Table keys of the worker's own entries; user ids are printable, so never start with NUL."""
PARTITION_FIELD = "partition"
TIMERS_DUE_EVERY_S = 0.5
"""How often the timer backlog gauge is counted while there is a backlog."""
IDLE_PAUSE_S = 0.005
"""Pause between two chunks of due timers while no event arrives."""
EXAMPLES_PER_MESSAGE = 200
"""Training examples per message: well under Kafka's default 1 MB message limit."""
PAUSE_EVERY = 250
"""Events applied, or profiles scored, between two pauses of a batch (:func:`_let_sends_run`)."""
EVENTS_PER_TIMER_TIME = 2.0
"""While events flow, the pause after a run of due timers, in multiples of the run's time: the
timers get a third of the worker. A half (1.0) kept the timer stretch of a paced run as its p99
on a 2-core AMD EPYC box (README, send chain in stages). The fault tests lost or added triggers
at a third until their cause was found (events applied out of event-time order, README, Tests);
since, they passed at a quarter (3.0) under three parallel loops."""
SEND_DEPTH = 4
"""Hand-offs sent at once at most (see :func:`_hand_off`)."""
LOOP_TURNS = 3
"""Event-loop iterations a batch gives at each pause: each step of a send in flight (a reply
read, a future resolved, the next request written) takes one, and with one per pause a send
moved a step per stage of the batch after it."""


@dataclass(slots=True)
class Persona:
    """Everything one worker holds: the Faust app and the parts its agents use."""

    app: faust.App
    settings: Settings
    metrics: Metrics
    cache: ProfileCache
    engine: Engine
    profiles: Any  # faust Table[bytes, bytes]
    topics: dict[str, faust.TopicT]
    clocks: PartitionClocks
    timers: TimerIndex = field(default_factory=TimerIndex)
    segment_counts: dict[int, Counter[str]] = field(default_factory=dict)
    """Users per segment, per partition owned here (absolute counts written to Redis)."""
    saved_watermarks: dict[int, float] = field(default_factory=dict)
    ordering: ReorderBuffer = field(default_factory=lambda: ReorderBuffer(()))
    internal_keys: KeyFilter = field(default_factory=KeyFilter)
    """Erasure markers and aliases that may be in the table: most lookups of them miss, and a
    miss in the RocksDB store searches every partition's database."""
    offsets: OffsetGuard = field(default_factory=lambda: OffsetGuard(frozenset()))
    """What this worker applied per input partition; keeps commits from passing a gap."""
    trainer_state: Any = None  # faust Table[bytes, bytes]: signed checkpoints by model
    trainers: dict[str, TrainerState] = field(default_factory=dict)
    serving: dict[str, int] = field(default_factory=dict)
    """The snapshot version each replica serves."""
    partition_events: dict[int, EventT] = field(default_factory=dict)
    """The latest event of each input partition owned here: table writes outside a batch
    (due timers) make it current, so they land in that partition's changelog and store."""
    batch_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held by a batch or a run of due timers: they take turns, never interleave."""
    timers_may_be_due: asyncio.Event = field(default_factory=asyncio.Event)
    """Set after every batch (watermarks may have moved): wakes :func:`run_due_timers`."""
    timers_due_counted_at: float = 0.0
    batches_with_events: int = 0
    batches_seen_by_timers: int = 0
    """``batches_with_events`` when :func:`run_due_timers` last looked (events flowing?)."""
    trainer_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    trainer_dirty: dict[str, EventT] = field(default_factory=dict)
    """Trainers that learned since their checkpoint → their latest example's event."""
    trainer_held: list[EventT] = field(default_factory=list)
    """Examples learned but not checkpointed yet: acknowledged by the next checkpoint."""
    trainers_checkpointed_at: float = 0.0
    sends: SendChain = field(default_factory=lambda: SendChain(SEND_DEPTH))
    """The hand-offs being sent (see :func:`_hand_off`): overlapping, each stage in order."""


@contextlib.contextmanager
def as_current_event(event: EventT) -> Iterator[None]:
    """Make ``event`` Faust's current event, so table writes go to its partition.

    Faust picks the changelog partition (and the RocksDB partition store) of a table write from
    the stream's current event. A batch mixes partitions, so each write names its own.
    """
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


def broker_credentials(security: KafkaSecurity) -> Any:
    """Faust's form of the Kafka security settings (None for PLAINTEXT)."""
    options = security.client_options()
    if not options:
        return None
    if security.protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=security.username,
            password=security.password,
            ssl_context=options.get("ssl_context"),
            mechanism=security.sasl_mechanism,
        )
    return faust.SSLCredentials(options["ssl_context"])


async def _or_crash(app: faust.App, work: Awaitable[None]) -> None:
    """Run a batch (or send one); if it fails, stop the whole worker with an error instead of
    letting Faust keep a worker alive whose agent died (it would serve /metrics and consume
    nothing). The batch is not acknowledged, so a restarted worker processes it again."""
    try:
        await work
    except Abandoned:
        raise  # behind a send that failed: that one stops the worker
    except Exception as exc:
        log.critical("batch failed, stopping the worker: %r", exc, exc_info=True)
        await app.crash(exc)
        raise


def build_engine(settings: Settings) -> Engine:
    """The models a worker with ``settings`` serves (also what the benchmark's ceiling runs)."""
    return Engine(
        load_config(settings.config_path or None),
        EngineOptions(
            consent_default=settings.consent_default == "allow",
            lead_horizon_s=settings.lead_horizon_days * 86400.0,
            attribution_window_s=settings.attribution_window_hours * 3600.0,
            holdout_share=settings.holdout_share,
            pseudonym_secret=settings.pseudonym_secret,
        ),
    )


def create_app(settings: Settings) -> Persona:
    """Build the Faust app for ``settings``."""
    configure_security(settings.kafka_security)
    app = faust.App(
        settings.app_id,
        broker=settings.broker_url,
        broker_credentials=broker_credentials(settings.kafka_security),
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
        # One record batch per partition and flush: a batch's changelog records (a profile each,
        # 1-3 KB) overflowed the default 16 KiB batch every few records, and each extra batch of a
        # partition waits for the one before it to reach the broker.
        producer_max_batch_size=PRODUCE_BATCH_BYTES,
        Monitor=QuietMonitor,
    )
    engine = build_engine(settings)
    metrics = Metrics()
    cache = ProfileCache(settings.redis_url, on_error=metrics.redis_errors.inc)
    table_options = {
        "partitions": settings.partitions,
        "key_type": bytes,
        "value_type": bytes,
        "options": rocksdb_options(settings.rocksdb_memory_mb),
    }
    profiles = app.Table("profiles", **table_options)
    trainer_state = app.Table("trainer-state", **table_options)
    raw = {"schema": RawSchema()}
    ticks_name = ticks_topic_name(settings)
    topics = {kind: app.topic(name, **raw) for kind, name in settings.topics.items()}
    topics["snapshots"] = app.topic(snapshots_topic_name(settings), **raw)
    topics["ticks"] = app.topic(ticks_name, partitions=settings.partitions, internal=True, **raw)
    links_name = identity_topic_name(settings.app_id)
    topics["identity_links"] = app.topic(
        links_name, partitions=settings.partitions, internal=True, **raw
    )
    # Every topic whose offsets must not pass an event not applied: the inputs, the identity
    # links this worker stitches, and the training examples its trainers learn.
    guarded = frozenset(
        {*settings.input_topics.values(), links_name, settings.topics["training_examples"]}
    )
    persona = Persona(
        app,
        settings,
        metrics,
        cache,
        engine,
        profiles,
        topics,
        PartitionClocks(
            lateness_s=settings.allowed_lateness_s,
            idle_after_s=settings.idle_after_s,
            live=settings.live_clock,
        ),
        ordering=ReorderBuffer(settings.input_topics.values(), max_held=settings.reorder_max_held),
        offsets=OffsetGuard(guarded),
        trainer_state=trainer_state,
    )
    persona.offsets.install(app.consumer)
    _limit_fetch_wait(app.consumer, settings.fetch_max_wait_ms)
    _recover_to_the_log_end(app.consumer, settings.broker_url)
    input_names = (*settings.input_topics.values(), ticks_name, links_name)
    intake = Intake(
        input_names,
        max_events=settings.batch_size,
        linger_s=settings.batch_within_s,
        flow_control=app.flow_control,
        # app.create_event without its settings lookup per event (Faust's conf is a registry).
        create_event=partial(app.conf.Event, app),
        generation=lambda: app.consumer_generation_id,
    )
    intake.install(app.consumer)
    if settings.batch_drain:
        install_batch_drain(app.consumer, direct=intake, unread_topics=persona.offsets.topics)

    @app.agent(app.topic(*input_names, partitions=settings.partitions, **raw), name="ingest")
    async def ingest(stream: faust.StreamT[bytes]) -> None:
        # The agent subscribes to the inputs, so the group assigns their partitions; their
        # events come in batches from the intake, never through the stream.
        async for events in intake.batches():
            await _or_crash(app, process_batch(persona, events))

    @app.agent(topics["training_examples"], name="trainer")
    async def trainer(stream: faust.StreamT[bytes]) -> None:
        async for events in stream.take_events(settings.batch_size, settings.batch_within_s):
            await _or_crash(app, train_batch(persona, events))

    @app.task
    async def snapshots_follower() -> None:
        await follow_snapshots(persona)

    trimmer = MemoryTrimmer(settings.malloc_trim_s)

    @app.timer(settings.tick_interval_s)
    async def tick_owned_partitions() -> None:
        """Wake every owned partition, so its timers run even when no event arrives."""
        first_input = settings.input_topics["clickstream"]
        owned = [tp.partition for tp in app.consumer.assignment() if tp.topic == first_input]
        value = orjson.dumps({"wall": time.time()})
        for partition in owned:
            await topics["ticks"].send(value=value, partition=partition)
        await watch_fetch_positions(persona)
        trimmer.maybe_trim(time.monotonic())
        metrics.set_consumer_lag(consumer_lag(persona))
        since = time.monotonic() - persona.trainers_checkpointed_at
        if persona.trainer_dirty and since >= settings.checkpoint_every_s:
            async with persona.trainer_lock:  # no example comes: checkpoint what was learned
                if persona.trainer_dirty:
                    await _checkpoint_trainers(persona)

    @app.on_partitions_assigned.connect
    async def guard_offsets(app: faust.App, assigned: set[Any], **kwargs: Any) -> None:
        """Where guarded partitions start: the committed offset, else the log start."""
        guarded = [tp for tp in assigned if tp.topic in persona.offsets.topics]
        if guarded:
            persona.offsets.log_start.update(await app.consumer.earliest_offsets(*guarded))
            committed = await committed_offsets(app.consumer, guarded)
            persona.offsets.committed_at_assignment.update(
                (tp, offset) for tp, offset in committed.items() if offset is not None
            )

    @app.task
    async def timers_between_batches() -> None:
        await run_due_timers(persona)

    @app.on_partitions_revoked.connect
    async def forget_revoked(app: faust.App, revoked: set[Any], **kwargs: Any) -> None:
        """A partition that moves away is rebuilt from the table if it ever comes back."""
        await settle(persona)
        if any(tp.topic == settings.topics["training_examples"] for tp in revoked):
            async with persona.trainer_lock:
                await _checkpoint_trainers(persona)  # the examples learned are acknowledged
                persona.trainers.clear()  # the checkpoint table is the truth when they return
        for tp in revoked:
            persona.timers.forget(tp.partition)
            persona.partition_events.pop(tp.partition, None)
            persona.clocks.forget(tp.partition)
            persona.segment_counts.pop(tp.partition, None)
            persona.saved_watermarks.pop(tp.partition, None)
            persona.ordering.forget(tp.partition)
            persona.offsets.forget(tp)
        metrics.forget_partitions((tp.topic, tp.partition) for tp in revoked)

    add_routes(app, cache=cache, metrics=metrics, segment_definitions=engine.segmenter.definitions)

    @app.service
    class RedisCloser(faust.Service):  # type: ignore[misc]
        async def on_stop(self) -> None:
            # What is still being sent either arrives or stays unacknowledged (read again).
            with contextlib.suppress(Exception):
                await asyncio.wait_for(wait_sent(persona), timeout=5.0)
            await cache.close()

    return persona


def rocksdb_options(memory_mb: int) -> dict[str, int]:
    """RocksDB options (used by the rocksdb:// store only) for ``memory_mb`` per partition.

    >>> rocksdb_options(64)["block_cache_size"] // 2**20, rocksdb_options(64)["write_buffer_size"]
    (64, 16777216)
    """
    mib = 2**20
    return {
        "block_cache_size": memory_mb * mib,
        "block_cache_compressed_size": memory_mb * mib // 4,
        "write_buffer_size": max(memory_mb * mib // 4, mib),
        "max_write_buffer_number": 2,
    }


def _limit_fetch_wait(consumer: Any, fetch_max_wait_ms: int) -> None:
    """Give the aiokafka consumer Faust creates our fetch wait (Faust passes a fixed 1500 ms)."""
    thread = consumer._thread
    create = thread._create_consumer

    def create_consumer(loop: asyncio.AbstractEventLoop) -> Any:
        client = create(loop)
        client._fetch_max_wait_ms = fetch_max_wait_ms  # read when the consumer starts
        return client

    thread._create_consumer = create_consumer


def _recover_to_the_log_end(consumer: Any, broker_url: str) -> None:
    """Make the consumer's ``highwaters`` (where Faust's table recovery stops) the log ends.

    Faust reads a changelog partition up to what ListOffsets answers; the embedded broker
    answers the start of the last record batch + 1 (:func:`~connectors.kafka.log_end_offsets`),
    so a recovery stopped after that batch's first record: a new owner restored a partition's
    watermark without the profile writes of the same batch and fired their carts again, and the
    rest of the batch waited in Faust's recovery buffer to overwrite newer values at the next
    rebalance.
    """
    reported_ends = consumer.highwaters

    async def highwaters(*partitions: TP) -> dict[TP, int | None]:
        answered = await reported_ends(*partitions)
        reported = {
            KafkaTopicPartition(tp.topic, tp.partition): end
            for tp, end in answered.items()
            if end is not None
        }
        ends = await log_end_offsets(broker_url, reported)
        return {tp: ends.get(KafkaTopicPartition(tp.topic, tp.partition)) for tp in answered}

    consumer.highwaters = highwaters


def ticks_topic_name(settings: Settings) -> str:
    return f"{settings.app_id}-ticks"


def end_of_log_ticks(settings: Settings, event_time: float) -> list[tuple[str, int, bytes]]:
    """(topic, partition, value) of the ticks that move every partition to ``event_time``."""
    value = orjson.dumps({"event_time": event_time})
    return [(ticks_topic_name(settings), p, value) for p in range(settings.partitions)]


def snapshots_topic_name(settings: Settings) -> str:
    return f"{settings.app_id}-model-snapshots"


def apply_snapshot(persona: Persona, blob: bytes) -> bool:
    """Serve the model in ``blob`` if it verifies and is newer than the replica; True if so.

    The signature is checked before anything is unpickled: a forged or corrupted snapshot is
    refused, counted and logged, and the replica keeps serving the previous model.
    """
    try:
        snap = verify_and_load(blob, persona.settings.snapshot_secret.encode())
    except SnapshotSignatureError as exc:
        log.error("refusing a model snapshot: %s", exc)
        persona.metrics.snapshot_refused.labels(model="unknown").inc()
        return False
    if snap.name not in MODELS or snap.version <= persona.serving.get(snap.name, 0):
        return False
    persona.engine.swap(snap.name, persona.engine.load_model(snap.name, snap.payload))
    persona.serving[snap.name] = snap.version
    published_at = float(snap.metrics.get("published_at") or time.time())
    persona.metrics.snapshot_loaded(snap.name, version=snap.version, published_at=published_at)
    if snap.name == "lead":
        if snap.metrics.get("rolling_auc") is not None:
            persona.metrics.lead_auc.set(snap.metrics["rolling_auc"])
        if snap.metrics.get("rolling_logloss") is not None:
            persona.metrics.lead_logloss.set(snap.metrics["rolling_logloss"])
    return True


async def follow_snapshots(persona: Persona) -> None:
    """Every worker reads every published snapshot, from the start, and swaps its replicas.

    A plain consumer outside the consumer group: each worker needs all of them.
    """
    settings = persona.settings
    topic = snapshots_topic_name(settings)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers(settings.broker_url),
        enable_auto_commit=False,
        **client_options(),
    )
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        while not partitions:
            await asyncio.sleep(1.0)
            await consumer.topics()  # refreshes the cluster metadata
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [KafkaTopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while True:
            batch = await consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                for record in records:
                    apply_snapshot(persona, record.value)
    finally:
        await consumer.stop()


async def train_batch(persona: Persona, events: list[EventT]) -> None:
    """Learn a batch of training examples; checkpoint and publish when due.

    A checkpoint serializes the whole model, so one per batch would cost more than the learning
    on small batches: the trainers checkpoint together at most every
    ``PERSONA_CHECKPOINT_EVERY_S`` (and whenever one publishes), and the examples learned since
    are held unacknowledged until then. A crash re-delivers them; the checkpoint's offsets tell
    which were learned already, so none is lost or learned twice.
    """
    async with persona.trainer_lock:
        settings, engine, metrics = persona.settings, persona.engine, persona.metrics
        secret = settings.snapshot_secret.encode()
        events = await admitted(persona, events)
        items = [(e.message.partition, e.message.offset, orjson.loads(e.value)) for e in events]
        event_of_partition = {e.message.partition: e for e in events}
        for name, group in group_by_model(items).items():
            state = persona.trainers.get(name)
            if state is None:
                state = persona.trainers[name] = restore(
                    persona.trainer_state.get(name.encode()),
                    secret,
                    lambda payload, name=name: engine.load_model(name, payload),
                    lambda name=name: engine.new_model(name),
                    name,
                )
            fresh = [(p, o, m) for p, o, m in group if not state.already_learned(p, o)]
            if not fresh:
                continue
            conversions_before = dict(state.conversions)
            drifts = learn(state, [example for _, _, m in fresh for example in m["examples"]])
            for partition, offset, _ in fresh:
                state.offsets[partition] = max(state.offsets.get(partition, -1), offset)
            persona.trainer_dirty[name] = event_of_partition[fresh[-1][0]]
            if drifts:
                metrics.drift_alarms.labels(model=name).inc(drifts)
            for (offer_id, policy), count in state.conversions.items():
                new = count - conversions_before.get((offer_id, policy), 0)
                if new:
                    metrics.offer_conversions.labels(offer=offer_id, policy=policy).inc(new)
        hold(e.message for e in events)  # acknowledged after the checkpoint that holds them
        persona.trainer_held += events
        publishing = any(
            should_publish(
                persona.trainers[name],
                every_examples=settings.snapshot_every_examples,
                every_s=settings.snapshot_every_s,
            )
            for name in persona.trainer_dirty
        )
        since = time.monotonic() - persona.trainers_checkpointed_at
        if publishing or since >= settings.checkpoint_every_s:
            await _checkpoint_trainers(persona)


async def _checkpoint_trainers(persona: Persona) -> None:
    """Checkpoint (and publish when due) every trainer that learned since its last checkpoint,
    then acknowledge the examples held for it. The caller holds ``persona.trainer_lock``."""
    settings = persona.settings
    secret = settings.snapshot_secret.encode()
    for name, event in persona.trainer_dirty.items():
        state = persona.trainers[name]
        publish = should_publish(
            state,
            every_examples=settings.snapshot_every_examples,
            every_s=settings.snapshot_every_s,
        )
        blob = checkpoint(state, secret, published_at=time.time() if publish else None)
        with as_current_event(event):
            persona.trainer_state[name.encode()] = blob
        if publish:
            await persona.topics["snapshots"].send(key=name.encode(), value=blob)
            state.unpublished = 0
            state.published_at = time.monotonic()
    persona.trainer_dirty.clear()
    persona.trainers_checkpointed_at = time.monotonic()
    # The checkpoints are on the broker before these examples are acknowledged.
    await persona.app.producer.flush()
    held, persona.trainer_held = persona.trainer_held, []
    acknowledge(persona.app.consumer, [e.message for e in held])


async def admitted(persona: Persona, events: list[EventT]) -> list[EventT]:
    """The events of guarded partitions the offset guard lets through, in order.

    One after a gap is held: it keeps a reference on its message (never acknowledged, so never
    committed) and comes again once the consumer reads the gap, which is sought here. One
    applied already is left to be acknowledged with the batch.
    """
    guard = persona.offsets
    through = []
    for event in events:
        message = event.message
        tp = message.tp
        if tp.topic in guard.topics:
            verdict = guard.admit(tp, message.offset, _committed(persona, tp))
            if verdict == HOLD:
                message.incref()
                continue
            if verdict == DONE:
                continue
        through.append(event)
    if guard.seeking:
        await _repair_gaps(persona)
    return through


async def committed_offsets(consumer: Any, partitions: list[TP]) -> dict[TP, int | None]:
    """The group's committed offsets of ``partitions`` (None: nothing committed), asked on the
    thread Faust runs its Kafka client in."""
    thread = consumer._thread  # Faust has no public accessor
    client = thread._ensure_consumer()

    async def fetch() -> dict[TP, int | None]:
        return {tp: await client.committed(ensure_aiokafka_TP(tp)) for tp in partitions}

    result: dict[TP, int | None] = await thread.call_thread(fetch)
    return result


def _committed(persona: Persona, tp: TP) -> int | None:
    committed: int | None = persona.app.consumer._committed_offset.get(tp)
    return committed  # Faust has no public accessor


def _read_position(persona: Persona, topic: str, partition: int) -> int:
    """Next offset this worker will apply: after what it applied, or the committed offset."""
    tp = TP(topic, partition)
    return persona.offsets.position(tp, _committed(persona, tp)) or 0


async def _repair_gaps(persona: Persona) -> None:
    async def first_offset_from(tp: TP, offset: int) -> int | None:
        return await first_offset_from_broker(
            persona.settings.broker_url, tp.topic, tp.partition, offset
        )

    await repair_gaps(
        persona.offsets,
        persona.app.consumer,
        first_offset_from,
        on_seek=lambda tp, offset: persona.metrics.offset_gaps.inc(),
    )


async def watch_fetch_positions(persona: Persona) -> None:
    """Read again what the consumer fetched on a guarded partition and never delivered.

    Asked only for partitions behind their high watermark, and only between batches: a batch
    under way (or one waiting for Redis) holds messages that are on their way to the guard.
    """
    if persona.batch_lock.locked() or persona.trainer_lock.locked():
        return
    consumer, guard = persona.app.consumer, persona.offsets
    for tp in consumer.assignment():
        if tp.topic not in guard.topics:
            continue
        committed = _committed(persona, tp)
        position = guard.position(tp, committed)
        highwater = _highwater(persona, tp.topic, tp.partition)
        if position is None or highwater is None or highwater <= position:
            guard.behind.pop(tp, None)
            continue
        try:
            fetched = await asyncio.wait_for(consumer.position(tp), timeout=2.0)
        except (TimeoutError, IllegalStateError):
            continue  # not assigned any more, or no position yet: nothing was fetched
        if fetched is not None:
            guard.watch_fetched(tp, fetched, committed, time.monotonic())
    if guard.seeking:
        async with persona.batch_lock:
            await _repair_gaps(persona)


def _highwater(persona: Persona, topic: str, partition: int) -> int | None:
    try:
        return persona.app.consumer.highwater(TP(topic, partition))
    except (AssertionError, KeyError, AttributeError):
        return None


def consumer_lag(persona: Persona) -> dict[tuple[str, int], int]:
    """Messages not yet read, per input topic partition this worker owns."""
    inputs = set(persona.settings.input_topics.values())
    lags = {}
    for tp in persona.app.consumer.assignment():
        if tp.topic in inputs:
            highwater = _highwater(persona, tp.topic, tp.partition)
            if highwater is not None:
                lags[(tp.topic, tp.partition)] = highwater - _read_position(
                    persona, tp.topic, tp.partition
                )
    return lags


def _ends(persona: Persona, partition: int) -> dict[str, float]:
    """The input topics this worker has read to their end (high watermark) on ``partition``,
    each with when the consumer last fetched it (ms): how fresh that end is
    (:mod:`streams.ordering`).

    Read position is the larger of the last offset this worker saw and the group's committed
    offset (after a restart, a fully consumed partition delivers nothing and is at its end).
    """
    ends = {}
    for topic in persona.ordering.topics:
        highwater = _highwater(persona, topic, partition)
        if highwater is None or _read_position(persona, topic, partition) < highwater:
            continue
        fetched_at = _fetched_at(persona, topic, partition)
        if fetched_at is not None:
            ends[topic] = fetched_at
    return ends


def _fetched_at(persona: Persona, topic: str, partition: int) -> float | None:
    """When the consumer last had a fetch answered for the partition (ms; None: not yet)."""
    try:
        client = persona.app.consumer._thread._ensure_consumer()  # Faust has no accessor
        stamp: int | None = client.last_poll_timestamp(KafkaTopicPartition(topic, partition))
    except (AssertionError, KeyError, AttributeError, IllegalStateError):
        return None
    return None if stamp is None else float(stamp)


def _load(persona: Persona, user_id: str) -> dict[str, Any] | None:
    raw = persona.profiles.get(user_id.encode())
    return profile_codec.decode(raw) if raw else None


def erasure_marker(persona: Persona, user_id: str) -> bytes:
    """Table key remembering that a user was erased: a keyed hash, never the raw id."""
    keyed = _keyed_sha256(persona.settings.pseudonym_secret).copy()
    keyed.update(user_id.encode())
    return ERASED_KEY_PREFIX + keyed.hexdigest().encode()


@cache
def _keyed_sha256(secret: str) -> hmac.HMAC:
    """HMAC-SHA256 keyed with ``secret``, nothing hashed yet: copies of it skip the key set-up
    (every event's user is looked up)."""
    return hmac.new(secret.encode(), digestmod=hashlib.sha256)


def _is_erased(persona: Persona, user_id: str) -> bool:
    return internal_entry(persona, erasure_marker(persona, user_id)) is not None


def write_table(
    persona: Persona, outbox: Outbox, partition: int, key: bytes, value: bytes | None
) -> None:
    """Set or delete a profiles-table entry (an event of ``partition`` is current)."""
    outbox.write(persona.profiles, partition, key, value)
    if value is not None and key.startswith(INTERNAL_KEY_PREFIX):
        persona.internal_keys.add(key)  # a deleted key stays: its lookups miss


def _stitch_identities(
    persona: Persona,
    identity: IdentityWork,
    released: list[tuple[Record, Event]],
    result: BatchResult,
    outbox: Outbox,
    link_partitions: int,
) -> None:
    """Identity links of this batch: claims, merges and unlinks run, links and forwards sent
    (``link_partitions``: the identity-links topic's partition count)."""

    def write(partition: int, key: bytes, value: bytes | None) -> None:
        # A link stitched here writes on the anonymous id's partition, which may have no event
        # in this batch: the last event seen there picks its store.
        with as_current_event(persona.partition_events[partition]):
            write_table(persona, outbox, partition, key, value)

    for target, event in result.forwarded:
        identity.forward(target, event)
    for record, event in released:
        if "linked_id" in event and event["user_id"] not in result.erasures:
            identity.link(event, record.partition)
    load, is_erased = partial(_load, persona), partial(_is_erased, persona)
    anonymous_ids = [anonymous_id for anonymous_id, _, _ in identity.links]
    placed = partitions_for_keys([i.encode() for i in anonymous_ids], link_partitions)
    owned_partition_of = {
        anonymous_id: partition
        for anonymous_id, partition in zip(anonymous_ids, placed, strict=True)
        if partition in persona.partition_events
    }
    claimed, noted = run_links(
        identity,
        result.changed,
        result.partition_of,
        local_partition=owned_partition_of.get,
        has_profile=lambda user_id: persona.profiles.get(user_id.encode()) is not None,
        alias_of=partial(alias_of, persona),
        is_erased=is_erased,
        load=load,
        write=write,
    )
    for step, count in ((CLAIM, claimed), (MERGE, noted)):
        if count:
            persona.metrics.identity_links.labels(step=step).inc(count)
    run_claims(persona, identity, result.changed, result.partition_of, write, load)
    run_merges(persona, identity, result.changed, result.partition_of, load, is_erased, write)
    run_unlinks(persona, identity, write)


def erase_users(
    persona: Persona,
    erasures: dict[str, tuple[float, int]],
    event_of_partition: dict[int, EventT],
    identity: IdentityWork,
    outbox: Outbox,
) -> Outputs:
    """Forget users who asked to be erased: profile (with its pending label snapshots, offer
    decisions, cart timers and de-duplication ids) out of the table, a keyed-hash marker in so
    their later events are dropped, and tombstones for every output topic.

    Identity links go too: the aliases of anonymous ids merged into the user are unlinked, and
    the erasure of an id merged into a known user erases that user (its data lives there now).
    """
    out = Outputs()
    secret = persona.settings.pseudonym_secret
    for user_id, (at, partition) in erasures.items():
        key = user_id.encode()
        old = _load(persona, user_id)
        target = alias_of(persona, user_id)
        with as_current_event(event_of_partition[partition]):
            write_table(persona, outbox, partition, key, None)
            if target is not None:
                write_table(persona, outbox, partition, alias_key(user_id), None)
            marker = erasure_marker(persona, user_id)
            write_table(persona, outbox, partition, marker, repr(at).encode())
        if old is not None:
            identity.unlink_all(old)
        if target is not None:
            identity.relinked[user_id] = None
            identity.forward(target, erasure_request(target, at))
        segment = ((old or {}).get(TRIGGERS_KEY) or {}).get("segment")
        move_segment(persona.segment_counts, partition, segment, None)
        for kind in ("abandoned_cart", "segment_changes", "hot_leads"):
            out.emissions.append(Emission(kind, key, tombstone(user_id, at=at)))
        offer_tombstone = tombstone(user_id, at=at, secret=secret)
        out.emissions.append(
            Emission("offers", offer_tombstone["pseudonymous_id"].encode(), offer_tombstone)
        )
    return out


def _index_partitions(persona: Persona, partitions: set[int]) -> None:
    """Rebuild these partitions' timers and segment counts from the table (after assignment).

    One pass over the table for all of them: it holds every partition's profiles, and a pass
    decodes each (about 25 µs a profile: some 25 s at a million).
    """
    counts: dict[int, Counter[str]] = {partition: Counter() for partition in partitions}
    for partition in partitions:
        persona.timers.start(partition)
    for key, raw in persona.profiles.items():
        if key.startswith(WATERMARK_KEY_PREFIX):
            partition = int(key[len(WATERMARK_KEY_PREFIX) :])
            if partition in partitions:
                persona.clocks.restore(partition, float(raw))
            continue
        if key.startswith(INTERNAL_KEY_PREFIX):  # erasure markers, aliases
            persona.internal_keys.add(key)
            continue
        profile = profile_codec.decode(raw)
        partition = profile.get(PARTITION_FIELD)
        if partition not in partitions:
            continue
        due = persona.engine.next_due(profile)
        if due is not None:
            persona.timers.schedule(partition, due, key)  # the table's own key object
        segment = (profile.get(TRIGGERS_KEY) or {}).get("segment")
        if segment:
            counts[partition][segment] += 1
    persona.segment_counts.update(counts)


async def process_batch(persona: Persona, events: list[EventT]) -> None:
    """Ingest one batch of Faust events end to end: table, Redis, triggers, metrics.

    Timers that came due are left to :func:`run_due_timers`, which works between batches.
    """
    async with persona.batch_lock:
        await _ingest(persona, events)
    persona.timers_may_be_due.set()


async def _ingest(persona: Persona, events: list[EventT]) -> None:
    started = time.perf_counter()
    settings, metrics, engine, clocks = (
        persona.settings,
        persona.metrics,
        persona.engine,
        persona.clocks,
    )
    wall_now = time.time()
    ticks_topic = persona.topics["ticks"].get_topic_name()
    links_topic = persona.topics["identity_links"].get_topic_name()
    records: list[Record] = []
    identity = IdentityWork()
    event_of_partition = {e.message.partition: e for e in events}
    # The batch holds its events until its sends are done (see :func:`_send`), so nothing is
    # committed before what it produced is on the broker.
    hold(e.message for e in events)
    for e in await admitted(persona, events):
        message = e.message
        if message.topic == ticks_topic:
            tick = orjson.loads(e.value)
            if "event_time" in tick:
                clocks.advance_to(message.partition, float(tick["event_time"]))
            else:
                clocks.tick(message.partition, wall_now)
        else:
            record = Record(message.topic, message.partition, message.offset, e.key, e.value, e)
            if message.topic == links_topic:
                identity.add(record)
            else:
                records.append(record)
    metrics.observe_latency("received", [r.source.message.timestamp for r in records])

    unindexed = {p for p in event_of_partition if not persona.timers.has(p)}
    if unindexed:
        _index_partitions(persona, unindexed)

    # Valid events wait for event-time order across the input topics; each holds a reference
    # on its message, so Kafka's committed offset never passes an event not yet applied.
    result = BatchResult()
    valid = parse_records(
        records,
        result,
        now=wall_now,
        max_event_bytes=settings.max_event_bytes,
        max_future_s=settings.max_future_s,
    )
    hold(record.source.message for record, _ in valid)
    # A fetch of a record's partition answered since it arrived makes it look fetched later: a
    # stricter condition on the topics it may pass, never a looser one.
    fetched_at: dict[tuple[str, int], float] = {}
    for record, event in valid:
        where = (record.topic, record.partition)
        stamp = fetched_at.get(where)
        if stamp is None:
            stamp = fetched_at[where] = _fetched_at(persona, *where) or wall_now * 1000.0
        item = (record, event)
        persona.ordering.add(record.partition, record.topic, event["ts"], item, fetched_at=stamp)
    await _let_sends_run()
    released: list[tuple[Record, Event]] = []
    for partition in persona.ordering.partitions():
        released += persona.ordering.release(partition, _ends(persona, partition))
    for record, _ in identity.forwarded:
        record.source.message.incref()  # acknowledged with the released events
    released += identity.forwarded
    for record, _ in released:
        event_of_partition.setdefault(record.partition, record.source)
    persona.partition_events.update(event_of_partition)
    for start in range(0, len(released), PAUSE_EVERY):
        if start:
            await _let_sends_run()
        apply_events(
            released[start : start + PAUSE_EVERY],
            lambda user_id: _load(persona, user_id),
            result,
            dedupe_window=settings.dedupe_window,
            affinity_half_life_s=settings.affinity_half_life_days * 86400.0,
            after_event=engine.after_event,
            is_erased=lambda user_id: _is_erased(persona, user_id),
            alias_of=lambda user_id: alias_of(persona, user_id),
        )
    for partition, max_ts in result.max_ts.items():
        clocks.observe(partition, max_ts, wall_now)
    outbox = Outbox(persona.app.producer)
    outputs = erase_users(persona, result.erasures, event_of_partition, identity, outbox)
    link_partitions = len(await persona.app.producer._producer.partitions_for(links_topic))
    _stitch_identities(persona, identity, released, result, outbox, link_partitions)
    await _let_sends_run()

    changed = result.changed
    for user_id, profile in changed.items():
        profile[PARTITION_FIELD] = result.partition_of[user_id]
    old_segments = {u: (p.get(TRIGGERS_KEY) or {}).get("segment") for u, p in changed.items()}
    # The deadlines of this batch's own users fire here, right after their events, as a replay
    # at any batch size would fire them; only users without new events wait for
    # run_due_timers (nothing about them changes meanwhile).
    for user_id, profile in changed.items():
        watermark = clocks.watermark(result.partition_of[user_id])
        due = engine.next_due(profile)
        if due is not None and due <= watermark:
            outputs.extend(engine.on_due(user_id, profile, watermark))

    topic_name = {kind: topic.get_topic_name() for kind, topic in persona.topics.items()}
    for record, rejection in result.rejected:
        outbox.send(
            topic_name["deadletter"],
            record.key,
            dead_letter_record(
                record.value,
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                reason=rejection.reason,
                detail=rejection.detail,
                at=wall_now,
            ),
        )
        metrics.deadletters.labels(reason=rejection.reason).inc()
    # After the profiles in the changelog (write_last): a new owner restores the watermark and
    # fires the timers it passed, so it must never find one without the profile writes before it.
    for partition, event in event_of_partition.items():
        watermark = clocks.watermark(partition)
        if math.isfinite(watermark) and watermark > persona.saved_watermarks.get(partition, -1.0):
            persona.saved_watermarks[partition] = watermark
            with as_current_event(event):
                key = WATERMARK_KEY_PREFIX + str(partition).encode()
                outbox.write_last(persona.profiles, partition, key, repr(watermark).encode())
    for user_or_id, message in identity.outgoing:
        outbox.send(topic_name["identity_links"], user_or_id.encode(), orjson.dumps(message))

    # Latency counts from the produce time of the events applied now (a held event counts when
    # it is released, in the batch that writes its effect, not in the batch it arrived with).
    produced_at = [record.source.message.timestamp for record, _ in released]
    hand_off = await _publish(
        persona,
        Changes(changed, result.partition_of, old_segments, outputs),
        outbox,
        produced_at=produced_at,
        erased=list(result.erasures),
        relinked=identity.relinked,
    )
    hand_off.acknowledge = [e.message for e in events]
    hand_off.acknowledge += [record.source.message for record, _ in released]

    for (topic, outcome), count in result.counts.items():
        metrics.events.labels(topic=topic, outcome=outcome).inc(count)
    metrics.count_event_types({(t, n, "ok"): c for (t, n), c in result.by_type.items()})
    if records:
        persona.batches_with_events += 1
        metrics.batch_events.observe(len(records))
        metrics.batch_seconds.observe(time.perf_counter() - started)
    metrics.held_events.set(persona.ordering.held())
    if persona.ordering.forced:
        metrics.forced_events.inc(persona.ordering.forced)
        persona.ordering.forced = 0
    set_timers_due(persona)
    await _hand_off(persona, hand_off)


@dataclass(slots=True)
class Changes:
    """Profiles a batch (or a run of due timers) changed, before they are scored."""

    profiles: dict[str, dict[str, Any]]
    partition_of: dict[str, int]
    old_segments: dict[str, str | None]
    """Each profile's segment before the change (for the per-partition segment counts)."""
    outputs: Outputs
    """What the change produced already (erasures, fired timers): scoring adds to it."""


@dataclass(slots=True)
class HandOff:
    """What a computed batch (or chunk of due timers) leaves to send: its Redis write and its
    outbox, then the events it acknowledges and the watermarks it shows (see :func:`_send`)."""

    outbox: Outbox
    redis_write: Callable[[], Awaitable[None]]
    produced_at: Sequence[float] = ()
    """Produce times of the events applied (for the latency histogram)."""
    triggers: bool = False
    """Whether it sends trigger messages (for the ``trigger_produced`` latency)."""
    acknowledge: list[Message] = field(default_factory=list)
    """Faust messages to acknowledge once sent (one reference each, see :mod:`streams.acks`)."""
    watermarks: dict[int, float] = field(default_factory=dict)


async def _publish(
    persona: Persona,
    changes: Changes,
    outbox: Outbox,
    *,
    produced_at: Sequence[float] = (),
    erased: Sequence[str] = (),
    relinked: Mapping[str, str | None] | None = None,
) -> HandOff:
    """Score changed profiles and put the results in the table and the outbox.

    Reschedules each profile's next deadline and keeps the segment counts. What is left to send
    (the Redis write, the outbox: table changelog, triggers, training examples) is returned for
    :func:`_hand_off`.
    """
    engine, metrics, clocks = persona.engine, persona.metrics, persona.clocks
    changed, partition_of = changes.profiles, changes.partition_of
    outputs = changes.outputs
    now_of = {u: now_for(p, clocks.watermark(partition_of[u])) for u, p in changed.items()}
    users = list(changed)
    for start in range(0, len(users), PAUSE_EVERY):
        part = {user_id: changed[user_id] for user_id in users[start : start + PAUSE_EVERY]}
        outputs.extend(engine.score(part, now_of))  # each profile is scored on its own
        await _let_sends_run()

    by_partition: dict[int, list[tuple[str, bytes]]] = {}
    for user_id, profile in changed.items():
        partition = partition_of[user_id]
        # One key object for the timer index and the table: the memory store keeps the one
        # it is given for a new user, so the index holds no copy of it.
        key = user_id.encode()
        by_partition.setdefault(partition, []).append((user_id, key))
        due = engine.next_due(profile)
        if due is not None:
            persona.timers.schedule(partition, due, key)
        new_segment = (profile.get(TRIGGERS_KEY) or {}).get("segment")
        move_segment(
            persona.segment_counts, partition, changes.old_segments.get(user_id), new_segment
        )
    for partition, users_keys in by_partition.items():
        with as_current_event(persona.partition_events[partition]):
            for user_id, key in users_keys:
                value = profile_codec.encode(changed[user_id])
                outbox.write(persona.profiles, partition, key, value)
    metrics.observe_latency("profile_updated", produced_at)

    totals: Counter[str] = Counter()
    for counts in persona.segment_counts.values():
        totals.update(counts)
    for segment, count in totals.items():
        metrics.segment_size.labels(segment=segment).set(count)
    redis_write = partial(
        persona.cache.write_profiles,
        outputs.redis_fields,
        lead_scores=outputs.lead_scores,
        segment_sizes=segment_sizes(persona.segment_counts, by_partition),
        erased=erased,
        aliases=relinked,
    )
    metrics.profile_writes.inc(len(outputs.redis_fields))
    metrics.timers_pending.set(len(persona.timers))

    topic_name = {kind: topic.get_topic_name() for kind, topic in persona.topics.items()}
    sent_kinds: Counter[str] = Counter()
    for emission in outputs.emissions:
        outbox.send(topic_name[emission.kind], emission.key, orjson.dumps(emission.payload))
        tombstone_sent = emission.payload.get("type") == "tombstone"
        sent_kinds["tombstone" if tombstone_sent else TRIGGER_KIND[emission.kind]] += 1
    for kind, count in sent_kinds.items():  # a metric's labels() lookup costs a microsecond
        metrics.triggers.labels(kind=kind).inc(count)
    # One message per model and batch: the trainer learns in batches anyway.
    for model, examples in outputs.examples_by_model().items():
        for start in range(0, len(examples), EXAMPLES_PER_MESSAGE):
            chunk = examples[start : start + EXAMPLES_PER_MESSAGE]
            value = orjson.dumps({"model": model, "examples": chunk})
            outbox.send(topic_name["training_examples"], model.encode(), value)
    for (offer_id, policy, reason), count in outputs.decisions.items():
        metrics.offer_decisions.labels(offer=offer_id, policy=policy, reason=reason).inc(count)
    for (kind, reason), count in outputs.suppressed.items():
        metrics.triggers_suppressed.labels(kind=kind, reason=reason).inc(count)
    return HandOff(outbox, redis_write, produced_at, triggers=bool(outputs.emissions))


async def _let_sends_run() -> None:
    """Give the event loop a few turns inside a batch, so the sends in flight move on (a Redis
    reply read, the changelog sent once the broker took the messages) while this batch is
    computed; without them each step of theirs would wait for the whole batch."""
    for _ in range(LOOP_TURNS):
        await asyncio.sleep(0)


async def _hand_off(persona: Persona, hand_off: HandOff) -> None:
    """Hand ``hand_off`` over for sending and return while it is sent; the watermarks it shows
    once sent are those settled now (:func:`settled_watermarks`).

    A batch's Redis write and broker sends wait on the network (a quarter of the worker's time
    when it waited for them); meanwhile the next batch is computed. Sends overlap, but each of
    their stages (outputs to the broker, changelog, Redis write) runs in batch order
    (:class:`~streams.sends.SendChain`), and at most ``SEND_DEPTH`` are in flight, so a batch
    computed sooner waits; a batch's events are acknowledged only once its writes are in Redis
    and on the broker and the batch before it is acknowledged (:func:`_send`), so a crash can
    only re-deliver, never lose. A failed send stops the worker, and the batches behind it are
    not acknowledged.
    """
    hand_off.watermarks = settled_watermarks(persona)
    await persona.sends.submit(lambda turn: _or_crash(persona.app, _send(persona, hand_off, turn)))
    await _let_sends_run()  # its first writes go out before the next batch is computed


async def _send(persona: Persona, hand_off: HandOff, turn: Turn) -> None:
    """Write ``hand_off`` to Redis and send its outbox, both at once, each in its turn; then,
    after the hand-off before it, acknowledge its events and show its watermarks.

    Last, the watermark gauge: at or past a time, it means every output due by then is on the
    broker (see :func:`settled_watermarks`).
    """
    metrics = persona.metrics

    async def write_redis() -> None:
        await turn.wait(REDIS)
        started = time.perf_counter()
        await hand_off.redis_write()
        turn.passed(REDIS)
        metrics.redis_write_seconds.observe(time.perf_counter() - started)
        metrics.observe_latency("redis_written", hand_off.produced_at)

    _, persist_offsets = await asyncio.gather(write_redis(), hand_off.outbox.flush(turn))
    if hand_off.triggers:
        metrics.observe_latency("trigger_produced", hand_off.produced_at)
    await turn.wait_previous()
    persist_offsets()
    acknowledge(persona.app.consumer, hand_off.acknowledge)
    metrics.set_watermarks(hand_off.watermarks)


async def wait_sent(persona: Persona) -> None:
    """Wait until every hand-off is sent (raises the last one's error if it failed)."""
    await persona.sends.wait()


async def settle(persona: Persona) -> None:
    """Wait until no batch or run of timers is under way and what they handed off is sent
    (before partitions move away). A failed send stops the worker by itself."""
    async with persona.batch_lock:
        with contextlib.suppress(Exception):
            await wait_sent(persona)


async def run_due_timers(persona: Persona) -> None:
    """Run timers that came due, a chunk at a time, whenever no batch is being processed.

    Events come first: a watermark that passes thousands of deadlines at once (label horizons
    and attribution windows of a busy hour) would otherwise hold a batch, and every event
    queued behind it, for seconds. A chunk takes ``PERSONA_TIMER_CHUNK`` profiles at
    most; batches and chunks take turns on one lock, and while events flow the timers get a third
    of the time (``EVENTS_PER_TIMER_TIME``), enough to keep pace under full load.
    """
    while True:
        await persona.timers_may_be_due.wait()
        persona.timers_may_be_due.clear()
        while True:
            async with persona.batch_lock:
                started = time.perf_counter()
                await run_due_chunk(persona, persona.settings.timer_chunk)
                took = time.perf_counter() - started
            if not timers_due_somewhere(persona):
                break
            # A chunk runs without a pause, and chunks back to back starve Faust's own delivery
            # of the next events (a bare yield moves its pipeline one step per chunk). While
            # events flow, as long again for them (EVENTS_PER_TIMER_TIME); else a short pause,
            # so the first events get through and pacing starts.
            batches = persona.batches_with_events
            flowing = batches != persona.batches_seen_by_timers
            persona.batches_seen_by_timers = batches
            await asyncio.sleep(took * EVENTS_PER_TIMER_TIME if flowing else IDLE_PAUSE_S)


def timers_due_somewhere(persona: Persona) -> bool:
    """True while an owned partition has a timer whose deadline its watermark passed. Each
    chunk shrinks that set: a fired timer's next deadline, or a stale entry's, is not before
    the watermark."""
    watermark = persona.clocks.watermark
    return any(persona.timers.has_due(p, watermark(p)) for p in persona.partition_events)


def settled_watermarks(persona: Persona) -> dict[int, float]:
    """The watermarks of the partitions with no timer left due: once what was handed off so
    far is sent, every output due by those event times is on the broker."""
    watermark, timers = persona.clocks.watermark, persona.timers
    return {
        p: watermark(p)
        for p in persona.partition_events
        if math.isfinite(watermark(p)) and not timers.has_due(p, watermark(p))
    }


def set_timers_due(persona: Persona) -> None:
    """Update the backlog gauge (with the event counts, so a scrape sees both or neither).

    Zero is exact and cheap (the heads of the heaps); a count is walked at most every
    ``TIMERS_DUE_EVERY_S``, since a big backlog takes milliseconds to count.
    """
    watermark, timers = persona.clocks.watermark, persona.timers
    if not timers_due_somewhere(persona):
        persona.metrics.timers_due.set(0)
        persona.timers_due_counted_at = 0.0
        return
    now = time.monotonic()
    if now - persona.timers_due_counted_at >= TIMERS_DUE_EVERY_S:
        persona.timers_due_counted_at = now
        persona.metrics.timers_due.set(
            sum(timers.due_count(p, watermark(p)) for p in persona.partition_events)
        )


async def run_due_chunk(persona: Persona, limit: int) -> int:
    """Fire the timers of at most ``limit`` profiles whose deadline the watermarks passed;
    score, store and publish what they changed. Returns how many profiles changed."""
    clocks, metrics = persona.clocks, persona.metrics
    owned = [p for p in persona.partition_events if persona.timers.has(p)]
    changes = Changes({}, {}, {}, Outputs())
    share = due_limit(limit, len(owned))
    for partition in owned:
        due_outputs, touched = persona.engine.run_due(
            persona.timers,
            partition,
            clocks.watermark(partition),
            changes.profiles,
            persona.profiles.get,
            limit=share,
        )
        changes.outputs.extend(due_outputs)
        for user_id, profile in touched:
            changes.profiles[user_id] = profile
            changes.partition_of[user_id] = partition
            changes.old_segments[user_id] = (profile.get(TRIGGERS_KEY) or {}).get("segment")
    metrics.timers_fired.inc(len(changes.profiles))
    set_timers_due(persona)
    if not changes.profiles and not changes.outputs.emissions and not changes.outputs.examples:
        return 0
    hand_off = await _publish(persona, changes, Outbox(persona.app.producer))
    await _hand_off(persona, hand_off)
    return len(changes.profiles)
