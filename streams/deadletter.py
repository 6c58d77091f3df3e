"""``persona dead-letter replay``: send dead-lettered messages back to their input topic.

Once the cause of a rejection is fixed (a producer bug, a too-strict limit, a parser fix), the
original messages are still in the dead-letter topic, byte for byte (``value_b64``), with where
they came from (``source.topic`` and ``source.partition``) and why (``reason``). This reads the
dead-letter topic from the beginning (or from given offsets) up to its end *as it was when the
replay started*, so messages rejected again while it runs are not replayed in a loop, and
re-produces the original bytes with the original key (the worker keys each dead letter with the
key of the message it rejected) to the original topic and partition.

No consumer group: partitions are assigned manually and nothing is committed, so a replay never
disturbs a worker and can be repeated. Replaying twice re-sends the same messages; valid ones are
de-duplicated by ``messageId`` in the worker, so that is harmless.

Order is deterministic: dead-letter partitions in ascending order, offsets in ascending order
within each; the sends keep that order within each target partition.

>>> from connectors.segment import dead_letter_record
>>> record = dead_letter_record(b"{oops", topic="clickstream", partition=2, offset=9,
...                             reason="not_json", detail="payload is not valid JSON", at=1.0)
>>> plan = plan_replay(record, key=b"u-1", reasons={"not_json"})
>>> plan.topic, plan.partition, plan.key, plan.value, plan.reason
('clickstream', 2, b'u-1', b'{oops', 'not_json')
>>> plan_replay(record, key=b"u-1", reasons={"bad_field"}).matched
False
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from connectors.kafka import bootstrap_servers, client_options
from connectors.segment import decode_dead_letter

__all__ = ["INVALID", "Replay", "plan_replay", "replay_dead_letters"]

INVALID = "invalid_record"
"""``by_reason`` key of dead-letter messages that are not dead-letter records (never replayed)."""


@dataclass(frozen=True, slots=True)
class Replay:
    """What one dead-letter message would be replayed as."""

    reason: str
    matched: bool
    """Whether its reason passes the filter (always False for an invalid record)."""
    topic: str | None
    partition: int | None
    key: bytes | None
    value: bytes


def plan_replay(record: bytes, *, key: bytes | None, reasons: Collection[str] | None) -> Replay:
    """Decode one dead-letter message (its value ``record`` and Kafka ``key``) and filter it.

    ``reasons`` None matches every reason. A message that is not a valid dead-letter record
    (not JSON, no ``value_b64``, no ``source.topic``) is reported with reason :data:`INVALID` and
    never matches: there is nothing trustworthy to replay.
    """
    try:
        original, meta = decode_dead_letter(record)
    except ValueError:
        return Replay(INVALID, False, None, None, key, record)
    source = meta.get("source")
    reason = meta.get("reason")
    topic = source.get("topic") if isinstance(source, dict) else None
    if not isinstance(reason, str) or not isinstance(topic, str) or not topic:
        return Replay(INVALID, False, None, None, key, record)
    partition = source.get("partition")
    if not isinstance(partition, int) or isinstance(partition, bool) or partition < 0:
        partition = None
    matched = reasons is None or reason in reasons
    return Replay(reason, matched, topic, partition, key, original)


async def replay_dead_letters(
    broker_url: str,
    deadletter_topic: str,
    *,
    reasons: Collection[str] | None = None,
    dry_run: bool = False,
    since_offsets: Mapping[int, int] | None = None,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Replay the dead letters of ``deadletter_topic`` whose reason is in ``reasons``.

    ``reasons`` None replays every reason; ``dry_run`` only counts. ``since_offsets`` maps a
    dead-letter partition to the first offset to read (default: the beginning); pass a previous
    result's ``end_offsets`` to replay only what was dead-lettered since. Each replayed message goes
    to its source topic and partition (by key when that partition no longer exists) with the key
    of the dead-letter message. ``timeout_s`` bounds reading each partition.

    The whole range is read before anything is sent, so nothing this replay sends can be
    rejected again and read back in the same run. Returns ``{"read", "matched", "replayed",
    "by_reason", "end_offsets"}``: messages read, those whose reason matched, those sent (0 on a
    dry run), read messages per reason (:data:`INVALID` for messages that are not dead-letter
    records) and, per dead-letter partition, the offset after the last message read.
    """
    wanted = frozenset(reasons) if reasons is not None else None
    servers = bootstrap_servers(broker_url)
    by_reason: Counter[str] = Counter()
    end_offsets: dict[int, int] = {}
    plans: list[Replay] = []  # matched, in (partition, offset) order
    read = 0
    consumer = AIOKafkaConsumer(
        bootstrap_servers=servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **client_options(),
    )
    await consumer.start()
    try:
        await consumer.topics()  # fetches the cluster metadata
        partitions = consumer.partitions_for_topic(deadletter_topic)
        if not partitions:
            raise ValueError(f"dead-letter topic {deadletter_topic!r} does not exist")
        tps = [TopicPartition(deadletter_topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        # The end is taken now: later dead letters are left for the next replay. No record is
        # filtered by offset against it, though: the embedded broker (Tansu) answers ListOffsets
        # with the base offset of the last *batch* + 1, below the true end, so the last fetched
        # batch is kept whole and the position after it is the end reported.
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        loop = asyncio.get_running_loop()
        for tp in tps:
            start = max(starts[tp], (since_offsets or {}).get(tp.partition, 0))
            end_offsets[tp.partition] = start
            if start >= ends[tp]:
                continue
            consumer.seek(tp, start)
            deadline = loop.time() + timeout_s
            while await consumer.position(tp) < ends[tp]:
                if loop.time() > deadline:
                    raise TimeoutError(
                        f"reading {tp.topic}[{tp.partition}] did not reach offset {ends[tp]} "
                        f"within {timeout_s:.0f}s"
                    )
                batch = await consumer.getmany(tp, timeout_ms=500)
                for message in batch.get(tp, []):
                    read += 1
                    plan = plan_replay(message.value, key=message.key, reasons=wanted)
                    by_reason[plan.reason] += 1
                    if plan.matched:
                        plans.append(plan)
            end_offsets[tp.partition] = await consumer.position(tp)
    finally:
        await consumer.stop()

    replayed = 0
    if plans and not dry_run:
        producer = AIOKafkaProducer(bootstrap_servers=servers, acks="all", **client_options())
        await producer.start()
        try:
            target_partitions: dict[str, frozenset[int]] = {}
            pending: list[asyncio.Future[Any]] = []
            for plan in plans:
                assert plan.topic is not None
                if plan.topic not in target_partitions:
                    known = await producer.partitions_for(plan.topic)
                    target_partitions[plan.topic] = frozenset(known or ())
                partition = plan.partition
                if partition not in target_partitions[plan.topic]:
                    partition = None  # the topic shrank or was recreated: partition by key
                pending.append(
                    await producer.send(
                        plan.topic, value=plan.value, key=plan.key, partition=partition
                    )
                )
            await asyncio.gather(*pending)
            replayed = len(pending)
        finally:
            await producer.stop()
    return {
        "read": read,
        "matched": len(plans),
        "replayed": replayed,
        "by_reason": dict(sorted(by_reason.items())),
        "end_offsets": end_offsets,
    }
