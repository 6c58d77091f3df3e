"""The production table store: ``PERSONA_STORE=rocksdb://`` (through ``rocksdict``) works, also for
identity links stitched across two partitions' databases in one batch."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
import redis

from connectors.embedded import EmbeddedBroker, EmbeddedRedis
from connectors.kafka import produce_all
from connectors.redis_cache import profile_key
from streams.backtest import read_topic_records
from tests.conftest import engine_settings, wait_until
from tests.integration.test_ingest import partition_of

pytestmark = pytest.mark.integration


def test_worker_on_rocksdb_keeps_profiles(
    broker: EmbeddedBroker, redis_server: EmbeddedRedis, tmp_path: Path, start_worker
) -> None:
    pytest.importorskip("rocksdict", reason="the rocksdb extra is not installed")
    settings = engine_settings(
        broker, redis_server, tmp_path, store="rocksdb://",
        redis_url=redis_server.database_url(5),
    )  # fmt: skip
    start_worker(settings)
    topic = settings.input_topics["clickstream"]
    events = [
        {
            "type": "track",
            "event": "Product Viewed",
            "userId": "rocks-1",
            "messageId": f"r{i}",
            "timestamp": f"2024-01-01T00:00:0{i}Z",
        }
        for i in range(3)
    ]
    asyncio.run(
        produce_all(settings.broker_url, [(topic, b"rocks-1", orjson.dumps(e)) for e in events])
    )

    def send(to: str, key: str, payload: dict) -> None:
        asyncio.run(produce_all(settings.broker_url, [(to, key.encode(), orjson.dumps(payload))]))

    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        wait_until(lambda: client.hget(profile_key("rocks-1"), "events") == "3", what="profile")
        # A login stitched in its own batch writes the alias entry into the anonymous id's
        # partition's database; a later event of that id finds it there and is forwarded.
        anon = "rocks-anon-2"
        anon_partition = partition_of(anon, settings.partitions)
        assert partition_of("rocks-1", settings.partitions) != anon_partition
        neighbour = next(
            f"rocks-n{i}" for i in range(1000)
            if partition_of(f"rocks-n{i}", settings.partitions) == anon_partition
        )  # fmt: skip
        send(topic, neighbour, {**events[0], "userId": neighbour, "messageId": "n0"})
        wait_until(lambda: client.hget(profile_key(neighbour), "events") == "1", what="neighbour")
        login = {"type": "identify", "userId": "rocks-1", "anonymousId": anon, "messageId": "r9",
                 "timestamp": "2024-01-01T00:01:00Z"}  # fmt: skip
        send(settings.input_topics["identity"], "rocks-1", login)
        wait_until(lambda: client.get(f"persona:alias:{{{anon}}}") == "rocks-1", what="alias")
        later = {**events[0], "messageId": "r10", "timestamp": "2024-01-01T00:02:00Z"}
        del later["userId"]
        send(topic, anon, {**later, "anonymousId": anon})
        wait_until(lambda: client.hget(profile_key("rocks-1"), "events") == "5", what="forwarded")
        assert not client.exists(profile_key(anon))
        links = asyncio.run(
            read_topic_records(settings.broker_url, f"{settings.app_id}-identity-links")
        )
        assert [orjson.loads(r.value)["op"] for r in links] == ["forward"]  # no claim, no merge
    finally:
        client.close()
    assert any(Path(settings.data_dir).rglob("*profiles*")), "RocksDB files on disk"
