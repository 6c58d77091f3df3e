"""Unit tests for models.labels: delayed lead-score labels without leakage."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from models import labels
from models.events import ORDER_COMPLETED, PRODUCT_ADDED, PRODUCT_VIEWED, Event
from models.features import apply_event, feature_vector, new_profile

DAY = 86400.0
H = 7 * DAY
T0 = 1_700_000_000.0


def snap(state: dict[str, Any], ts: float, **kw: Any) -> bool:
    return labels.on_scored(state, {"x": ts}, ts, horizon_s=H, min_gap_s=DAY, **kw)


def test_new_state_is_json_and_empty() -> None:
    s = labels.new_state()
    assert orjson.loads(orjson.dumps(s)) == s
    assert labels.next_due(s) is None
    assert labels.expire(s, T0) == [] and labels.on_purchase(s, T0) == []


def test_one_snapshot_per_min_gap_either_side_and_bounded() -> None:
    s = labels.new_state()
    assert snap(s, T0)
    assert not snap(s, T0 + DAY - 1)
    assert not snap(s, T0 - DAY + 1)  # a late event close to a kept snapshot
    assert snap(s, T0 - DAY)  # a late event a full gap earlier is fine
    for k in range(1, 20):
        snap(s, T0 + k * DAY)
    assert len(s["pending"]) == labels.DEFAULT_MAX_PENDING
    assert [p["ts"] for p in s["pending"]] == sorted(p["ts"] for p in s["pending"])
    assert orjson.loads(orjson.dumps(s)) == s  # stays JSON-serializable inside the profile


def test_features_are_copied() -> None:
    s = labels.new_state()
    f = {"x": 1.0}
    labels.on_scored(s, f, T0)
    f["x"] = 99.0
    assert s["pending"][0]["features"] == {"x": 1.0}


def test_purchase_labels_exactly_the_snapshots_whose_horizon_contains_it() -> None:
    s = labels.new_state()
    for k in range(3):
        snap(s, T0 + k * DAY)
    # At T0 + 1 day: the first snapshot is resolved; the one taken at the same instant is not.
    pos = labels.on_purchase(s, T0 + DAY, user_id="u1")
    assert [(e["label"], e["ts"], e["labelled_at"]) for e in pos] == [(1, T0, T0 + DAY)]
    assert [p["ts"] for p in s["pending"]] == [T0 + DAY, T0 + 2 * DAY]
    # A second after the end of its horizon a purchase no longer labels a snapshot.
    late = labels.on_purchase(s, T0 + DAY + H + 1)
    assert [e["ts"] for e in late] == [T0 + 2 * DAY]
    assert [p["ts"] for p in s["pending"]] == [T0 + DAY]
    # Exactly at the end of the horizon still counts.
    at_due = labels.new_state()
    snap(at_due, T0)
    assert [e["label"] for e in labels.on_purchase(at_due, T0 + H)] == [1]


def test_expire_turns_passed_horizons_into_negatives_labelled_at_due() -> None:
    s = labels.new_state()
    snap(s, T0)
    snap(s, T0 + 2 * DAY)
    assert labels.next_due(s) == T0 + H
    assert labels.expire(s, T0 + H) == []  # a purchase at due could still come
    neg = labels.expire(s, T0 + H + 0.001)
    assert [(e["label"], e["ts"], e["labelled_at"]) for e in neg] == [(0, T0, T0 + H)]
    assert labels.next_due(s) == T0 + 2 * DAY + H
    assert [e["ts"] for e in labels.expire(s, T0 + 100 * DAY)] == [T0 + 2 * DAY]
    assert labels.next_due(s) is None


def test_late_purchase_inside_the_horizon_wins_until_the_watermark_passes() -> None:
    s = labels.new_state()
    snap(s, T0)
    # Watermark is behind event time by the allowed lateness: the snapshot is still pending.
    assert labels.expire(s, T0 + H - 3600) == []
    assert [e["label"] for e in labels.on_purchase(s, T0 + 3 * DAY)] == [1]
    assert labels.expire(s, T0 + 100 * DAY) == []


def test_example_shape_and_deterministic_keys() -> None:
    a, b = labels.new_state(), labels.new_state()
    for st in (a, b):
        labels.on_scored(st, {"x": 1.0}, T0, score=0.25)
        labels.on_scored(st, {"x": 1.0}, T0 + 2 * DAY)
    assert all("key" not in s for s in a["pending"])  # computed at emission, not stored
    ea = labels.expire(a, T0 + 100 * DAY, user_id="u1")
    eb = labels.expire(b, T0 + 100 * DAY, user_id="u1")
    assert ea == eb
    assert set(ea[0]) == {"features", "label", "ts", "labelled_at", "key", "score"}
    assert ea[0]["score"] == 0.25 and "score" not in ea[1]
    assert ea[0]["key"] != ea[1]["key"]
    other = labels.new_state()
    labels.on_scored(other, {"x": 1.0}, T0)
    assert labels.expire(other, T0 + 100 * DAY, user_id="u2")[0]["key"] != ea[0]["key"]


def test_keys_are_those_snapshots_stored_before_and_a_stored_key_is_kept() -> None:
    """Snapshots used to carry their key, hashed at scoring time from the same user, time and
    features: an example emitted now has the key it had then, and a snapshot stored with a
    key (a profile written by the code before) keeps it."""
    new, stored = labels.new_state(), labels.new_state()
    labels.on_scored(new, {"x": 1.23456}, T0)
    labels.on_scored(stored, {"x": 1.23456}, T0)
    stored["pending"][0]["key"] = "stored-key"
    (example,) = labels.on_purchase(new, T0 + DAY, user_id="u1")
    assert example["key"] == "b427083934142cd8a8acf58e"  # the hash the code before stored
    assert labels.on_purchase(stored, T0 + DAY, user_id="u1")[0]["key"] == "stored-key"


def test_hold_until_due_emits_positives_in_snapshot_order() -> None:
    s = labels.new_state()
    for k in range(3):
        snap(s, T0 + k * DAY)
    assert labels.on_purchase(s, T0 + 2.5 * DAY, hold_until_due=True) == []
    assert labels.on_purchase(s, T0 + 3 * DAY, hold_until_due=True) == []  # already labelled
    out = labels.expire(s, T0 + 100 * DAY)
    assert [(e["ts"], e["label"], e["labelled_at"]) for e in out] == [
        (T0, 1, T0 + 2.5 * DAY),
        (T0 + DAY, 1, T0 + 2.5 * DAY),
        (T0 + 2 * DAY, 1, T0 + 2.5 * DAY),
    ]


def test_bad_horizon() -> None:
    with pytest.raises(ValueError):
        labels.on_scored(labels.new_state(), {}, T0, horizon_s=0)


# --------------------------------------------------------------------------- no leakage


def ev(name: str, ts: float, **props: Any) -> Event:
    return Event(message_id=f"m-{name}-{ts}", user_id="u1", type="track", event=name, ts=ts,
                 properties=props, traits={}, consent=None)  # fmt: skip


def engine_step(profile: dict[str, Any], event: Event) -> list[dict[str, Any]]:
    """The documented call order: snapshot -> apply the event -> on_purchase."""
    state = profile.setdefault(labels.STATE_KEY, labels.new_state())
    features = feature_vector(profile, now=event["ts"])
    labels.on_scored(state, features, event["ts"])
    apply_event(profile, event)
    if event["event"] == ORDER_COMPLETED:
        return labels.on_purchase(state, event["ts"], user_id=profile["user_id"])
    return []


def test_snapshot_never_contains_the_event_that_labels_it() -> None:
    profile = new_profile("u1")
    order = ev(ORDER_COMPLETED, T0 + 2 * DAY, total=50.0)
    out = []
    for e in [
        ev(PRODUCT_VIEWED, T0, product_id="p1", category="shoes"),
        ev(PRODUCT_ADDED, T0 + 60, product_id="p1", price=50.0, category="shoes"),
        order,
    ]:
        out += engine_step(profile, e)
    # The snapshot of the first day is the positive; its features predate the purchase.
    assert [(e["label"], e["ts"]) for e in out] == [(1, T0)]
    assert out[0]["features"]["has_ordered"] == 0.0 and out[0]["features"]["has_cart"] == 0.0
    # The snapshot taken at the purchase event shows the profile before it, and that same
    # purchase does not label it (it stays pending for a future purchase or a negative).
    (pending,) = profile[labels.STATE_KEY]["pending"]
    assert pending["ts"] == order["ts"]
    assert pending["features"]["has_ordered"] == 0.0
    assert pending["features"]["cart_value"] == 50.0
    # Applying the event first would have leaked it into the features.
    leaked = feature_vector(profile, now=order["ts"])
    assert leaked["has_ordered"] == 1.0 and leaked["cart_value"] == 0.0
    assert pending["features"] != leaked


def test_replay_gives_the_same_examples() -> None:
    def replay() -> list[dict[str, Any]]:
        profile = new_profile("u1")
        out = []
        for k in range(10):
            out += engine_step(profile, ev(PRODUCT_VIEWED, T0 + k * DAY, category="c"))
            if k % 4 == 3:
                out += engine_step(profile, ev(ORDER_COMPLETED, T0 + k * DAY + 3600, total=9.0))
        return out + labels.expire(profile[labels.STATE_KEY], T0 + 100 * DAY, user_id="u1")

    first = replay()
    assert first == replay()
    assert {e["label"] for e in first} == {0, 1}
    assert len({e["key"] for e in first}) == len(first)
