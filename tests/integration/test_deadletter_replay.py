"""Integration: ``streams.deadletter.replay_dead_letters`` on the real embedded broker.

A message the worker rejects lands in the dead-letter topic; a replay filtered on other reasons
sends nothing, one that includes its reason sends the original bytes, with the original key, back
to the source topic and partition. (The worker rejects it again, as expected: a replay is meant
for after a fix.)
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from connectors.kafka import bootstrap_servers, produce_all
from connectors.segment import dead_letter_record, decode_dead_letter
from streams.backtest import read_topic_records
from streams.deadletter import INVALID, replay_dead_letters
from streams.settings import Settings
from tests.conftest import engine_settings

pytestmark = pytest.mark.integration


def read_all(settings: Settings, topic: str) -> list[Any]:
    """Every record of ``topic`` now, in (partition, offset) order."""
    return asyncio.run(read_topic_records(settings.broker_url, topic))


def wait_for_records(settings: Settings, topic: str, n: int, timeout: float = 30.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    records = read_all(settings, topic)
    while len(records) < n and time.monotonic() < deadline:
        time.sleep(0.3)
        records = read_all(settings, topic)
    assert len(records) == n, f"{topic}: {len(records)} records, expected {n}"
    return records


def replay(settings: Settings, **options: Any) -> dict[str, Any]:
    return asyncio.run(
        replay_dead_letters(settings.broker_url, settings.topics["deadletter"], **options)
    )


def test_replay_filters_by_reason_and_resends_the_original_bytes(
    broker, redis_server, tmp_path, start_worker
) -> None:
    settings = engine_settings(broker, redis_server, tmp_path)
    start_worker(settings)
    source = settings.input_topics["clickstream"]
    deadletter = settings.topics["deadletter"]
    key = b"dlq-user"
    # rejected: missing_message_id (the bytes are kept exactly, spacing included)
    rejected = (
        b'{"type": "track", "event": "Product Viewed", "userId": "dlq-user",  '
        b'"timestamp": "2024-03-01T10:00:00Z", "properties": {"product_id": "p1"}}'
    )
    asyncio.run(produce_all(settings.broker_url, [(source, key, rejected)]))

    (dead,) = wait_for_records(settings, deadletter, 1)
    original, meta = decode_dead_letter(dead.value)
    assert (original, meta["reason"], dead.key) == (rejected, "missing_message_id", key)
    source_partition = meta["source"]["partition"]

    excluded = replay(settings, reasons={"not_json", "bad_field"}, dry_run=False)
    assert excluded["read"] == 1 and excluded["matched"] == 0 and excluded["replayed"] == 0
    assert excluded["by_reason"] == {"missing_message_id": 1}
    assert [r.value for r in read_all(settings, source)] == [rejected], "nothing replayed"

    dry = replay(settings, reasons={"missing_message_id"}, dry_run=True)
    assert (dry["read"], dry["matched"], dry["replayed"]) == (1, 1, 0)
    assert [r.value for r in read_all(settings, source)] == [rejected], "a dry run sends nothing"

    included = replay(settings, reasons={"missing_message_id", "bad_field"}, dry_run=False)
    assert (included["read"], included["matched"], included["replayed"]) == (1, 1, 1)
    back = read_all(settings, source)
    assert len(back) == 2
    first, again = sorted(back, key=lambda r: r.offset)
    assert again.value == rejected == first.value, "the original bytes, exactly"
    assert again.key == key
    assert again.partition == first.partition == source_partition
    assert again.offset > first.offset

    # The worker rejects the replayed message again: a second dead letter. A replay that starts
    # where the last one ended reads only that one.
    wait_for_records(settings, deadletter, 2)
    later = replay(settings, reasons=None, dry_run=True, since_offsets=included["end_offsets"])
    assert (later["read"], later["matched"]) == (1, 1)
    everything = replay(settings, reasons=None, dry_run=True)
    assert everything["read"] == 2 and everything["by_reason"] == {"missing_message_id": 2}


def test_replay_skips_records_that_are_not_dead_letters_and_keeps_order(
    broker, redis_server, tmp_path
) -> None:
    settings = engine_settings(broker, redis_server, tmp_path)  # no worker: nothing re-rejects
    deadletter = settings.topics["deadletter"]
    source = settings.input_topics["purchases"]
    records = [
        dead_letter_record(
            f"payload-{i}".encode(),
            topic=source,
            partition=0,
            offset=i,
            reason="not_json" if i % 2 else "bad_timestamp",
            detail="test",
            at=1.0,
        )
        for i in range(6)
    ]
    garbage = [b"not a dead letter", orjson.dumps({"value_b64": "???"}), orjson.dumps([1])]
    # everything on dead-letter partition 1, in this order, keyed
    messages = [(deadletter, 1, r) for r in records[:3] + garbage + records[3:]]

    async def send() -> None:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers(settings.broker_url))
        await producer.start()
        try:
            for topic, partition, value in messages:
                await producer.send_and_wait(topic, value=value, partition=partition, key=b"k")
        finally:
            await producer.stop()

    asyncio.run(send())
    result = replay(settings, reasons={"not_json"}, dry_run=False)
    assert result["read"] == 9
    assert result["by_reason"] == {"bad_timestamp": 3, "not_json": 3, INVALID: 3}
    assert (result["matched"], result["replayed"]) == (3, 3)
    assert result["end_offsets"][1] == 9
    back = read_all(settings, source)
    assert [r.value for r in back] == [b"payload-1", b"payload-3", b"payload-5"]
    assert {(r.partition, r.key) for r in back} == {(0, b"k")}

    with pytest.raises(ValueError, match="does not exist"):
        asyncio.run(replay_dead_letters(settings.broker_url, "no-such-topic-x", dry_run=True))
