"""Unit tests for models.offers: catalog config, eligibility, caps, holdout, propensities, state."""

from __future__ import annotations

import copy
import json
import math
from collections import Counter
from typing import Any

import numpy as np
import pytest

from connectors.simulator import OFFER_IDS
from models.events import OFFER_CLICKED, ORDER_COMPLETED, PRODUCT_VIEWED
from models.features import new_profile
from models.offers import (
    CONTEXT_FEATURES,
    DEFAULT_WINDOW_S,
    MAX_PENDING,
    REASONS,
    OfferCatalog,
    OfferConfigError,
    OfferPolicy,
    attribute,
    expire,
    holdout_score,
    load_catalog,
    new_offer_state,
    offer_state,
    record,
)

T0 = 1_700_000_000.0
H = 3600.0
DIM = 1 + len(CONTEXT_FEATURES)


def catalog(*offers: dict[str, Any], **extra: Any) -> OfferCatalog:
    return OfferCatalog.from_config({"offers": list(offers), **extra})


def onsite(offer_id: str, **kw: Any) -> dict[str, Any]:
    return {"id": offer_id, "channel": "onsite", **kw}


def profile(user_id: str = "u-1", **fields: Any) -> dict[str, Any]:
    p = new_profile(user_id)
    p.update(fields)
    return p


def with_cart(p: dict[str, Any], value: float = 40.0) -> dict[str, Any]:
    p["cart"] = {"p1": {"qty": 1, "price": value}}
    p["cart_value"] = value
    p["cart_updated_at"] = T0 - 60
    return p


def ids(cat: OfferCatalog, idx: list[int]) -> list[str]:
    return [cat.ids[i] for i in idx]


# --------------------------------------------------------------------------- config


def test_default_catalog_is_the_simulator_offers_with_valid_channels() -> None:
    cat = load_catalog()
    assert cat.ids == OFFER_IDS
    assert {o.channel for o in cat.offers} <= {"email", "ads", "onsite"}
    assert cat.max_offers is not None and cat.horizon_s >= cat.window_s


@pytest.mark.parametrize(
    ("config", "names"),
    [
        ({"offers": [onsite("a", colour="red")]}, ("'a'", "colour")),
        ({"offers": [{"id": "a", "channel": "sms"}]}, ("'a'", "channel")),
        ({"offers": [onsite("a", eligibility={"min_age": 3})]}, ("'a'", "eligibility.min_age")),
        ({"offers": [onsite("a", eligibility={"has_cart": "yes"})]}, ("'a'", "has_cart")),
        ({"offers": [onsite("a", eligibility={"min_orders": -1})]}, ("'a'", "min_orders")),
        ({"offers": [onsite("a", eligibility={"min_orders": 1.5})]}, ("'a'", "min_orders")),
        ({"offers": [onsite("a", eligibility={"segment_in": []})]}, ("'a'", "segment_in")),
        (
            {"offers": [onsite("a", eligibility={"min_orders": 3, "max_orders": 1})]},
            ("'a'", "min_orders"),
        ),
        ({"offers": [onsite("a", cooldown_hours=-1)]}, ("'a'", "cooldown_hours")),
        ({"offers": [onsite("a", cooldown_hours="1h")]}, ("'a'", "cooldown_hours")),
        ({"offers": [onsite("a", frequency_cap=2)]}, ("'a'", "frequency_window_hours")),
        (
            {"offers": [onsite("a", frequency_cap=1000, frequency_window_hours=1)]},
            ("'a'", "frequency_cap"),
        ),
        ({"offers": [onsite("a"), onsite("a")]}, ("'a'", "id")),
        ({"offers": [{"channel": "onsite"}]}, ("#0", "id")),
        ({"offers": []}, ("offers",)),
        ({"offers": [onsite("a")], "extra": 1}, ("extra",)),
        ({"offers": [onsite("a")], "defaults": {"cooldown_days": 1}}, ("cooldown_days",)),
        ({"offers": [onsite("a")], "limits": {"max_offers": 3}}, ("window_hours",)),
    ],
)
def test_config_errors_are_one_line_naming_offer_and_key(
    config: dict[str, Any], names: tuple[str, ...]
) -> None:
    with pytest.raises(OfferConfigError) as info:
        OfferCatalog.from_config(config)
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message
    assert isinstance(info.value, ValueError)


def test_bad_toml_is_a_config_error(tmp_path: Any) -> None:
    path = tmp_path / "offers.toml"
    path.write_text("[[offers.catalog]\nid = 'x'\n")
    with pytest.raises(OfferConfigError, match="TOML"):
        load_catalog(path)


def test_defaults_fill_offers_and_zero_cap_means_none() -> None:
    cat = catalog(
        onsite("a"),
        onsite("b", cooldown_hours=0, frequency_cap=0),
        defaults={"cooldown_hours": 2, "frequency_cap": 3, "frequency_window_hours": 24},
    )
    a, b = cat.offers
    assert (a.cooldown_s, a.frequency_cap, a.frequency_window_s) == (2 * H, 3, 24 * H)
    assert (b.cooldown_s, b.frequency_cap) == (0.0, None)


# --------------------------------------------------------------------------- eligibility


def test_eligibility_conditions() -> None:
    cat = catalog(
        onsite("cart", eligibility={"has_cart": True, "min_cart_value": 30}),
        onsite("no_cart", eligibility={"has_cart": False}),
        onsite("repeat", eligibility={"min_orders": 2, "max_days_since_order": 30}),
        onsite("new", eligibility={"max_orders": 0}),
        onsite("lapsed", eligibility={"min_days_since_order": 60}),
        onsite("rich", eligibility={"min_revenue": 500, "max_cart_value": 100}),
        onsite("checkout", eligibility={"checkout_started": True}),
        onsite("reader", eligibility={"min_email_open_rate": 0.5}),
        onsite("vip", eligibility={"segment_in": ["vip", "loyal"]}),
    )
    p = profile()
    assert ids(cat, cat.eligible(p, now=T0)) == ["no_cart", "new", "lapsed"]
    p = with_cart(profile(orders=3, revenue=900.0, last_order_at=T0 - 10 * 86400), 35.0)
    p.update(checkout_started_at=T0 - 5, email_delivered=4, email_opened=2)
    assert ids(cat, cat.eligible(p, now=T0, segment="vip")) == [
        "cart", "repeat", "rich", "checkout", "reader", "vip",
    ]  # fmt: skip
    assert "vip" not in ids(cat, cat.eligible(p, now=T0, segment="new"))
    assert "cart" not in ids(cat, cat.eligible(with_cart(p, 20.0), now=T0))
    assert "repeat" not in ids(cat, cat.eligible(p, now=T0 + 40 * 86400))
    assert "lapsed" in ids(cat, cat.eligible(p, now=T0 + 70 * 86400))


def test_channels_need_consent_and_unsubscribed_gets_no_email() -> None:
    cat = catalog(
        {"id": "mail", "channel": "email"},
        {"id": "ad", "channel": "ads"},
        onsite("site"),
    )
    p = profile()
    assert ids(cat, cat.eligible(p, now=T0)) == ["site"]
    assert ids(cat, cat.eligible(p, now=T0, consent_default=True)) == ["mail", "ad", "site"]
    p["consent"] = {"email": True, "advertising": False}
    assert ids(cat, cat.eligible(p, now=T0, consent_default=True)) == ["mail", "site"]
    p["unsubscribed"] = True
    assert ids(cat, cat.eligible(p, now=T0, consent_default=True)) == ["site"]
    policy = OfferPolicy(cat, holdout_share=0.0)
    assert policy.decide(p, now=T0)["offer_id"] == "site"


def _decision(policy: OfferPolicy, p: dict[str, Any], ts: float) -> dict[str, Any]:
    d = policy.decide(p, now=ts)
    record(offer_state(p), d)
    return d


def test_cooldown_blocks_the_same_offer_only() -> None:
    cat = catalog(onsite("a", cooldown_hours=24), onsite("b"))
    policy = OfferPolicy(cat, holdout_share=0.0)
    p = profile()
    record(offer_state(p), {**policy.decide(p, now=T0), "offer_id": "a"})
    assert ids(cat, cat.eligible(p, now=T0 + 23 * H)) == ["b"]
    assert ids(cat, cat.eligible(p, now=T0 + 24 * H + 1)) == ["a", "b"]
    d = policy.decide(p, now=T0 + H)
    assert (d["offer_id"], d["reason"], d["propensity"]) == ("b", "only_eligible", 1.0)


def test_frequency_cap_per_offer_and_catalog_limit() -> None:
    cat = catalog(onsite("a", frequency_cap=2, frequency_window_hours=48), onsite("b"))
    p = profile()
    state = offer_state(p)
    base = {"channel": "onsite", "reason": "exploit", "policy": "bandit", "propensity": 0.5,
            "score": 0.0, "model_version": 0, "context": [1.0] * DIM}  # fmt: skip
    for k, ts in enumerate((T0, T0 + 10 * H)):
        record(state, {**base, "decision_id": f"d{k}", "offer_id": "a", "ts": ts})
    assert ids(cat, cat.eligible(p, now=T0 + 20 * H)) == ["b"]
    assert ids(cat, cat.eligible(p, now=T0 + 49 * H)) == ["a", "b"]  # first one left the window
    limited = catalog(onsite("a"), onsite("b"), limits={"max_offers": 2, "window_hours": 24})
    assert limited.eligible(p, now=T0 + 20 * H) == []
    assert limited.eligible(p, now=T0 + 35 * H) == [0, 1]
    d = OfferPolicy(limited).decide(p, now=T0 + 20 * H)
    assert (d["offer_id"], d["reason"], d["propensity"]) == (None, "none_eligible", 1.0)


# --------------------------------------------------------------------------- holdout


def test_holdout_is_about_five_percent_deterministic_and_salted() -> None:
    cat = catalog(onsite("a"), onsite("b"))
    policy = OfferPolicy(cat)
    users = [f"user-{i}" for i in range(20_000)]
    group = [policy.in_holdout(u) for u in users]
    share = sum(group) / len(users)
    assert 0.045 < share < 0.055
    assert group == [OfferPolicy(cat).in_holdout(u) for u in users]
    other = [OfferPolicy(cat, holdout_salt="other").in_holdout(u) for u in users]
    assert other != group and 0.045 < sum(other) / len(users) < 0.055
    assert all(0.0 <= holdout_score(u, "s") < 1.0 for u in users[:100])


def test_holdout_gets_uniform_control_decisions() -> None:
    cat = catalog(onsite("a"), onsite("b"), onsite("c"), onsite("d"))
    policy = OfferPolicy(cat)
    for _k in range(300):  # make "a" clearly best for the bandit
        policy.update([1.0] + [0.0] * (DIM - 1), "a", 1.0)
        policy.update([1.0] + [0.0] * (DIM - 1), "b", 0.0)
    user = next(u for u in (f"u{i}" for i in range(1000)) if policy.in_holdout(u))
    p = profile(user)
    decisions = [policy.decide(p, now=T0 + k) for k in range(4000)]
    assert {(d["policy"], d["reason"], d["propensity"]) for d in decisions} == {
        ("control", "holdout", 0.25)
    }
    counts = Counter(d["offer_id"] for d in decisions)
    assert set(counts) == {"a", "b", "c", "d"}
    assert all(abs(c / 4000 - 0.25) < 0.03 for c in counts.values())


# --------------------------------------------------------------------------- propensities


def trained_policy(**kw: Any) -> tuple[OfferCatalog, OfferPolicy]:
    cat = catalog(onsite("a"), onsite("b"), onsite("c"))
    policy = OfferPolicy(cat, holdout_share=0.0, **kw)
    rng = np.random.default_rng(0)
    x = np.zeros((600, DIM))
    x[:, 0] = 1.0
    x[:, 1:] = rng.random((600, DIM - 1))
    arms = rng.integers(0, 3, 600)
    rewards = (rng.random(600) < np.array([0.3, 0.25, 0.05])[arms]).astype(float)
    policy.update_many(x, arms, rewards)
    return cat, policy


def test_propensities_are_exact_and_sum_to_one() -> None:
    cat, policy = trained_policy(temperature=0.05, epsilon=0.1)
    p = profile("u-x")
    decisions = [policy.decide(p, now=T0 + k) for k in range(6000)]
    x = np.array([decisions[0]["context"]])
    probs = policy.probabilities_many(policy.ucb_many(x)[1])[0]
    assert math.isclose(probs.sum(), 1.0)
    assert probs.min() >= 0.1 / 3 - 1e-12  # the epsilon floor
    for d in decisions[:50]:
        assert math.isclose(d["propensity"], probs[cat.index[d["offer_id"]]], rel_tol=1e-9)
    counts = Counter(d["offer_id"] for d in decisions)
    for offer_id, c in counts.items():
        pk = probs[cat.index[offer_id]]
        assert abs(c / 6000 - pk) < 4 * math.sqrt(pk * (1 - pk) / 6000) + 1e-3
    reasons = Counter(d["reason"] for d in decisions)
    assert set(reasons) == {"exploit", "explore"}
    best = cat.ids[int(np.argmax(policy.ucb_many(x)[1][0]))]
    assert all((d["reason"] == "exploit") == (d["offer_id"] == best) for d in decisions)


def test_eligible_subset_renormalizes_and_greedy_is_allowed() -> None:
    _cat, policy = trained_policy(temperature=0.0, epsilon=0.0)
    ucb = policy.ucb_many(np.ones((2, DIM)))[1]
    mask = np.array([[True, True, True], [False, True, True]])
    probs = policy.probabilities_many(ucb, mask)
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert probs[1, 0] == 0.0
    assert sorted(probs[0]) == [0.0, 0.0, 1.0]
    assert set(REASONS) == {"exploit", "explore", "holdout", "only_eligible", "none_eligible"}


def test_decisions_are_deterministic_and_survive_serialization() -> None:
    _cat, policy = trained_policy(temperature=0.05)
    users = [with_cart(profile(f"u{i}", orders=i % 3, revenue=50.0 * i)) for i in range(200)]
    batch = policy.decide_many(users, now=T0)
    single = [policy.decide(u, now=T0) for u in users]
    for a, b in zip(batch, single, strict=True):
        assert (a["offer_id"], a["reason"], a["decision_id"]) == (
            b["offer_id"], b["reason"], b["decision_id"],
        )  # fmt: skip
        assert math.isclose(a["propensity"], b["propensity"], rel_tol=1e-9)
    restored = OfferPolicy.from_bytes(policy.to_bytes())
    again = restored.decide_many(users, now=T0)
    assert [d["offer_id"] for d in again] == [d["offer_id"] for d in batch]
    assert restored.version == policy.version == 600
    assert restored.counts() == policy.counts()
    other_seed = OfferPolicy.from_bytes(policy.to_bytes())
    other_seed.seed = 1
    assert [d["offer_id"] for d in other_seed.decide_many(users, now=T0)] != [
        d["offer_id"] for d in batch
    ]
    json.dumps(batch)  # decisions are JSON-serializable


def test_from_bytes_with_a_new_catalog_keeps_learning_by_offer_id() -> None:
    _cat, policy = trained_policy()
    new = catalog(onsite("c"), onsite("z"), onsite("a"))
    restored = OfferPolicy.from_bytes(policy.to_bytes(), catalog=new)
    assert restored.counts() == {"c": policy.counts()["c"], "z": 0, "a": policy.counts()["a"]}
    x = np.ones((1, DIM))
    assert np.allclose(restored.ucb_many(x)[0][0, [0, 2]], policy.ucb_many(x)[0][0, [2, 0]])


def test_sherman_morrison_updates_match_exact_ridge_and_batches() -> None:
    cat = catalog(onsite("a"), onsite("b"))
    rng = np.random.default_rng(1)
    x = rng.random((300, DIM))
    arms = rng.integers(0, 2, 300)
    r = rng.random(300)
    seq = OfferPolicy(cat, ridge=2.0, refresh_every=10_000)
    for xi, ai, ri in zip(x, arms, r, strict=True):
        seq.update(xi, int(ai), float(ri))
    batch = OfferPolicy(cat, ridge=2.0)
    batch.update_many(x, [cat.ids[a] for a in arms], r)
    for k in range(2):
        xs, rs = x[arms == k], r[arms == k]
        exact = np.linalg.solve(xs.T @ xs + 2.0 * np.eye(DIM), xs.T @ rs)
        assert np.allclose(seq._theta[k], exact, atol=1e-8)
        assert np.allclose(batch._theta[k], exact, atol=1e-10)
    seq.update(x[0], "unknown-offer", 1.0)  # ignored
    assert seq.version == 300


# --------------------------------------------------------------------------- state & rewards


def _d(did: str, offer_id: str, ts: float) -> dict[str, Any]:
    return {"decision_id": did, "offer_id": offer_id, "channel": "onsite", "ts": ts,
            "reason": "exploit", "policy": "bandit", "propensity": 0.8, "score": 0.1,
            "model_version": 3, "context": [1.0, 0.5]}  # fmt: skip


def test_purchase_pays_the_latest_pending_decision_in_the_window() -> None:
    state = new_offer_state()
    assert record(state, _d("d1", "a", T0)) == []
    record(state, _d("d2", "b", T0 + H))
    record(state, _d("d2", "b", T0 + H))  # idempotent
    assert len(state["pending"]) == 2 and len(state["history"]) == 2
    assert attribute(state, PRODUCT_VIEWED, T0 + 2 * H) == []
    assert attribute(state, ORDER_COMPLETED, T0 - 1) == []  # before any decision
    [ex] = attribute(state, ORDER_COMPLETED, T0 + 2 * H)
    assert (ex["decision_id"], ex["offer_id"], ex["reward"], ex["propensity"]) == (
        "d2", "b", 1.0, 0.8,
    )  # fmt: skip
    assert ex["context"] == [1.0, 0.5] and ex["decided_at"] == T0 + H
    assert attribute(state, ORDER_COMPLETED, T0 + DEFAULT_WINDOW_S + 1) == []  # d1 too old
    [zero] = expire(state, T0 + DEFAULT_WINDOW_S)
    assert (zero["decision_id"], zero["reward"]) == ("d1", 0.0)
    assert state["pending"] == [] and expire(state, T0 + 10 * DEFAULT_WINDOW_S) == []
    assert state["last"]["decision_id"] == "d2"
    json.dumps(state)


def test_click_pays_its_offer_and_window_is_configurable() -> None:
    state = new_offer_state()
    record(state, _d("d1", "a", T0))
    record(state, _d("d2", "b", T0 + 60))
    [ex] = attribute(state, OFFER_CLICKED, T0 + 120, offer_id="a")
    assert ex["decision_id"] == "d1"
    assert attribute(state, OFFER_CLICKED, T0 + 2 * H, window_s=H) == []
    assert expire(state, T0 + 2 * H, window_s=3 * H) == []
    assert [e["decision_id"] for e in expire(state, T0 + 2 * H, window_s=H)] == ["d2"]


def test_pending_and_history_are_bounded() -> None:
    state = new_offer_state()
    evicted = []
    for k in range(MAX_PENDING + 5):
        evicted += record(state, _d(f"d{k}", "a", T0 + k))
    assert len(state["pending"]) == MAX_PENDING
    assert [e["decision_id"] for e in evicted] == [f"d{k}" for k in range(5)]
    assert all(e["reward"] == 0.0 for e in evicted)
    for k in range(200):
        record(state, _d(f"h{k}", "a", T0 + 1000 + k))
    assert len(state["history"]) == 100
    record(state, _d("late", "a", T0 + 90 * 86400))
    assert [h[1] for h in state["history"]] == [T0 + 90 * 86400]  # older than horizon: dropped


def test_decide_does_not_mutate_the_profile_and_state_roundtrips_json() -> None:
    cat = load_catalog()
    policy = OfferPolicy(cat, consent_default=True)
    p = with_cart(profile("u-7", orders=3, revenue=300.0, last_order_at=T0 - 86400))
    before = copy.deepcopy(p)
    d = policy.decide(p, now=T0)
    assert p == before
    assert d["offer_id"] in d["eligible"] and d["channel"] in {"email", "ads", "onsite"}
    record(offer_state(p), d)
    assert json.loads(json.dumps(p)) == p
    assert d["offer_id"] not in ids(cat, cat.eligible(p, now=T0 + H, consent_default=True))
