"""A quiet shop still gets its triggers: in live mode an idle partition's watermark follows the
wall clock, so a cart abandoned by the last shopper of the day fires with no later event."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from connectors.embedded import EmbeddedBroker, EmbeddedRedis
from connectors.kafka import produce_all
from streams.backtest import read_whole_topic
from tests.conftest import engine_settings, wait_until

pytestmark = pytest.mark.integration


def test_idle_partition_fires_the_abandoned_cart_on_the_wall_clock(
    broker: EmbeddedBroker, redis_server: EmbeddedRedis, tmp_path: Path, start_worker
) -> None:
    config = tmp_path / "persona.toml"
    config.write_text("[triggers.abandoned_cart]\nabandon_after_minutes = 0.05\n")  # 3 s
    settings = engine_settings(
        broker,
        redis_server,
        tmp_path,
        config_path=str(config),
        live_clock=True,
        idle_after_s=1.0,
        tick_interval_s=0.5,
        allowed_lateness_s=0.0,
        consent_default="allow",
    )
    start_worker(settings)
    now = datetime.now(UTC).isoformat()
    added = {"type": "track", "event": "Product Added", "userId": "quiet-1", "messageId": "q1",
             "timestamp": now, "properties": {"product_id": "p1", "price": 12.0}}  # fmt: skip
    topic = settings.input_topics["clickstream"]
    asyncio.run(produce_all(settings.broker_url, [(topic, b"quiet-1", orjson.dumps(added))]))
    sent_at = time.monotonic()

    def fired() -> list[dict]:
        values = asyncio.run(
            read_whole_topic(settings.broker_url, settings.topics["abandoned_cart"])
        )
        return [orjson.loads(v) for v in values]

    triggers = wait_until(fired, timeout=30, interval=1.0, what="the abandoned-cart trigger")
    assert len(triggers) == 1 and triggers[0]["user_id"] == "quiet-1"
    assert time.monotonic() - sent_at >= 3.0, "not before the 3 s abandonment window"
