"""The engine's decisions without a broker: offers publication rules and abandoned carts."""

from __future__ import annotations

import orjson

from connectors.segment import parse_event
from models import profile_codec
from models.config import load_config
from models.features import feature_vector
from models.lead import LeadModel
from streams.clock import TimerIndex
from streams.engine import Engine, EngineOptions, Outputs, now_for
from streams.ingest import Record, ingest_batch

T0 = 1_700_000_000.0


def event(user: str, name: str, n: int, ts: float, **properties: object) -> bytes:
    return orjson.dumps(
        {
            "type": "track",
            "event": name,
            "userId": user,
            "messageId": f"{user}-{n}",
            "timestamp": ts,
            "properties": properties,
            "context": {"consent": {"categoryPreferences": {"email": True, "advertising": True}}},
        }
    )


def run(engine: Engine, values: list[bytes]) -> tuple[dict, list]:
    changed, out = run_outputs(engine, values)
    return changed, out.emissions


def run_outputs(engine: Engine, values: list[bytes]) -> tuple[dict, Outputs]:
    records = [Record("clickstream", 0, i, None, v) for i, v in enumerate(values)]
    result = ingest_batch(records, lambda _: None, now=T0 + 1e6, after_event=engine.after_event)
    now = max(result.max_ts.values())
    out = engine.score(result.changed, {u: now_for(p, now) for u, p in result.changed.items()})
    return result.changed, out


def shopper(user: str) -> list[bytes]:
    return [
        event(user, "Product Viewed", 1, T0, product_id="p1", price=30.0, category="shoes"),
        event(user, "Product Added", 2, T0 + 60, product_id="p1", price=30.0, category="shoes"),
    ]


def test_ad_offers_carry_a_pseudonymous_id_and_skip_the_holdout() -> None:
    engine = Engine(load_config(None), EngineOptions(consent_default=False, holdout_share=0.5))
    users = [f"user-{i}" for i in range(40)]
    holdout = {u for u in users if engine.policy.in_holdout(u)}
    assert 0 < len(holdout) < len(users)
    _, out = run_outputs(engine, [v for u in users for v in shopper(u)])
    offers = [e.payload for e in out.emissions if e.kind == "offers"]
    assert out.suppressed[("offer", "holdout")] > 0, "holdout users' ad offers are held back"
    assert offers, "some bandit users should get an ad offer"
    raw_ids = set(users)
    for offer in offers:
        assert offer["pseudonymous_id"] not in raw_ids
        assert offer["policy"] == "bandit"
        assert not any(u.encode() in orjson.dumps(offer) for u in users)


def test_no_ad_offer_without_advertising_consent() -> None:
    engine = Engine(load_config(None), EngineOptions(consent_default=False, holdout_share=0.0))
    values = [orjson.dumps({**orjson.loads(v), "context": {}}) for v in shopper("no-consent-user")]
    _, emissions = run(engine, values)
    assert not [e for e in emissions if e.kind == "offers"]


def test_abandoned_cart_fires_once_when_the_watermark_passes_the_deadline() -> None:
    engine = Engine(load_config(None), EngineOptions(consent_default=False))
    changed, _ = run(engine, shopper("cart-user"))
    profile = changed["cart-user"]
    deadline = engine.next_due(profile)
    assert deadline is not None
    assert not engine.on_due("cart-user", profile, deadline - 1).emissions
    fired = engine.on_due("cart-user", profile, T0 + 3600).emissions
    carts = [e.payload for e in fired if e.kind == "abandoned_cart"]
    assert len(carts) == 1 and carts[0]["cart_value"] == 30.0
    assert not [e for e in engine.on_due("cart-user", profile, T0 + 7200).emissions
                if e.kind == "abandoned_cart"]  # fmt: skip
    assert parse_event(shopper("x")[0], now=T0) is not None


def test_run_due_fires_due_profiles_within_the_limit_and_reschedules_stale_entries() -> None:
    engine = Engine(load_config(None), EngineOptions(consent_default=False))
    changed, _ = run(engine, shopper("a") + shopper("b") + shopper("c"))
    table = {user.encode(): profile_codec.encode(profile) for user, profile in changed.items()}
    deadline = engine.next_due(changed["a"])
    assert deadline is not None
    timers = TimerIndex()
    for user in (b"a", b"b", b"c"):
        timers.schedule(0, deadline, user)
    timers.schedule(0, deadline - 100.0, b"a")  # stale: a's deadline moved on since

    early, touched = engine.run_due(timers, 0, deadline - 1.0, {}, table.get, limit=2)
    assert touched == [] and not early.emissions
    assert timers.due_count(0, deadline + 1.0) == 3  # the stale one is back, at the deadline

    fired, touched = engine.run_due(timers, 0, T0 + 3600, {}, table.get, limit=2)
    assert [user for user, _ in touched] == ["a", "b"]
    assert len([e for e in fired.emissions if e.kind == "abandoned_cart"]) == 2
    rest, touched = engine.run_due(timers, 0, T0 + 3600, {}, table.get, limit=2)
    assert [user for user, _ in touched] == ["c"] and len(rest.emissions) == 1
    assert not timers.has_due(0, T0 + 3600)


def test_scores_are_explained_by_the_served_lead_model() -> None:
    """Each scored profile's Redis fields carry its lead score and the top three contributions
    to it, as the served model explains that profile's features; none before it learned."""
    engine = Engine(load_config(None))
    users = [f"user-{i}" for i in range(30)]
    values = [  # users differ, so an explanation given to the wrong user would show
        event(u, "Product Added", 1, T0 + i, product_id="p1", price=5.0 + 7 * i, quantity=1 + i % 4)
        for i, u in enumerate(users)
    ] + [event(u, "Email Opened", 2, T0 + 60) for u in users[::2]]
    _, untrained = run_outputs(engine, values)
    assert {f["lead_explanation"] for f in untrained.redis_fields.values()} == {"[]"}

    changed, _ = run_outputs(Engine(load_config(None)), values)
    now = T0 + 60
    vectors = {u: feature_vector(p, now=now_for(p, now)) for u, p in changed.items()}
    model = LeadModel()
    model.learn_many(list(vectors.values()), [i % 3 == 0 for i in range(len(vectors))])
    engine = Engine(load_config(None))
    engine.swap("lead", model)
    _, out = run_outputs(engine, values)
    assert set(out.redis_fields) == set(users)
    for user, fields in out.redis_fields.items():
        expected = [
            {"feature": name, "contribution": round(c, 4)}
            for name, c in model.explain(vectors[user], top_k=3)
        ]
        assert orjson.loads(fields["lead_explanation"]) == expected, user
        assert len(expected) == 3
        assert float(fields["lead_score"]) == round(model.predict_one(vectors[user]), 4)
