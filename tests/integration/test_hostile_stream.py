"""Integration: the whole hostile corpus through the real embedded broker, worker and Redis.

The corpus of ``tests/unit/test_hostile_input.py`` (raw bytes) is produced interleaved with good
events of a few users, plus re-sent duplicates of some good events. Afterwards: the dead-letter
topic holds exactly one record per rejected message, with its reason, original bytes and key; the
good events are all in the Redis profiles, duplicates counted once; the worker still runs.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import orjson
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from connectors.kafka import produce_all
from connectors.redis_cache import profile_key
from connectors.segment import Rejection, decode_dead_letter, parse_event, partition_key
from streams.backtest import read_topic_records
from streams.settings import Settings
from tests.conftest import engine_settings, wait_until
from tests.unit.test_hostile_input import ACCEPT, CORPUS, DUPLICATE

pytestmark = pytest.mark.integration

GOOD_USERS = [f"hs-good-{i}" for i in range(4)]
EVENTS_PER_USER = 12  # 11 product views and 1 order of 30.00 each
RESENT = 6  # good events sent a second time, later in the stream
MAX_SENDABLE = 512 * 1024  # the producer refuses requests over 1 MiB: leave out the 1 MB case


def good_event(user: str, i: int) -> bytes:
    if i == EVENTS_PER_USER // 2:
        props: dict[str, Any] = {"order_id": f"{user}-o", "revenue": 30.0}
        name = "Order Completed"
    else:
        props = {"product_id": f"p{i}", "price": 5.0, "category": "shoes"}
        name = "Product Viewed"
    return orjson.dumps(
        {
            "type": "track",
            "event": name,
            "userId": user,
            "messageId": f"{user}-{i}",
            "timestamp": f"2024-03-01T10:{i:02d}:00Z",
            "properties": props,
        }
    )


def read_all(settings: Settings, topic: str) -> list[Any]:
    """Every record of ``topic`` now, in (partition, offset) order."""
    return asyncio.run(read_topic_records(settings.broker_url, topic))


def event_totals(text: str) -> Counter[str]:
    """``persona_events_total`` summed over topics, by outcome."""
    totals: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "persona_events_total":
                totals[sample.labels["outcome"]] += int(sample.value)
    return totals


def test_hostile_corpus_through_the_worker(broker, redis_server, tmp_path, start_worker) -> None:
    own_database = redis_server.database_url(7)
    settings = engine_settings(broker, redis_server, tmp_path, redis_url=own_database)
    worker = start_worker(settings)
    topic = settings.input_topics["clickstream"]
    hostile = [c for c in CORPUS if c.expect != DUPLICATE and len(c.raw) <= MAX_SENDABLE]
    hostile = [c for c in hostile if not c.kwargs]  # the worker runs with the default limits

    # What the worker must decide for each hostile message, on its own settings and clock.
    expected_reason: dict[bytes, str] = {}
    accepted_ids: dict[str, set[str]] = {}
    accepted = 0
    for case in hostile:
        parsed = parse_event(
            case.raw,
            now=time.time(),
            max_bytes=settings.max_event_bytes,
            max_future_s=settings.max_future_s,
        )
        if isinstance(parsed, Rejection):
            assert parsed.reason == case.expect, case.name
            expected_reason[case.raw] = parsed.reason
        else:
            assert case.expect == ACCEPT, case.name
            accepted += 1
            accepted_ids.setdefault(parsed["user_id"], set()).add(parsed["message_id"])
    hostile_users = {u: len(ids) for u, ids in accepted_ids.items()}
    hostile_duplicates = accepted - sum(hostile_users.values())  # same (user, messageId) twice

    # Interleave: a good event, a hostile one, ...; rejected ones are keyed by a good user (so
    # they share partitions with good events), accepted ones by their own user; the resent
    # duplicates go after everything, and a last good event per user closes each partition.
    good = [(u, good_event(u, i)) for i in range(EVENTS_PER_USER - 1) for u in GOOD_USERS]
    closing = [(u, good_event(u, EVENTS_PER_USER - 1)) for u in GOOD_USERS]
    messages: list[tuple[str, bytes | None, bytes]] = []
    sent_key: dict[bytes, bytes] = {}
    for i in range(max(len(good), len(hostile))):
        if i < len(good):
            user, raw = good[i]
            messages.append((topic, user.encode(), raw))
        if i < len(hostile):
            case = hostile[i]
            if case.raw in expected_reason:
                key = GOOD_USERS[i % len(GOOD_USERS)].encode()
            else:
                key = partition_key(orjson.loads(case.raw)) or b"h-user"
            sent_key[case.raw] = key
            messages.append((topic, key, case.raw))
    resent = [good[i * 7] for i in range(RESENT)]
    messages += [(topic, u.encode(), raw) for u, raw in resent + closing]

    n_good = len(GOOD_USERS) * EVENTS_PER_USER
    n_rejected = len(expected_reason)
    sent = len(messages)
    # 48 good + 6 resent + 124 hostile (102 to reject, 22 valid) = 178 messages sent. (The corpus
    # has 127 cases: the duplicate case is covered by the resends, the 1 MB ones are not sent.)
    assert (n_good, RESENT, n_rejected, accepted) == (48, 6, 102, 22)
    assert sent == n_good + RESENT + n_rejected + accepted == 178
    asyncio.run(produce_all(settings.broker_url, messages))

    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:

        def events_of(user: str) -> int:
            return int(client.hget(profile_key(user), "events") or 0)

        def all_applied() -> bool:
            return all(events_of(u) == EVENTS_PER_USER for u in GOOD_USERS) and all(
                events_of(u) == n for u, n in hostile_users.items()
            )

        wait_until(all_applied, timeout=90, what=f"{n_good} good + {accepted} accepted events")
        for user in GOOD_USERS:
            got = client.hgetall(profile_key(user))
            assert got["events"] == str(EVENTS_PER_USER) and got["orders"] == "1", user
            assert float(got["revenue"]) == pytest.approx(30.0)
        assert sum(events_of(u) for u in GOOD_USERS) == n_good

        # Dead letters: the last good event of every partition is applied, so every rejection
        # before it was already produced to the dead-letter topic (before its batch's writes).
        deadline = time.monotonic() + 60
        records = read_all(settings, settings.topics["deadletter"])
        while len(records) < n_rejected and time.monotonic() < deadline:
            time.sleep(0.5)
            records = read_all(settings, settings.topics["deadletter"])
        seen = {decode_dead_letter(r.value)[0] for r in records}
        missing = Counter(reason for raw, reason in expected_reason.items() if raw not in seen)
        assert len(records) == n_rejected, (
            f"{len(records)} dead letters for {n_rejected} rejected; missing: {dict(missing)}"
        )
        originals: Counter[bytes] = Counter()
        for record in records:
            original, meta = decode_dead_letter(record.value)
            originals[original] += 1
            assert meta["reason"] == expected_reason.get(original), meta
            assert meta["source"]["topic"] == topic
            assert record.key == sent_key[original], "dead letters keep the message key"
        assert set(originals) == set(expected_reason)
        assert set(originals.values()) == {1}

        expected_totals = {
            "ok": n_good + sum(hostile_users.values()),
            "duplicate": RESENT + hostile_duplicates,
            "deadletter": n_rejected,
        }
        assert sum(expected_totals.values()) == sent
        totals = wait_until(
            lambda: (t := event_totals(worker.scrape() or "")) == expected_totals and t,
            timeout=30,
            what=f"event counters {expected_totals}",
        )
        assert dict(totals) == expected_totals
        assert worker.running, worker.log_tail()
    finally:
        client.close()
