"""``persona bench``: how fast is the engine, and against what ceiling?

One run on the embedded broker and Redis (started once, stopped at the end): the first ``events``
messages of the seeded :class:`~connectors.simulator.ShopperSimulator` are produced once to the
four input topics (prefix ``bench-``), then each contender reads that same copy under its *own
consumer group* (topics shared, offsets not), one after the other, so the contenders never
compete for the two cores with each other:

1. **ceiling**: a plain aiokafka consumer in this process (``getmany``, batches of
   ``PERSONA_BATCH_SIZE``) doing the engine's per-batch work with the project's own functions:
   :func:`~streams.ingest.parse_records`, the event-time :class:`~streams.ordering.ReorderBuffer`
   (within the batch: no hold across batches),
   :func:`~streams.ingest.apply_events` with :meth:`Engine.after_event`, due timers
   (:meth:`Engine.on_due`), :meth:`Engine.score`, the trainers' learning of the examples scoring
   made (:func:`~streams.training.learn`, on the models it scores with: no snapshots), profiles
   encoded into a dict (the table), one pipelined :meth:`ProfileCache.write_profiles` per batch.
   It does *not* produce changelog records, trigger messages, training-example messages nor
   Prometheus metrics, and does not stitch identities (the engine's merges cross partitions
   through a topic).
2. **faust count**: ``python -m streams.bench_count``, a Faust agent that only counts
   (``take_events(1000)``): Faust's own floor on this broker.
3. **two workers** (``workers=2``): two ``persona worker`` processes in one group.
4. **engine**: one ``persona worker`` child process, everything on (table + changelog, Redis,
   triggers, trainer, metrics), started after the topics were filled; progress read from its
   ``/metrics`` every 0.25 s. Its resident memory (``VmRSS``) right after start-up and after the
   run is reported too (start-up growth and the reorder hold dominate it at 10k users).
   The ceiling and the engine run in ``rounds`` pairs, each engine run right after its ceiling
   run, each under a consumer group of its own: the box's speed drifts by a third from one
   minute to the next, and a pair run back to back shares the drift. The rates are the rounds'
   medians, ``ratio`` the median of their ratios; the other figures are the last round's.
   Every contender scores with the same trained lead model (:func:`warm_lead_model`).
5. **later events**: the last round's worker, idle again, gets the next events of the simulator
   on the same topics, paced at half the engine's rate (:func:`~connectors.kafka.produce_all`
   ``rate_per_s``); p50/p99 from the difference of its ``persona_latency_seconds`` histogram
   before and after (linear within a bucket, as Prometheus' ``histogram_quantile`` does). These
   events cost more each than the first ones: the attribution windows (a day of event time) and
   abandoned carts of the users scored earlier come due meanwhile. (The input spans about two
   days of event time: no lead horizon, a week, comes due in a run.)
6. **latency** (the target): the same events as the engine run, produced again to their own
   topics (prefix ``bench-paced-``) at half the engine's rate while a fresh worker reads them:
   the workload whose maximum rate was measured, at half of it. Its memory per profile has no
   read-ahead in it (the input arrives as it is produced).
7. **memory**: a fresh worker reads ``memory_events`` messages of ``memory_users`` other
   simulated users (prefix ``bench-memory-``) in two halves: the RSS growth per 100k profiles
   over the second half, once the first warmed it up, is ``rss_mb_per_100k_profiles``
   (:func:`_memory_run`).

Throughput has one definition for every contender: events counted after the end of the first
batch, divided by the time from the end of the first batch to the end of the last (the start of
the first batch is not observable from ``/metrics``; the engine's end is the middle of the 0.25 s
poll interval in which its count reached ``events``). Every contender runs on uvloop with the
worker's garbage-collector settings (:func:`~streams.worker.tune_gc`) and uses the worker's settings
(``PERSONA_*`` environment, as ``persona demo`` does), with the embedded broker's 2 s session
timeout and 0.5 s heartbeat, and ``PERSONA_LIVE_CLOCK=false`` (simulated event time).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import uvloop
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from connectors.embedded import EmbeddedBroker, EmbeddedRedis, free_port, spawn
from connectors.embedded import stop_process_group as _stop_group
from connectors.kafka import Message, bootstrap_servers, produce_all
from connectors.redis_cache import ProfileCache
from connectors.segment import parse_event
from connectors.simulator import ShopperSimulator
from models import profile_codec
from models.features import apply_event, feature_vector, new_profile
from models.lead import LeadModel
from models.snapshots import sign
from streams.app import build_engine, snapshots_topic_name
from streams.clock import PartitionClocks, TimerIndex
from streams.engine import (
    MODELS,
    TRIGGERS_KEY,
    Outputs,
    due_limit,
    move_segment,
    now_for,
    segment_sizes,
)
from streams.ingest import BatchResult, Record, apply_events, parse_records
from streams.ordering import ReorderBuffer
from streams.settings import Settings
from streams.training import TrainerState, learn
from streams.worker import WorkerProcess, ensure_topics, tune_gc

TOPIC_PREFIX = "bench-"
PACED_TOPIC_PREFIX = "bench-paced-"
"""The latency run's own copy of the input, produced at its pace while a fresh worker reads."""
MEMORY_TOPIC_PREFIX = "bench-memory-"
"""The memory run's input: many users, few events each."""
MEMORY_EVENTS = 300_000
"""Default events (and users) of the memory run: about 76k profiles, 51k of them added by the
second half."""
MEMORY_REORDER_MAX_HELD = 2000
"""The memory run's bound on events held for event-time order per partition: on prefilled
topics the hold grows with how far one topic is read ahead of another (about 4 KB an event,
a peak the allocator keeps), which is read-ahead, not profile memory."""
WARM_LEAD_VERSION = 1
"""Snapshot version of the trained lead model every engine run serves from its start."""
POLL_S = 0.25
"""How often the engine's /metrics is read: each read renders every series (a few % of the
worker's CPU at 10 per second); the end of a 30 s run is known to ±0.125 s."""
PARTITION_FIELD = "partition"  # as streams.app writes it into each profile
REDIS_DB = {"ceiling": 1, "engine": 2, "engine2": 3, "paced": 4, "memory": 5}
"""One Redis database per contender, so none overwrites another's profiles."""
PROFILE_WRITES = "persona_profile_writes_total"
"""Profiles scored and written to Redis: per event, 1 when no two events of a user share a batch,
less the more they do (a prefilled topic read in batches of 1,000 coalesces most)."""
LEAD_VERSION = 'persona_model_snapshot_version{model="lead"}'
"""The lead snapshot a worker serves: :data:`WARM_LEAD_VERSION` once it has the warm model."""
RESULT_KEYS = (
    "events", "workers", "engine_events_per_s", "ceiling_events_per_s", "ratio",
    "faust_count_events_per_s", "p50_ms", "p99_ms", "rss_mb_per_100k_profiles",
)  # fmt: skip


class BenchError(RuntimeError):
    """A contender did not finish; the message names its log."""


@dataclass(slots=True)
class Throughput:
    events_per_s: float
    seconds: float
    cpu_cores: float | None = None
    """CPU time of the contender's process over the window, in cores (1.0 = one core busy)."""
    others_cores: dict[str, float] = field(default_factory=dict)
    """CPU of the other processes watched over the same window (broker, Redis), in cores."""
    profile_writes_per_event: float | None = None
    """Profiles scored and written per event (see :data:`PROFILE_WRITES`), where counted."""


# -- the machine and the processes ----------------------------------------------------------


def machine() -> dict[str, Any]:
    """Cores this process may use (as ``nproc`` counts them) and the CPU model."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"nproc": len(os.sched_getaffinity(0)), "cpu_model": model}


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` (``VmRSS`` in ``/proc/<pid>/status``), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_idle(pid: int, *, below_cores: float = 0.1, timeout_s: float = 20.0) -> None:
    """Wait until ``pid`` uses less than ``below_cores`` over half a second (trainer caught up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(0.5)
        if (cpu_seconds(pid) - before) / (time.monotonic() - t0) < below_cores:
            return


# -- /metrics -------------------------------------------------------------------------------

_EVENTS = re.compile(r"^persona_events_total\{([^}]*)\} (\S+)$", re.MULTILINE)


def events_counted(text: str, *, duplicates: bool = True) -> int:
    """Sum of ``persona_events_total`` in an exposition (cheap: no full parse per poll)."""
    total = 0.0
    for labels, value in _EVENTS.findall(text):
        if duplicates or 'outcome="duplicate"' not in labels:
            total += float(value)
    return int(total)


def gauge(text: str, name: str) -> int:
    """An unlabelled gauge of an exposition, e.g. the timer backlog (0 when not exported).

    >>> gauge("persona_timers_due 12.0\\n", "persona_timers_due"), gauge("", "persona_timers_due")
    (12, 0)
    """
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return int(float(found.group(1))) if found else 0


REPORTED_STAGES = {"redis_written": "", "received": "received_"}
"""Latency stages the bench reports, by key prefix: produce → Redis written (the target), and
produce → taken into a batch (what happens before the engine's own work: broker fetch, Faust's
delivery, the batch window, waiting for a run of timers)."""


def latency_buckets(text: str, stage: str = "redis_written") -> dict[float, float]:
    """Cumulative bucket counts (upper bound → count) of ``persona_latency_seconds{stage}``."""
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "persona_latency_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket") and sample.labels.get("stage") == stage:
                buckets[float(sample.labels["le"])] = sample.value
    return buckets


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Quantile ``q`` of cumulative ``buckets``, linear within the bucket (Prometheus' way).

    >>> round(histogram_quantile(0.5, {0.1: 0, 0.2: 10, math.inf: 10}), 6)
    0.15
    >>> histogram_quantile(0.99, {0.1: 5, 0.2: 5, math.inf: 10})  # in +Inf: largest bound
    0.2
    """
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank and count > below:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


@dataclass(frozen=True, slots=True)
class _Mark:
    """One poll's reading: when, the events counted, CPU seconds of the workers and others."""

    t: float
    count: int
    cpu: float
    others: dict[str, float]


@dataclass(slots=True)
class _Poll:
    """Counts of one or more workers read every ``POLL_S``: the run's window from them."""

    workers: Sequence[WorkerProcess]
    duplicates: bool = True
    others: dict[str, int] = field(default_factory=dict)
    """Other processes (name → pid) whose CPU over the window is reported too."""
    halfway: Callable[[], None] | None = None
    """Called once, when the count first reaches half of what is expected."""

    def count(self) -> tuple[float, int, int]:
        """(time, events counted, timers due but not run yet); counts -1 while a worker does
        not answer."""
        t0 = time.monotonic()
        total = backlog = 0
        for worker in self.workers:
            text = worker.scrape()
            if text is None:
                if not worker.running:
                    raise BenchError(f"worker died; see {worker.log_path}:\n{worker.log_tail()}")
                return (t0 + time.monotonic()) / 2, -1, -1
            total += events_counted(text, duplicates=self.duplicates)
            backlog += gauge(text, "persona_timers_due")
        return (t0 + time.monotonic()) / 2, total, backlog

    def _mark(self, t: float, count: int) -> _Mark:
        return _Mark(
            t,
            count,
            sum(cpu_seconds(w.pid) for w in self.workers if w.pid),
            {name: cpu_seconds(pid) for name, pid in self.others.items()},
        )

    def until(self, expected: int, timeout_s: float, stall_s: float = 60.0) -> Throughput:
        """Poll until the count reaches ``expected`` and no timer is left due (the work of an
        event includes the timers it made due); the rate after the first batch (the time the
        group took to form is no part of it), or, when all came between two polls, a lower bound.

        Fails after ``timeout_s``, or after ``stall_s`` without progress (a crashed agent leaves
        its worker serving /metrics but consuming nothing), quoting the workers' errors.
        """
        deadline = time.monotonic() + timeout_s
        first: _Mark | None = None
        before_first: _Mark | None = None
        previous_t = changed_at = time.monotonic()
        count = 0
        last: tuple[int, int] = (0, 0)
        while time.monotonic() < deadline and time.monotonic() - changed_at < stall_s:
            t, count, backlog = self.count()
            if (count, backlog) != last:
                changed_at, last = t, (count, backlog)
            if self.halfway is not None and count >= expected / 2:
                self.halfway()
                self.halfway = None
            if first is None:
                mark = self._mark(t, max(count, 0))
                if count <= 0:
                    before_first = mark
                else:
                    first = mark
            if count >= expected and backlog == 0 and first is not None:
                start, end = first, (previous_t + t) / 2 if count > first.count else t
                if first.count >= expected and before_first is not None:
                    # Everything came between two polls: the window from the last poll that had
                    # none, so the rate is a lower bound rather than nothing.
                    start, end = before_first, t
                span = end - start.t
                if span <= 0 or start.count >= expected:
                    return Throughput(0.0, 0.0)
                final = self._mark(t, count)
                cores = {n: round((c - start.others[n]) / span, 2) for n, c in final.others.items()}
                return Throughput(
                    (expected - start.count) / span, span, (final.cpu - start.cpu) / span, cores
                )
            previous_t = t
            time.sleep(max(0.0, POLL_S - (time.monotonic() - t)))
        raise BenchError(
            f"workers counted {count} of {expected} events (stalled or out of time); "
            + "; ".join(f"{w.log_path}: {_errors(w.log_path)}" for w in self.workers)
        )


def _errors(log_path: Path, limit: int = 3) -> str:
    """The first error lines of a worker's JSON log, shortened (an agent crash, typically)."""
    found = []
    with contextlib.suppress(OSError):
        for line in log_path.read_text(errors="replace").splitlines():
            if '"level":"error"' in line:
                found.append(line[:400])
                if len(found) >= limit:
                    break
    return " | ".join(found) or "no error logged"


# -- the runs -------------------------------------------------------------------------------


def _settings(
    broker: EmbeddedBroker,
    redis: EmbeddedRedis,
    data_dir: Path,
    run: str,
    partitions: int,
    topic_prefix: str = TOPIC_PREFIX,
    **overrides: Any,
) -> Settings:
    run_dir = data_dir / run
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings.from_env(
        os.environ,
        broker_url=broker.url,
        redis_url=f"redis://{redis.host}:{redis.port}/{REDIS_DB.get(run, 0)}",
        app_id=f"bench-{run}",
        topic_prefix=topic_prefix,
        # Each engine run trains from its own examples only.
        topic_training_examples=f"{run}-training-examples",
        partitions=partitions,
        data_dir=str(run_dir),
        web_port=free_port(),
        session_timeout_s=2.0,
        heartbeat_s=0.5,
        live_clock=False,
        log_level="warning",
        **overrides,
    )
    asyncio.run(ensure_topics(settings))
    return settings


def _routed(settings: Settings, raw: Iterator[tuple[str, bytes, bytes]], n: int) -> list[Message]:
    topics = settings.input_topics
    return [(topics[stream], key, value) for stream, key, value in itertools.islice(raw, n)]


def warm_lead_model(users: int, seed: int, events: int) -> LeadModel:
    """A trained lead model, for the ceiling and every engine run to score with.

    A run's input spans about two days of event time, less than the lead model's horizon (a
    week), so no label comes due and a worker started fresh scores with a model that learned
    nothing: no explanations, every score the same, no hot lead. Production scores with a
    trained model. So the simulator's first ``events`` messages are folded into profiles, and
    each profile's features at its last event are labelled by a seeded draw from its user's
    true 7-day purchase propensity (the simulator's ground truth): deterministic, about a
    second of work.

    >>> model = warm_lead_model(users=50, seed=1, events=600)
    >>> model.examples_seen > 10, len(model.explain_many([dict.fromkeys(model.feature_names, 1.0)]))
    (True, 1)
    """
    sim = ShopperSimulator(users, seed)
    propensity = {u["user_id"]: u["purchase_propensity"] for u in sim.ground_truth()}
    profiles: dict[str, dict[str, Any]] = {}
    now = time.time()
    for _, _, value in itertools.islice(sim.raw_messages(), events):
        event = parse_event(value, now=now)
        if isinstance(event, dict):
            profile = profiles.get(event["user_id"])
            if profile is None:
                profile = profiles[event["user_id"]] = new_profile(event["user_id"])
            apply_event(profile, event)
    known = [p for u, p in profiles.items() if u in propensity]
    xs = [feature_vector(p, now=p["last_seen"]) for p in known]
    draws = np.random.default_rng(seed).random(len(known))
    ys = [int(d < propensity[p["user_id"]]) for d, p in zip(draws, known, strict=True)]
    model = LeadModel()
    for start in range(0, len(xs), 1000):  # the trainer's batches
        model.learn_many(xs[start : start + 1000], ys[start : start + 1000])
    return model


def _signed_lead_snapshot(model: LeadModel, settings: Settings) -> bytes:
    trainer = TrainerState("lead", model, WARM_LEAD_VERSION, model.examples_seen)
    return sign(trainer.snapshot(published_at=time.time()), settings.snapshot_secret.encode())


async def _ceiling(
    settings: Settings, expected: int, timeout_s: float, lead: LeadModel | None = None
) -> Throughput:
    """Plain aiokafka consumer + the engine's per-batch work, until ``expected`` events,
    scoring with ``lead`` when given (see :func:`warm_lead_model`)."""
    engine = build_engine(settings)
    if lead is not None:
        engine.swap("lead", lead)
    tune_gc(settings.gc_gen0_threshold)  # as the worker does
    topics = list(settings.input_topics.values())
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap_servers(settings.broker_url),
        group_id=settings.app_id,
        auto_offset_reset="earliest",
        enable_auto_commit=True,
        session_timeout_ms=int(settings.session_timeout_s * 1000),
        heartbeat_interval_ms=int(settings.heartbeat_s * 1000),
    )
    cache = ProfileCache(settings.redis_url)
    table: dict[bytes, bytes] = {}
    ordering = ReorderBuffer(topics, max_held=settings.reorder_max_held)
    clocks = PartitionClocks(lateness_s=settings.allowed_lateness_s, live=False)
    timers = TimerIndex()
    segment_counts: dict[int, Counter[str]] = {}
    seen: set[int] = set()
    writes = 0
    # The trainers' work, on the models scoring uses (the engine's trainers learn copies and
    # publish snapshots of them; the learning itself is the same).
    trainers = {name: TrainerState(name, engine.replica(name)) for name in MODELS}
    # The reorder buffer's work per event (heap push and pop) without its cross-batch hold: on
    # prefilled topics aiokafka hands out one partition's whole fetch at a time, so a hold until
    # every topic is caught up would release the entire log in one final batch.
    everything_read = dict.fromkeys(topics, math.inf)

    def load(user_id: str) -> dict[str, Any] | None:
        raw = table.get(user_id.encode())
        return profile_codec.decode(raw) if raw else None

    async def publish(
        changed: dict[str, dict[str, Any]],
        partition_of: dict[str, int],
        old: dict[str, str | None],
        outputs: Outputs,
    ) -> None:
        nonlocal writes
        writes += len(changed)
        now_of = {u: now_for(p, clocks.watermark(partition_of[u])) for u, p in changed.items()}
        outputs.extend(engine.score(changed, now_of))
        for model, examples in outputs.examples_by_model().items():
            learn(trainers[model], examples)
        for user_id, profile in changed.items():
            partition, key = partition_of[user_id], user_id.encode()
            due = engine.next_due(profile)
            if due is not None:
                timers.schedule(partition, due, key)
            new = (profile.get(TRIGGERS_KEY) or {}).get("segment")
            move_segment(segment_counts, partition, old.get(user_id), new)
            table[key] = profile_codec.encode(profile)
        sizes = segment_sizes(segment_counts, set(partition_of.values()))
        await cache.write_profiles(
            outputs.redis_fields, lead_scores=outputs.lead_scores, segment_sizes=sizes
        )

    async def process(batch: dict[TopicPartition, list[Any]]) -> int:
        wall_now = time.time()
        records = []
        for messages in batch.values():
            records += [Record(m.topic, m.partition, m.offset, m.key, m.value) for m in messages]
        result = BatchResult()
        valid = parse_records(
            records, result, now=wall_now,
            max_event_bytes=settings.max_event_bytes, max_future_s=settings.max_future_s,
        )  # fmt: skip
        for record, event in valid:
            ordering.add(record.partition, record.topic, event["ts"], (record, event))
        released = []
        for partition in ordering.partitions():
            released += ordering.release(partition, everything_read)
        apply_events(
            released, load, result,
            dedupe_window=settings.dedupe_window,
            affinity_half_life_s=settings.affinity_half_life_days * 86400.0,
            after_event=engine.after_event,
        )  # fmt: skip
        for partition, max_ts in result.max_ts.items():
            clocks.observe(partition, max_ts, wall_now)
            seen.add(partition)
        changed = result.changed
        for user_id, profile in changed.items():
            profile[PARTITION_FIELD] = result.partition_of[user_id]
        old = {u: (p.get(TRIGGERS_KEY) or {}).get("segment") for u, p in changed.items()}
        await publish(changed, result.partition_of, old, Outputs())
        return sum(result.counts.values())

    async def run_due_chunk() -> int:
        """The worker's :func:`~streams.app.run_due_chunk`, on this loop's state."""
        changed: dict[str, dict[str, Any]] = {}
        partition_of: dict[str, int] = {}
        old: dict[str, str | None] = {}
        outputs = Outputs()
        share = due_limit(settings.timer_chunk, len(seen))
        for partition in sorted(seen):
            due_outputs, touched = engine.run_due(
                timers, partition, clocks.watermark(partition), changed, table.get, limit=share
            )
            outputs.extend(due_outputs)
            for user_id, profile in touched:
                changed[user_id] = profile
                partition_of[user_id] = partition
                old[user_id] = (profile.get(TRIGGERS_KEY) or {}).get("segment")
        if changed:
            await publish(changed, partition_of, old, outputs)
        return len(changed)

    await consumer.start()
    try:
        deadline = time.monotonic() + timeout_s
        done = 0
        first: tuple[float, int, float] | None = None
        while done < expected:
            if time.monotonic() > deadline:
                raise BenchError(
                    f"ceiling consumed {done} of {expected} events in {timeout_s:.0f}s"
                )
            batch = await consumer.getmany(
                timeout_ms=int(settings.batch_within_s * 1000), max_records=settings.batch_size
            )
            if batch:
                done += await process(batch)
            if done and first is None:
                first = (time.monotonic(), done, time.process_time())
            await run_due_chunk()  # the worker's batches and due chunks take turns too
        while await run_due_chunk():  # the backlog is part of the work, as for the engine
            pass
        assert first is not None
        span = time.monotonic() - first[0]
        cpu = time.process_time() - first[2]
        if span <= 0:
            return Throughput(0.0, 0.0)
        return Throughput(
            (done - first[1]) / span, span, cpu / span, profile_writes_per_event=writes / done
        )
    finally:
        await consumer.stop()
        await cache.close()


def _faust_count(settings: Settings, expected: int, data_dir: Path, timeout_s: float) -> Throughput:
    """``python -m streams.bench_count`` over the input topics; its own measurement."""
    out = data_dir / "count.json"
    env = {
        **os.environ,
        "PERSONA_BENCH_BROKER_URL": settings.broker_url,
        "PERSONA_BENCH_APP_ID": settings.app_id,
        "PERSONA_BENCH_TOPICS": ",".join(settings.input_topics.values()),
        "PERSONA_BENCH_PARTITIONS": str(settings.partitions),
        "PERSONA_BENCH_EXPECTED": str(expected),
        "PERSONA_BENCH_OUT": str(out),
        "PERSONA_BENCH_DATA_DIR": str(data_dir / "faust"),
        "PERSONA_BENCH_BATCH": "1000",
        "PERSONA_BENCH_WITHIN_S": str(settings.batch_within_s),
        "PERSONA_BENCH_SESSION_TIMEOUT_S": str(settings.session_timeout_s),
        "PERSONA_BENCH_HEARTBEAT_S": str(settings.heartbeat_s),
    }
    log = data_dir / "count.log"
    proc = spawn([sys.executable, "-m", "streams.bench_count"], log, env)
    try:
        deadline = time.monotonic() + timeout_s
        report: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if out.exists():
                report = orjson.loads(out.read_bytes())
                if report.get("done"):
                    break
            if proc.poll() is not None:
                raise BenchError(f"faust count exited early; see {log}")
            time.sleep(POLL_S)
        else:
            raise BenchError(f"faust count got {report.get('count', 0)} of {expected}; see {log}")
        span = report["last_at"] - report["first_at"]
        return Throughput(report["events_per_s"] or 0.0, span, report.get("cpu_cores"))
    finally:
        _stop_group(proc, 15.0)


@contextlib.contextmanager
def _engine_workers(
    settings: Settings, count: int, lead: LeadModel | None = None
) -> Iterator[list[WorkerProcess]]:
    """``count`` workers of one app (one consumer group), each with its own port, dir and log;
    with ``lead``, published as the app's lead snapshot before they start: a worker reads the
    snapshots from the start while its consumer group forms, so it serves the model from its
    first batches (the served version is read from ``/metrics`` after the run)."""
    if lead is not None:
        snapshot = (snapshots_topic_name(settings), b"lead", _signed_lead_snapshot(lead, settings))
        asyncio.run(produce_all(settings.broker_url, [snapshot]))
    with contextlib.ExitStack() as stack:
        workers = []
        for i in range(count):
            run_dir = Path(settings.data_dir) / f"worker-{i}"
            own = dataclasses.replace(
                settings,
                data_dir=str(run_dir),
                web_port=settings.web_port if i == 0 else free_port(),
            )
            workers.append(stack.enter_context(WorkerProcess(own, run_dir / "worker.log")))
        for worker in workers:
            worker.wait_serving()
        yield workers


PY_SPY_MISSING = "--profile needs py-spy: pip install '.[profile]'"


def py_spy() -> str | None:
    """The py-spy executable on the PATH or beside this Python, if installed."""
    beside = Path(sys.executable).with_name("py-spy")
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


class _Profiler:
    """``py-spy record -f raw --gil`` attached to a pid until :meth:`stop` (SIGINT writes the
    file). Only the thread holding the GIL is sampled: without ``--gil`` a thread waiting for
    it counts as busy, and Faust's consumer thread showed 11 to 12% of the samples while
    ``/proc`` gave it 4 to 5% of the worker's CPU."""

    def __init__(self, pid: int, path: Path) -> None:
        exe = py_spy()
        if exe is None:
            raise BenchError(PY_SPY_MISSING)
        self.path = path
        with (path.parent / "py-spy.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [exe, "record", "-p", str(pid), "-f", "raw", "-r", "100", "--gil", "-o", str(path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def stop(self) -> Path | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.path if self.path.exists() else None


def _latency_profile(path: Path) -> Path:
    """Where the profile of the paced (latency) run goes, beside the throughput run's."""
    return path.with_name(f"{path.stem}-latency{path.suffix}")


def summarize_profile(path: Path, top: int = 15) -> dict[str, list[tuple[str, float]]]:
    """Top frames of a ``py-spy -f raw`` file by self and by cumulative share of samples."""
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            cumulative[frame] += count
    if not total:
        return {"self": [], "cumulative": []}
    return {
        "self": [(f, round(c / total, 4)) for f, c in own.most_common(top)],
        "cumulative": [(f, round(c / total, 4)) for f, c in cumulative.most_common(top)],
        "samples": total,  # type: ignore[dict-item]
    }


async def _count_profiles(redis_url: str) -> int:
    cache = ProfileCache(redis_url)
    try:
        return await cache.count_profiles()
    finally:
        await cache.close()


# -- the benchmark --------------------------------------------------------------------------


def _run_ceiling(
    settings: Settings, expected: int, timeout_s: float, lead: LeadModel | None
) -> Throughput:
    # On uvloop, as the worker and the count-only agent run: the same loop for every contender.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_ceiling(settings, expected, timeout_s, lead))


def _rounds_summary(pairs: Sequence[tuple[Throughput, Throughput]]) -> dict[str, Any]:
    """Each round's rates and ratio (ceiling, then engine), their medians, and ``ratio``: the
    median of the rounds' ratios, each taken over one stretch of the box's drifting speed.

    >>> t = lambda rate: Throughput(float(rate), 1.0)
    >>> summary = _rounds_summary([(t(8000), t(4000)), (t(5000), t(4500)), (t(6000), t(3600))])
    >>> summary["ratio"], summary["ceiling_events_per_s"], summary["engine_events_per_s"]
    (0.6, 6000.0, 4000.0)
    """
    rounds = [
        {
            "ceiling_events_per_s": round(ceiling.events_per_s, 1),
            "engine_events_per_s": round(engine.events_per_s, 1),
            "ratio": round(engine.events_per_s / ceiling.events_per_s, 3),
        }
        for ceiling, engine in pairs
    ]
    return {
        "rounds": rounds,
        "ratio": statistics.median(r["ratio"] for r in rounds),
        "ceiling_events_per_s": statistics.median(r["ceiling_events_per_s"] for r in rounds),
        "engine_events_per_s": statistics.median(r["engine_events_per_s"] for r in rounds),
    }


def run_bench(
    events: int,
    *,
    users: int = 10_000,
    seed: int = 7,
    workers: int = 1,
    partitions: int = 4,
    data_dir: Path | None = None,
    profile_path: Path | None = None,
    latency_s: float = 20.0,
    memory_events: int = MEMORY_EVENTS,
    memory_users: int = MEMORY_EVENTS,
    rounds: int = 3,
) -> dict[str, Any]:
    """Run every contender over the first ``events`` simulated messages; the result dict.

    The ceiling and the engine run ``rounds`` times, each engine run right after its ceiling
    run; the reported rates are the medians and ``ratio`` is the median of the rounds' ratios.

    Memory per profile is measured apart: a fresh worker reads ``memory_events`` messages of
    ``memory_users`` simulated users (many profiles, few events each), and the figure is its
    RSS growth per 100k profiles once warm (see :func:`_memory_run`).

    ``profile_path``: record the one-worker engine run with py-spy (raw format) to that file.
    ``latency_s``: about how long the run of the events that follow lasts (never longer than
    the max-rate run took, never under 5 s); the latency target's run replays all ``events``
    at half the rate, so it takes about twice the max-rate run.
    """
    if workers not in (1, 2):
        raise ValueError("workers must be 1 or 2")
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    if events <= 0 or memory_events <= 0:
        raise ValueError("events and memory_events must be positive")
    data_dir = Path(data_dir or tempfile.mkdtemp(prefix="persona-bench-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    timeout_s = 120.0 + events / 100.0
    result: dict[str, Any] = {"events": 0, "workers": workers, "users": users, "seed": seed,
                              "partitions": partitions, "machine": machine(),
                              "data_dir": str(data_dir)}  # fmt: skip
    raw = ShopperSimulator(users, seed).raw_messages()
    with contextlib.ExitStack() as servers:
        broker = servers.enter_context(EmbeddedBroker(data_dir))
        redis = servers.enter_context(EmbeddedRedis(data_dir))

        # 0. the input, produced once
        base = _settings(broker, redis, data_dir, "input", partitions)
        messages = _routed(base, raw, events)
        n = len(messages)
        if n == 0:
            raise BenchError("the simulator produced no events; raise --users")
        started = time.monotonic()
        asyncio.run(produce_all(base.broker_url, messages))
        result["produce_events_per_s"] = round(n / (time.monotonic() - started), 1)
        del messages
        result["events"] = n
        result["batch_size"] = base.batch_size
        servers_pids = {"broker": broker.pid or 0, "redis": redis.pid or 0}
        lead = warm_lead_model(users, seed, n)
        result["lead_model_examples"] = lead.examples_seen

        # 1. Faust alone
        count_settings = _settings(broker, redis, data_dir, "count", partitions)
        count = _faust_count(count_settings, n, data_dir / "count", timeout_s)
        result["faust_count_events_per_s"] = round(count.events_per_s, 1)
        result["faust_count_cpu_cores"] = _round(count.cpu_cores)

        # 2. two workers, before the latency run adds events to the topics
        if workers == 2:
            two_settings = _settings(broker, redis, data_dir, "engine2", partitions)
            with _engine_workers(two_settings, 2, lead) as pair:
                two = _Poll(pair, duplicates=False, others=servers_pids).until(n, timeout_s)
                texts = [w.scrape() or "" for w in pair]
                result["two_worker_redelivered"] = sum(events_counted(t) for t in texts) - sum(
                    events_counted(t, duplicates=False) for t in texts
                )
            result["two_worker_events_per_s"] = round(two.events_per_s, 1)
            result["two_worker_cpu_cores"] = _round(two.cpu_cores)
            result["two_worker_broker_cpu_cores"] = two.others_cores.get("broker")

        # 3. rounds of the ceiling and the engine back to back: the box's speed drifts by a
        # third from one minute to the next, and a pair run back to back shares the drift. The
        # last round's engine worker goes on with the events that follow (5.).
        pairs: list[tuple[Throughput, Throughput]] = []
        for i in range(rounds - 1):
            ceiling = _run_ceiling(
                _settings(broker, redis, data_dir, f"ceiling-{i}", partitions), n, timeout_s, lead
            )
            round_settings = _settings(broker, redis, data_dir, f"engine-{i}", partitions)
            with _engine_workers(round_settings, 1, lead) as (worker,):
                pairs.append((ceiling, _Poll([worker], others=servers_pids).until(n, timeout_s)))
        ceiling_settings = _settings(broker, redis, data_dir, "ceiling", partitions)
        ceiling = _run_ceiling(ceiling_settings, n, timeout_s, lead)
        result["ceiling_profile_writes_per_event"] = _round(ceiling.profile_writes_per_event)
        result["ceiling_cpu_cores"] = _round(ceiling.cpu_cores)

        # 4. the last round's engine, then 5. its latency at half the engine's rate
        engine_settings = _settings(broker, redis, data_dir, "engine", partitions)
        with _engine_workers(engine_settings, 1, lead) as (worker,):
            assert worker.pid is not None
            rss_start = rss_kib(worker.pid)
            held_at_halfway: list[int] = []

            def at_halfway() -> None:
                # Events held back for event-time order: their memory stays with the process.
                held_at_halfway.append(gauge(worker.scrape() or "", "persona_ordering_held_events"))

            profiler = _Profiler(worker.pid, profile_path) if profile_path else None
            try:
                poll = _Poll([worker], others=servers_pids, halfway=at_halfway)
                engine = poll.until(n, timeout_s)
            finally:
                recorded = profiler.stop() if profiler else None
            rss_end = rss_kib(worker.pid)
            profiles = asyncio.run(_count_profiles(engine_settings.redis_url))
            exposition = worker.scrape() or ""
            writes = gauge(exposition, PROFILE_WRITES)
            result["engine_profile_writes_per_event"] = round(writes / n, 2)
            result["engine_lead_model_version"] = gauge(exposition, LEAD_VERSION)
            result["store"] = engine_settings.store
            pairs.append((ceiling, engine))
            result.update(_rounds_summary(pairs))
            result["engine_cpu_cores"] = _round(engine.cpu_cores)
            result["broker_cpu_cores"] = engine.others_cores.get("broker")
            result["redis_cpu_cores"] = engine.others_cores.get("redis")
            result["engine_seconds"] = round(engine.seconds, 2)
            result["profiles"] = profiles
            result["held_events_at_halfway"] = next(iter(held_at_halfway), None)
            result["rss_start_mb"] = round(rss_start / 1024, 1)
            result["rss_end_mb"] = round(rss_end / 1024, 1)
            result["engine_rss_mb_per_100k_profiles"] = mib_per_100k(rss_end - rss_start, profiles)
            if recorded is not None:
                result["profile"] = str(recorded)

            # 5. the events that follow, at half that rate, on the same worker (idle again)
            _wait_idle(worker.pid)
            rate = max(result["engine_events_per_s"] * 0.5, 1.0)
            duration = min(max(engine.seconds, 5.0), max(latency_s, 5.0))
            later = _routed(engine_settings, raw, max(int(rate * duration), 100))
            result["later_events"] = len(later)
            result.update(_paced(worker, later, rate, n + len(later), timeout_s, "later_"))

        # 6. the same events again, at half that rate, to a fresh worker: the latency target
        paced_settings = _settings(
            broker, redis, data_dir, "paced", partitions, topic_prefix=PACED_TOPIC_PREFIX
        )
        same = _routed(paced_settings, ShopperSimulator(users, seed).raw_messages(), n)
        with _engine_workers(paced_settings, 1, lead) as (worker,):
            assert worker.pid is not None
            worker.wait_ready()  # else the first events wait for the group to form
            paced_rss_start = rss_kib(worker.pid)
            profiler = (
                _Profiler(worker.pid, _latency_profile(profile_path)) if profile_path else None
            )
            try:
                result.update(_paced(worker, same, rate, n, timeout_s))
            finally:
                recorded = profiler.stop() if profiler else None
            if recorded is not None:
                result["latency_profile"] = str(recorded)
            paced_profiles = asyncio.run(_count_profiles(paced_settings.redis_url))
            result["paced_rss_mb_per_100k_profiles"] = mib_per_100k(
                rss_kib(worker.pid) - paced_rss_start, paced_profiles
            )
        result["latency_rate_per_s"] = round(rate, 1)
        result["latency_events"] = n

        # 7. memory per profile: a fresh worker, many users
        memory_settings = _memory_settings(broker, redis, data_dir, partitions)
        result.update(
            _memory_run(
                memory_settings, memory_events, memory_users, seed, 120.0 + memory_events / 100.0
            )
        )

    if workers == 2:
        result["scale_ratio"] = round(
            result["two_worker_events_per_s"] / result["engine_events_per_s"], 3
        )
    return result


def _memory_run(
    settings: Settings, events: int, users: int, seed: int, timeout_s: float, parts: int = 2
) -> dict[str, Any]:
    """Resident memory per profile: a fresh worker reads ``events`` messages of ``users``
    simulated users, produced in ``parts`` equal parts. After each part, once the worker is
    idle and its allocator's free memory was trimmed, its RSS and the profiles it holds are read.

    The parts before the last warm the worker up: their growth holds what the worker allocates
    whatever the profiles (start-up, the models' first batches, the peak working set of reading
    prefilled topics at full speed, which the allocator keeps). The figure is the last part's
    growth over the profiles it added: what each further profile costs. Below a few hundred
    thousand profiles it is optimistic: the last part fills free space that the first part's
    peak left in the allocator's arenas (:func:`run_memory` measures up to a million directly).
    The growth from start-up over all profiles is reported beside it. The reorder hold is
    bounded (:data:`MEMORY_REORDER_MAX_HELD`)."""
    if parts < 2:
        raise ValueError("the memory run needs at least two parts (the first one warms up)")
    source = ShopperSimulator(users, seed + 1).raw_messages()
    sizes = [events // parts + (1 if i < events % parts else 0) for i in range(parts)]
    marks: list[tuple[int, int]] = []  # (profiles, RSS KiB) at start-up and after each part
    peak_kib, seconds, n = 0, 0.0, 0
    with _engine_workers(settings, 1) as (worker,):
        assert worker.pid is not None
        marks.append((0, rss_kib(worker.pid)))
        for size in sizes:
            messages = _routed(settings, source, size)
            n += len(messages)
            asyncio.run(produce_all(settings.broker_url, messages))
            del messages
            seconds += _Poll([worker]).until(n, timeout_s).seconds
            peak_kib = max(peak_kib, rss_kib(worker.pid))
            _wait_idle(worker.pid)
            time.sleep(settings.malloc_trim_s + 2 * settings.tick_interval_s)  # a trim since idle
            marks.append((asyncio.run(_count_profiles(settings.redis_url)), rss_kib(worker.pid)))
    (_, start), (warm_profiles, warm), (profiles, end) = marks[0], marks[-2], marks[-1]
    added = profiles - warm_profiles
    if added < profiles / (2 * parts):  # the slope would rest on a handful of profiles
        raise BenchError(
            f"memory run: only {added} of {profiles} profiles were added in its last part; "
            "raise the users of the memory run"
        )
    per_100k = mib_per_100k(end - warm, added)
    return {
        "memory_events": n,
        "memory_users": users,
        "memory_seconds": round(seconds, 1),
        "memory_parts": [
            {"profiles": count, "rss_mb": round(kib / 1024, 1)} for count, kib in marks[1:]
        ],
        "memory_profiles": profiles,
        "memory_profiles_warm": warm_profiles,
        "memory_rss_start_mb": round(start / 1024, 1),
        "memory_rss_warm_mb": round(warm / 1024, 1),
        "memory_rss_end_mb": round(end / 1024, 1),
        "memory_rss_peak_mb": round(peak_kib / 1024, 1),
        "rss_mb_per_100k_profiles": per_100k,
        "rss_mb_per_100k_profiles_with_startup": mib_per_100k(end - start, profiles),
        # This worker as it ended, plus the same cost per profile up to a million of them.
        "rss_mb_at_1m_profiles_projected": round(
            end / 1024 + per_100k * max(1_000_000 - profiles, 0) / 100_000, 1
        ),
    }


def _memory_settings(
    broker: EmbeddedBroker, redis: EmbeddedRedis, data_dir: Path, partitions: int
) -> Settings:
    return _settings(
        broker, redis, data_dir, "memory", partitions,
        topic_prefix=MEMORY_TOPIC_PREFIX, reorder_max_held=MEMORY_REORDER_MAX_HELD,
    )  # fmt: skip


def run_memory(
    events: int,
    *,
    users: int,
    parts: int = 4,
    seed: int = 7,
    partitions: int = 4,
    data_dir: Path | None = None,
) -> dict[str, Any]:
    """The memory run alone, in ``parts`` parts, on its own embedded broker and Redis: resident
    memory measured at each part's end rather than projected (``persona bench-memory``).

    The store is the worker's setting (``PERSONA_STORE``). With ``events`` and ``users`` in the
    millions it takes about half an hour. Few of the simulator's users have events early:
    4 million events of 4 million users made 1.19 million profiles.

    >>> run_memory(0, users=1)
    Traceback (most recent call last):
    ...
    ValueError: events must be positive
    """
    if events <= 0:
        raise ValueError("events must be positive")
    data_dir = Path(data_dir or tempfile.mkdtemp(prefix="persona-bench-memory-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"seed": seed, "partitions": partitions, "machine": machine(),
                              "data_dir": str(data_dir)}  # fmt: skip
    with EmbeddedBroker(data_dir) as broker, EmbeddedRedis(data_dir) as redis:
        settings = _memory_settings(broker, redis, data_dir, partitions)
        result["store"] = settings.store
        result.update(
            _memory_run(settings, events, users, seed, 120.0 + events / 100.0 / parts, parts)
        )
    return result


def mib_per_100k(grown_kib: int, profiles: int) -> float:
    """Resident memory growth in MiB per 100k profiles (over at least one profile).

    >>> mib_per_100k(20_480, 50_000), mib_per_100k(1024, 0)
    (40.0, 100000.0)
    """
    return round(grown_kib / 1024 / max(profiles, 1) * 100_000, 1)


def _paced(
    worker: WorkerProcess,
    messages: list[Message],
    rate: float,
    expected_total: int,
    timeout_s: float,
    prefix: str = "",
) -> dict[str, Any]:
    """Produce ``messages`` at ``rate`` per second while ``worker`` reads them, until it counted
    ``expected_total``: p50/p99 of each reported stage over that run (from the difference of its
    histograms), the worker's CPU, and the due timers it fired and profiles it wrote per event."""
    assert worker.pid is not None
    text = worker.scrape() or ""
    before = {stage: latency_buckets(text, stage) for stage in REPORTED_STAGES}
    fired_before = gauge(text, "persona_timers_fired_total")
    writes_before = gauge(text, PROFILE_WRITES)
    cpu_before, started = cpu_seconds(worker.pid), time.monotonic()
    asyncio.run(produce_all(worker.settings.broker_url, messages, rate_per_s=rate))
    _Poll([worker]).until(expected_total, timeout_s)
    text = worker.scrape() or ""
    busy = (cpu_seconds(worker.pid) - cpu_before) / (time.monotonic() - started)
    fired = gauge(text, "persona_timers_fired_total") - fired_before
    writes = gauge(text, PROFILE_WRITES) - writes_before
    out: dict[str, Any] = {
        f"{prefix}latency_cpu_cores": round(busy, 2),
        f"{prefix}timers_per_event": round(fired / max(len(messages), 1), 2),
        f"{prefix}profile_writes_per_event": round(writes / max(len(messages), 1), 2),
    }
    for stage, stage_prefix in REPORTED_STAGES.items():
        after = latency_buckets(text, stage)
        diff = {le: after.get(le, 0.0) - before[stage].get(le, 0.0) for le in after}
        for name, q in (("p50", 0.5), ("p99", 0.99)):
            seconds = histogram_quantile(q, diff)
            ms = None if seconds is None else round(seconds * 1000, 1)
            out[f"{prefix}{stage_prefix}{name}_ms"] = ms
    return out


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def format_report(result: dict[str, Any]) -> str:
    """The benchmark result for a reader: numbers first, then how each was measured."""
    m = result["machine"]
    lines = [
        f"persona bench: {result['events']} simulated events ({result['users']} users, seed "
        f"{result['seed']}), {result['partitions']} partitions, batches of {result['batch_size']}",
        f"machine: {m['nproc']} cores ({m['cpu_model']}), shared by the broker, Redis, the "
        "producer, this process and the worker(s): these are numbers of this box, not of Kafka",
        "",
        f"  ceiling (aiokafka + same per-batch work) {result['ceiling_events_per_s']:>10,.0f} "
        f"events/s  (last round: {_cores(result.get('ceiling_cpu_cores'))}; "
        f"{result.get('ceiling_profile_writes_per_event') or 0:.2f} profile writes per event)",
        f"  engine  (persona worker, 1 process)      {result['engine_events_per_s']:>10,.0f} "
        f"events/s  (last round: {_cores(result.get('engine_cpu_cores'))}; broker "
        f"{_cores(result.get('broker_cpu_cores'))}, Redis {_cores(result.get('redis_cpu_cores'))}; "
        f"{result.get('engine_profile_writes_per_event', 0):.2f} profile writes per event)"
        f"  ratio {result['ratio']:.2f}",
    ]
    rounds = result.get("rounds") or []
    if len(rounds) > 1:
        lines.append(
            f"  {len(rounds)} rounds, each a ceiling run and then an engine run (medians above): "
            + ", ".join(
                f"{r['ceiling_events_per_s']:,.0f} → {r['engine_events_per_s']:,.0f} "
                f"({r['ratio']:.2f})"
                for r in rounds
            )
        )
    lines.append(
        f"  faust count (take_events(1000) only)     {result['faust_count_events_per_s']:>10,.0f} "
        f"events/s  ({_cores(result.get('faust_count_cpu_cores'))})"
    )
    if result.get("two_worker_events_per_s") is not None:
        lines.append(
            f"  engine, 2 workers                        "
            f"{result['two_worker_events_per_s']:>10,.0f} events/s  "
            f"({_cores(result.get('two_worker_cpu_cores'))}; broker "
            f"{_cores(result.get('two_worker_broker_cpu_cores'))})  scale "
            f"{result['scale_ratio']:.2f} x one worker, "
            f"{result.get('two_worker_redelivered', 0)} re-delivered"
        )
    lines += [
        f"  latency produce → Redis at {result['latency_rate_per_s']:,.0f} events/s (half the "
        f"engine's rate; the same {result['latency_events']:,} events to a fresh worker, "
        f"{result.get('timers_per_event', 0):.2f} due timers fired and "
        f"{result.get('profile_writes_per_event', 0):.2f} profile writes per event): "
        f"p50 {_ms(result.get('p50_ms'))}, p99 {_ms(result.get('p99_ms'))} "
        f"({_cores(result.get('latency_cpu_cores'))}); before the batch starts "
        f"(produce → received): p50 {_ms(result.get('received_p50_ms'))}, "
        f"p99 {_ms(result.get('received_p99_ms'))}",
        f"  the {result.get('later_events', 0):,} events that follow, same rate, same worker as "
        f"the engine run ({result.get('later_timers_per_event', 0):.2f} due timers fired and "
        f"{result.get('later_profile_writes_per_event', 0):.2f} profile writes per event): "
        f"p50 {_ms(result.get('later_p50_ms'))}, p99 {_ms(result.get('later_p99_ms'))} "
        f"({_cores(result.get('later_latency_cpu_cores'))}); before the batch starts: "
        f"p50 {_ms(result.get('later_received_p50_ms'))}, "
        f"p99 {_ms(result.get('later_received_p99_ms'))}",
        f"  memory ({result.get('store', 'memory://')} store): "
        f"{result['rss_mb_per_100k_profiles']:,.0f} MiB RSS per 100k further profiles (a fresh "
        f"worker, {result['memory_events']:,} events of {result['memory_users']:,} users in "
        f"{len(result['memory_parts'])} parts: {result['memory_rss_start_mb']:,.0f} MiB at "
        "start-up, "
        f"{result['memory_rss_warm_mb']:,.0f} MiB for {result['memory_profiles_warm']:,} "
        f"profiles, {result['memory_rss_end_mb']:,.0f} MiB for {result['memory_profiles']:,}; "
        f"peak {result['memory_rss_peak_mb']:,.0f} MiB; start-up growth included: "
        f"{_mib(result.get('rss_mb_per_100k_profiles_with_startup'))} per 100k); projected at "
        f"a million profiles: {result['rss_mb_at_1m_profiles_projected']:,.0f} MiB",
        f"  memory in the runs above (start-up growth included): engine run "
        f"{result['rss_start_mb']:.0f} → {result['rss_end_mb']:.0f} MiB for "
        f"{result['profiles']:,} profiles ({result.get('held_events_at_halfway') or 0:,} events "
        "held for event-time order at halfway); paced run (nothing read ahead): "
        f"{_mib(result.get('paced_rss_mb_per_100k_profiles'))} per 100k profiles",
        "",
        "how: the input is produced once; each contender reads it under its own consumer group, "
        "alone on the machine.",
        "  events/s = events counted after the first batch / time from the end of the first "
        "batch to the end of the last;",
        "  the engine's counts come from its /metrics every 0.25 s (end = middle of the poll "
        "interval that reached the total).",
        "  models: every contender scores with the same trained lead model "
        f"({result.get('lead_model_examples', 0):,} examples, served by the engine as snapshot "
        f"{result.get('engine_lead_model_version', 0)}): the input's two days of event time are "
        "shorter than its label horizon.",
        "  ceiling: in-process aiokafka getmany + parse, event-time reorder, apply+after_event, "
        "timers, score, a dict of stored (zstd) profiles,",
        "  the trainers' learning, one Redis pipeline per batch; no changelog, no trigger or "
        "training-example sends, no metrics, no identity stitching (the engine does all of those).",
        '  latency: difference of the worker\'s persona_latency_seconds{stage="redis_written"} '
        "histogram over a paced run, from the Kafka produce timestamp,",
        "  interpolated linearly inside buckets (bounds 50, 100, 150, 200, 250, 300, 400, 500 ms, "
        "...). The target is read on the same events as the engine run, produced again",
        "  to their own topics at half its rate: the events that follow cost more each (the "
        "attribution windows and carts of the users scored before come due among them).",
        "  profile writes per event: profiles scored and written to the table and Redis (timers "
        "included); below 1 where a batch holds several events of one user.",
        "  memory: the memory run's worker VmRSS growth over the second half of its input "
        "(idle, free memory trimmed after each half), over the profiles that half added;",
        "  the first half takes start-up and the peak working set of reading prefilled topics "
        f"at full speed. Its reorder hold is bounded ({MEMORY_REORDER_MAX_HELD} events per",
        "  partition: a prefilled topic read far ahead of another fills it, about 4 KB an "
        "event). The projection is the end RSS plus that cost per profile up to a million.",
    ]
    return "\n".join(lines)


def format_memory_report(result: dict[str, Any]) -> str:
    """The result of :func:`run_memory` for a reader: RSS at each part's end, then the slope."""
    m = result["machine"]
    lines = [
        f"persona bench-memory: {result['memory_events']:,} simulated events of "
        f"{result['memory_users']:,} users (seed {result['seed']}), {result['partitions']} "
        f"partitions, {result['store']} store; machine: {m['nproc']} cores ({m['cpu_model']})",
        "",
        f"  {'after part':>10}  {'profiles':>10}  {'RSS':>10}  "
        f"{'MiB per 100k profiles of the part':>34}",
        f"  {'start-up':>10}  {0:>10,}  {result['memory_rss_start_mb']:>6,.0f} MiB",
    ]
    previous = (0, result["memory_rss_start_mb"])
    for number, part in enumerate(result["memory_parts"], 1):
        added, grown = part["profiles"] - previous[0], part["rss_mb"] - previous[1]
        slope = f"{grown / added * 100_000:,.0f}" if added > 0 else "—"
        lines.append(
            f"  {number:>10}  {part['profiles']:>10,}  {part['rss_mb']:>6,.0f} MiB  {slope:>34}"
        )
        previous = (part["profiles"], part["rss_mb"])
    lines += [
        "",
        f"  peak {result['memory_rss_peak_mb']:,.0f} MiB; the last part's slope projected to a "
        f"million profiles: {result['rss_mb_at_1m_profiles_projected']:,.0f} MiB",
        "how: RSS (VmRSS) of the worker idle after each part, its free memory trimmed; each part "
        "is produced, then read at full speed (reorder hold bounded)",
    ]
    return "\n".join(lines)


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} MiB"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} ms"


def _cores(value: float | None) -> str:
    return "cpu n/a" if value is None else f"{value:.2f} cores busy"
