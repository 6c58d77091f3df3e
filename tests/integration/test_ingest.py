"""Integration: events through the real embedded broker into the real embedded Redis.

One worker per module (its start-up costs seconds); each test uses its own users and topics.
"""

from __future__ import annotations

import asyncio
import csv
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from aiokafka import AIOKafkaConsumer, TopicPartition

from connectors.embedded import EmbeddedBroker, EmbeddedRedis
from connectors.kafka import (
    bootstrap_servers,
    create_topics,
    first_offset_from,
    log_end_offsets,
    produce_all,
)
from connectors.redis_cache import profile_key
from connectors.segment import decode_dead_letter
from streams.settings import Settings
from streams.worker import WorkerProcess
from tests.conftest import DATASETS, REPO, engine_settings, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engine(
    broker: EmbeddedBroker, redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, WorkerProcess]]:
    data_dir = tmp_path_factory.mktemp("engine")
    settings = engine_settings(broker, redis_server, data_dir)
    worker = WorkerProcess(settings, data_dir / "worker.log").start()
    try:
        worker.wait_serving()
        yield settings, worker
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def redis_client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


def event(user: str, name: str, message_id: str, ts: str, **properties: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "event": name,
        "userId": user,
        "messageId": message_id,
        "timestamp": ts,
        "properties": properties,
        "context": {"consent": {"categoryPreferences": {"email": True, "advertising": False}}},
    }


def send(settings: Settings, items: list[tuple[str, bytes | None, bytes]]) -> None:
    asyncio.run(produce_all(settings.broker_url, items))


def clickstream(settings: Settings, payload: dict[str, Any]) -> tuple[str, bytes, bytes]:
    from connectors.segment import partition_key, route

    return (settings.input_topics[route(payload)], partition_key(payload), orjson.dumps(payload))


def profile(client: redis.Redis, user: str) -> dict[str, str]:
    return client.hgetall(profile_key(user))


def test_events_become_profile_values_in_redis(engine, redis_client) -> None:
    settings, _ = engine
    user = "it-alice"
    events = [
        event(
            user,
            "Product Viewed",
            "a1",
            "2024-03-01T10:00:00Z",
            product_id="p1",
            price=20.0,
            category="shoes",
        ),
        event(
            user,
            "Product Added",
            "a2",
            "2024-03-01T10:01:00Z",
            product_id="p1",
            price=20.0,
            quantity=2,
            category="shoes",
        ),
        event(
            user,
            "Product Added",
            "a3",
            "2024-03-01T10:02:00Z",
            product_id="p2",
            price=5.5,
            category="socks",
        ),
        event(
            user,
            "Order Completed",
            "a4",
            "2024-03-01T10:05:00Z",
            order_id="o1",
            revenue=45.5,
            products=[
                {"product_id": "p1", "price": 20.0, "quantity": 2},
                {"product_id": "p2", "price": 5.5, "quantity": 1},
            ],
        ),
        event(
            user,
            "Product Added",
            "a5",
            "2024-03-02T09:00:00Z",
            product_id="p3",
            price=12.25,
            category="hats",
        ),
    ]
    send(settings, [clickstream(settings, e) for e in events])
    wait_until(lambda: profile(redis_client, user).get("events") == "5", what="5 events in Redis")
    got = profile(redis_client, user)
    assert got["orders"] == "1"
    assert float(got["revenue"]) == pytest.approx(45.5)
    assert got["cart_items"] == "1"
    assert float(got["cart_value"]) == pytest.approx(12.25)
    assert got["consent_email"] == "1"
    assert got["consent_advertising"] == "0"
    assert got["updated_at"].startswith("2024-03-02T09:00:00")


def test_same_event_twice_counts_once(engine, redis_client) -> None:
    settings, _ = engine
    user = "it-bob"
    order = event(
        user, "Order Completed", "b1", "2024-03-01T10:05:00Z", order_id="o9", revenue=100.0
    )
    marker = event(user, "Product Viewed", "b2", "2024-03-01T11:00:00Z", product_id="p1")
    # the duplicate arrives in a later batch too, after the worker has written the profile
    send(settings, [clickstream(settings, order), clickstream(settings, order)])
    wait_until(lambda: profile(redis_client, user).get("orders") == "1", what="bob's order")
    send(settings, [clickstream(settings, order), clickstream(settings, marker)])
    wait_until(lambda: profile(redis_client, user).get("events") == "2", what="bob's 2nd event")
    got = profile(redis_client, user)
    assert got["orders"] == "1"
    assert float(got["revenue"]) == pytest.approx(100.0)


def read_topic(settings: Settings, topic: str, expected: int, timeout: float = 30.0) -> list[Any]:
    async def consume() -> list[Any]:
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap_servers(settings.broker_url),
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        records: list[Any] = []
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while len(records) < expected and loop.time() < deadline:
                batch = await consumer.getmany(timeout_ms=500)
                for messages in batch.values():
                    records.extend(messages)
        finally:
            await consumer.stop()
        return records

    return asyncio.run(consume())


def test_malformed_messages_are_dead_lettered_and_the_worker_keeps_going(
    engine, redis_client
) -> None:
    settings, worker = engine
    user = "it-carol"
    bad: list[tuple[bytes, str]] = [
        (b"not json at all", "not_json"),
        (b"\xff\xfe\x00garbage", "invalid_utf8"),
        (
            orjson.dumps(event(user, "Product Added", "", "2024-03-01T10:00:00Z")),
            "missing_message_id",
        ),
        (
            orjson.dumps(event(user, "Product Added", "c-neg", "2024-03-01T10:00:00Z", price=-3)),
            "negative_value",
        ),
        (orjson.dumps(event(user, "Product Added", "c-ts", "yesterday-ish")), "bad_timestamp"),
        (
            orjson.dumps(event(user, "Product Added", "c-old", "1970-01-02T00:00:00Z")),
            "timestamp_out_of_range",
        ),
        (
            orjson.dumps({**event(user, "x", "c-type", "2024-03-01T10:00:00Z"), "type": "shout"}),
            "unknown_type",
        ),
        (
            b'{"type": "track", "event": "Product Viewed", "messageId": "c-nouser", '
            b'"timestamp": "2024-03-01T10:00:00Z"}',
            "missing_user_id",
        ),
        (b"[" * 5000 + b"]" * 5000, "too_deep"),
        (b'{"pad": "' + b"x" * 70_000 + b'"}', "too_large"),
    ]
    good = event(user, "Product Viewed", "c-good", "2024-03-01T12:00:00Z", product_id="p1")
    topic = settings.input_topics["clickstream"]
    items = [(topic, user.encode(), raw) for raw, _ in bad]
    items.insert(5, clickstream(settings, good))
    send(settings, items)

    records = read_topic(settings, settings.topics["deadletter"], expected=len(bad))
    assert len(records) == len(bad), f"expected {len(bad)} dead letters, got {len(records)}"
    decoded = [decode_dead_letter(r.value) for r in records]
    assert sorted(meta["reason"] for _, meta in decoded) == sorted(r for _, r in bad)
    originals = {raw for raw, _ in decoded}
    assert originals == {raw for raw, _ in bad}, "dead letters must keep the original bytes"
    for _, meta in decoded:
        assert meta["source"]["topic"] == topic
        assert meta["source"]["offset"] >= 0
    wait_until(lambda: profile(redis_client, user).get("events") == "1", what="carol's good event")
    assert worker.running


def rees46_expected(path: Path) -> dict[str, dict[str, float]]:
    """Per-user counts and revenue computed from the raw CSV, independently of the adapter."""
    expected: dict[str, dict[str, float]] = defaultdict(
        lambda: {"events": 0, "orders": 0, "revenue": 0.0}
    )
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            user = expected[row["user_id"]]
            user["events"] += 1
            if row["event_type"] == "purchase":
                user["orders"] += 1
                user["revenue"] += float(row["price"])
    return dict(expected)


def test_rees46_replay_gives_profiles_equal_to_an_independent_count(
    broker, redis_server, tmp_path, start_worker
) -> None:
    path = DATASETS / "clickstream_samples" / "rees46_2019-Oct_first1000.csv"
    if not path.exists():
        pytest.skip(f"dataset missing: {path}")
    expected = rees46_expected(path)
    own_database = redis_server.database_url(1)
    settings = engine_settings(broker, redis_server, tmp_path, redis_url=own_database)
    start_worker(settings)
    replay = subprocess.run(
        [sys.executable, "-m", "streams.cli", "replay", str(path), "--format", "rees46"],
        env={**settings.as_env(), "PATH": "/usr/bin:/bin"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert replay.returncode == 0, replay.stderr
    summary = orjson.loads(replay.stdout.strip().splitlines()[-1])
    assert summary["events"] == 1000

    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:

        def all_written() -> bool:
            return sum(int(client.hget(profile_key(u), "events") or 0) for u in expected) == 1000

        wait_until(all_written, timeout=60, what="all 1000 REES46 events in Redis profiles")
        mismatches = Counter()
        for user, want in expected.items():
            got = client.hgetall(profile_key(user))
            if int(got["events"]) != want["events"] or int(got["orders"]) != want["orders"]:
                mismatches["counts"] += 1
            if abs(float(got["revenue"]) - want["revenue"]) > 0.005:
                mismatches["revenue"] += 1
        assert not mismatches, f"profiles differ from the CSV for {dict(mismatches)} users"
        assert sum(1 for _ in client.scan_iter(match="persona:profile:*")) == len(expected)
    finally:
        client.close()


def test_erasure_removes_the_user_everywhere_persona_wrote(engine, redis_client) -> None:
    from streams.backtest import read_topic_records, read_whole_topic

    settings, worker = engine
    user = "it-erin"
    before = [
        event(user, "Product Added", "e1", "2024-03-01T10:00:00Z", product_id="p1", price=9.0),
        event(user, "Order Completed", "e2", "2024-03-01T10:05:00Z", order_id="o1", revenue=9.0),
    ]
    send(settings, [clickstream(settings, e) for e in before])
    wait_until(lambda: profile(redis_client, user).get("events") == "2", what="erin's profile")
    erase = event(user, "Erasure Requested", "e3", "2024-03-01T11:00:00Z")
    after = event(user, "Product Viewed", "e4", "2024-03-01T12:00:00Z", product_id="p2")
    marker_user = "it-frank"
    marker = event(marker_user, "Product Viewed", "f1", "2024-03-01T12:00:01Z", product_id="p3")
    send(settings, [clickstream(settings, erase)])
    wait_until(lambda: not redis_client.exists(profile_key(user)), what="erin's Redis profile gone")
    send(settings, [clickstream(settings, after), clickstream(settings, marker)])
    wait_until(lambda: profile(redis_client, marker_user).get("events") == "1", what="frank seen")

    # Redis: no key, no lead entry, no value anywhere mentions the user.
    assert not redis_client.exists(profile_key(user))
    assert redis_client.zscore("persona:leads", user) is None
    for key in redis_client.scan_iter(match="*"):
        assert user not in key
        if redis_client.type(key) == "hash":
            assert user not in str(redis_client.hgetall(key))
    # The profiles changelog ends the user's key with a deletion (compaction drops the rest),
    # and the erasure marker is a keyed hash, not the id.
    changelog = f"{settings.app_id}-profiles-changelog"

    changelog_records = asyncio.run(read_topic_records(settings.broker_url, changelog))
    user_records = [r for r in changelog_records if r.key == user.encode()]
    assert user_records and user_records[-1].value is None
    assert not any(user.encode() in (r.key or b"") for r in changelog_records if r.value
                   and r.key and r.key.startswith(b"\x00erased/"))  # fmt: skip
    # Every output topic got a tombstone for the user.
    for kind in ("abandoned_cart", "segment_changes", "hot_leads"):
        values = asyncio.run(read_whole_topic(settings.broker_url, settings.topics[kind]))
        tombstones = [orjson.loads(v) for v in values if b'"tombstone"' in v]
        assert any(t.get("user_id") == user for t in tombstones), kind
    offers = asyncio.run(read_whole_topic(settings.broker_url, settings.topics["offers"]))
    assert any(b'"tombstone"' in v and user.encode() not in v for v in offers)
    # The event after the erasure was counted, not applied.
    text = worker.scrape() or ""
    assert 'outcome="erased"' in text


def test_first_offset_from_tells_a_missing_offset_from_a_hole(broker: EmbeddedBroker) -> None:
    """The probe the offset guard uses before it passes offsets that were never delivered."""
    topic = "first-offset-probe"
    asyncio.run(create_topics(broker.url, [topic], partitions=1))
    messages = [(topic, None, b"%d" % i) for i in range(3)]
    assert asyncio.run(produce_all(broker.url, messages)) == 3
    assert asyncio.run(first_offset_from(broker.url, topic, 0, 1)) == 1
    assert asyncio.run(first_offset_from(broker.url, topic, 0, 0)) == 0
    assert asyncio.run(first_offset_from(broker.url, topic, 0, 3, timeout_s=0.5)) is None


def test_log_end_offsets_are_past_the_last_record_of_a_batch(broker: EmbeddedBroker) -> None:
    """Where a table recovery must stop: the embedded broker's ListOffsets answer stops at the
    first record of the last record batch; the log end is past all of it."""
    from aiokafka import AIOKafkaProducer

    topic = "log-end-probe"
    asyncio.run(create_topics(broker.url, [topic], partitions=3))
    batches = {0: [1, 5], 1: [4]}  # records per record batch; partition 2 stays empty

    async def produce_and_probe() -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers(broker.url))
        await producer.start()
        try:
            for partition, sizes in batches.items():
                for size in sizes:
                    batch = producer.create_batch()
                    for i in range(size):
                        batch.append(key=None, value=b"%d" % i, timestamp=None)
                    await (await producer.send_batch(batch, topic, partition=partition))
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers(broker.url))
        await consumer.start()
        try:
            reported = await consumer.end_offsets([TopicPartition(topic, p) for p in range(3)])
        finally:
            await consumer.stop()
        return reported, await log_end_offsets(broker.url, reported)

    reported, ends = asyncio.run(produce_and_probe())
    assert ends == {
        TopicPartition(topic, 0): 6,
        TopicPartition(topic, 1): 4,
        TopicPartition(topic, 2): 0,
    }
    assert all(reported[tp] <= end for tp, end in ends.items()), reported


def test_send_batched_keeps_order_partitioning_and_reports_last_offsets(
    broker: EmbeddedBroker,
) -> None:
    """The outbox's batch send: where aiokafka's own ``send`` would put each message, in order,
    across batch overflows, with the last offset per partition for the table store."""
    from aiokafka import AIOKafkaProducer

    from streams.backtest import read_topic_records
    from streams.outbox import send_batched

    topic = "outbox-batches"
    asyncio.run(create_topics(broker.url, [topic], partitions=3))
    messages = [(topic, b"k%d" % (i % 7), b"v%04d" % i + b"." * 300, None) for i in range(60)]
    messages += [(topic, b"pinned", b"p%d" % i, 2) for i in range(5)]

    async def send() -> dict[tuple[str, int], int]:
        # A 2 KiB batch holds a few of these messages: most partitions overflow into more.
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers(broker.url), max_batch_size=2048
        )
        await producer.start()
        try:
            return await send_batched(producer, messages)
        finally:
            await producer.stop()

    last = asyncio.run(send())
    records = asyncio.run(read_topic_records(broker.url, topic))
    assert len(records) == len(messages)
    for _, key, value, partition in messages:
        got = [r.partition for r in records if r.value == value]
        assert got == [_expected_partition(key, partition)], (key, value[:5])
    for p in range(3):
        in_p = [r for r in records if r.partition == p]
        sent_in_order = [v for _, k, v, q in messages if _expected_partition(k, q) == p]
        assert [r.value for r in in_p] == sent_in_order
        if in_p:
            assert last[(topic, p)] == in_p[-1].offset


def test_outbox_sends_a_write_last_record_after_every_other_record_of_its_partition(
    broker: EmbeddedBroker,
) -> None:
    """A partition's watermark reaches the changelog after the profile writes it vouches for,
    however the flush splits into record batches: a changelog cut anywhere (a worker killed
    between two record batches of one flush) never holds it without them."""
    from types import SimpleNamespace

    import faust
    from aiokafka import AIOKafkaProducer

    from streams.backtest import read_topic_records
    from streams.outbox import Outbox
    from streams.sends import Turn

    app = faust.App("outbox-order", broker=broker.url, store="memory://", autodiscover=False)
    table = app.Table("profiles", partitions=2, key_type=bytes, value_type=bytes)
    changelog = table.changelog_topic.get_topic_name()
    asyncio.run(create_topics(broker.url, [changelog], partitions=2))
    marker = (b"\x00watermark/1", b"1700000000.0")

    async def flush() -> None:
        # A 2 KiB batch holds a few of these records: partition 1's flush spans several.
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers(broker.url), max_batch_size=2048
        )
        await producer.start()
        try:
            outbox = Outbox(SimpleNamespace(_producer=producer))  # Faust's producer holds it so
            outbox.write_last(table, 1, *marker)  # written first, sent last
            for i in range(30):
                outbox.write(table, i % 2, b"user-%02d" % i, b"%02d" % i + b"." * 300)
            (await outbox.flush(Turn(None)))()
        finally:
            await producer.stop()

    asyncio.run(flush())
    records = asyncio.run(read_topic_records(broker.url, changelog))
    in_1 = [(r.key, r.value) for r in records if r.partition == 1]
    assert in_1[-1] == marker
    assert [key for key, _ in in_1[:-1]] == [b"user-%02d" % i for i in range(1, 30, 2)]
    assert len([r for r in records if r.partition == 0]) == 15
    assert table.data[marker[0]] == marker[1] and table.data[b"user-07"].startswith(b"07.")


def _expected_partition(key: bytes, pinned: int | None) -> int:
    return pinned if pinned is not None else partition_of(key.decode(), 3)


def partition_of(key: str, partitions: int) -> int:
    """The partition Kafka's default (murmur2) partitioner gives ``key``."""
    from aiokafka.partitioner import DefaultPartitioner

    every = list(range(partitions))
    return int(DefaultPartitioner()(key.encode(), every, every))


def anonymous(anonymous_id: str, name: str, message_id: str, ts: str, **properties: Any) -> dict:
    payload = event("", name, message_id, ts, **properties)
    del payload["userId"], payload["context"]  # an anonymous visitor has stated no consent
    payload["anonymousId"] = anonymous_id
    return payload


def test_identify_merges_the_anonymous_profile_and_both_ids_reach_it(engine, redis_client) -> None:
    from streams.backtest import read_topic_records

    settings, worker = engine
    user, anon = "it-gina", "anon-gina-1"
    assert partition_of(user, settings.partitions) != partition_of(anon, settings.partitions)
    before = [
        anonymous(anon, "Product Viewed", "g1", "2024-03-01T10:00:00Z", product_id="p1"),
        anonymous(
            anon,
            "Product Added",
            "g2",
            "2024-03-01T10:01:00Z",
            product_id="p1",
            price=30.0,
            quantity=2,
            category="boots",
        ),
        event(user, "Product Viewed", "g3", "2024-02-01T09:00:00Z", product_id="p9"),
    ]
    send(settings, [clickstream(settings, e) for e in before])
    wait_until(lambda: profile(redis_client, anon).get("events") == "2", what="anonymous profile")
    wait_until(lambda: profile(redis_client, user).get("events") == "1", what="known profile")
    identify = {
        "type": "identify", "userId": user, "anonymousId": anon, "messageId": "g4",
        "timestamp": "2024-03-01T10:02:00Z",
        "context": {"consent": {"categoryPreferences": {"email": False, "advertising": True}}},
    }  # fmt: skip
    send(settings, [clickstream(settings, identify)])
    wait_until(lambda: not redis_client.exists(profile_key(anon)), what="anonymous hash re-keyed")
    wait_until(lambda: profile(redis_client, user).get("events") == "4", what="merged profile")
    merged = profile(redis_client, user)
    assert merged["cart_items"] == "2" and float(merged["cart_value"]) == pytest.approx(60.0)
    assert merged["consent_email"] == "0" and merged["consent_advertising"] == "1"
    assert redis_client.get(f"persona:alias:{{{anon}}}") == user

    # Later events on either id reach the same profile; a re-sent event still counts once.
    after = [
        anonymous(anon, "Product Viewed", "g5", "2024-03-01T10:03:00Z", product_id="p2"),
        event(user, "Product Viewed", "g6", "2024-03-01T10:04:00Z", product_id="p3"),
        anonymous(anon, "Product Viewed", "g5", "2024-03-01T10:03:00Z", product_id="p2"),
        identify,  # re-delivered: merges nothing twice
    ]
    send(settings, [clickstream(settings, e) for e in after])
    wait_until(lambda: profile(redis_client, user).get("events") == "6", what="both ids applied")
    marker = event("it-marker-g", "Product Viewed", "g7", "2024-03-01T10:05:00Z")
    send(settings, [clickstream(settings, marker)])
    wait_until(lambda: profile(redis_client, "it-marker-g").get("events") == "1", what="marker")
    time.sleep(1.0)  # the forwarded copies travel one more hop; give them time to be wrong
    assert profile(redis_client, user)["events"] == "6"
    assert not redis_client.exists(profile_key(anon))
    text = worker.scrape() or ""
    assert 'outcome="forwarded"' in text and 'persona_identity_links_total{step="merge"}' in text

    # Erasing the user takes the alias with it: no key names or points to either id.
    send(
        settings,
        [clickstream(settings, event(user, "Erasure Requested", "g8", "2024-03-01T11:00:00Z"))],
    )
    wait_until(
        lambda: not redis_client.exists(f"persona:alias:{{{anon}}}"), what="alias key unlinked"
    )
    assert not redis_client.exists(profile_key(user))
    for key in redis_client.scan_iter(match="*"):
        assert user not in key and anon not in key
    changelog = asyncio.run(
        read_topic_records(settings.broker_url, f"{settings.app_id}-profiles-changelog")
    )
    last: dict[bytes, bytes | None] = {}
    for record in changelog:
        last[record.key] = record.value
    assert all(value is None for key, value in last.items() if anon.encode() in key)
    assert last[user.encode()] is None


def test_a_login_with_an_id_that_had_no_events_only_notes_the_id(engine, redis_client) -> None:
    """The identify of an anonymous id without events of its own (the common login): there is
    no profile to move, so the user's profile only notes the id; the user is not scored or
    written to Redis a second time, and a second login with the same id claims nothing. The
    one worker owns both partitions, so the link is stitched in the identify's own batch:
    nothing goes through the identity-links topic."""
    from streams.backtest import read_topic_records
    from streams.bench import gauge

    settings, worker = engine
    user, anon = "it-hana", "anon-hana-2"
    anon_partition = partition_of(anon, settings.partitions)
    assert partition_of(user, settings.partitions) != anon_partition
    # The worker stitches a link on the spot on a partition it has seen events of: another
    # user's event there first.
    neighbour = next(
        f"it-hana-neighbour-{i}"
        for i in range(1000)
        if partition_of(f"it-hana-neighbour-{i}", settings.partitions) == anon_partition
    )
    first = [
        event(user, "Product Viewed", "h1", "2024-03-01T10:00:00Z"),
        event(neighbour, "Product Viewed", "h0", "2024-03-01T10:00:00Z"),
    ]
    send(settings, [clickstream(settings, e) for e in first])
    wait_until(lambda: profile(redis_client, user).get("events") == "1", what="known profile")
    wait_until(lambda: profile(redis_client, neighbour).get("events") == "1", what="neighbour")

    def counts() -> tuple[int, int, int, int]:
        text = worker.scrape() or ""
        links = {
            step: sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith(f'persona_identity_links_total{{step="{step}"}}')
            )
            for step in ("claim", "merge")
        }
        writes = gauge(text, "persona_profile_writes_total")
        fired = gauge(text, "persona_timers_fired_total")
        return int(links["claim"]), int(links["merge"]), writes, fired

    markers = iter(range(1, 10))

    def settled() -> None:
        # A marker user's event after the links' last hop: once it is in Redis, the batches
        # before it are counted.
        marker = f"it-marker-h{next(markers)}"
        send(
            settings,
            [
                clickstream(
                    settings, event(marker, "Product Viewed", marker, "2024-03-01T10:05:00Z")
                )
            ],
        )
        wait_until(lambda: profile(redis_client, marker).get("events") == "1", what="marker")

    claims, merges, writes, fired = counts()
    identify = {
        "type": "identify", "userId": user, "anonymousId": anon, "messageId": "h2",
        "timestamp": "2024-03-01T10:02:00Z",
    }  # fmt: skip
    send(settings, [clickstream(settings, identify)])
    wait_until(lambda: counts()[1] == merges + 1, what="the merge of the link")
    settled()
    wait_until(lambda: redis_client.get(f"persona:alias:{{{anon}}}") == user, what="alias key")
    assert profile(redis_client, user)["events"] == "2"
    after = counts()
    assert after[0] == claims + 1
    # The identify's own batch and the marker wrote; the merge did not (timers may have fired).
    assert (after[2] - writes) - (after[3] - fired) == 2

    changelog = asyncio.run(
        read_topic_records(settings.broker_url, f"{settings.app_id}-profiles-changelog")
    )
    from models import profile_codec

    stored = [r.value for r in changelog if r.key == user.encode() and r.value is not None]
    assert profile_codec.decode(stored[-1])["merged_from"] == [anon]
    assert [r.value for r in changelog if r.key == b"\x00alias/" + anon.encode()] == [user.encode()]
    links = asyncio.run(
        read_topic_records(settings.broker_url, f"{settings.app_id}-identity-links")
    )
    assert not [r for r in links if r.key in (user.encode(), anon.encode())]

    second = {**identify, "messageId": "h3", "timestamp": "2024-03-01T10:03:00Z"}
    send(settings, [clickstream(settings, second)])
    wait_until(lambda: profile(redis_client, user).get("events") == "3", what="second login")
    settled()
    assert counts()[:2] == (claims + 1, merges + 1)
