"""Unit tests of the batch ingest logic: validation outcomes, de-duplication, profiles."""

from __future__ import annotations

import orjson

from models.dedupe import as_digests
from streams.ingest import SEEN_KEY, Record, ingest_batch

NOW = 1_800_000_000.0


def raw(user: str, message_id: str, name: str = "Product Viewed", **props: object) -> bytes:
    return orjson.dumps(
        {
            "type": "track",
            "event": name,
            "userId": user,
            "messageId": message_id,
            "timestamp": "2024-01-01T00:00:00Z",
            "properties": props,
        }
    )


def records(*values: bytes, topic: str = "clickstream") -> list[Record]:
    return [Record(topic, 0, offset, b"k", value) for offset, value in enumerate(values)]


def test_duplicates_within_a_batch_count_once() -> None:
    result = ingest_batch(
        records(raw("u", "m1"), raw("u", "m1"), raw("u", "m2")), lambda _: None, now=NOW
    )
    assert result.changed["u"]["events"] == 2
    assert result.counts == {("clickstream", "ok"): 2, ("clickstream", "duplicate"): 1}


def test_duplicates_across_batches_count_once_through_the_stored_profile() -> None:
    store: dict[str, dict] = {}
    first = ingest_batch(
        records(raw("u", "m1", "Order Completed", revenue=10.0)), store.get, now=NOW
    )
    store.update({k: orjson.loads(orjson.dumps(v)) for k, v in first.changed.items()})
    second = ingest_batch(
        records(raw("u", "m1", "Order Completed", revenue=10.0)), store.get, now=NOW
    )
    assert second.changed == {}
    assert second.counts == {("clickstream", "duplicate"): 1}
    assert store["u"]["orders"] == 1


def test_dedupe_memory_is_bounded_per_user() -> None:
    values = [raw("u", f"m{i}") for i in range(50)]
    result = ingest_batch(records(*values), lambda _: None, now=NOW, dedupe_window=10)
    assert result.changed["u"][SEEN_KEY] == as_digests([f"m{i}" for i in range(40, 50)])


def test_rejects_are_kept_with_their_record_and_do_not_stop_the_batch() -> None:
    batch = records(b"{oops", raw("u", "m1"), raw("u", "m2", price=-1), raw("v", "m3"))
    result = ingest_batch(batch, lambda _: None, now=NOW)
    assert [(r.offset, why.reason) for r, why in result.rejected] == [
        (0, "not_json"),
        (2, "negative_value"),
    ]
    assert sorted(result.changed) == ["u", "v"]
    assert result.counts == {("clickstream", "ok"): 2, ("clickstream", "deadletter"): 2}
    assert result.partition_of == {"u": 0, "v": 0}


def test_a_profile_stored_with_message_id_strings_still_drops_their_re_delivery() -> None:
    stored = {"u": ingest_batch(records(raw("u", "m1")), lambda _: None, now=NOW).changed["u"]}
    stored["u"][SEEN_KEY] = ["m0", "m1"]  # how profiles kept their ids before digests
    again = ingest_batch(records(raw("u", "m1"), raw("u", "m2")), stored.get, now=NOW)
    assert again.counts == {("clickstream", "duplicate"): 1, ("clickstream", "ok"): 1}
    assert again.changed["u"][SEEN_KEY] == as_digests(["m0", "m1", "m2"])
