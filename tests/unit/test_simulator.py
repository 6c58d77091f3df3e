"""Unit tests for ``connectors.simulator``: determinism, event contract, behaviour, wire noise."""

from __future__ import annotations

import collections
import re
import time
from datetime import datetime
from typing import Any

import numpy as np
import orjson
import pytest

from connectors.segment import Rejection, parse_event
from connectors.simulator import (
    CATALOG,
    HOSTILE_KINDS,
    OFFER_IDS,
    SHOPPER_TYPES,
    ShopperSimulator,
)
from models.events import (
    CALL_TYPES,
    CART_VIEWED,
    CHECKOUT_STARTED,
    EMAIL_DELIVERED,
    EMAIL_LINK_CLICKED,
    EMAIL_OPENED,
    ORDER_COMPLETED,
    PRODUCT_ADDED,
    PRODUCT_REMOVED,
    PRODUCT_VIEWED,
    UNSUBSCRIBED,
    topic_kind,
)

TRACK_EVENTS = {
    PRODUCT_VIEWED,
    PRODUCT_ADDED,
    PRODUCT_REMOVED,
    CART_VIEWED,
    CHECKOUT_STARTED,
    ORDER_COMPLETED,
    EMAIL_DELIVERED,
    EMAIL_OPENED,
    EMAIL_LINK_CLICKED,
    UNSUBSCRIBED,
}
PRODUCT_KEYS = {"product_id", "price", "category", "name"}
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


@pytest.fixture(scope="module")
def small() -> ShopperSimulator:
    return ShopperSimulator(300, seed=11, days=10.0)


@pytest.fixture(scope="module")
def small_events(small: ShopperSimulator) -> list[dict[str, Any]]:
    return list(small.events())


@pytest.fixture(scope="module")
def month() -> tuple[ShopperSimulator, list[dict[str, Any]]]:
    """1500 users over 28 days: enough for per-type statistics."""
    sim = ShopperSimulator(1500, seed=5, days=28.0)
    return sim, list(sim.events())


@pytest.fixture(scope="module")
def per_user(month: tuple[ShopperSimulator, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per-user observed behaviour computed from the events."""
    sim, events = month
    stats: dict[str, dict[str, Any]] = {
        g["user_id"]: {
            "type": g["type"],
            "counts": collections.Counter(),
            "revenue": 0.0,
            "last_order": None,
            "order_weeks": set(),
        }
        for g in sim.ground_truth()
    }
    for e in events:
        s = stats[e["userId"]]
        name = e.get("event", "identify")
        s["counts"][name] += 1
        if name == ORDER_COMPLETED:
            ts = _ts(e)
            s["revenue"] += e["properties"]["revenue"]
            s["last_order"] = ts
            s["order_weeks"].add(int((ts - sim.start) // (7 * 86400)))
    return stats


def _by_type(stats: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for s in stats.values():
        out[s["type"]].append(s)
    return out


def _mean_count(users: list[dict[str, Any]], name: str) -> float:
    return sum(u["counts"][name] for u in users) / len(users)


# --- determinism --------------------------------------------------------------------------------


def test_same_seed_gives_identical_events_and_ground_truth() -> None:
    a = ShopperSimulator(120, seed=3, days=5.0)
    b = ShopperSimulator(120, seed=3, days=5.0)
    events_a = list(a.events())
    assert events_a == list(b.events())
    assert events_a == list(a.events())  # a fresh pass each call
    assert a.ground_truth() == b.ground_truth()
    assert list(a.raw_messages()) == list(b.raw_messages())


def test_different_seed_gives_different_events() -> None:
    a = ShopperSimulator(120, seed=3, days=5.0)
    b = ShopperSimulator(120, seed=4, days=5.0)
    strip = [{k: v for k, v in e.items() if k != "messageId"} for e in a.events()]
    other = [{k: v for k, v in e.items() if k != "messageId"} for e in b.events()]
    assert strip != other
    assert a.ground_truth() != b.ground_truth()


def test_noise_rates_do_not_change_the_valid_stream() -> None:
    clean = ShopperSimulator(80, seed=9, days=4.0)
    noisy = ShopperSimulator(80, seed=9, days=4.0, invalid_rate=0.2, duplicate_rate=0.1)
    assert list(clean.events()) == list(noisy.events())
    assert clean.ground_truth() == noisy.ground_truth()


# --- event contract -----------------------------------------------------------------------------


def test_events_are_in_non_decreasing_event_time_within_the_window(
    small: ShopperSimulator, small_events: list[dict[str, Any]]
) -> None:
    stamps = [e["timestamp"] for e in small_events]
    assert all(ISO_MS.match(s) for s in stamps)
    times = [_ts(e) for e in small_events]
    assert times == sorted(times)
    assert small.start <= times[0] and times[-1] < small.end


def test_message_ids_are_unique(small_events: list[dict[str, Any]]) -> None:
    ids = [e["messageId"] for e in small_events]
    assert len(ids) == len(set(ids))
    assert all(i.startswith("sim-11-") for i in ids)


def test_every_event_has_the_required_fields(
    small: ShopperSimulator, small_events: list[dict[str, Any]]
) -> None:
    for e in small_events:
        assert e["type"] in CALL_TYPES
        for key in ("userId", "anonymousId", "messageId", "timestamp"):
            assert isinstance(e[key], str) and e[key]
        assert isinstance(e["context"], dict)
        assert isinstance(e["context"]["library"]["name"], str)
        if e["type"] == "identify":
            assert set(e["traits"]) == {"plan", "created_at"}
            prefs = e["context"]["consent"]["categoryPreferences"]
            assert set(prefs) == {"email", "advertising"}
            assert all(isinstance(v, bool) for v in prefs.values())
            continue
        assert e["type"] == "track"
        assert e["event"] in TRACK_EVENTS
        props = e["properties"]
        if e["event"] in (PRODUCT_VIEWED, PRODUCT_ADDED, PRODUCT_REMOVED):
            assert set(props) >= PRODUCT_KEYS
            assert props["price"] > 0
        if e["event"] in (PRODUCT_ADDED, PRODUCT_REMOVED):
            assert props["quantity"] in (1, 2)
        if e["event"] in (ORDER_COMPLETED, CHECKOUT_STARTED):
            assert props["currency"] == "EUR"
            assert props["order_id"]
            assert props["products"]
            for line in props["products"]:
                assert PRODUCT_KEYS | {"quantity"} <= set(line)
            total = sum(p["price"] * p["quantity"] for p in props["products"])
            assert props["revenue"] == pytest.approx(total, abs=0.01)
        if e["event"].startswith("Email") or e["event"] == UNSUBSCRIBED:
            assert props["campaign_id"] and props["email_id"]
        # Valid for the project's own ingest validator.
        assert not isinstance(parse_event(orjson.dumps(e), now=small.end), Rejection)
    # No email addresses anywhere.
    assert b"@" not in b"".join(orjson.dumps(e) for e in small_events)


def test_one_identify_per_user_at_its_first_event(small_events: list[dict[str, Any]]) -> None:
    first: dict[str, dict[str, Any]] = {}
    identifies = collections.Counter()
    for e in small_events:
        first.setdefault(e["userId"], e)
        if e["type"] == "identify":
            identifies[e["userId"]] += 1
    assert all(e["type"] == "identify" for e in first.values())
    assert set(identifies) == set(first)
    assert set(identifies.values()) == {1}


def test_email_only_to_consenting_users(
    small: ShopperSimulator, small_events: list[dict[str, Any]]
) -> None:
    consent = {g["user_id"]: g["consent"]["email"] for g in small.ground_truth()}
    assert not all(consent.values())  # some users do not consent
    unsubscribed_at: dict[str, float] = {}
    for e in small_events:
        if e.get("event") == EMAIL_DELIVERED:
            assert consent[e["userId"]]
            assert e["userId"] not in unsubscribed_at
        elif e.get("event") == UNSUBSCRIBED:
            unsubscribed_at[e["userId"]] = _ts(e)


# --- ground truth -------------------------------------------------------------------------------


def test_ground_truth_fields_and_offer_oracle(small: ShopperSimulator, tmp_path: Any) -> None:
    truth = small.ground_truth()
    assert [g["user_id"] for g in truth] == [f"u{i:05d}" for i in range(300)]
    for g in truth:
        kind = SHOPPER_TYPES[g["type"]]
        assert 0.0 <= g["purchase_propensity"] <= 1.0
        assert g["best_offer"] in OFFER_IDS
        assert kind.offer_conversion[g["best_offer"]] == max(kind.offer_conversion.values())
    assert len(SHOPPER_TYPES) >= 5
    assert all(set(t.offer_conversion) == set(OFFER_IDS) for t in SHOPPER_TYPES.values())
    assert len({t.best_offer for t in SHOPPER_TYPES.values()}) >= 4
    path = tmp_path / "truth.jsonl"
    small.write_ground_truth(path)
    assert [orjson.loads(line) for line in path.read_bytes().splitlines()] == truth


def test_type_weights_and_validation() -> None:
    only_vip = ShopperSimulator(50, seed=1, days=1.0, type_weights={"loyal_vip": 1.0})
    assert {g["type"] for g in only_vip.ground_truth()} == {"loyal_vip"}
    with pytest.raises(ValueError):
        ShopperSimulator(10, seed=1, type_weights={"nobody": 1.0})
    with pytest.raises(ValueError):
        ShopperSimulator(10, seed=1, invalid_rate=1.0)
    with pytest.raises(ValueError):
        ShopperSimulator(10, seed=1, days=0)


def test_offer_converts_is_deterministic_and_follows_the_type(small: ShopperSimulator) -> None:
    truth = small.ground_truth()
    vip = next(g["user_id"] for g in truth if g["type"] == "loyal_vip")
    draws = [small.offer_converts(vip, "vip_early_access", n) for n in range(4000)]
    assert draws == [small.offer_converts(vip, "vip_early_access", n) for n in range(4000)]
    expected = SHOPPER_TYPES["loyal_vip"].offer_conversion["vip_early_access"]
    assert sum(draws) / len(draws) == pytest.approx(expected, abs=0.03)
    with pytest.raises(KeyError):
        small.offer_converts("nobody", "free_shipping")


# --- behaviour per latent type ------------------------------------------------------------------


def test_types_differ_in_behaviour(per_user: dict[str, dict[str, Any]]) -> None:
    t = _by_type(per_user)
    assert set(t) == set(SHOPPER_TYPES)
    orders = {k: _mean_count(v, ORDER_COMPLETED) for k, v in t.items()}
    views = {k: _mean_count(v, PRODUCT_VIEWED) for k, v in t.items()}
    adds = {k: _mean_count(v, PRODUCT_ADDED) for k, v in t.items()}
    checkouts = {k: _mean_count(v, CHECKOUT_STARTED) for k, v in t.items()}
    opens = {
        k: sum(u["counts"][EMAIL_OPENED] for u in v)
        / max(1, sum(u["counts"][EMAIL_DELIVERED] for u in v))
        for k, v in t.items()
    }
    events = {k: sum(sum(u["counts"].values()) for u in v) / len(v) for k, v in t.items()}

    assert orders["loyal_vip"] > 20 * max(orders["window_shopper"], 0.01)
    assert orders["loyal_vip"] == max(orders.values())
    assert orders["window_shopper"] < 0.1
    # Window shoppers view a lot and hardly add to cart.
    assert views["window_shopper"] > 2 * views["cart_abandoner"]
    assert adds["window_shopper"] < 0.05 * views["window_shopper"]
    # Cart abandoners add and start checkouts but rarely complete them.
    assert adds["cart_abandoner"] > 5 * adds["window_shopper"]
    assert orders["cart_abandoner"] < 0.1 * checkouts["cart_abandoner"]
    assert orders["loyal_vip"] > 0.8 * checkouts["loyal_vip"]
    # Bargain hunters buy cheap, VIPs expensive.
    aov = {
        k: sum(u["revenue"] for u in v) / sum(u["counts"][ORDER_COMPLETED] for u in v)
        for k, v in t.items()
        if k in ("bargain_hunter", "loyal_vip", "newsletter_reader")
    }
    assert aov["bargain_hunter"] * 5 < aov["loyal_vip"]
    assert aov["bargain_hunter"] < aov["newsletter_reader"]
    # Newsletter readers open the most emails; dormant users open almost none and do least.
    assert opens["newsletter_reader"] == max(opens.values()) and opens["newsletter_reader"] > 0.8
    assert opens["loyal_vip"] > 2 * opens["window_shopper"]
    assert opens["dormant"] < 0.1
    assert events["dormant"] == min(events.values())
    assert _mean_count(t["dormant"], UNSUBSCRIBED) > _mean_count(t["loyal_vip"], UNSUBSCRIBED)


def test_ground_truth_propensity_matches_observed_weekly_orders(
    month: tuple[ShopperSimulator, list[dict[str, Any]]], per_user: dict[str, dict[str, Any]]
) -> None:
    sim, _ = month
    truth = sim.ground_truth()
    propensity = np.array([g["purchase_propensity"] for g in truth])
    # Share of the four weeks in which the user ordered: an unbiased estimate of the propensity.
    observed = np.array([len(per_user[g["user_id"]]["order_weeks"]) / 4 for g in truth])
    assert np.corrcoef(propensity, observed)[0, 1] > 0.8
    assert observed.mean() == pytest.approx(propensity.mean(), abs=0.02)


def test_types_are_separable_by_profile_features(
    month: tuple[ShopperSimulator, list[dict[str, Any]]], per_user: dict[str, dict[str, Any]]
) -> None:
    """k-means on simple RFM + engagement features recovers the latent types (purity)."""
    sim, _ = month
    ids = [u for u, s in per_user.items() if s["counts"]]
    rows = []
    for uid in ids:
        s = per_user[uid]
        c = s["counts"]
        recency = (sim.end - s["last_order"]) / 86400 if s["last_order"] else 365.0
        rows.append(
            [
                np.log1p(recency),
                np.log1p(c[ORDER_COMPLETED]),
                np.log1p(s["revenue"]),
                np.log1p(c[PRODUCT_ADDED]),
                c[EMAIL_OPENED] / c[EMAIL_DELIVERED] if c[EMAIL_DELIVERED] else 0.0,
                np.log1p(c[PRODUCT_VIEWED]),
            ]
        )
    x = np.array(rows)
    x = (x - x.mean(0)) / x.std(0)
    labels = _kmeans(x, k=len(SHOPPER_TYPES), seed=0)
    types = [per_user[u]["type"] for u in ids]
    clusters: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for kind, label in zip(types, labels.tolist(), strict=True):
        clusters[label][kind] += 1
    majority = sum(c.most_common(1)[0][1] for c in clusters.values())
    assert majority / len(ids) >= 0.85


def _kmeans(x: np.ndarray, k: int, seed: int, restarts: int = 8, iters: int = 50) -> np.ndarray:
    """Plain k-means++ with restarts (lowest inertia wins)."""
    rng = np.random.default_rng(seed)
    best: tuple[float, np.ndarray] | None = None
    for _ in range(restarts):
        centers = x[rng.integers(len(x))][None, :]
        for _ in range(k - 1):
            d = ((x[:, None, :] - centers[None]) ** 2).sum(-1).min(1)
            centers = np.vstack([centers, x[rng.choice(len(x), p=d / d.sum())]])
        for _ in range(iters):
            labels = ((x[:, None, :] - centers[None]) ** 2).sum(-1).argmin(1)
            centers = np.array(
                [x[labels == j].mean(0) if (labels == j).any() else centers[j] for j in range(k)]
            )
        inertia = float(((x - centers[labels]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, labels)
    assert best is not None
    return best[1]


# --- wire format --------------------------------------------------------------------------------


def test_invalid_rate_yields_that_fraction_of_rejected_messages() -> None:
    sim = ShopperSimulator(300, seed=2, days=7.0, invalid_rate=0.1)
    records = list(sim.raw_messages())
    results = [parse_event(value, now=sim.end) for _, _, value in records]
    rejected = [r for r in results if isinstance(r, Rejection)]
    assert len(rejected) / len(records) == pytest.approx(0.1, abs=0.015)
    reasons = {r.reason for r in rejected}
    assert {"missing_message_id", "negative_value", "unknown_type"} <= reasons
    assert reasons & {"not_json", "invalid_utf8"}
    assert reasons & {"bad_timestamp", "timestamp_out_of_range"}
    assert len(HOSTILE_KINDS) == 5
    # The valid ones are exactly events(), in order.
    valid = [value for (_, _, value), r in zip(records, results, strict=True)
             if not isinstance(r, Rejection)]  # fmt: skip
    assert valid == [orjson.dumps(e) for e in sim.events()]


def test_duplicate_rate_resends_identical_messages() -> None:
    sim = ShopperSimulator(200, seed=8, days=7.0, duplicate_rate=0.05)
    records = list(sim.raw_messages())
    events = list(sim.events())
    by_id: dict[str, bytes] = {}
    dups = 0
    for _, _, value in records:
        message_id = orjson.loads(value)["messageId"]
        if message_id in by_id:
            dups += 1
            assert by_id[message_id] == value
        by_id[message_id] = value
    assert set(by_id) == {e["messageId"] for e in events}
    assert dups / len(events) == pytest.approx(0.05, abs=0.01)


def test_raw_messages_routing_and_keys(small: ShopperSimulator) -> None:
    expected = {
        "identify": "identity",
        ORDER_COMPLETED: "purchases",
        EMAIL_DELIVERED: "email",
        EMAIL_OPENED: "email",
        EMAIL_LINK_CLICKED: "email",
        UNSUBSCRIBED: "email",
        PRODUCT_VIEWED: "clickstream",
        PRODUCT_ADDED: "clickstream",
        CHECKOUT_STARTED: "clickstream",
        CART_VIEWED: "clickstream",
    }
    seen: dict[str, str] = {}
    for stream, key, value in small.raw_messages():
        payload = orjson.loads(value)
        assert stream == topic_kind(payload["type"], payload.get("event", ""))
        assert key == payload["userId"].encode()
        seen[payload.get("event", payload["type"])] = stream
    for name, stream in expected.items():
        assert seen[name] == stream
    assert set(seen.values()) == {"identity", "purchases", "email", "clickstream"}


def test_catalog_is_fixed_and_priced() -> None:
    assert len(CATALOG) >= 5
    for products in CATALOG.values():
        prices = [p["price"] for p in products]
        assert prices == sorted(prices) and prices[0] > 0
        assert len({p["product_id"] for p in products}) == len(products)


def test_generation_speed_2000_users_30_days() -> None:
    sim = ShopperSimulator(2000, seed=1, days=30.0)
    started = time.perf_counter()
    count = sum(1 for _ in sim.events())
    elapsed = time.perf_counter() - started
    print(f"\n{count} events ({count / 2000:.1f}/user) in {elapsed:.2f}s = {count / elapsed:.0f}/s")
    assert count > 2000 * 20
