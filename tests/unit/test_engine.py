"""The engine's decisions without a broker: offers publication rules and abandoned carts."""

from __future__ import annotations

import orjson

from connectors.segment import parse_event
from models import profile_codec
from models.config import load_config
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
    table = {user: profile_codec.encode(profile) for user, profile in changed.items()}
    deadline = engine.next_due(changed["a"])
    assert deadline is not None
    timers = TimerIndex()
    for user in ("a", "b", "c"):
        timers.schedule(0, deadline, user)
    timers.schedule(0, deadline - 100.0, "a")  # stale: a's deadline moved on since

    early, touched = engine.run_due(timers, 0, deadline - 1.0, {}, table.get, limit=2)
    assert touched == [] and not early.emissions
    assert timers.due_count(0, deadline + 1.0) == 3  # the stale one is back, at the deadline

    fired, touched = engine.run_due(timers, 0, T0 + 3600, {}, table.get, limit=2)
    assert [user for user, _ in touched] == ["a", "b"]
    assert len([e for e in fired.emissions if e.kind == "abandoned_cart"]) == 2
    rest, touched = engine.run_due(timers, 0, T0 + 3600, {}, table.get, limit=2)
    assert [user for user, _ in touched] == ["c"] and len(rest.emissions) == 1
    assert not timers.has_due(0, T0 + 3600)
