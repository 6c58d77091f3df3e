"""Unit tests for models.features: the per-user profile as pure functions of (state, event)."""

from __future__ import annotations

import copy
import math
import random
import time
from datetime import datetime
from typing import Any

import orjson
import pytest

from models import features as F
from models.events import (
    CART_VIEWED,
    CHECKOUT_STARTED,
    EMAIL_BOUNCED,
    EMAIL_DELIVERED,
    EMAIL_LINK_CLICKED,
    EMAIL_OPENED,
    OFFER_CLICKED,
    OFFER_VIEWED,
    ORDER_COMPLETED,
    ORDER_REFUNDED,
    PRODUCT_ADDED,
    PRODUCT_REMOVED,
    PRODUCT_VIEWED,
    UNSUBSCRIBED,
    Event,
)
from models.features import (
    FEATURE_NAMES,
    MAX_CART_LINES,
    MAX_CATEGORIES,
    apply_event,
    feature_vector,
    has_consent,
    new_profile,
    summary,
)

T0 = 1_700_000_000.0
DAY = 86400.0
_seq = 0


def ev(
    name: str,
    ts: float,
    props: dict[str, Any] | None = None,
    *,
    type: str = "track",
    consent: dict[str, bool] | None = None,
) -> Event:
    global _seq
    _seq += 1
    return Event(
        message_id=f"m-{_seq}",
        user_id="u-1",
        type=type,
        event=name if type == "track" else "",
        ts=ts,
        properties=props or {},
        traits={},
        consent=consent,
    )


def build(events: list[Event], **kw: Any) -> dict[str, Any]:
    p = new_profile("u-1")
    for e in events:
        p = apply_event(p, e, **kw)
    return p


# --------------------------------------------------------------------------- RFM


def test_rfm_orders_and_refunds() -> None:
    p = build(
        [
            ev(ORDER_COMPLETED, T0 + 10, {"order_id": "o1", "revenue": 50.0}),
            ev(ORDER_COMPLETED, T0 + 20, {"order_id": "o2", "revenue": 30.25}),
            ev(ORDER_REFUNDED, T0 + 30, {"order_id": "o2", "revenue": 30.25}),
        ]
    )
    assert p["orders"] == 2
    assert p["refunds"] == 1
    assert p["revenue"] == pytest.approx(50.0)
    assert p["first_order_at"] == T0 + 10
    assert p["last_order_at"] == T0 + 20
    apply_event(p, ev(ORDER_REFUNDED, T0 + 40, {"revenue": 1000.0}))
    assert p["revenue"] == 0.0
    assert p["refunds"] == 2
    s = summary(p, now=T0 + 20 + 2 * DAY)
    assert s["recency_days"] == "2.000"
    assert s["orders"] == "2" and s["revenue"] == "0.00"


def test_revenue_fallback_order() -> None:
    products = [
        {"product_id": "a", "price": 10.0, "quantity": 2},
        {"product_id": "b", "price": 5.5},
    ]
    both = {"revenue": 7.0, "total": 9.0, "products": products}
    total_only = {"total": 9.0, "products": products}
    products_only = {"products": products}
    assert build([ev(ORDER_COMPLETED, T0, both)])["revenue"] == 7.0
    assert build([ev(ORDER_COMPLETED, T0, total_only)])["revenue"] == 9.0
    assert build([ev(ORDER_COMPLETED, T0, products_only)])["revenue"] == 25.5
    assert build([ev(ORDER_COMPLETED, T0, {})])["revenue"] == 0.0
    # Invalid values fall through to the next source; string numbers are accepted.
    assert build([ev(ORDER_COMPLETED, T0, {"revenue": "x", "total": "12.5"})])["revenue"] == 12.5
    assert build([ev(ORDER_COMPLETED, T0, {"revenue": math.nan, "total": 3})])["revenue"] == 3.0
    assert build([ev(ORDER_COMPLETED, T0, {"revenue": -5.0})])["revenue"] == 0.0


def test_recency_empty_when_never_ordered() -> None:
    p = build([ev(PRODUCT_VIEWED, T0)])
    s = summary(p, now=T0 + DAY)
    assert s["recency_days"] == ""
    assert s["days_since_seen"] == "1.000"
    assert feature_vector(p, now=T0)["recency_days"] == 365.0


# --------------------------------------------------------------------------- cart


def test_cart_add_remove_qty_and_value() -> None:
    p = build(
        [
            ev(PRODUCT_ADDED, T0, {"product_id": "p1", "price": 10.0, "name": "Shoe",
                                   "category": "shoes"}),
            ev(PRODUCT_ADDED, T0 + 1, {"product_id": "p1", "price": 10.0, "quantity": 2}),
            ev(PRODUCT_ADDED, T0 + 2, {"product_id": "p2", "price": 0.1, "quantity": 3}),
        ]
    )
    assert p["cart"]["p1"] == {"qty": 3, "price": 10.0, "name": "Shoe", "category": "shoes"}
    assert p["cart"]["p2"] == {"qty": 3, "price": 0.1}
    assert p["cart_value"] == 30.3
    assert p["cart_updated_at"] == T0 + 2
    apply_event(p, ev(PRODUCT_REMOVED, T0 + 3, {"product_id": "p1"}))
    assert p["cart"]["p1"]["qty"] == 2
    assert p["cart_value"] == 20.3
    apply_event(p, ev(PRODUCT_REMOVED, T0 + 4, {"product_id": "p2", "quantity": 5}))
    assert "p2" not in p["cart"]
    assert p["cart_value"] == 20.0
    apply_event(p, ev(PRODUCT_REMOVED, T0 + 5, {"product_id": "nope"}))
    assert list(p["cart"]) == ["p1"]
    s = summary(p, now=T0 + 10)
    assert s["cart_items"] == "2" and s["cart_value"] == "20.00"
    apply_event(p, ev(ORDER_COMPLETED, T0 + 6, {"revenue": 20.0}))
    assert p["cart"] == {} and p["cart_value"] == 0.0


def test_cart_is_bounded() -> None:
    p = build(
        [ev(PRODUCT_ADDED, T0 + i, {"product_id": f"p{i}", "price": 1.0}) for i in range(250)]
    )
    assert len(p["cart"]) == MAX_CART_LINES
    assert "p249" in p["cart"] and "p0" not in p["cart"]
    assert p["cart_value"] == float(MAX_CART_LINES)


def test_checkout_flag() -> None:
    p = build([ev(PRODUCT_ADDED, T0, {"product_id": "p1", "price": 5.0}),
               ev(CHECKOUT_STARTED, T0 + 60)])
    assert p["checkout_started_at"] == T0 + 60
    assert summary(p, now=T0 + 100)["checkout_started"] == "1"
    assert feature_vector(p, now=T0 + 100)["checkout_started"] == 1.0
    apply_event(p, ev(ORDER_COMPLETED, T0 + 120, {"revenue": 5.0}))
    assert p["checkout_started_at"] is None
    assert summary(p, now=T0 + 100)["checkout_started"] == "0"


def test_late_cart_events_do_not_resurrect_a_bought_cart() -> None:
    add = ev(PRODUCT_ADDED, T0, {"product_id": "p1", "price": 5.0})
    checkout = ev(CHECKOUT_STARTED, T0 + 10)
    order = ev(ORDER_COMPLETED, T0 + 20, {"revenue": 5.0})
    in_order = build([add, checkout, order])
    late = build([order, checkout, add])
    assert in_order["cart"] == late["cart"] == {}
    assert in_order["checkout_started_at"] is late["checkout_started_at"] is None
    # A late order only removes what it bought from a cart that changed since.
    p = build(
        [
            ev(PRODUCT_ADDED, T0, {"product_id": "p1", "price": 5.0}),
            ev(PRODUCT_ADDED, T0 + 30, {"product_id": "p2", "price": 7.0}),
            ev(ORDER_COMPLETED, T0 + 20, {"products": [{"product_id": "p1", "price": 5.0}]}),
        ]
    )
    assert list(p["cart"]) == ["p2"] and p["cart_value"] == 7.0


# --------------------------------------------------------------------------- ordering


def _mixed_events() -> list[Event]:
    return [
        ev(PRODUCT_VIEWED, T0 + 5, {"product_id": "p1", "category": "shoes"}),
        ev("", T0 + 1, type="page"),
        ev(ORDER_COMPLETED, T0 + 50, {"revenue": 20.0}),
        ev(EMAIL_DELIVERED, T0 + 2),
        ev(EMAIL_OPENED, T0 + 40),
        ev(EMAIL_LINK_CLICKED, T0 + 45),
        ev(OFFER_VIEWED, T0 + 3),
        ev(OFFER_CLICKED, T0 + 4),
        ev(ORDER_COMPLETED, T0 + 30, {"total": 10.0}),
    ]


COUNT_KEYS = ("events", "views", "pages", "orders", "refunds", "email_delivered",
              "email_opened", "email_clicked", "email_bounced", "offers_viewed",
              "offers_clicked", "revenue", "first_seen", "last_seen", "first_order_at",
              "last_order_at", "last_email_open_at", "last_email_click_at")


def test_late_events_do_not_move_time_back_and_order_does_not_matter() -> None:
    events = _mixed_events()
    forward = build(events)
    assert forward["last_seen"] == T0 + 50
    assert forward["first_seen"] == T0 + 1
    assert forward["last_order_at"] == T0 + 50
    for seed in range(5):
        shuffled = events[:]
        random.Random(seed).shuffle(shuffled)
        other = build(shuffled)
        for key in COUNT_KEYS:
            assert other[key] == forward[key], key
    p = build([ev(PRODUCT_VIEWED, T0 + 100), ev(PRODUCT_VIEWED, T0)])
    assert p["last_seen"] == T0 + 100 and p["first_seen"] == T0 and p["events"] == 2


def test_replay_gives_identical_profile() -> None:
    rng = random.Random(7)
    events = random_events(rng, 500)
    assert build(events) == build(copy.deepcopy(events))
    a, b = build(events), build(events)
    assert orjson.dumps(a) == orjson.dumps(b)


def test_orjson_round_trip() -> None:
    p = build(random_events(random.Random(3), 300))
    assert orjson.loads(orjson.dumps(p)) == p
    # A reloaded profile keeps evolving exactly like the in-memory one.
    more = random_events(random.Random(4), 100, t0=T0 + 10 * DAY)
    reloaded = orjson.loads(orjson.dumps(p))
    for e in more:
        apply_event(p, e)
        apply_event(reloaded, e)
    assert reloaded == p


# --------------------------------------------------------------------------- email & consent


def test_email_engagement_and_unsubscribe_revokes_consent() -> None:
    p = build(
        [
            ev(EMAIL_DELIVERED, T0, consent={"email": True}),
            ev(EMAIL_DELIVERED, T0 + 1),
            ev(EMAIL_OPENED, T0 + 10),
            ev(EMAIL_OPENED, T0 + 5),
            ev(EMAIL_LINK_CLICKED, T0 + 12),
            ev(EMAIL_BOUNCED, T0 + 13),
        ]
    )
    assert (p["email_delivered"], p["email_opened"], p["email_clicked"]) == (2, 2, 1)
    assert p["email_bounced"] == 1
    assert p["last_email_open_at"] == T0 + 10 and p["last_email_click_at"] == T0 + 12
    assert has_consent(p, "email", default=False)
    fv = feature_vector(p, now=T0 + 20)
    assert fv["email_open_rate"] == 1.0 and fv["email_click_rate"] == 0.5
    apply_event(p, ev(UNSUBSCRIBED, T0 + 20))
    assert p["unsubscribed"] is True and p["consent"]["email"] is False
    assert not has_consent(p, "email", default=True)
    # Unsubscribed is sticky: a later (e.g. stale CMP) "email: true" does not re-grant email.
    apply_event(p, ev(PRODUCT_VIEWED, T0 + 30, consent={"email": True, "advertising": True}))
    assert not has_consent(p, "email", default=True)
    assert has_consent(p, "advertising", default=False)
    s = summary(p, now=T0 + 40)
    assert s["unsubscribed"] == "1" and s["consent_email"] == "0"
    assert s["consent_advertising"] == "1"


def test_late_unsubscribe_still_revokes() -> None:
    p = build([ev(PRODUCT_VIEWED, T0 + 100, consent={"email": True}), ev(UNSUBSCRIBED, T0)])
    assert not has_consent(p, "email", default=True)


def test_consent_none_given_revoked_and_default() -> None:
    p = new_profile("u-1")
    assert p["consent"] == {"email": None, "advertising": None}
    assert has_consent(p, "advertising", default=True) is True
    assert has_consent(p, "advertising", default=False) is False
    assert summary(p, now=T0)["consent_advertising"] == ""
    apply_event(p, ev("", T0, type="identify", consent={"advertising": True}))
    assert has_consent(p, "Advertising", default=False) is True
    assert p["consent"]["email"] is None
    assert summary(p, now=T0)["consent_advertising"] == "1"
    apply_event(p, ev(CART_VIEWED, T0 + 10, consent={"advertising": False}))
    assert has_consent(p, "advertising", default=True) is False
    assert summary(p, now=T0)["consent_advertising"] == "0"
    # An older statement arriving late does not override the newer one.
    apply_event(p, ev(CART_VIEWED, T0 + 5, consent={"advertising": True}))
    assert has_consent(p, "advertising", default=True) is False
    # Same event time, conflicting statements: refusal wins whatever the order.
    a = build([ev(CART_VIEWED, T0, consent={"advertising": True}),
               ev(CART_VIEWED, T0, consent={"advertising": False})])
    b = build([ev(CART_VIEWED, T0, consent={"advertising": False}),
               ev(CART_VIEWED, T0, consent={"advertising": True})])
    assert a["consent"] == b["consent"] == {"email": None, "advertising": False}
    # Unknown categories fall back to the default.
    assert has_consent(p, "sms", default=True) is True


# --------------------------------------------------------------------------- affinity


def test_affinity_halves_after_one_half_life() -> None:
    hl = 7 * DAY
    p = build([ev(PRODUCT_VIEWED, T0, {"category": "shoes"})], affinity_half_life_s=hl)
    assert p["affinity"] == {"shoes": 1.0}
    apply_event(p, ev(PRODUCT_VIEWED, T0 + hl, {"category": "hats"}), affinity_half_life_s=hl)
    assert p["affinity"]["shoes"] == pytest.approx(0.5)
    assert p["affinity"]["hats"] == pytest.approx(1.0)
    assert p["affinity_at"] == T0 + hl
    # A late event adds its weight already decayed by its age, and does not move time back.
    apply_event(p, ev(PRODUCT_ADDED, T0, {"category": "bags"}), affinity_half_life_s=hl)
    assert p["affinity"]["bags"] == pytest.approx(1.5)
    assert p["affinity_at"] == T0 + hl
    # Weights: view 1, add 3, purchase 5 (per product category).
    q = build([ev(ORDER_COMPLETED, T0, {"products": [{"category": "a"}, {"category": "b"},
                                                     {"category": "a"}]})])
    assert q["affinity"] == {"a": 10.0, "b": 5.0}


def test_affinity_order_independent_up_to_rounding() -> None:
    events = [ev(PRODUCT_VIEWED, T0 + i * 3600, {"category": f"c{i % 3}"}) for i in range(30)]
    a = build(events)
    b = build(list(reversed(events)))
    assert a["affinity"].keys() == b["affinity"].keys()
    for k in a["affinity"]:
        assert a["affinity"][k] == pytest.approx(b["affinity"][k], rel=1e-9)


def test_affinity_keeps_top_n() -> None:
    events = []
    for i in range(60):
        # Category ci is viewed i+1 times at the same instant: higher i, higher score.
        events += [ev(PRODUCT_VIEWED, T0, {"category": f"c{i:02d}"})] * (i + 1)
    p = build(events)
    assert len(p["affinity"]) == MAX_CATEGORIES
    assert set(p["affinity"]) == {f"c{i:02d}" for i in range(40, 60)}
    assert summary(p, now=T0)["top_category"] == "c59"
    fv = feature_vector(p, now=T0)
    assert fv["n_categories"] == MAX_CATEGORIES
    assert fv["top_category_share"] == pytest.approx(60 / sum(range(41, 61)))


# --------------------------------------------------------------------------- outputs


def test_summary_and_features_deterministic_types_no_wall_clock(monkeypatch) -> None:
    p = build(random_events(random.Random(11), 400))

    def boom(*_a: Any, **_k: Any) -> float:
        raise AssertionError("wall clock used")

    monkeypatch.setattr(time, "time", boom)
    monkeypatch.setattr(time, "time_ns", boom)
    monkeypatch.setattr(time, "monotonic", boom)
    now = T0 + 30 * DAY
    p2 = build(random_events(random.Random(11), 400))  # apply_event without the clock
    assert p2 == p
    s1, s2 = summary(p, now=now), summary(p, now=now)
    assert s1 == s2
    assert list(s1) == [
        "user_id", "events", "orders", "revenue", "recency_days", "days_since_seen",
        "cart_items", "cart_value", "checkout_started", "email_delivered", "email_opened",
        "email_clicked", "unsubscribed", "consent_email", "consent_advertising",
        "top_category", "first_seen", "last_seen", "updated_at",
    ]
    assert all(type(v) is str for v in s1.values())
    assert s1["updated_at"].endswith("Z")
    parsed = datetime.fromisoformat(s1["updated_at"].replace("Z", "+00:00"))
    assert parsed.timestamp() == pytest.approx(p["last_seen"], abs=1e-3)
    f1, f2 = feature_vector(p, now=now), feature_vector(p, now=now)
    assert f1 == f2
    assert tuple(f1) == FEATURE_NAMES
    assert all(type(v) is float and math.isfinite(v) for v in f1.values())
    # An empty profile works too, and "now" before the events never gives negative ages.
    empty = new_profile("u-2")
    fe = feature_vector(empty, now=T0)
    assert tuple(fe) == FEATURE_NAMES and all(math.isfinite(v) for v in fe.values())
    se = summary(empty, now=T0)
    assert se["updated_at"] == "" and se["first_seen"] == "" and se["top_category"] == ""
    assert all(v >= 0 for v in feature_vector(p, now=T0 - 10 * DAY).values())


# --------------------------------------------------------------------------- randomized

_NAMES = (PRODUCT_VIEWED, PRODUCT_ADDED, PRODUCT_REMOVED, CART_VIEWED, CHECKOUT_STARTED,
          ORDER_COMPLETED, ORDER_REFUNDED, EMAIL_DELIVERED, EMAIL_OPENED, EMAIL_LINK_CLICKED,
          EMAIL_BOUNCED, UNSUBSCRIBED, OFFER_VIEWED, OFFER_CLICKED)
_WEIRD = (None, "abc", -3, 0, math.inf, math.nan, True, "2.5", 1e30)


def _maybe(rng: random.Random, good: Any) -> Any:
    return rng.choice(_WEIRD) if rng.random() < 0.1 else good


def random_events(rng: random.Random, n: int, *, t0: float = T0) -> list[Event]:
    out: list[Event] = []
    for i in range(n):
        ts = t0 + i * 60 + rng.uniform(-3600, 3600)  # jittered: plenty of late events
        if rng.random() < 0.05:
            out.append(ev("", ts, type=rng.choice(("page", "screen", "identify"))))
            continue
        name = rng.choice(_NAMES)
        pid = f"p{rng.randrange(30)}"
        cat = f"cat{rng.randrange(30)}"
        props: dict[str, Any]
        if name in (ORDER_COMPLETED, ORDER_REFUNDED):
            products = [
                {"product_id": f"p{rng.randrange(30)}", "price": _maybe(rng, rng.uniform(1, 99)),
                 "quantity": _maybe(rng, rng.randint(1, 3)), "category": cat}
                for _ in range(rng.randint(0, 3))
            ]
            props = {"products": products}
            r = rng.random()
            if r < 0.4:
                props["revenue"] = _maybe(rng, round(rng.uniform(1, 300), 2))
            elif r < 0.7:
                props["total"] = _maybe(rng, round(rng.uniform(1, 300), 2))
        else:
            props = {"product_id": _maybe(rng, pid), "price": _maybe(rng, rng.uniform(1, 99)),
                     "quantity": _maybe(rng, rng.randint(1, 4)), "category": _maybe(rng, cat)}
        consent = None
        if rng.random() < 0.05:
            consent = {"email": rng.random() < 0.5, "advertising": rng.random() < 0.5}
        out.append(ev(name, ts, props, consent=consent))
    return out


def test_randomized_invariants() -> None:
    rng = random.Random(20240601)
    events = random_events(rng, 2000)
    p = new_profile("u-1")
    max_ts = -math.inf
    for i, e in enumerate(events):
        apply_event(p, e)
        max_ts = max(max_ts, e["ts"])
        assert p["cart_value"] >= 0 and p["revenue"] >= 0
        assert p["last_seen"] == max_ts
        assert len(p["cart"]) <= MAX_CART_LINES and len(p["affinity"]) <= MAX_CATEGORIES
        assert all(line["qty"] > 0 and line["price"] >= 0 for line in p["cart"].values())
        assert all(math.isfinite(v) and v >= 0 for v in p["affinity"].values())
        if i % 97 == 0:
            fv = feature_vector(p, now=max_ts)
            assert all(math.isfinite(v) for v in fv.values())
            assert all(type(v) is str for v in summary(p, now=max_ts).values())
    for key in ("events", "views", "pages", "orders", "refunds", "email_delivered",
                "email_opened", "email_clicked", "email_bounced", "offers_viewed",
                "offers_clicked"):
        assert type(p[key]) is int and p[key] >= 0, key
    assert p["events"] == 2000
    assert p["cart_value"] == round(sum(x["price"] * x["qty"] for x in p["cart"].values()), 2)
    assert math.isfinite(p["revenue"])
    assert orjson.loads(orjson.dumps(p)) == p


def test_module_exports() -> None:
    assert set(F.__all__) <= set(dir(F))
