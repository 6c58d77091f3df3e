"""Unit tests for models.segments: rule segments, learned clusters and change records."""

from __future__ import annotations

import copy
import itertools
import math
import time
import tomllib
from collections import Counter
from typing import Any

import numpy as np
import orjson
import pytest

from connectors.segment import parse_event
from connectors.simulator import SHOPPER_TYPES, ShopperSimulator
from models.events import (
    EMAIL_DELIVERED,
    EMAIL_OPENED,
    ORDER_COMPLETED,
    PRODUCT_ADDED,
    PRODUCT_VIEWED,
    UNSUBSCRIBED,
    Event,
)
from models.features import FEATURE_NAMES, apply_event, feature_vector, new_profile
from models.segments import (
    CLUSTER_FEATURES,
    DEFAULT_CONFIG_PATH,
    ProfileClusters,
    RuleSegmenter,
    SegmentConfigError,
    adjusted_rand_index,
    purity,
)

T0 = 1_700_000_000.0
DAY = 86400.0
HOUR = 3600.0
_ids = itertools.count()


def ev(name: str, ts: float, user: str = "u-1", **props: Any) -> Event:
    return Event(
        message_id=f"m-{next(_ids)}",
        user_id=user,
        type="track",
        event=name,
        ts=ts,
        properties=props,
        traits={},
        consent=None,
    )


def build(*events: Event, user: str = "u-1") -> dict[str, Any]:
    p = new_profile(user)
    for e in events:
        apply_event(p, e)
    return p


def order(ts: float, total: float) -> Event:
    return ev(ORDER_COMPLETED, ts, total=total, products=[{"product_id": "p1", "price": total}])


def views(start: float, n: int, step: float = HOUR) -> list[Event]:
    return [
        ev(PRODUCT_VIEWED, start + i * step, product_id=f"p{i}", category="shoes") for i in range(n)
    ]


def emails(start: float, delivered: int, opened: int) -> list[Event]:
    out = []
    for i in range(delivered):
        out.append(ev(EMAIL_DELIVERED, start + i * DAY, email_id=f"e{i}"))
        if i < opened:
            out.append(ev(EMAIL_OPENED, start + i * DAY + HOUR, email_id=f"e{i}"))
    return out


@pytest.fixture(scope="module")
def default_config() -> dict[str, Any]:
    return tomllib.loads(DEFAULT_CONFIG_PATH.read_text())


@pytest.fixture(scope="module")
def segmenter(default_config: dict[str, Any]) -> RuleSegmenter:
    return RuleSegmenter.from_config(default_config)


# --------------------------------------------------------------------------- rules


def _default_profiles() -> dict[str, tuple[dict[str, Any], float]]:
    """One hand-built profile per default segment, with the event time to assess it at."""
    now = T0 + 40 * DAY
    vip = build(*(order(T0 + 30 * DAY + i * DAY, 150.0) for i in range(6)))
    at_risk = build(order(T0, 80.0))
    cart = build(
        *views(now - 3 * HOUR, 2),
        ev(PRODUCT_ADDED, now - 2 * HOUR, product_id="p1", price=30.0, quantity=2),
    )
    new = build(*views(now - 2 * DAY, 3))
    window = build(*views(T0, 25, step=DAY))
    reader = build(*views(T0, 2), *emails(T0, 4, 3))
    other = build(*views(T0, 3))
    return {
        "vip": (vip, now),
        "at_risk": (at_risk, T0 + 50 * DAY),
        "cart_abandoner": (cart, now),
        "new": (new, now),
        "window_shopper": (window, now),
        "engaged_reader": (reader, now),
        "other": (other, now),
    }


@pytest.mark.parametrize("expected", list(_default_profiles()))
def test_each_default_segment_matches_its_profile(segmenter: RuleSegmenter, expected: str) -> None:
    profile, now = _default_profiles()[expected]
    segment, reason = segmenter.assign(profile, now=now)
    assert segment == expected, reason
    assert reason


def test_reasons_name_the_conditions(segmenter: RuleSegmenter) -> None:
    profiles = _default_profiles()

    def reason(name: str) -> tuple[str, str]:
        profile, now = profiles[name]
        return segmenter.assign(profile, now=now)

    assert reason("vip") == ("vip", "orders>=5 and revenue>=500 and recency_days<=90")
    assert reason("new") == ("new", "never_ordered and days_since_first_seen<=14")
    assert reason("engaged_reader")[1] == (
        "not unsubscribed and emails_delivered>=3 and email_open_rate>=0.5"
    )
    assert reason("other") == ("other", "no rule matched")


def test_now_is_keyword_only(segmenter: RuleSegmenter) -> None:
    profile, now = _default_profiles()["cart_abandoner"]
    with pytest.raises(TypeError):
        segmenter.assign(profile, now)  # type: ignore[misc]
    assert segmenter.assign(profile, now=now)[0] == "cart_abandoner"


def test_rules_use_event_time_only(segmenter: RuleSegmenter) -> None:
    profile, _ = _default_profiles()["cart_abandoner"]
    last = profile["cart_updated_at"]
    assert segmenter.assign(profile, now=last + 30 * 60)[0] == "new"  # cart 30 min old
    assert segmenter.assign(profile, now=last + 2 * HOUR)[0] == "cart_abandoner"
    reader = _default_profiles()["engaged_reader"][0]
    apply_event(reader, ev(UNSUBSCRIBED, T0 + 10 * DAY))
    assert segmenter.assign(reader, now=T0 + 40 * DAY)[0] == "other"


def test_unknown_quantities_never_satisfy_bounds(segmenter: RuleSegmenter) -> None:
    empty = new_profile("u-0")
    assert segmenter.assign(empty, now=T0) == ("other", "no rule matched")
    cfg = {"segments": {"rules": [{"name": "lapsed", "description": "", "recency_days_min": 0}]}}
    seg = RuleSegmenter.from_config(cfg)
    assert seg.assign(empty, now=T0)[0] == "other"  # never ordered: recency unknown
    assert seg.assign(build(order(T0, 10.0)), now=T0)[0] == "lapsed"


def test_precedence_first_matching_rule_wins(
    segmenter: RuleSegmenter, default_config: dict[str, Any]
) -> None:
    vip, now = _default_profiles()["vip"]
    apply_event(vip, ev(PRODUCT_ADDED, now - 3 * HOUR, product_id="p9", price=20.0))
    assert vip["cart"]  # now matches vip AND cart_abandoner
    assert segmenter.assign(vip, now=now)[0] == "vip"
    cfg = copy.deepcopy(default_config)
    rules = cfg["segments"]["rules"]
    cart = next(r for r in rules if r["name"] == "cart_abandoner")
    rules.remove(cart)
    rules.insert(0, cart)
    assert RuleSegmenter.from_config(cfg).assign(vip, now=now)[0] == "cart_abandoner"
    # new vs window_shopper: a brand-new heavy browser is "new" (it comes first).
    fresh = build(*views(now - DAY, 30, step=60.0))
    assert segmenter.assign(fresh, now=now)[0] == "new"
    assert segmenter.assign(fresh, now=now + 20 * DAY)[0] == "window_shopper"


def test_custom_config() -> None:
    cfg = tomllib.loads(
        """
        [segments]
        fallback = "everyone_else"
        fallback_description = "The rest."

        [[segments.rules]]
        name = "whale"
        description = "Big spenders."
        revenue_min = 1000
        revenue_max = 1e9

        [[segments.rules]]
        name = "lost"
        description = "Unsubscribed and quiet for a week."
        unsubscribed = true
        days_since_seen_min = 7.0

        [[segments.rules]]
        name = "small_carts"
        description = "A cart under 50 with 1-2 items."
        cart_value_max = 50
        cart_items_min = 1
        cart_items_max = 2
        """
    )
    seg = RuleSegmenter.from_config(cfg)
    assert seg.assign(build(order(T0, 1500.0)), now=T0 + DAY) == (
        "whale",
        "revenue>=1000 and revenue<=1e+09",
    )
    lost = build(*views(T0, 2), ev(UNSUBSCRIBED, T0 + HOUR))
    assert seg.assign(lost, now=T0 + 3 * DAY)[0] == "everyone_else"
    assert seg.assign(lost, now=T0 + 8 * DAY) == ("lost", "unsubscribed and days_since_seen>=7")
    cart = build(ev(PRODUCT_ADDED, T0, product_id="p1", price=20.0, quantity=2))
    assert seg.assign(cart, now=T0)[0] == "small_carts"
    apply_event(cart, ev(PRODUCT_ADDED, T0 + 1, product_id="p2", price=1.0))
    assert seg.assign(cart, now=T0)[0] == "everyone_else"  # 3 items

    defs = seg.definitions()
    assert [d["name"] for d in defs] == ["whale", "lost", "small_carts", "everyone_else"]
    assert [d["precedence"] for d in defs] == [0, 1, 2, 3]
    assert defs[0]["conditions"] == {"revenue_min": 1000, "revenue_max": 1e9}
    assert defs[-1] == {
        "name": "everyone_else",
        "description": "The rest.",
        "precedence": 3,
        "conditions": {},
        "reason": "no rule matched",
        "fallback": True,
    }
    orjson.dumps(defs)  # JSON-ready for the API


def test_rule_without_conditions_matches_everyone() -> None:
    cfg = {"segments": {"rules": [{"name": "all", "description": "catch-all"}]}}
    assert RuleSegmenter.from_config(cfg).assign(new_profile("u"), now=T0) == ("all", "always")


def test_default_definitions(segmenter: RuleSegmenter) -> None:
    names = [d["name"] for d in segmenter.definitions()]
    assert names == [
        "vip",
        "at_risk",
        "cart_abandoner",
        "new",
        "window_shopper",
        "engaged_reader",
        "other",
    ]
    assert all(d["description"] for d in segmenter.definitions())


def _rule(**kw: Any) -> dict[str, Any]:
    return {"segments": {"rules": [{"name": "vip", "description": "d", **kw}]}}


@pytest.mark.parametrize(
    ("cfg", "needles"),
    [
        (_rule(order_min=1), ["rules[0]", "'vip'", "order_min", "unknown quantity"]),
        (_rule(orders=1), ["'vip'", "'orders'", "orders_min"]),
        (_rule(never_ordered_min=1), ["'vip'", "never_ordered_min", "flag"]),
        (_rule(colour="red"), ["'vip'", "'colour'"]),
        (_rule(orders_min="5"), ["'vip'", "orders_min", "number", "str"]),
        (_rule(orders_min=True), ["'vip'", "orders_min", "number", "bool"]),
        (_rule(revenue_max=math.inf), ["'vip'", "revenue_max", "finite"]),
        (_rule(unsubscribed=1), ["'vip'", "unsubscribed", "true or false", "int"]),
        (_rule(orders_min=5, orders_max=2), ["'vip'", "orders_min", "orders_max"]),
        (_rule(description=3), ["'vip'", "description"]),
        (
            {
                "segments": {
                    "rules": [
                        {"name": "vip", "description": "a"},
                        {"name": "vip", "description": "b"},
                    ]
                }
            },
            ["rules[1]", "'vip'", "'name'", "duplicates", "rules[0]"],
        ),
        ({"segments": {"rules": [{"description": "x"}]}}, ["rules[0]", "'name'"]),
        ({"segments": {"rules": [{"name": "", "description": "x"}]}}, ["rules[0]", "'name'"]),
        ({"segments": {"rules": ["vip"]}}, ["rules[0]", "table"]),
        ({"segments": {"rules": {"name": "vip"}}}, ["'rules'", "array"]),
        ({"segments": {"rulez": []}}, ["segments", "'rulez'"]),
        ({"segment": {}}, ["'segment'"]),
        ({}, ["'segments'"]),
        ({"segments": {"rules": [], "fallback": 3}}, ["'fallback'"]),
        (
            {"segments": {"fallback": "vip", "rules": [{"name": "vip", "description": ""}]}},
            ["'fallback'", "'vip'", "rules[0]"],
        ),
        ({"segments": {"fallback_description": None}}, ["fallback_description"]),
        (_rule(**{"orders_min": 1, "views\nmax": 3}), ["'vip'", "views\\nmax"]),
    ],
)
def test_config_errors_are_one_line(cfg: dict[str, Any], needles: list[str]) -> None:
    with pytest.raises(SegmentConfigError) as info:
        RuleSegmenter.from_config(cfg)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    assert isinstance(info.value, ValueError)


def test_default_config_file_is_valid_and_documented() -> None:
    text = DEFAULT_CONFIG_PATH.read_text()
    assert "PRECEDENCE" in text and "FIRST rule" in text
    cfg = tomllib.loads(text)
    assert cfg["segments"]["fallback"] == "other"
    RuleSegmenter.from_config(cfg)


# --------------------------------------------------------------------------- metrics


def test_purity_and_ari() -> None:
    truth = ["a"] * 5 + ["b"] * 5 + ["c"] * 5
    assert purity(list(range(15)), truth) == 1.0
    assert purity([0] * 15, truth) == pytest.approx(1 / 3)
    perfect = [2] * 5 + [0] * 5 + [1] * 5
    assert adjusted_rand_index(perfect, truth) == 1.0
    assert adjusted_rand_index([0] * 15, truth) == pytest.approx(0.0)
    # A known value: contingency [[2, 1], [0, 2]] (Hubert & Arabie) → 1/6.
    assert adjusted_rand_index([0, 0, 0, 1, 1], ["a", "a", "b", "b", "b"]) == pytest.approx(1 / 6)
    with pytest.raises(ValueError):
        purity([0], ["a", "b"])


# --------------------------------------------------------------------------- clusters

USERS = 1500
SEED = 11
BATCH = 250


def _simulated(users: int, seed: int) -> tuple[list[dict[str, float]], list[str]]:
    """Feature vectors at the end of a simulation and the users' true types."""
    sim = ShopperSimulator(users=users, seed=seed)
    far = sim.end + 365 * DAY  # parse_event's "now": accept every simulated timestamp
    profiles: dict[str, dict[str, Any]] = {}
    for raw in sim.events():
        event = parse_event(orjson.dumps(raw), now=far)
        assert isinstance(event, dict), event
        p = profiles.get(event["user_id"])
        if p is None:
            p = profiles[event["user_id"]] = new_profile(event["user_id"])
        apply_event(p, event)
    truth = sim.ground_truth()
    vectors = [
        feature_vector(profiles.get(g["user_id"]) or new_profile(g["user_id"]), now=sim.end)
        for g in truth
    ]
    return vectors, [g["type"] for g in truth]


@pytest.fixture(scope="module")
def simulated() -> tuple[list[dict[str, float]], list[str]]:
    return _simulated(USERS, SEED)


def _train(vectors: list[dict[str, float]], seed: int = 0) -> ProfileClusters:
    """One online pass in batches (the first init_size examples seed the clusters)."""
    model = ProfileClusters(n_clusters=len(SHOPPER_TYPES), seed=seed)
    for i in range(0, len(vectors), BATCH):
        model.learn_many(vectors[i : i + BATCH])
    return model


def test_clusters_recover_simulated_shopper_types(
    simulated: tuple[list[dict[str, float]], list[str]],
) -> None:
    vectors, types = simulated
    start = time.perf_counter()
    model = _train(vectors)
    learn_s = time.perf_counter() - start
    assert model.ready and model.n_seen == USERS
    labels = model.assign_many(vectors)
    p, ari = purity(labels, types), adjusted_rand_index(labels, types)
    print(
        f"\nclusters vs simulator types ({USERS} users, seed {SEED}): purity {p:.3f}, ARI {ari:.3f}"
    )
    print(f"  one online pass incl. init: {learn_s * 1e3:.1f} ms")
    for c in model.centroids_summary():
        members = Counter(t for t, k in zip(types, labels, strict=True) if k == c["id"])
        top = ", ".join(f"{t} {n}" for t, n in members.most_common(2))
        print(f"  {c['id']}: size {c['size']:4d}  {c['label']:<55s} [{top}]")
    assert p >= 0.8
    assert ari >= 0.6


def _scaled_centroids(model: ProfileClusters, vectors: list[dict[str, float]]) -> np.ndarray:
    """Summary centroids back on the model's log scale, divided by the data's spread."""
    logged = [log_here or src.startswith("log_") for _, src, log_here in CLUSTER_FEATURES]
    names = [name for name, _, _ in CLUSTER_FEATURES]
    rows = [
        [
            math.log1p(c["centroid"][n]) if lg else c["centroid"][n]
            for n, lg in zip(names, logged, strict=True)
        ]
        for c in model.centroids_summary()
    ]
    data = np.array(
        [
            [math.log1p(v[src]) if here else v[src] for _, src, here in CLUSTER_FEATURES]
            for v in vectors
        ]
    )
    return np.array(rows) / np.maximum(data.std(0), 1e-9)


def test_learning_more_keeps_cluster_ids(
    simulated: tuple[list[dict[str, float]], list[str]],
) -> None:
    vectors, _ = simulated
    model = _train(vectors)
    before = _scaled_centroids(model, vectors)
    labels_before = model.assign_many(vectors)
    sizes_before = [c["size"] for c in model.centroids_summary()]
    more, _ = _simulated(500, SEED + 1)  # another batch: new users, same population
    model.learn_many(more)
    after = _scaled_centroids(model, vectors)
    gaps = np.sqrt(((before[:, None, :] - before[None, :, :]) ** 2).sum(-1))
    min_gap = gaps[~np.eye(len(before), dtype=bool)].min()
    moves = np.sqrt(((after - before) ** 2).sum(-1))
    print(f"\ncentroid moves after 500 more users: max {moves.max():.3f} (min gap {min_gap:.3f})")
    for i in range(len(before)):
        nearest = int(np.sqrt(((before - after[i]) ** 2).sum(-1)).argmin())
        assert nearest == i
    assert moves.max() < 0.25 * min_gap
    agree = np.mean(np.array(model.assign_many(vectors)) == np.array(labels_before))
    assert agree >= 0.97
    summary = model.centroids_summary()
    assert [c["id"] for c in summary] == list(range(len(SHOPPER_TYPES)))
    assert sum(c["size"] for c in summary) == sum(sizes_before) + 500


def test_centroids_summary_is_readable(
    simulated: tuple[list[dict[str, float]], list[str]],
) -> None:
    vectors, _ = simulated
    summary = _train(vectors).centroids_summary()
    names = [name for name, _, _ in CLUSTER_FEATURES]
    assert sum(c["size"] for c in summary) == USERS
    for c in summary:
        assert list(c["centroid"]) == names
        assert all(math.isfinite(v) and v >= 0 for v in c["centroid"].values())
        assert c["label"] and len(c["label"]) < 80
    by_revenue = max(summary, key=lambda c: c["centroid"]["revenue"])
    assert by_revenue["id"] == 0  # ids are ordered by typical revenue at initialization
    assert "high revenue" in by_revenue["label"]
    assert any(c["label"].endswith("no orders") for c in summary)
    orjson.dumps(summary)


def test_clusters_deterministic_and_serializable(
    simulated: tuple[list[dict[str, float]], list[str]],
) -> None:
    vectors, _ = simulated
    a, b = _train(vectors, seed=3), _train(vectors, seed=3)
    assert a.to_bytes() == b.to_bytes()
    c = ProfileClusters.from_bytes(a.to_bytes())
    assert c.to_bytes() == a.to_bytes()
    assert c.assign_many(vectors) == a.assign_many(vectors)
    assert c.centroids_summary() == a.centroids_summary()
    a.learn_many(vectors[:300])
    c.learn_many(vectors[:300])
    assert c.to_bytes() == a.to_bytes()
    # Mid-initialization state (buffer and RNG) round-trips too.
    half = ProfileClusters(seed=5)
    half.learn_many(vectors[:200])
    resumed = ProfileClusters.from_bytes(half.to_bytes())
    half.learn_many(vectors[200:600])
    resumed.learn_many(vectors[200:600])
    assert resumed.to_bytes() == half.to_bytes()
    with pytest.raises(ValueError):
        ProfileClusters.from_bytes(b'{"kind": "something else"}')


def test_clusters_before_initialization() -> None:
    model = ProfileClusters(n_clusters=3, init_size=10)
    zero = dict.fromkeys(FEATURE_NAMES, 0.0)
    assert model.assign_many([zero, zero]) == [-1, -1]
    assert model.assign_one(zero) == -1
    assert model.centroids_summary() == []
    model.learn_many([])
    assert not model.ready and model.n_seen == 0
    with pytest.raises(ValueError):
        ProfileClusters(n_clusters=0)
    with pytest.raises(ValueError):
        ProfileClusters(n_clusters=6, init_size=5)
