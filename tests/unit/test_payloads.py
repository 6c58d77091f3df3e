"""Unit tests for connectors.payloads: every builder's output validates against its JSON Schema."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from models.events import iso_utc

jsonschema = pytest.importorskip("jsonschema")

from connectors.payloads import (  # noqa: E402
    SCHEMA_VERSION,
    abandoned_cart_payload,
    hot_lead_payload,
    offer_payload,
    profile_summary,
    pseudonymize,
    segment_change_payload,
    tombstone,
)
from connectors.segment import PII_KEYS, dead_letter_record  # noqa: E402
from models.features import apply_event, new_profile  # noqa: E402
from models.triggers import AbandonedCart, fire_due, new_state, on_event  # noqa: E402

SCHEMAS = Path(__file__).resolve().parents[2] / "infra" / "schemas"
T0 = 1_700_000_000.0
SECRET = b"test-secret-key"
SCHEMA_FILES = (
    "abandoned-cart.schema.json",
    "offers.schema.json",
    "segment-changes.schema.json",
    "hot-leads.schema.json",
    "deadletter.schema.json",
    "tombstone.schema.json",
)


def validator(name: str) -> Any:
    schema = json.loads((SCHEMAS / name).read_text())
    cls = jsonschema.Draft202012Validator
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def check(name: str, payload: dict[str, Any]) -> None:
    """Validate the payload as the consumer sees it (after orjson encoding)."""
    validator(name).validate(orjson.loads(orjson.dumps(payload)))


def keys_of(node: Any, *, skip_items: bool = True) -> set[str]:
    """All keys at any depth, except inside cart ``items`` (where ``name`` is a product's)."""
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            found.add(key.lower())
            if not (skip_items and key == "items"):
                found |= keys_of(value, skip_items=skip_items)
    elif isinstance(node, list):
        for value in node:
            found |= keys_of(value, skip_items=skip_items)
    return found


def shopper(
    user_id: str = "u-42", p1_extra: dict[str, Any] | None = None, **consent: bool
) -> dict[str, Any]:
    """A profile (with its trigger state under "triggers") driven as the engine drives it."""
    profile = new_profile(user_id)
    profile["triggers"] = new_state()
    p1 = {"product_id": "p1", "price": 49.9, "quantity": 2, **(p1_extra or {})}
    events = [
        ("Product Viewed", T0, {"product_id": "p1", "category": "shoes"}),
        ("Product Added", T0 + 10, p1),
        ("Product Added", T0 + 20, {"product_id": "p2", "price": 5.0, "category": "socks"}),
        ("Checkout Started", T0 + 30, {}),
    ]
    for i, (name, ts, props) in enumerate(events):
        event = {
            "message_id": f"m-{i}",
            "user_id": user_id,
            "type": "track",
            "event": name,
            "ts": ts,
            "properties": props,
            "traits": {},
            "consent": consent or None,
        }
        apply_event(profile, event)  # type: ignore[arg-type]
        on_event(profile["triggers"], profile, name, ts)
    return profile


def a_trigger(**p1_extra: Any) -> AbandonedCart:
    profile = shopper(p1_extra=p1_extra)
    trigger = fire_due(
        profile["triggers"], profile, watermark=T0 + 3600, user_id="u-42", consent_default=True
    )
    assert isinstance(trigger, AbandonedCart)
    return trigger


def test_schemas_are_valid_draft_2020_12_with_descriptions() -> None:
    for name in SCHEMA_FILES:
        schema = json.loads((SCHEMAS / name).read_text())
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["additionalProperties"] is False
        for field, spec in schema["properties"].items():
            assert spec.get("description"), f"{name}: {field} has no description"


# --------------------------------------------------------------------------- abandoned cart


def test_abandoned_cart_payload_validates() -> None:
    trigger = a_trigger(name="Runner 2", category="shoes")
    payload = abandoned_cart_payload(
        trigger,
        segment="cart_abandoner",
        lead_score=0.42,
        next_best_offer={"offer_id": "free-shipping", "channel": "email", "score": 3.0},
        currency="USD",
    )
    check("abandoned-cart.schema.json", payload)
    assert payload["idempotency_key"] == trigger.idempotency_key
    assert payload["abandoned_at"] == iso_utc(T0 + 30 + 1800) == "2023-11-14T22:43:50.000Z"
    assert payload["episode_started_at"] == iso_utc(T0 + 10)
    assert payload["flags"] == ["checkout_started"]
    assert payload["next_best_offer"] == {"offer_id": "free-shipping", "channel": "email"}
    assert payload["items"][0] == {
        "product_id": "p1",
        "name": "Runner 2",
        "category": "shoes",
        "quantity": 2,
        "price": 49.9,
    }
    assert payload["cart_value"] == 104.8
    assert payload["schema_version"] == SCHEMA_VERSION


def test_abandoned_cart_payload_with_nulls_validates() -> None:
    payload = abandoned_cart_payload(a_trigger())
    check("abandoned-cart.schema.json", payload)
    assert payload["segment"] is payload["lead_score"] is payload["next_best_offer"] is None
    assert payload["currency"] is None


def test_abandoned_cart_schema_rejects_unknown_fields() -> None:
    payload = abandoned_cart_payload(a_trigger())
    payload["email"] = "someone@example.com"
    with pytest.raises(jsonschema.ValidationError):
        check("abandoned-cart.schema.json", payload)


# --------------------------------------------------------------------------- offers


OFFER_ARGS: dict[str, Any] = dict(
    secret=SECRET,
    offer_id="free-shipping",
    channel="ads",
    score=1.7,
    propensity=0.35,
    reason="explore",
    policy="linucb@v3",
    decided_at=T0,
)


@pytest.mark.parametrize(
    ("stated", "default", "allowed"),
    [(None, False, False), (None, True, True), (False, True, False), (True, False, True)],
)
def test_offer_requires_ads_consent(stated: bool | None, default: bool, allowed: bool) -> None:
    consent = {} if stated is None else {"advertising": stated}
    profile = shopper(**consent)
    payload = offer_payload(profile, consent_default=default, **OFFER_ARGS)
    assert (payload is not None) == allowed


def test_email_consent_is_not_ads_consent() -> None:
    profile = shopper(email=True)
    assert offer_payload(profile, consent_default=False, **OFFER_ARGS) is None


def test_offer_payload_validates_and_is_pseudonymous() -> None:
    profile = shopper(advertising=True)
    payload = offer_payload(profile, consent_default=False, ttl_hours=6, **OFFER_ARGS)
    assert payload is not None
    check("offers.schema.json", payload)
    assert "user_id" not in payload
    assert b"u-42" not in orjson.dumps(payload)
    expected = hmac.new(SECRET, b"u-42", hashlib.sha256).hexdigest()
    assert payload["pseudonymous_id"] == expected
    assert payload["decided_at"] == iso_utc(T0)
    assert payload["expires_at"] == iso_utc(T0 + 6 * 3600)
    again = offer_payload(profile, consent_default=False, ttl_hours=6, **OFFER_ARGS)
    assert again == payload  # deterministic, key included
    later = offer_payload(profile, consent_default=False, **{**OFFER_ARGS, "decided_at": T0 + 1})
    assert later is not None and later["idempotency_key"] != payload["idempotency_key"]


def test_pseudonymize() -> None:
    pid = pseudonymize("u-42", SECRET)
    assert pid != "u-42" and "u-42" not in pid and len(pid) == 64
    assert pid == pseudonymize("u-42", SECRET.decode())  # stable, str or bytes secret
    assert pid != pseudonymize("u-43", SECRET)
    assert pid != pseudonymize("u-42", b"another-secret")
    assert pid != hashlib.sha256(b"u-42").hexdigest()  # keyed: not a plain hash
    with pytest.raises(ValueError):
        pseudonymize("u-42", b"")


# --------------------------------------------------------------------------- segments, leads


def test_segment_change_payload_validates() -> None:
    payload = segment_change_payload(
        user_id="u-42", old_segment=None, new_segment="vip", reason="rule:vip", at=T0
    )
    check("segment-changes.schema.json", payload)
    assert payload["at"] == iso_utc(T0)
    same = segment_change_payload(
        user_id="u-42", old_segment=None, new_segment="vip", reason="other", at=T0
    )
    assert same["idempotency_key"] == payload["idempotency_key"]
    other = segment_change_payload(
        user_id="u-42", old_segment="new", new_segment="vip", reason="rule:vip", at=T0
    )
    assert other["idempotency_key"] != payload["idempotency_key"]


def test_hot_lead_payload_validates() -> None:
    profile = shopper()
    contributions = {"cart_value": 0.8, "recency_days": -1.2, "log_views": 0.1, "x": float("nan")}
    payload = hot_lead_payload(
        profile,
        score=0.83,
        explanation=contributions,
        model_version="lead-v12",
        at=T0 + 86400,
        max_features=2,
    )
    check("hot-leads.schema.json", payload)
    assert payload["explanation"] == [
        {"feature": "recency_days", "contribution": -1.2},
        {"feature": "cart_value", "contribution": 0.8},
    ]
    assert payload["profile"]["cart_items"] == 3
    assert payload["profile"]["checkout_started"] is True
    assert payload["profile"]["top_category"] == "socks"  # an add weighs more than a view
    assert payload["profile"]["days_since_seen"] == 1.0
    left = hot_lead_payload(
        profile, score=0.5, explanation=[], model_version="v", at=T0, transition="left"
    )
    check("hot-leads.schema.json", left)


def test_profile_summary_is_a_whitelist() -> None:
    profile = shopper()
    profile["email"] = "someone@example.com"  # even if PII ever reached the profile
    profile["phone"] = "+1 555 0100"
    summary = profile_summary(profile, now=T0)
    assert set(summary) == {
        "orders",
        "revenue",
        "cart_items",
        "cart_value",
        "checkout_started",
        "top_category",
        "days_since_last_order",
        "days_since_seen",
        "email_opened",
        "email_clicked",
    }
    encoded = orjson.dumps(
        hot_lead_payload(profile, score=0.9, explanation={}, model_version="v", at=T0)
    )
    assert b"example.com" not in encoded and b"555" not in encoded


# --------------------------------------------------------------------------- tombstones, dlq


def test_tombstones_validate() -> None:
    plain = tombstone("u-42", at=T0)
    check("tombstone.schema.json", plain)
    assert plain["user_id"] == "u-42" and "pseudonymous_id" not in plain
    hidden = tombstone("u-42", at=T0, secret=SECRET)
    check("tombstone.schema.json", hidden)
    assert hidden["pseudonymous_id"] == pseudonymize("u-42", SECRET)
    assert b"u-42" not in orjson.dumps(hidden)
    assert hidden["idempotency_key"] != plain["idempotency_key"]
    assert tombstone("u-42", at=T0) == plain
    both = {**plain, "pseudonymous_id": hidden["pseudonymous_id"]}
    with pytest.raises(jsonschema.ValidationError):
        check("tombstone.schema.json", both)


def test_dead_letter_record_validates() -> None:
    record = dead_letter_record(
        b"\xff\xfe{not json",
        topic="clickstream",
        partition=3,
        offset=42,
        reason="invalid_utf8",
        detail="payload is not valid UTF-8",
        at=T0,
    )
    validator("deadletter.schema.json").validate(orjson.loads(record))


# --------------------------------------------------------------------------- privacy


def test_no_pii_keys_in_any_payload() -> None:
    profile = shopper(advertising=True)
    payloads = [
        abandoned_cart_payload(a_trigger(name="Runner 2"), currency="EUR"),
        offer_payload(profile, consent_default=False, **OFFER_ARGS),
        segment_change_payload(user_id="u-42", old_segment="a", new_segment="b", reason="r", at=T0),
        hot_lead_payload(profile, score=0.9, explanation={"a": 1.0}, model_version="v", at=T0),
        tombstone("u-42", at=T0),
        tombstone("u-42", at=T0, secret=SECRET),
    ]
    for payload in payloads:
        assert payload is not None
        assert not keys_of(payload) & PII_KEYS, payload["type"]


def test_iso_utc_is_datetimes_millisecond_form_to_the_rounding() -> None:
    from datetime import UTC, datetime

    rng = random.Random(11)
    times = [rng.uniform(0, 4e9) for _ in range(20000)]
    times += [T0 + k / 1000 + d for k in range(2000) for d in (0.0, 4e-7, 5e-7, 9.995e-4)]
    times += [T0 + 0.9999995, T0 + 0.9999996, T0 - 4e-7, 0.0, 1.5]
    for ts in times:
        want = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
        assert iso_utc(ts) == want, ts
