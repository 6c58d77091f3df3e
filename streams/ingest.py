"""Ingest of one batch: parse, validate, de-duplicate and fold events into user profiles.

This is the hot path's logic as a plain function, beside the agent that feeds it (``streams.app``):
the agent hands over a batch of raw Kafka records, this returns the profiles that changed, the
rejected records for the dead-letter topic and the counts for the metrics. It touches no broker
and no Redis, so it is tested without either.

De-duplication is per user: each profile remembers the last ``dedupe_window`` message ids it
applied, in the same table entry as the profile itself, so the memory of what was applied is
restored together with the state it protects after a restart or a rebalance.

>>> import orjson
>>> raw = orjson.dumps({"type": "track", "event": "Product Viewed", "userId": "u1",
...                     "messageId": "m1", "timestamp": "2024-01-01T00:00:00Z"})
>>> records = [Record("clickstream", 0, 7, b"u1", raw), Record("clickstream", 0, 8, b"u1", raw)]
>>> result = ingest_batch(records, lambda user_id: None, now=1_800_000_000.0)
>>> sorted(result.counts.items())
[(('clickstream', 'duplicate'), 1), (('clickstream', 'ok'), 1)]
>>> result.changed["u1"]["events"]
1
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from connectors.segment import Rejection, parse_event
from models.dedupe import as_digests, remember
from models.events import ERASURE_REQUESTED, Event
from models.features import apply_event, new_profile

SEEN_KEY = "seen"


class Record(NamedTuple):
    """One raw Kafka record as consumed."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    source: Any = None
    """The consumer's own handle on the message (a Faust event), to acknowledge it later."""


@dataclass(slots=True)
class BatchResult:
    changed: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Profiles that changed in this batch, by user id."""
    partition_of: dict[str, int] = field(default_factory=dict)
    """Source partition of each changed user (where its table entry lives)."""
    rejected: list[tuple[Record, Rejection]] = field(default_factory=list)
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(topic, outcome) → events; outcome is ok, duplicate, deadletter, erased or forwarded."""
    forwarded: list[tuple[str, Event]] = field(default_factory=list)
    """(known user id, event) for events of anonymous ids merged into a known user."""
    max_ts: dict[int, float] = field(default_factory=dict)
    """Largest event time per source partition (for the partition watermarks)."""
    by_type: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Applied events by (call type, event name)."""
    erasures: dict[str, tuple[float, int]] = field(default_factory=dict)
    """Users who asked to be erased in this batch: user id → (event time, partition)."""


def parse_records(
    records: Iterable[Record],
    result: BatchResult,
    *,
    now: float,
    max_event_bytes: int = 65536,
    max_future_s: float = 86400.0,
) -> list[tuple[Record, Event]]:
    """Validate raw records: rejects go to ``result.rejected``, valid events are returned.

    ``now`` is the wall clock, used only to reject timestamps absurdly far in the future.
    """
    valid = []
    for record in records:
        parsed = parse_event(
            record.value, now=now, max_bytes=max_event_bytes, max_future_s=max_future_s
        )
        if isinstance(parsed, Rejection):
            result.rejected.append((record, parsed))
            result.counts[(record.topic, "deadletter")] += 1
        else:
            valid.append((record, parsed))
    return valid


def apply_events(
    events: Iterable[tuple[Record, Event]],
    load_profile: Callable[[str], dict[str, Any] | None],
    result: BatchResult,
    *,
    dedupe_window: int = 256,
    affinity_half_life_s: float = 14 * 86400.0,
    after_event: Callable[[dict[str, Any], Event], None] | None = None,
    is_erased: Callable[[str], bool] | None = None,
    alias_of: Callable[[str], str | None] | None = None,
) -> None:
    """Fold valid events, in the order given, into the profiles ``load_profile`` returns.

    Duplicates (a message id the profile already applied) are counted and skipped. An Erasure
    Requested event drops the user's profile from the batch and records the erasure; events of
    an erased user (``is_erased``) are counted as ``erased`` and never applied. Events of an id
    merged into a known user (``alias_of``) are counted as ``forwarded`` and listed for that user.
    ``after_event(profile, event)`` runs after each applied event (the models' per-event
    bookkeeping: cart episodes, labels, rewards). Everything runs on event time.
    """
    changed = result.changed
    counts = result.counts
    erasures = result.erasures
    for record, parsed in events:
        user_id = parsed["user_id"]
        if parsed["event"] == ERASURE_REQUESTED:
            erasures[user_id] = (parsed["ts"], record.partition)
            changed.pop(user_id, None)
            counts[(record.topic, "ok")] += 1
            continue
        if user_id in erasures:
            counts[(record.topic, "erased")] += 1
            continue
        profile = changed.get(user_id)
        if profile is None:
            profile = load_profile(user_id)
            if profile is None:
                if is_erased is not None and is_erased(user_id):
                    counts[(record.topic, "erased")] += 1
                    continue
                target = alias_of(user_id) if alias_of is not None else None
                if target is not None:
                    result.forwarded.append((target, parsed))
                    counts[(record.topic, "forwarded")] += 1
                    continue
                profile = new_profile(user_id)
        seen = profile.get(SEEN_KEY)
        if seen is None:
            seen = profile[SEEN_KEY] = []
        elif seen and type(seen[-1]) is not int:  # stored before digests
            seen = profile[SEEN_KEY] = as_digests(seen)
        if not remember(seen, parsed["message_id"], window=dedupe_window):
            counts[(record.topic, "duplicate")] += 1
            continue
        apply_event(profile, parsed, affinity_half_life_s=affinity_half_life_s)
        if after_event is not None:
            after_event(profile, parsed)
        changed[user_id] = profile
        result.partition_of[user_id] = record.partition
        counts[(record.topic, "ok")] += 1
        result.by_type[(parsed["type"], parsed["event"])] += 1
        if parsed["ts"] > result.max_ts.get(record.partition, -math.inf):
            result.max_ts[record.partition] = parsed["ts"]


def ingest_batch(
    records: Iterable[Record],
    load_profile: Callable[[str], dict[str, Any] | None],
    *,
    now: float,
    max_event_bytes: int = 65536,
    max_future_s: float = 86400.0,
    dedupe_window: int = 256,
    affinity_half_life_s: float = 14 * 86400.0,
    after_event: Callable[[dict[str, Any], Event], None] | None = None,
) -> BatchResult:
    """Parse and apply a batch in arrival order (:func:`parse_records` + :func:`apply_events`)."""
    result = BatchResult()
    valid = parse_records(
        records, result, now=now, max_event_bytes=max_event_bytes, max_future_s=max_future_s
    )
    apply_events(
        valid,
        load_profile,
        result,
        dedupe_window=dedupe_window,
        affinity_half_life_s=affinity_half_life_s,
        after_event=after_event,
    )
    return result
