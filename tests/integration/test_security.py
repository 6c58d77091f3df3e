"""Redis AUTH passes through the settings: the engine works with the password and refuses to
start, in one clear line, without it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis

from connectors.embedded import EmbeddedBroker, EmbeddedRedis
from connectors.kafka import produce_all
from connectors.redis_cache import profile_key
from tests.conftest import REPO, engine_settings, wait_until

pytestmark = pytest.mark.integration
PASSWORD = "s3cret-for-tests"


@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path, password=PASSWORD) as server:
        yield server


def test_worker_works_with_the_password(
    broker: EmbeddedBroker, locked_redis: EmbeddedRedis, tmp_path: Path, start_worker
) -> None:
    settings = engine_settings(broker, locked_redis, tmp_path)
    assert PASSWORD in settings.redis_url
    start_worker(settings)
    event = {"type": "track", "event": "Product Viewed", "userId": "sec-1", "messageId": "s1",
             "timestamp": "2024-01-01T00:00:00Z"}  # fmt: skip
    topic = settings.input_topics["clickstream"]
    asyncio.run(produce_all(settings.broker_url, [(topic, b"sec-1", orjson.dumps(event))]))
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        wait_until(lambda: client.hget(profile_key("sec-1"), "events") == "1", what="profile")
    finally:
        client.close()


@pytest.mark.parametrize("password", ["", "wrong-password"])
def test_worker_without_the_right_password_fails_in_one_line(
    broker: EmbeddedBroker, locked_redis: EmbeddedRedis, tmp_path: Path, password: str
) -> None:
    auth = f":{password}@" if password else ""
    url = f"redis://{auth}{locked_redis.host}:{locked_redis.port}/0"
    settings = engine_settings(broker, locked_redis, tmp_path, redis_url=url)
    result = subprocess.run(
        [sys.executable, "-m", "streams.cli", "worker"],
        env={**settings.as_env(), "PATH": "/usr/bin:/bin"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Redis" in lines[0] and "password" in lines[0].lower()
    assert PASSWORD not in result.stderr
