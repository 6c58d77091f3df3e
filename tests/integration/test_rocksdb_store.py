"""The production table store: ``PERSONA_STORE=rocksdb://`` (through ``rocksdict``) works."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
import redis

from connectors.embedded import EmbeddedBroker, EmbeddedRedis
from connectors.kafka import produce_all
from connectors.redis_cache import profile_key
from tests.conftest import engine_settings, wait_until

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
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        wait_until(lambda: client.hget(profile_key("rocks-1"), "events") == "3", what="profile")
    finally:
        client.close()
    assert any(Path(settings.data_dir).rglob("*profiles*")), "RocksDB files on disk"
