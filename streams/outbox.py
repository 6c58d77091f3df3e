"""Outbox: what one batch writes to tables and topics, sent through the producer in one go.

Faust sends a table's changelog record and a topic message through its own per-message path
(a ``FutureMessage``, its producer buffer, callbacks): on the hot path that cost more CPU per
changed profile than scoring it. The outbox keeps the same records and guarantees with less
work per message:

- a table write goes straight into the table's store (memory or RocksDB, in the partition of the
  batch event given) and queues the changelog record for that same partition, exactly the record
  Faust would have sent, so recovery and standbys read it unchanged;
- a record that says how far the others go (a partition's event-time watermark) is written
  with :meth:`Outbox.write_last`: its changelog record goes after every other record of its
  partition in the flush, so a changelog cut anywhere (a worker killed between two record
  batches of one flush) never holds it without what it covers;
- messages for other topics are queued too;
- :meth:`Outbox.flush` hands the messages to the aiokafka producer as one record batch per
  partition (:func:`send_batched`), waits until the broker has them, then does the same with
  the changelog records; only then does the caller acknowledge the batch (at-least-once), and
  the RocksDB store learns the changelog offsets it holds (Faust's ``set_persisted_offset``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from aiokafka.partitioner import DefaultPartitioner
from faust.types import TP

from connectors.partitioner import partitions_for_keys
from streams.sends import CHANGELOG, MESSAGES, Turn


@dataclass
class Outbox:
    """One batch's pending table writes and messages; ``producer`` is the app's producer."""

    producer: Any
    pending: list[tuple[str, bytes | None, bytes | None, int | None, Any]] = field(
        default_factory=list
    )
    """(topic, key, value, partition, table or None) in send order."""
    last: list[tuple[str, bytes | None, bytes | None, int | None, Any]] = field(
        default_factory=list
    )
    """Table writes whose changelog records go after all of ``pending`` (:meth:`write_last`)."""

    def write(self, table: Any, partition: int, key: bytes, value: bytes | None) -> None:
        """Set (``value``) or delete (None) ``key`` in ``table`` on ``partition``.

        The caller makes an event of ``partition`` current (RocksDB picks its database by it).
        """
        self._write(self.pending, table, partition, key, value)

    def write_last(self, table: Any, partition: int, key: bytes, value: bytes) -> None:
        """:meth:`write`, with the changelog record sent after every other record of this
        flush: for a record that vouches for the others (a partition's watermark says the
        profiles hold every event before it), which a recovery must never see without them.
        """
        self._write(self.last, table, partition, key, value)

    def _write(
        self,
        queue: list[tuple[str, bytes | None, bytes | None, int | None, Any]],
        table: Any,
        partition: int,
        key: bytes,
        value: bytes | None,
    ) -> None:
        store = table.data
        if value is None:
            if key not in store:
                return
            del store[key]
        else:
            store[key] = value
        queue.append((table.changelog_topic.get_topic_name(), key, value, partition, table))

    def send(
        self, topic: str, key: bytes | None, value: bytes, partition: int | None = None
    ) -> None:
        """Queue a message (``partition`` None: by key, Kafka's default partitioner)."""
        self.pending.append((topic, key, value, partition, None))

    async def flush(self, turn: Turn) -> Callable[[], None]:
        """Send everything queued and wait until the broker has acknowledged it; returns what
        records the changelog offsets in the stores (RocksDB's ``set_persisted_offset``), for
        the caller to run when it acknowledges the batch, in batch order.

        Messages first, table changelog records after them: a worker killed in between has sent
        a trigger whose state change is not yet recorded, so the batch runs again and sends the
        same trigger (same idempotency key) again; the other order would record a trigger as
        sent that never was. Each goes to the producer in ``turn`` (:mod:`streams.sends`): after
        the previous send's, so every partition gets them in batch order.
        """
        pending, self.pending, self.last = [*self.pending, *self.last], [], []
        producer = self.producer._producer  # the aiokafka producer under Faust's
        messages = [(t, k, v, p) for t, k, v, p, table in pending if table is None]
        await send_batched(producer, messages, turn, MESSAGES)
        tables = {(t, p): table for t, k, v, p, table in pending if table is not None}
        changelog = [(t, k, v, p) for t, k, v, p, table in pending if table is not None]
        offsets = await send_batched(producer, changelog, turn, CHANGELOG)

        def persist() -> None:
            for (topic, partition), offset in offsets.items():
                tables[(topic, partition)].data.set_persisted_offset(TP(topic, partition), offset)

        return persist


Appended = list[tuple[str, int, int, Any]]
"""(topic, partition, records, future of the batch's metadata) per record batch handed over."""


async def send_batched(
    producer: Any,
    messages: list[tuple[str, bytes | None, bytes | None, int | None]],
    turn: Turn | None = None,
    stage: str = MESSAGES,
) -> dict[tuple[str, int], int]:
    """Send ``(topic, key, value, partition)`` messages as one record batch per partition (more
    when one overflows the producer's batch size), in order within each partition; wait for the
    broker's acknowledgements; the last offset written on each ``(topic, partition)``.

    aiokafka's per-message ``send`` creates a future per message and appends it to a batch
    anyway; building the batches here skips that. ``partition`` None: by key, with the default
    partitioner (murmur2), as ``send`` would choose (for the whole batch at once). With ``turn``
    (:mod:`streams.sends`), the batches go to the producer at its ``stage``: after the previous
    send's, and before the next send's, while the broker's acknowledgements are awaited.
    """
    if turn is not None:
        await turn.wait(stage)
    appended = await _append_batched(producer, messages)
    if turn is not None:
        turn.passed(stage)
    return await _acknowledged(appended)


async def _append_batched(
    producer: Any, messages: list[tuple[str, bytes | None, bytes | None, int | None]]
) -> Appended:
    """:func:`send_batched` up to the producer taking the batches: returns their futures."""
    by_key = await _partitions_by_key(producer, messages)
    by_partition: dict[tuple[str, int], list[tuple[bytes | None, bytes | None]]] = {}
    for i, (topic, key, value, partition) in enumerate(messages):
        if partition is None:
            partition = by_key[i]
        by_partition.setdefault((topic, partition), []).append((key, value))
    sent: Appended = []
    for (topic, partition), records in by_partition.items():
        batch, count = producer.create_batch(), 0
        for key, value in records:
            if batch.append(key=key, value=value, timestamp=None) is None:  # full: send it
                sent.append((topic, partition, count, await producer.send_batch(
                    batch, topic, partition=partition)))  # fmt: skip
                batch, count = producer.create_batch(), 0
                if batch.append(key=key, value=value, timestamp=None) is None:
                    raise ValueError(f"a message for {topic} is larger than a whole batch")
            count += 1
        sent.append((topic, partition, count, await producer.send_batch(
            batch, topic, partition=partition)))  # fmt: skip
    return sent


async def _acknowledged(sent: Appended) -> dict[tuple[str, int], int]:
    """Wait for the broker to acknowledge ``sent``: the last offset on each partition."""
    last: dict[tuple[str, int], int] = {}
    for topic, partition, count, future in sent:
        metadata = await future
        offset = metadata.offset + count - 1
        last[(topic, partition)] = max(last.get((topic, partition), -1), offset)
    return last


async def _partitions_by_key(
    producer: Any, messages: list[tuple[str, bytes | None, bytes | None, int | None]]
) -> dict[int, int]:
    """The default partitioner's choice for each message (by index) sent without a partition:
    murmur2 of the key for a whole topic at once; a random available partition without a key."""
    partitions_of: dict[str, list[int]] = {}  # one metadata lookup per topic, not per message
    keyed: dict[str, list[int]] = {}  # topic -> indexes of its keyed messages
    chosen: dict[int, int] = {}
    for i, (topic, key, _, partition) in enumerate(messages):
        if partition is not None:
            continue
        if topic not in partitions_of:
            partitions_of[topic] = sorted(await producer.partitions_for(topic))
        if key is None:
            every = partitions_of[topic]
            chosen[i] = DefaultPartitioner()(None, every, every)
        else:
            keyed.setdefault(topic, []).append(i)
    for topic, indexes in keyed.items():
        keys = [cast(bytes, messages[i][1]) for i in indexes]
        placed = partitions_for_keys(keys, len(partitions_of[topic]))
        chosen.update(zip(indexes, placed, strict=True))
    return chosen
