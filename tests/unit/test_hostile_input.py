"""Hostile input: every malformed, oversized, mistyped or malicious message a producer could send.

Two halves:

* ``CORPUS``: named hostile messages with the outcome the contract asks for: a rejection with a
  specific reason code, or (when the message is valid per the Segment spec) an event applied
  without a crash. Each is ingested between two good events of another user, which must be
  applied exactly. ``tests/integration/test_hostile_stream.py`` sends the same corpus through the
  real broker and worker.
* Property-based fuzzing (hypothesis, derandomized so the suite is deterministic): arbitrary
  bytes, arbitrary JSON values in Segment-shaped messages, valid events with one field mutated,
  and the dead-letter record round trip.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.segment import (
    BAD_FIELD,
    BAD_TIMESTAMP,
    INVALID_UTF8,
    MISSING_EVENT_NAME,
    MISSING_MESSAGE_ID,
    MISSING_USER_ID,
    NEGATIVE_VALUE,
    NOT_JSON,
    NOT_OBJECT,
    REASONS,
    TIMESTAMP_OUT_OF_RANGE,
    TOO_DEEP,
    TOO_LARGE,
    UNKNOWN_TYPE,
    Rejection,
    dead_letter_record,
    decode_dead_letter,
    parse_event,
    route,
)
from models.dedupe import as_digests
from models.events import EMAIL_EVENTS, IDENTITY_EVENTS, PURCHASE_EVENTS
from models.features import FEATURE_NAMES, feature_vector, summary
from streams.ingest import SEEN_KEY, BatchResult, Record, ingest_batch

NOW = 1_800_000_000.0  # 2027-01-15: the wall clock of every unit ingest here
TS = "2024-03-01T10:00:00Z"
GOOD_USER = "good-user"
HOSTILE_USER = "h-user"
ACCEPT = "accept"
"""Outcome of a hostile message that is valid per the contract: applied, no crash."""
DUPLICATE = "duplicate"
"""Outcome of a message whose (user, messageId) was already applied: counted once."""
MAX_BYTES = 65536
KNOWN_NAMES = PURCHASE_EVENTS | EMAIL_EVENTS | IDENTITY_EVENTS

# Fields of the Redis summary that are numbers (or '' when unknown).
NUMERIC_SUMMARY = (
    "events",
    "orders",
    "revenue",
    "recency_days",
    "days_since_seen",
    "cart_items",
    "cart_value",
    "checkout_started",
    "email_delivered",
    "email_opened",
    "email_clicked",
    "unsubscribed",
    "consent_email",
    "consent_advertising",
    "first_seen",
    "last_seen",
)


def track(
    name: str = "Product Viewed",
    *,
    user: Any = HOSTILE_USER,
    message_id: Any = "h-1",
    ts: Any = TS,
    **properties: Any,
) -> dict[str, Any]:
    return {
        "type": "track",
        "event": name,
        "userId": user,
        "messageId": message_id,
        "timestamp": ts,
        "properties": properties,
    }


def good_raw(message_id: str, user: str = GOOD_USER, minute: int = 0) -> bytes:
    return orjson.dumps(
        track(
            "Product Viewed",
            user=user,
            message_id=message_id,
            ts=f"2024-03-01T09:{minute:02d}:00Z",
            product_id="p-good",
            category="shoes",
        )
    )


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """``base`` with top-level keys changed; a value of ``...`` deletes the key."""
    out = dict(base)
    for key, value in changes.items():
        if value is ...:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def nested(depth: int, *, arrays: bool = False) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value] if arrays else {"k": value}
    return value


def padded_to(size: int) -> bytes:
    """A valid event whose JSON is exactly ``size`` bytes (padding in a property)."""
    stub = orjson.dumps(track(message_id="h-pad", pad=""))
    raw = orjson.dumps(track(message_id="h-pad", pad="x" * (size - len(stub))))
    assert len(raw) == size
    return raw


@dataclass(frozen=True)
class Case:
    name: str
    raw: bytes
    expect: str
    """A reason code from ``REASONS``, ``ACCEPT`` or ``DUPLICATE``."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra ``ingest_batch`` arguments (a larger ``max_event_bytes``)."""
    check: Callable[[BatchResult], None] | None = None
    """More assertions on an accepted message's result."""


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def _pii_dropped(result: BatchResult) -> None:
    profile = result.changed[HOSTILE_USER]
    text = orjson.dumps(profile).decode()
    for secret in ("alice@example.com", "+1-555-0100", "Alice", "Liddell", "Wonderland"):
        assert secret not in text


def _long_string_capped(result: BatchResult) -> None:
    profile = result.changed[HOSTILE_USER]
    assert all(len(category) <= 200 for category in profile["affinity"])
    assert len(orjson.dumps(profile)) < 10_000, "a 1 MB property must not be stored whole"


def _huge_numbers_finite(result: BatchResult) -> None:
    profile = result.changed[HOSTILE_USER]
    assert math.isfinite(profile["cart_value"]) and math.isfinite(profile["revenue"])
    assert all(math.isfinite(v) for v in feature_vector(profile, now=NOW).values())


def _unknown_event_applied(result: BatchResult) -> None:
    profile = result.changed[HOSTILE_USER]
    assert profile["events"] == 1
    assert profile["views"] == 0 and profile["orders"] == 0  # no handler: only counted


def build_corpus() -> list[Case]:
    base = track(message_id="h-base", product_id="p1", price=9.5, quantity=1, category="hats")
    cases: list[Case] = []

    def add(
        name: str,
        raw: bytes | dict[str, Any] | list[Any],
        expect: str,
        *,
        check: Callable[[BatchResult], None] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(raw, bytes):
            raw = _dumps(raw)
        cases.append(Case(name, raw, expect, kwargs, check))

    # --- not JSON at all ------------------------------------------------------------------------
    add("empty", b"", NOT_JSON)
    add("whitespace only", b" \n\t ", NOT_JSON)
    add("plain text", b"hello, kafka", NOT_JSON)
    add("truncated object", _dumps(base)[:-7], NOT_JSON)
    add("truncated string", b'{"type": "track", "event": "Prod', NOT_JSON)
    add("single quotes", b"{'type': 'track'}", NOT_JSON)
    add("trailing comma", b'{"type": "track",}', NOT_JSON)
    add("two objects", _dumps(base) + _dumps(base), NOT_JSON)
    add("NaN literal", _dumps(base)[:-1] + b', "x": NaN}', NOT_JSON)
    add("number 1e400 (infinite double)", _dumps(base).replace(b"9.5", b"1e400"), NOT_JSON)
    add("BOM-prefixed JSON", b"\xef\xbb\xbf" + _dumps(base), NOT_JSON)
    add("raw NUL byte inside a string", _dumps(base).replace(b"hats", b"ha\x00ts"), NOT_JSON)
    add("NUL byte after the object", _dumps(base) + b"\x00", NOT_JSON)
    # --- invalid UTF-8 --------------------------------------------------------------------------
    add("lone continuation byte", _dumps(base).replace(b"hats", b"h\x80ts"), INVALID_UTF8)
    add("overlong encoding of '/'", _dumps(base).replace(b"hats", b"h\xc0\xafts"), INVALID_UTF8)
    add("UTF-8 encoded surrogate", _dumps(base).replace(b"hats", b"h\xed\xa0\x80ts"), INVALID_UTF8)
    add("truncated multi-byte char", _dumps(base).replace(b"hats", b"h\xe2\x82"), INVALID_UTF8)
    add("Latin-1 bytes", _dumps(base).replace(b"hats", b"caf\xe9"), INVALID_UTF8)
    add("binary garbage", b"\xff\xfe\x00\x01garbage", INVALID_UTF8)
    add("escaped lone surrogate", _dumps(base).replace(b"hats", b"h\\ud800ts"), NOT_JSON)
    # --- not an object --------------------------------------------------------------------------
    add("JSON null", b"null", NOT_OBJECT)
    add("JSON true", b"true", NOT_OBJECT)
    add("JSON number", b"42", NOT_OBJECT)
    add("JSON string", b'"track"', NOT_OBJECT)
    add("JSON empty array", b"[]", NOT_OBJECT)
    add("array of a valid event", [base], NOT_OBJECT)
    add("empty object", {}, UNKNOWN_TYPE)
    # --- size and depth -------------------------------------------------------------------------
    add("one byte over the limit", padded_to(MAX_BYTES + 1), TOO_LARGE)
    add("exactly at the limit", padded_to(MAX_BYTES), ACCEPT)
    add("1 MB of garbage", b"\xff" * 1_048_576, TOO_LARGE)
    add("objects nested 9 deep", with_(base, properties={"x": nested(7)}), TOO_DEEP)
    add("arrays nested 9 deep", with_(base, properties={"x": nested(7, arrays=True)}), TOO_DEEP)
    add("objects nested 8 deep (limit)", with_(base, properties={"x": nested(6)}), ACCEPT)
    add("arrays nested 5000 deep", b"[" * 5000 + b"]" * 5000, TOO_DEEP)
    add("objects nested 3000 deep", b'{"a":' * 3000 + b"1" + b"}" * 3000, TOO_DEEP)
    add("deep traits", with_(base, traits=nested(20)), TOO_DEEP)
    add(
        "1 MB string in properties (limit 2 MB)",
        with_(base, properties={"category": "c" * 1_048_576, "product_id": "p"}),
        ACCEPT,
        check=_long_string_capped,
        max_event_bytes=2_000_000,
    )
    # --- call type and event name ---------------------------------------------------------------
    add("type missing", with_(base, type=...), UNKNOWN_TYPE)
    add("type unknown", with_(base, type="shout"), UNKNOWN_TYPE)
    add("type wrong case", with_(base, type="Track"), UNKNOWN_TYPE)
    add("type is a number", with_(base, type=1), BAD_FIELD)
    add("type is a list", with_(base, type=["track"]), BAD_FIELD)
    add("track without event", with_(base, event=...), MISSING_EVENT_NAME)
    add("track with empty event", with_(base, event=""), MISSING_EVENT_NAME)
    add("event is a list", with_(base, event=["Product Viewed"]), BAD_FIELD)
    add(
        "custom track event name",
        with_(base, event="Hovered Over Banner 🎉"),
        ACCEPT,
        check=_unknown_event_applied,
    )
    add("page call", with_(base, type="page", event=...), ACCEPT)
    add(
        "identify with an event name of a wrong type",
        with_(base, type="identify", event=3),
        BAD_FIELD,
    )
    # --- ids ------------------------------------------------------------------------------------
    add("messageId missing", with_(base, messageId=...), MISSING_MESSAGE_ID)
    add("messageId empty", with_(base, messageId=""), MISSING_MESSAGE_ID)
    add("messageId null", with_(base, messageId=None), MISSING_MESSAGE_ID)
    add("messageId float", with_(base, messageId=1.5), BAD_FIELD)
    add("messageId object", with_(base, messageId={"id": "m"}), BAD_FIELD)
    add("messageId bool", with_(base, messageId=True), BAD_FIELD)
    add("messageId integer", with_(base, messageId=123456789), ACCEPT)
    add("messageId whitespace", with_(base, messageId="   "), ACCEPT)
    add("userId missing, no anonymousId", with_(base, userId=...), MISSING_USER_ID)
    add("userId and anonymousId empty", with_(base, userId="", anonymousId=""), MISSING_USER_ID)
    add("userId null", with_(base, userId=None), MISSING_USER_ID)
    add("userId list", with_(base, userId=[HOSTILE_USER]), BAD_FIELD)
    add("userId object", with_(base, userId={"id": HOSTILE_USER}), BAD_FIELD)
    add("userId bool", with_(base, userId=True), BAD_FIELD)
    add("userId float", with_(base, userId=4.2), BAD_FIELD)
    add("anonymousId list", with_(base, userId=None, anonymousId=["a"]), BAD_FIELD)
    add("userId integer", with_(base, userId=42, messageId="h-int-user"), ACCEPT)
    add("empty userId, anonymousId used", with_(base, userId="", anonymousId="anon-h"), ACCEPT)
    # Whitespace ids are non-empty strings: the contract accepts them as given (no trimming).
    add("userId whitespace", with_(base, userId="   ", messageId="h-ws-user"), ACCEPT)
    # Regression (fixed in connectors/segment.py): a NUL-prefixed id collided with the worker's
    # own watermark keys in the profiles table.
    add("userId with a NUL (watermark key)", with_(base, userId="\x00watermark/0"), BAD_FIELD)
    add("userId with a newline", with_(base, userId="h-user\nX-Injected: 1"), BAD_FIELD)
    add(
        "anonymousId with an escape char",
        with_(base, userId=None, anonymousId="a\x1b[2J"),
        BAD_FIELD,
    )
    add("duplicate messageId of a good event", good_raw("g-1"), DUPLICATE)
    add(
        "duplicate keys, last is wrong-typed",
        b'{"userId": "u", ' + _dumps(base)[1:-1] + b', "userId": ["x"]}',
        BAD_FIELD,
    )
    # --- timestamps -----------------------------------------------------------------------------
    add("timestamp missing", with_(base, timestamp=...), BAD_TIMESTAMP)
    add("timestamp bool", with_(base, timestamp=True), BAD_TIMESTAMP)
    add("timestamp object", with_(base, timestamp={"$date": TS}), BAD_TIMESTAMP)
    add("timestamp list", with_(base, timestamp=[2024, 3, 1]), BAD_TIMESTAMP)
    add("timestamp empty", with_(base, timestamp=""), BAD_TIMESTAMP)
    add("timestamp prose", with_(base, timestamp="yesterday"), BAD_TIMESTAMP)
    add("timestamp 30 February", with_(base, timestamp="2024-02-30T00:00:00Z"), BAD_TIMESTAMP)
    add("timestamp tz +25:00", with_(base, timestamp="2024-03-01T10:00:00+25:00"), BAD_TIMESTAMP)
    add("timestamp tz name", with_(base, timestamp="2024-03-01T10:00:00 PST"), BAD_TIMESTAMP)
    add("timestamp tz garbage", with_(base, timestamp="2024-03-01T10:00:00+ab:cd"), BAD_TIMESTAMP)
    add("timestamp epoch 0", with_(base, timestamp=0), TIMESTAMP_OUT_OF_RANGE)
    add("timestamp negative", with_(base, timestamp=-1e18), TIMESTAMP_OUT_OF_RANGE)
    add("timestamp 1999", with_(base, timestamp="1999-12-31T23:59:59Z"), TIMESTAMP_OUT_OF_RANGE)
    add(
        "timestamp year 1",
        with_(base, timestamp="0001-01-01T00:00:00+23:59"),
        TIMESTAMP_OUT_OF_RANGE,
    )
    add(
        "timestamp year 9999",
        with_(base, timestamp="9999-12-31T23:59:59.999999-23:59"),
        TIMESTAMP_OUT_OF_RANGE,
    )
    add("timestamp 2999 in ms", with_(base, timestamp=32_503_680_000_000), TIMESTAMP_OUT_OF_RANGE)
    add("timestamp 1e300", with_(base, timestamp=1e300), TIMESTAMP_OUT_OF_RANGE)
    quoted_ts = b'"' + TS.encode() + b'"'
    add(
        "timestamp 30-digit integer",
        _dumps(base).replace(quoted_ts, b"9" * 30),
        TIMESTAMP_OUT_OF_RANGE,
    )
    add("timestamp 400-digit integer", _dumps(base).replace(quoted_ts, b"9" * 400), NOT_JSON)
    add("timestamp epoch seconds", with_(base, timestamp=1_709_287_200, messageId="h-s"), ACCEPT)
    add("timestamp epoch ms", with_(base, timestamp=1_709_287_200_123, messageId="h-ms"), ACCEPT)
    # --- properties, products, money ------------------------------------------------------------
    add("properties string", with_(base, properties="price=9"), BAD_FIELD)
    add("properties list", with_(base, properties=[{"price": 9}]), BAD_FIELD)
    add("properties null", with_(base, properties=None), ACCEPT)
    add("price string", track(price="9.99"), BAD_FIELD)
    add("price bool", track(price=True), BAD_FIELD)
    add("price 'NaN' string", track(price="NaN"), BAD_FIELD)
    add("price 'Infinity' string", track(price="Infinity"), BAD_FIELD)
    add("price object", track(price={"amount": 9}), BAD_FIELD)
    add("price null (dropped)", track("Product Added", product_id="p", price=None), ACCEPT)
    add("price negative", track("Product Added", product_id="p", price=-9.5), NEGATIVE_VALUE)
    add("quantity negative", track("Product Added", product_id="p", quantity=-2), NEGATIVE_VALUE)
    add("revenue negative", track("Order Completed", revenue=-100), NEGATIVE_VALUE)
    add("total negative", track("Order Completed", total=-0.01), NEGATIVE_VALUE)
    add("value negative", track("Offer Clicked", value=-1), NEGATIVE_VALUE)
    add("products object", track("Order Completed", products={"p1": {"price": 1}}), BAD_FIELD)
    add("products string", track("Order Completed", products="p1,p2"), BAD_FIELD)
    add("products of strings", track("Order Completed", products=["p1"]), BAD_FIELD)
    add(
        "product price negative",
        track("Order Completed", products=[{"product_id": "p", "price": -5, "quantity": 1}]),
        NEGATIVE_VALUE,
    )
    add(
        "product quantity negative",
        track("Order Completed", products=[{"product_id": "p", "price": 5, "quantity": -1}]),
        NEGATIVE_VALUE,
    )
    add(
        "product price string",
        track("Order Completed", products=[{"product_id": "p", "price": "5"}]),
        BAD_FIELD,
    )
    add(
        "huge but finite money",
        _dumps(
            track("Product Added", product_id="p-huge", price=1.7e308, quantity=1e308, revenue=0)
        ).replace(b'"revenue":0', b'"revenue":123456789012345678901234567890'),
        ACCEPT,
        check=_huge_numbers_finite,
    )
    add(
        "order of huge products",
        track("Order Completed", products=[{"price": 1e300, "quantity": 1e300}] * 50),
        ACCEPT,
        check=_huge_numbers_finite,
    )
    add(
        "product_id is an object", track("Product Added", product_id={"a": [1, 2]}, price=1), ACCEPT
    )
    add("category is a number", track("Product Viewed", category=3.5, product_id=True), ACCEPT)
    # --- context, consent, traits, PII ----------------------------------------------------------
    add("context string", with_(base, context="web"), BAD_FIELD)
    add("consent list", with_(base, context={"consent": ["email"]}), BAD_FIELD)
    add(
        "categoryPreferences string",
        with_(base, context={"consent": {"categoryPreferences": "all"}}),
        BAD_FIELD,
    )
    add(
        "consent values not booleans",
        with_(base, context={"consent": {"categoryPreferences": {"Email": "yes", "ads": 1}}}),
        ACCEPT,
    )
    add("traits list", {**base, "type": "identify", "traits": ["a@example.com"]}, BAD_FIELD)
    add("context.traits number", with_(base, context={"traits": 7}), BAD_FIELD)
    pii = {
        "email": "alice@example.com",
        "Phone": "+1-555-0100",
        "name": "Alice Liddell",
        "firstName": "Alice",
        "lastName": "Liddell",
        "address": {"street": "1 Rabbit Hole", "city": "Wonderland"},
        "contact": "alice@example.com",
        "plan": "gold",
        "nested": {"email": "alice@example.com", "aliases": ["alice@example.com", "al"]},
    }
    add(
        "PII in identify traits",
        {
            "type": "identify",
            "userId": HOSTILE_USER,
            "messageId": "h-pii",
            "timestamp": TS,
            "traits": pii,
        },
        ACCEPT,
        check=_pii_dropped,
    )
    add(
        "PII in context.traits and properties",
        {
            **track(
                "Product Added",
                message_id="h-pii2",
                product_id="p",
                email="alice@example.com",
                NAME="Alice",
                phone="+1-555-0100",
            ),
            "context": {"traits": pii},
        },
        ACCEPT,
        check=_pii_dropped,
    )
    add("escaped NUL in a property value", track(category="a\x00b", product_id="\x00"), ACCEPT)
    add(
        "unknown extra fields",
        {**base, "integrations": {"All": False}, "_metadata": [1, None]},
        ACCEPT,
    )
    return cases


CORPUS = build_corpus()


def test_the_corpus_is_large_unique_and_uses_every_reason() -> None:
    assert len(CORPUS) >= 30
    assert len({c.name for c in CORPUS}) == len(CORPUS)
    assert len({c.raw for c in CORPUS}) == len(CORPUS), "raw bytes identify dead letters"
    assert {c.expect for c in CORPUS} == {*REASONS, ACCEPT, DUPLICATE}


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_hostile_message_between_good_ones(case: Case) -> None:
    batch = [
        Record("clickstream", 0, 10, GOOD_USER.encode(), good_raw("g-1", minute=1)),
        Record("clickstream", 0, 11, b"hostile", case.raw),
        Record("clickstream", 0, 12, GOOD_USER.encode(), good_raw("g-2", minute=2)),
    ]
    result = ingest_batch(batch, lambda _: None, now=NOW, **case.kwargs)

    good = result.changed[GOOD_USER]
    assert good["events"] == 2 and good["views"] == 2
    assert good[SEEN_KEY] == as_digests(["g-1", "g-2"])
    outcomes = {outcome: n for (_, outcome), n in result.counts.items()}
    if case.expect == ACCEPT:
        assert result.rejected == []
        assert outcomes == {"ok": 3}
        (hostile_user,) = set(result.changed) - {GOOD_USER}
        profile = result.changed[hostile_user]
        assert profile["events"] == 1
        _assert_sane(profile)
        payload = orjson.loads(case.raw)
        if payload["type"] == "track" and payload["event"] not in KNOWN_NAMES:
            assert route(payload) == "clickstream"  # custom names are valid: clickstream
        if case.check is not None:
            case.check(result)
    elif case.expect == DUPLICATE:
        assert result.rejected == []
        assert outcomes == {"ok": 2, "duplicate": 1}
        assert set(result.changed) == {GOOD_USER}
    else:
        assert [(r.offset, why.reason) for r, why in result.rejected] == [(11, case.expect)]
        assert outcomes == {"ok": 2, "deadletter": 1}
        assert set(result.changed) == {GOOD_USER}
        assert result.rejected[0][0].value == case.raw  # the original bytes, for the DLQ
        detail = result.rejected[0][1].detail
        assert "alice" not in detail.lower() and "\n" not in detail


def test_custom_track_event_is_valid_routed_to_clickstream_and_applied() -> None:
    payload = track("Banner Hovered", message_id="h-custom", banner="spring")
    assert route(payload) == "clickstream"
    event = parse_event(orjson.dumps(payload), now=NOW)
    assert not isinstance(event, Rejection) and event["event"] == "Banner Hovered"


def test_timestamp_just_beyond_the_future_bound_is_rejected_and_just_within_is_not() -> None:
    limit = NOW + 86400.0
    inside = parse_event(orjson.dumps(track(ts=limit)), now=NOW)
    beyond = parse_event(orjson.dumps(track(ts=limit + 1)), now=NOW)
    assert not isinstance(inside, Rejection) and inside["ts"] == limit
    assert isinstance(beyond, Rejection) and beyond.reason == TIMESTAMP_OUT_OF_RANGE


def test_pii_never_reaches_the_event() -> None:
    (case,) = [c for c in CORPUS if c.name == "PII in identify traits"]
    event = parse_event(case.raw, now=NOW)
    assert not isinstance(event, Rejection)
    text = orjson.dumps(event).decode()
    assert "alice@example.com" not in text and "555" not in text and "Liddell" not in text
    assert event["traits"]["plan"] == "gold"


def test_regression_nul_user_id_cannot_overwrite_the_watermark_entry() -> None:
    """Found by the hostile corpus: ``userId`` "\\u0000watermark/0" used to be accepted.

    The worker stores partition watermarks in the profiles table under b"\\x00watermark/<n>";
    loading that entry as the profile of this user gave a float and ``apply_events`` crashed with
    AttributeError (and the profile written back would have corrupted the watermark).
    """
    table = {b"\x00watermark/0": repr(1_709_290_000.0).encode()}

    def load(user_id: str) -> dict[str, Any] | None:
        raw = table.get(user_id.encode())
        return orjson.loads(raw) if raw else None

    raw = orjson.dumps(track(user="\x00watermark/0"))
    result = ingest_batch([Record("clickstream", 0, 1, b"k", raw)], load, now=NOW)
    assert [why.reason for _, why in result.rejected] == [BAD_FIELD]
    assert result.changed == {}
    # ordinary non-ASCII ids are printable and still accepted
    for user in ("ユーザー-1", "josé", "user with spaces"):
        event = parse_event(orjson.dumps(track(user=user)), now=NOW)
        assert not isinstance(event, Rejection) and event["user_id"] == user


# --------------------------------------------------------------------------- fuzzing

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

text = st.text(st.characters(codec="utf-8"), max_size=30)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=20,
)
amounts = (
    st.floats(min_value=0, max_value=1.7e308)
    | st.integers(min_value=0, max_value=2**64 - 1)
    | st.sampled_from([0, 1, 0.5, 1e-300, 1e12, 1e12 + 1, 1e300])
)
EVENT_NAMES = [
    "Product Viewed",
    "Product Added",
    "Product Removed",
    "Cart Viewed",
    "Checkout Started",
    "Order Completed",
    "Order Refunded",
    "Email Delivered",
    "Email Opened",
    "Email Link Clicked",
    "Unsubscribed",
    "Email Bounced",
    "Offer Viewed",
    "Offer Clicked",
    "Segment Consent Preference Updated",
    "Erasure Requested",
    "Some Custom Event",
]
TOP_KEYS = [
    "type",
    "event",
    "userId",
    "anonymousId",
    "messageId",
    "timestamp",
    "properties",
    "context",
    "traits",
]
PROPERTY_KEYS = [
    "product_id",
    "sku",
    "price",
    "quantity",
    "revenue",
    "total",
    "value",
    "category",
    "name",
    "products",
    "categoryPreferences",
    "email",
]


def valid_event(name: str, user: str, message_id: str, minute: int) -> dict[str, Any]:
    """A valid message of each kind, with properties that exercise every handler."""
    call = "track"
    properties: dict[str, Any] = {
        "product_id": "p1",
        "price": 12.5,
        "quantity": 2,
        "category": "shoes",
    }
    if name in {"Order Completed", "Order Refunded"}:
        properties = {
            "revenue": 25.0,
            "products": [{"product_id": "p1", "price": 12.5, "quantity": 2, "category": "shoes"}],
        }
    elif name == "Segment Consent Preference Updated":
        properties = {"categoryPreferences": {"Email": True, "advertising": False}}
    event = {
        "type": call,
        "event": name,
        "userId": user,
        "anonymousId": f"anon-{user}",
        "messageId": message_id,
        "timestamp": f"2024-03-01T10:{minute % 60:02d}:00Z",
        "properties": properties,
        "context": {"consent": {"categoryPreferences": {"email": True}}},
    }
    return event


def _assert_sane(profile: dict[str, Any]) -> None:
    """A profile that Redis, the table and the models can take: finite numbers, JSON round trip."""
    assert orjson.loads(orjson.dumps(profile)) == profile
    fields = summary(profile, now=NOW)
    for key in NUMERIC_SUMMARY:
        if fields[key] != "":
            assert math.isfinite(float(fields[key])), (key, fields[key])
    vector = feature_vector(profile, now=NOW)
    assert list(vector) == list(FEATURE_NAMES)
    assert all(math.isfinite(v) for v in vector.values()), vector


def _ingest_and_check(values: list[bytes]) -> BatchResult:
    records = [Record("clickstream", 0, i, b"k", v) for i, v in enumerate(values)]
    result = ingest_batch(records, lambda _: None, now=NOW)
    assert all(why.reason in REASONS for _, why in result.rejected)
    for profile in result.changed.values():
        _assert_sane(profile)
    applied = sum(n for (_, outcome), n in result.counts.items() if outcome != "deadletter")
    assert applied + len(result.rejected) == len(values)
    return result


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_arbitrary_bytes_never_raise(raw: bytes) -> None:
    parsed = parse_event(raw, now=NOW)
    assert isinstance(parsed, Rejection | dict)
    if isinstance(parsed, Rejection):
        assert parsed.reason in REASONS


@FUZZ
@given(st.data())
def test_fuzz_byte_mutations_of_a_valid_event_never_raise(data: st.DataObject) -> None:
    raw = bytearray(orjson.dumps(valid_event(data.draw(st.sampled_from(EVENT_NAMES)), "u", "m", 1)))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw)))
        op = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = data.draw(st.binary(min_size=1, max_size=3))
        if op == "insert":
            raw[at:at] = byte
        elif op == "delete":
            del raw[at : at + len(byte)]
        else:
            raw[at : at + len(byte)] = byte
    _ingest_and_check([bytes(raw)])


@st.composite
def segment_shaped(draw: st.DrawFn) -> dict[str, Any]:
    event = valid_event(
        draw(st.sampled_from(EVENT_NAMES)),
        draw(st.sampled_from(["u1", "u2"])),
        draw(st.sampled_from(["m1", "m2", "m3", "m4"])),
        draw(st.integers(0, 59)),
    )
    event["type"] = draw(
        st.sampled_from(["track", "track", "identify", "page", "screen", "group", "alias"])
    )
    for key in draw(st.lists(st.sampled_from(TOP_KEYS), max_size=3, unique=True)):
        event[key] = draw(json_values)
    props = event.get("properties")
    if type(props) is dict:
        for key in draw(st.lists(st.sampled_from(PROPERTY_KEYS), max_size=3, unique=True)):
            props[key] = draw(amounts | json_values)  # numbers often, to get past validation
        if draw(st.booleans()):
            props["products"] = draw(
                st.lists(
                    st.dictionaries(
                        st.sampled_from(PROPERTY_KEYS), amounts | json_values, max_size=4
                    )
                    | json_values,
                    max_size=3,
                )
            )
    return event


@FUZZ
@given(st.lists(segment_shaped(), min_size=1, max_size=6))
def test_fuzz_segment_shaped_json_never_raises_and_profiles_stay_finite(
    events: list[dict[str, Any]],
) -> None:
    result = _ingest_and_check([orjson.dumps(e) for e in events])
    # every applied event is counted once per (user, messageId); an erasure drops its profile
    applied = sum(p["events"] for p in result.changed.values())
    ok = sum(n for (_, outcome), n in result.counts.items() if outcome == "ok")
    if result.erasures:
        assert applied <= ok
        assert not set(result.erasures) & set(result.changed)
    else:
        assert applied == ok


@st.composite
def one_field_mutated(draw: st.DrawFn) -> dict[str, Any]:
    event = valid_event(draw(st.sampled_from(EVENT_NAMES)), "u1", "m1", 5)
    place = draw(st.sampled_from(["top", "properties", "product", "consent"]))
    if place == "top":
        target, key = event, draw(st.sampled_from(TOP_KEYS))
    elif place == "properties":
        target, key = event["properties"], draw(st.sampled_from(PROPERTY_KEYS))
    elif place == "product":
        event["properties"]["products"] = [{"product_id": "p1", "price": 2.0, "quantity": 1}]
        target, key = event["properties"]["products"][0], draw(st.sampled_from(PROPERTY_KEYS))
    else:
        target = event["context"]["consent"]["categoryPreferences"]
        key = draw(st.sampled_from(["email", "Advertising", "EMAIL", "other"]))
    if draw(st.booleans()):
        target.pop(key, None)
    else:
        target[key] = draw(amounts | json_values)
    return event


@FUZZ
@given(one_field_mutated())
def test_fuzz_valid_event_with_one_field_mutated_never_raises(event: dict[str, Any]) -> None:
    good = good_raw("g-1")
    result = _ingest_and_check([good, orjson.dumps(event), good_raw("g-2", minute=3)])
    assert result.changed[GOOD_USER]["events"] == 2


@FUZZ
@given(
    raw=st.binary(max_size=4096),
    reason=st.sampled_from(REASONS) | text,
    detail=text,
    topic=text,
    partition=st.integers(0, 2**31 - 1),
    offset=st.integers(0, 2**63 - 1),
    at=st.floats(allow_nan=False, allow_infinity=False),
)
def test_fuzz_dead_letter_round_trip(
    raw: bytes, reason: str, detail: str, topic: str, partition: int, offset: int, at: float
) -> None:
    record = dead_letter_record(
        raw, topic=topic, partition=partition, offset=offset, reason=reason, detail=detail, at=at
    )
    original, meta = decode_dead_letter(record)
    assert original == raw
    assert meta == {
        "reason": reason,
        "detail": detail,
        "source": {"topic": topic, "partition": partition, "offset": offset},
        "at": at,
    }


@FUZZ
@given(st.binary(max_size=512) | json_values.map(orjson.dumps))
def test_fuzz_decode_dead_letter_raises_only_value_error(record: bytes) -> None:
    try:
        original, meta = decode_dead_letter(record)
    except ValueError:
        return
    assert isinstance(original, bytes) and isinstance(meta, dict)
