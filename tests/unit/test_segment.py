"""Unit tests for the Segment / RudderStack input adapter (no broker needed)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from connectors import segment
from connectors.segment import (
    Rejection,
    dead_letter_record,
    decode_dead_letter,
    parse_event,
    partition_key,
    route,
)
from models.events import (
    CONSENT_UPDATED,
    EMAIL_OPENED,
    ERASURE_REQUESTED,
    ORDER_COMPLETED,
    PRODUCT_ADDED,
)

NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z
TS_ISO = "2023-11-14T22:13:20Z"
EMAIL = "jane.doe@example.com"


def msg(**overrides: Any) -> dict[str, Any]:
    """A realistic track message; keyword overrides replace fields (None removes them)."""
    base: dict[str, Any] = {
        "type": "track",
        "event": PRODUCT_ADDED,
        "userId": "u-42",
        "anonymousId": "anon-9",
        "messageId": "ajs-next-1700000000000-abc",
        "timestamp": TS_ISO,
        "properties": {"product_id": "p-1", "sku": "SKU-1", "price": 19.99, "quantity": 2},
        "context": {"library": {"name": "analytics.js", "version": "2.11.1"}},
    }
    for key, value in overrides.items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = value
    return base


def parse(payload: Any, **kwargs: Any) -> Any:
    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return parse_event(raw, now=NOW, **kwargs)


def ok(payload: Any, **kwargs: Any) -> dict[str, Any]:
    result = parse(payload, **kwargs)
    assert not isinstance(result, Rejection), result
    return result


def rejected(payload: Any, reason: str, **kwargs: Any) -> Rejection:
    result = parse(payload, **kwargs)
    assert isinstance(result, Rejection), result
    assert result.reason == reason, result
    assert result.reason in segment.REASONS
    return result


# --- happy path ---------------------------------------------------------------------------------


def test_clickstream_track_event() -> None:
    event = ok(msg())
    assert event == {
        "message_id": "ajs-next-1700000000000-abc",
        "user_id": "u-42",
        "type": "track",
        "event": PRODUCT_ADDED,
        "ts": NOW,
        "properties": {"product_id": "p-1", "sku": "SKU-1", "price": 19.99, "quantity": 2},
        "traits": {},
        "consent": None,
    }
    assert route(msg()) == "clickstream"


def test_purchase_event_with_products() -> None:
    props = {
        "order_id": "o-1",
        "total": 42.5,
        "revenue": 40.0,
        "currency": "EUR",
        "products": [{"product_id": "p-1", "name": "Red Shoe", "price": 20.0, "quantity": 2}],
    }
    event = ok(msg(event=ORDER_COMPLETED, properties=props))
    assert event["event"] == ORDER_COMPLETED
    assert event["properties"]["total"] == 42.5
    assert event["properties"]["products"][0]["name"] == "Red Shoe"  # product name kept
    assert route(msg(event=ORDER_COMPLETED)) == "purchases"


def test_email_event() -> None:
    props = {"campaign_id": "c-7", "email_id": "e-1", "email_subject": "Hi"}
    event = ok(msg(event=EMAIL_OPENED, properties=props))
    assert event["event"] == EMAIL_OPENED
    assert event["properties"] == props
    assert route(msg(event=EMAIL_OPENED)) == "email"


def test_identity_events() -> None:
    event = ok(msg(event=ERASURE_REQUESTED, properties={}))
    assert event["event"] == ERASURE_REQUESTED
    assert route(msg(event=ERASURE_REQUESTED)) == "identity"
    assert route(msg(event=CONSENT_UPDATED)) == "identity"
    assert route({"type": "identify", "userId": "u-1"}) == "identity"
    assert route({"type": "alias", "userId": "u-1", "previousId": "anon-1"}) == "identity"
    assert route({"type": "page", "name": "Home"}) == "clickstream"
    assert route({"type": ["junk"], "event": 5}) == "clickstream"


def test_identify_with_traits_drops_pii() -> None:
    payload = msg(
        type="identify",
        event=None,
        properties=None,
        traits={
            "email": EMAIL,
            "firstName": "Jane",
            "Last_Name": "Doe",
            "Phone": "+33 6 00 00 00 00",
            "address": {"street": "1 rue X", "city": "Paris"},
            "contact": EMAIL,
            "plan": "gold",
            "age_band": "25-34",
            "company": {"name": "ACME", "industry": "retail", "billing": EMAIL},
        },
    )
    event = ok(payload)
    assert event["type"] == "identify"
    assert event["event"] == ""
    assert event["properties"] == {}
    assert event["traits"] == {
        "plan": "gold",
        "age_band": "25-34",
        "company": {"industry": "retail"},
    }


def test_traits_from_context_and_anonymous_id() -> None:
    payload = msg(
        userId=None,
        context={"traits": {"email": EMAIL, "loyalty": "silver"}, "ip": "203.0.113.9"},
    )
    event = ok(payload)
    assert event["user_id"] == "anon-9"
    assert event["traits"] == {"loyalty": "silver"}


def test_empty_user_id_falls_back_to_anonymous_and_int_ids() -> None:
    assert ok(msg(userId=""))["user_id"] == "anon-9"
    event = ok(msg(userId=12345, messageId=678))
    assert event["user_id"] == "12345"
    assert event["message_id"] == "678"


def test_non_track_event_name_is_empty() -> None:
    event = ok(msg(type="page", event=None, properties={"path": "/"}))
    assert event["event"] == ""
    assert event["type"] == "page"


def test_pii_never_in_event() -> None:
    payload = msg(
        properties={
            "product_id": "p-1",
            "Email": EMAIL,
            "NAME": "Jane Doe",
            "ip": "203.0.113.9",
            "street": "1 rue X",
            "price": 5,
        },
        traits={"email": EMAIL, "name": "Jane Doe", "alt": EMAIL, "tags": [EMAIL, "vip"]},
        context={"traits": {"email": EMAIL}, "consent": {"categoryPreferences": {"Email": True}}},
    )
    event = ok(payload)
    blob = orjson.dumps(event)
    for secret in (EMAIL, "Jane Doe", "203.0.113.9", "1 rue X"):
        assert secret.encode() not in blob
    assert event["properties"] == {"product_id": "p-1", "price": 5}
    assert event["traits"] == {"tags": ["vip"]}


def test_rejection_detail_has_no_pii() -> None:
    bad = msg(userId=[EMAIL], properties={"price": EMAIL}, timestamp=EMAIL)
    result = parse(bad)
    assert isinstance(result, Rejection)
    assert EMAIL not in result.detail
    for reason_payload in (msg(timestamp=EMAIL), msg(properties={"price": EMAIL})):
        assert EMAIL not in parse(reason_payload).detail


def test_consent_from_context() -> None:
    prefs = {"Email": True, "ADVERTISING": False, "analytics": "yes", "other": 1}
    event = ok(msg(context={"consent": {"categoryPreferences": prefs}}))
    assert event["consent"] == {"email": True, "advertising": False}


def test_consent_update_event_reads_properties() -> None:
    payload = msg(
        event=CONSENT_UPDATED,
        properties={"categoryPreferences": {"Email": False, "Advertising": True}},
    )
    assert ok(payload)["consent"] == {"email": False, "advertising": True}
    # context wins when both are present
    payload["context"] = {"consent": {"categoryPreferences": {"email": True}}}
    assert ok(payload)["consent"] == {"email": True}
    # other events don't read properties.categoryPreferences
    other = msg(properties={"categoryPreferences": {"email": True}})
    assert ok(other)["consent"] is None


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        ("2023-11-14T22:13:20Z", NOW),
        ("2023-11-14T23:13:20+01:00", NOW),
        ("2023-11-14T17:13:20.000-05:00", NOW),
        ("2023-11-14T22:13:20.250Z", NOW + 0.25),
        ("2023-11-14T22:13:20.123456Z", NOW + 0.123456),
        ("2023-11-14T22:13:20", NOW),  # naive: UTC
        (1_700_000_000, NOW),
        (1_700_000_000.5, NOW + 0.5),
        (1_700_000_000_000, NOW),
        (1_700_000_000_250, NOW + 0.25),
    ],
)
def test_timestamp_formats(timestamp: Any, expected: float) -> None:
    assert ok(msg(timestamp=timestamp))["ts"] == pytest.approx(expected, abs=1e-6)


def test_numeric_null_is_dropped() -> None:
    event = ok(msg(properties={"product_id": "p-1", "price": None}))
    assert event["properties"] == {"product_id": "p-1"}


# --- rejections ---------------------------------------------------------------------------------


def test_too_large() -> None:
    payload = msg(properties={"blob": "x" * 70_000})
    rejected(payload, segment.TOO_LARGE)
    rejected(orjson.dumps(msg()), segment.TOO_LARGE, max_bytes=100)


def test_invalid_utf8() -> None:
    rejected(b"\xff\xfe", segment.INVALID_UTF8)
    rejected(b'{"type": "track", "event": "\xc3\x28"}', segment.INVALID_UTF8)


def test_not_json() -> None:
    rejected(b"type=track&event=Product+Added", segment.NOT_JSON)
    rejected(b'{"type": "track", ', segment.NOT_JSON)
    rejected(b"", segment.NOT_JSON)
    rejected(b'{"price": NaN}', segment.NOT_JSON)


def test_too_deep() -> None:
    nested: Any = "leaf"
    for _ in range(12):
        nested = {"x": nested}
    rejected(msg(properties=nested), segment.TOO_DEEP)
    rejected(b"[" * 5000 + b"]" * 5000, segment.TOO_DEEP)  # beyond orjson's own limit
    # at the limit is fine: root(1) > properties(2) > ... up to depth 8
    nested = "leaf"
    for _ in range(7):
        nested = {"x": nested}
    ok(msg(properties=nested))
    rejected(msg(properties=nested), segment.TOO_DEEP, max_depth=7)


def test_not_object() -> None:
    rejected([msg(), msg()], segment.NOT_OBJECT)
    rejected(b'"track"', segment.NOT_OBJECT)
    rejected(b"null", segment.NOT_OBJECT)


def test_unknown_type() -> None:
    rejected(msg(type="purchase"), segment.UNKNOWN_TYPE)
    rejected(msg(type=None), segment.UNKNOWN_TYPE)
    rejected(msg(type="TRACK"), segment.UNKNOWN_TYPE)


def test_missing_message_id() -> None:
    rejected(msg(messageId=None), segment.MISSING_MESSAGE_ID)
    rejected(msg(messageId=""), segment.MISSING_MESSAGE_ID)


def test_missing_user_id() -> None:
    rejected(msg(userId=None, anonymousId=None), segment.MISSING_USER_ID)
    rejected(msg(userId="", anonymousId=""), segment.MISSING_USER_ID)


def test_properties_as_list() -> None:
    rejected(msg(properties=[{"price": 1}]), segment.BAD_FIELD)


def test_price_as_string() -> None:
    rejected(msg(properties={"product_id": "p-1", "price": "19.99"}), segment.BAD_FIELD)


def test_price_as_bool() -> None:
    rejected(msg(properties={"product_id": "p-1", "price": True}), segment.BAD_FIELD)


@pytest.mark.parametrize(
    "overrides",
    [
        {"userId": {"id": "u-1"}},
        {"userId": True},
        {"anonymousId": ["a"]},
        {"messageId": 1.5},
        {"messageId": False},
        {"event": 42},
        {"type": ["track"]},
        {"context": "web"},
        {"traits": ["vip"]},
        {"context": {"consent": {"categoryPreferences": ["email"]}}},
        {"properties": {"quantity": "2"}},
        {"properties": {"products": {"price": 1}}},
        {"properties": {"products": ["p-1"]}},
        {"properties": {"products": [{"price": "1"}]}},
    ],
)
def test_bad_field_types(overrides: dict[str, Any]) -> None:
    rejected(msg(**overrides), segment.BAD_FIELD)


def test_missing_event_name() -> None:
    rejected(msg(event=None), segment.MISSING_EVENT_NAME)
    rejected(msg(event=""), segment.MISSING_EVENT_NAME)


@pytest.mark.parametrize("timestamp", ["yesterday", "2023-13-45T99:00:00Z", "", [1], {"s": 1}])
def test_bad_timestamp(timestamp: Any) -> None:
    rejected(msg(timestamp=timestamp), segment.BAD_TIMESTAMP)


def test_missing_timestamp() -> None:
    rejected(msg(timestamp=None), segment.BAD_TIMESTAMP)
    rejected(msg(timestamp=True), segment.BAD_TIMESTAMP)


@pytest.mark.parametrize(
    "timestamp",
    ["1970-01-01T00:00:00Z", "2100-01-01T00:00:00Z", 0, 4_102_444_800_000, -5],
)
def test_timestamp_out_of_range(timestamp: Any) -> None:
    rejected(msg(timestamp=timestamp), segment.TIMESTAMP_OUT_OF_RANGE)


def test_future_tolerance() -> None:
    ok(msg(timestamp=NOW + 3600))
    rejected(msg(timestamp=NOW + 3600), segment.TIMESTAMP_OUT_OF_RANGE, max_future_s=60)


def test_negative_price() -> None:
    rejected(msg(properties={"product_id": "p-1", "price": -19.99}), segment.NEGATIVE_VALUE)
    rejected(msg(event=ORDER_COMPLETED, properties={"revenue": -1}), segment.NEGATIVE_VALUE)


def test_negative_product_price_in_products() -> None:
    props = {
        "order_id": "o-1",
        "total": 10.0,
        "products": [{"product_id": "p-1", "price": 10.0}, {"product_id": "p-2", "price": -5}],
    }
    result = rejected(msg(event=ORDER_COMPLETED, properties=props), segment.NEGATIVE_VALUE)
    assert "products[1]" in result.detail


def test_rejection_is_frozen() -> None:
    result = rejected(b"nope", segment.NOT_JSON)
    with pytest.raises(AttributeError):
        result.reason = "other"  # type: ignore[misc]


# --- partition key and dead letters -------------------------------------------------------------


def test_partition_key() -> None:
    assert partition_key(msg()) == b"u-42"
    assert partition_key(msg(userId=None)) == b"anon-9"
    assert partition_key(msg(userId="")) == b"anon-9"
    assert partition_key(msg(userId=7)) == b"7"
    assert partition_key({"userId": "usér"}) == "usér".encode()
    assert partition_key({}) == b""
    # same key as the parsed profile id
    for payload in (msg(), msg(userId=None), msg(userId=7)):
        assert partition_key(payload) == ok(payload)["user_id"].encode()


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xff\xfe",
        b'{"type": "track"}',
        bytes(range(256)),
        b"\x00\x80\xc3\x28" * 100,
    ],
)
def test_dead_letter_round_trip(raw: bytes) -> None:
    record = dead_letter_record(
        raw,
        topic="clickstream",
        partition=3,
        offset=12345,
        reason=segment.INVALID_UTF8,
        detail="payload is not valid UTF-8",
        at=NOW,
    )
    assert isinstance(record, bytes)
    original, meta = decode_dead_letter(record)
    assert original == raw
    assert meta == {
        "reason": segment.INVALID_UTF8,
        "detail": "payload is not valid UTF-8",
        "source": {"topic": "clickstream", "partition": 3, "offset": 12345},
        "at": NOW,
    }


def test_dead_letter_from_rejection_then_replay() -> None:
    raw = b'{"type": "track", "userId": "u-1"}'
    rejection = parse_event(raw, now=NOW)
    assert isinstance(rejection, Rejection)
    record = dead_letter_record(
        raw,
        topic="clickstream",
        partition=0,
        offset=1,
        reason=rejection.reason,
        detail=rejection.detail,
        at=NOW,
    )
    original, meta = decode_dead_letter(record)
    assert meta["reason"] == segment.MISSING_MESSAGE_ID
    assert parse_event(original, now=NOW) == rejection


@pytest.mark.parametrize("record", [b"junk", b"[]", b'{"reason": "x"}', b'{"value_b64": "!!"}'])
def test_decode_dead_letter_rejects_garbage(record: bytes) -> None:
    with pytest.raises(ValueError):
        decode_dead_letter(record)
