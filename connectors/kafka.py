"""Kafka plumbing outside the Faust app: topic admin and a fast batch producer.

The worker's own topics are declared by Faust too, but creating them up front with the configured
partition count matters: the input topics and the profiles changelog must be co-partitioned (same
partition count, keyed by user id) for a user's events and state to live on the same worker. The
producer is what ``persona simulate`` and ``persona replay`` use to load input topics quickly: it
pipelines sends and waits for acknowledgements in chunks, not per message.

>>> bootstrap_servers("kafka://broker-1:9092;kafka://broker-2:9092")
'broker-1:9092,broker-2:9092'
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context


@dataclass(frozen=True, slots=True)
class KafkaSecurity:
    """How every Kafka client of this process authenticates (SASL) and encrypts (SSL)."""

    protocol: str = "PLAINTEXT"
    """PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."""
    sasl_mechanism: str = "PLAIN"
    """PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512."""
    username: str | None = None
    password: str | None = None
    ssl_cafile: str | None = None

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka's clients."""
        if self.protocol == "PLAINTEXT":
            return {}
        options: dict[str, Any] = {"security_protocol": self.protocol}
        if self.protocol in ("SSL", "SASL_SSL"):
            options["ssl_context"] = create_ssl_context(cafile=self.ssl_cafile)
        if self.protocol.startswith("SASL"):
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.username
            options["sasl_plain_password"] = self.password
        return options


_security = KafkaSecurity()


def configure_security(security: KafkaSecurity) -> None:
    """Set the security every client made through this module (and :func:`client_options`) uses.

    Process-wide on purpose: one process talks to one Kafka cluster with one identity.
    """
    global _security
    _security = security


def client_options() -> dict[str, Any]:
    """Security keyword arguments for an aiokafka client of this process."""
    return _security.client_options()


def bootstrap_servers(broker_url: str) -> str:
    """Faust broker URL(s) (``kafka://host:port;...``) to aiokafka bootstrap servers."""
    hosts = []
    for part in broker_url.replace(",", ";").split(";"):
        part = part.strip()
        if part:
            hosts.append(part.split("://", 1)[-1].rstrip("/"))
    return ",".join(hosts)


async def create_topics(
    broker_url: str,
    names: Iterable[str],
    *,
    partitions: int,
    replication_factor: int = 1,
    timeout_s: float = 30.0,
) -> list[str]:
    """Create the topics that do not exist yet; return the names created."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap_servers(broker_url),
        request_timeout_ms=int(timeout_s * 1000),
        **client_options(),
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [name for name in dict.fromkeys(names) if name not in existing]
        created = []
        for name in wanted:
            try:
                topic = NewTopic(
                    name, num_partitions=partitions, replication_factor=replication_factor
                )
                await admin.create_topics([topic])
                created.append(name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        await admin.close()


async def first_offset_from(
    broker_url: str, topic: str, partition: int, offset: int, *, timeout_s: float = 5.0
) -> int | None:
    """The first offset the broker holds at or after ``offset`` (None: nothing there yet).

    An answer past ``offset`` proves the offsets between hold no message (transaction markers,
    records deleted by retention), unlike offsets a consumer merely did not receive.
    """
    consumer = await probe_consumer(broker_url, auto_offset_reset="earliest")
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, offset)
        records = await consumer.getmany(tp, timeout_ms=int(timeout_s * 1000), max_records=1)
        batch = records.get(tp)
        return batch[0].offset if batch else None
    finally:
        await consumer.stop()


async def log_end_offsets(
    broker_url: str, reported: dict[TopicPartition, int], *, timeout_s: float = 5.0
) -> dict[TopicPartition, int]:
    """The log end offsets of partitions whose ListOffsets answer (``end_offsets``) was
    ``reported``: each partition's offset past its last record.

    The embedded broker (Tansu) answers ListOffsets with the base offset of the partition's
    last record batch + 1, short of the end by the rest of that batch; the high watermark of a
    fetch response is right. So each non-empty partition is fetched once from its answer - 1
    (inside the last batch) and the larger of the two ends kept; on Apache Kafka they agree.
    Where no fetch answers within ``timeout_s``, the reported end stands.
    """
    ends = dict(reported)
    fetch = [tp for tp, end in reported.items() if end > 0]
    if not fetch:
        return ends
    consumer = await probe_consumer(broker_url, auto_offset_reset="latest")
    try:
        consumer.assign(fetch)
        for tp in fetch:
            consumer.seek(tp, reported[tp] - 1)
        deadline = asyncio.get_running_loop().time() + timeout_s
        waiting = set(fetch)
        while waiting and asyncio.get_running_loop().time() < deadline:
            await consumer.getmany(*waiting, timeout_ms=200, max_records=1)
            for tp in list(waiting):
                highwater = consumer.highwater(tp)
                if highwater is not None:
                    ends[tp] = max(ends[tp], highwater)
                    waiting.discard(tp)
                    consumer.pause(tp)
    finally:
        await consumer.stop()
    return ends


async def probe_consumer(broker_url: str, *, auto_offset_reset: str) -> AIOKafkaConsumer:
    """A started consumer outside any group, for reading a few offsets (caller stops it)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers(broker_url),
        enable_auto_commit=False,
        auto_offset_reset=auto_offset_reset,
        **client_options(),
    )
    await consumer.start()
    return consumer


Message = tuple[str, bytes | None, bytes]
"""(topic, key, value)."""


async def send_to_partitions(broker_url: str, messages: Iterable[tuple[str, int, bytes]]) -> None:
    """Send each (topic, partition, value) to exactly that partition, acknowledged."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers(broker_url), acks="all", **client_options()
    )
    await producer.start()
    try:
        for topic, partition, value in messages:
            await producer.send_and_wait(topic, value=value, partition=partition)
    finally:
        await producer.stop()


PACE_EVERY = 10
"""With a rate, the producer checks its schedule every this many messages: at 900 events/s a
burst of 10 every 11 ms, close to a steady stream (100 made bursts of 100 every 111 ms)."""


async def produce_all(
    broker_url: str,
    messages: Iterable[Message],
    *,
    chunk: int = 5000,
    on_progress: Callable[[int], None] | None = None,
    rate_per_s: float | None = None,
    in_step: bool = False,
) -> int:
    """Send every message, in order, acknowledged by the broker; return how many were sent.

    With ``rate_per_s`` the sends are paced (the demo's live traffic); without it they go as fast
    as the broker takes them. Order within a partition is kept (one in-flight batch per partition).

    Across partitions, batching lets one topic's messages land before an earlier message of
    another topic: a log produced that way while a worker reads it can be read ahead on one
    topic, hours of event time in milliseconds (see :mod:`streams.ordering`). ``in_step`` sends
    each message only once the one before it is acknowledged, so the broker holds a prefix of
    ``messages`` at every moment, as sources writing live do (about a millisecond a message).
    """
    if in_step:
        chunk = 1
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers(broker_url),
        linger_ms=0 if in_step else 5,
        max_batch_size=256 * 1024,
        acks="all",
        enable_idempotence=False,
        **client_options(),
    )
    await producer.start()
    sent = 0
    started = asyncio.get_running_loop().time()
    try:
        pending: list[asyncio.Future[object]] = []
        for topic, key, value in messages:
            pending.append(await producer.send(topic, value=value, key=key))
            sent += 1
            if len(pending) >= chunk:
                await asyncio.gather(*pending)
                pending.clear()
                if on_progress:
                    on_progress(sent)
            if rate_per_s and sent % PACE_EVERY == 0:
                ahead = sent / rate_per_s - (asyncio.get_running_loop().time() - started)
                if ahead > 0:
                    await asyncio.gather(*pending)
                    pending.clear()
                    if on_progress:
                        on_progress(sent)
                    await asyncio.sleep(ahead)
        if pending:
            await asyncio.gather(*pending)
        if on_progress:
            on_progress(sent)
        return sent
    finally:
        await producer.stop()
