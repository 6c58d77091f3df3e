"""Segment / RudderStack spec input adapter: raw bytes in, a validated ``Event`` or a ``Rejection``.

Producers send Segment-spec JSON (``track``, ``identify``, ...). Everything downstream (feature
functions, models, triggers) wants a small, trusted, PII-free shape with event time as a float,
so this module is the single place where untrusted input is parsed and checked. It is pure: no
Kafka, Redis or Faust, so it is cheap to unit-test and fast enough to run once per event.

Invalid input never raises: :func:`parse_event` returns a :class:`Rejection` whose ``reason`` is a
short stable code (a Prometheus label) and whose ``detail`` never carries field values, so it is
safe to log. The caller sends the original bytes to the dead-letter topic with
:func:`dead_letter_record`; :func:`decode_dead_letter` gets them back for a replay.

>>> raw = (b'{"type": "track", "event": "Product Added", "userId": "u-1", "messageId": "m-1",'
...        b' "timestamp": "2023-11-14T22:13:20Z",'
...        b' "properties": {"product_id": "p-1", "price": 9.5, "email": "a@example.com"}}')
>>> event = parse_event(raw, now=1_700_000_000.0)
>>> event["user_id"], event["event"], event["ts"], event["properties"]
('u-1', 'Product Added', 1700000000.0, {'product_id': 'p-1', 'price': 9.5})
>>> parse_event(b'{"type": "track"', now=1_700_000_000.0).reason
'not_json'
>>> route(orjson.loads(raw)), partition_key(orjson.loads(raw))
('clickstream', b'u-1')
>>> record = dead_letter_record(b'\\xff\\xfe', topic="clickstream", partition=3, offset=42,
...                             reason=INVALID_UTF8, detail="payload is not valid UTF-8", at=1.0)
>>> decode_dead_letter(record)[0]
b'\\xff\\xfe'
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from models.events import CALL_TYPES, CONSENT_UPDATED, IDENTITY_TYPES, Event, topic_kind

__all__ = [
    "BAD_FIELD",
    "BAD_TIMESTAMP",
    "INVALID_UTF8",
    "MISSING_EVENT_NAME",
    "MISSING_MESSAGE_ID",
    "MISSING_USER_ID",
    "NEGATIVE_VALUE",
    "NOT_JSON",
    "NOT_OBJECT",
    "REASONS",
    "TIMESTAMP_OUT_OF_RANGE",
    "TOO_DEEP",
    "TOO_LARGE",
    "UNKNOWN_TYPE",
    "Rejection",
    "dead_letter_record",
    "decode_dead_letter",
    "parse_event",
    "partition_key",
    "route",
]

TOO_LARGE = "too_large"
INVALID_UTF8 = "invalid_utf8"
NOT_JSON = "not_json"
TOO_DEEP = "too_deep"
NOT_OBJECT = "not_object"
UNKNOWN_TYPE = "unknown_type"
MISSING_MESSAGE_ID = "missing_message_id"
MAX_ID_LENGTH = 200
MISSING_USER_ID = "missing_user_id"
BAD_FIELD = "bad_field"
MISSING_EVENT_NAME = "missing_event_name"
BAD_TIMESTAMP = "bad_timestamp"
TIMESTAMP_OUT_OF_RANGE = "timestamp_out_of_range"
NEGATIVE_VALUE = "negative_value"

REASONS: tuple[str, ...] = (
    TOO_LARGE,
    INVALID_UTF8,
    NOT_JSON,
    TOO_DEEP,
    NOT_OBJECT,
    UNKNOWN_TYPE,
    MISSING_MESSAGE_ID,
    MISSING_USER_ID,
    BAD_FIELD,
    MISSING_EVENT_NAME,
    BAD_TIMESTAMP,
    TIMESTAMP_OUT_OF_RANGE,
    NEGATIVE_VALUE,
)
"""Every reason code :func:`parse_event` can return (e.g. to pre-create metric label values)."""

# Keys whose values are raw PII; matched case-insensitively, dropped from traits and properties.
PII_KEYS = frozenset(
    {
        "email",
        "name",
        "first_name",
        "firstname",
        "last_name",
        "lastname",
        "phone",
        "address",
        "street",
        "ip",
    }
)
# Monetary / count keys that must be non-negative numbers (bools rejected), in properties and in
# each of properties.products[*].
NUMERIC_KEYS = ("price", "revenue", "quantity", "total", "value")

_MS_THRESHOLD = 1e11  # numbers above this are epoch milliseconds (1e11 s is the year 5138)


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a raw message was refused: ``reason`` is a stable code, ``detail`` one PII-free line."""

    reason: str
    detail: str


def parse_event(
    raw: bytes,
    *,
    now: float,
    max_bytes: int = 65536,
    max_future_s: float = 86400.0,
    min_ts: float = 946684800.0,
    max_depth: int = 8,
) -> Event | Rejection:
    """Validate one Segment-spec message and normalize it into an :class:`Event`.

    ``now`` (epoch seconds) bounds future timestamps; ``min_ts`` (default 2000-01-01) bounds past
    ones. Returns a :class:`Rejection` instead of raising on any invalid input.
    """
    # orjson only builds exact builtin types, so ``type(x) is str`` is exact here (and fast), and
    # ``type(x) is int`` excludes booleans.
    if len(raw) > max_bytes:
        return Rejection(TOO_LARGE, f"payload is {len(raw)} bytes, limit {max_bytes}")
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _decode_failure(raw, exc)

    kind = type(payload)
    if kind is dict or kind is list:
        # Depth can never exceed the number of opening brackets: skip the walk for small events.
        if raw.count(b"{") + raw.count(b"[") > max_depth and _deeper_than(payload, max_depth):
            return Rejection(TOO_DEEP, f"nesting deeper than {max_depth} levels")
        if kind is list:
            return Rejection(NOT_OBJECT, "top-level JSON value is an array, not an object")
    else:
        return Rejection(NOT_OBJECT, f"top-level JSON value is {_kind(payload)}, not an object")
    get = payload.get

    call_type = get("type")
    if type(call_type) is not str or call_type not in CALL_TYPES:
        if call_type is None:
            return Rejection(UNKNOWN_TYPE, "type is missing")
        if type(call_type) is not str:
            return Rejection(BAD_FIELD, f"type must be a string, got {_kind(call_type)}")
        return Rejection(UNKNOWN_TYPE, "type is not one of " + ", ".join(sorted(CALL_TYPES)))

    message_id = get("messageId")
    if type(message_id) is not str or not message_id:
        if message_id is None or message_id == "":
            return Rejection(MISSING_MESSAGE_ID, "messageId is missing or empty")
        if type(message_id) is not int:
            return Rejection(BAD_FIELD, f"messageId must be a string, got {_kind(message_id)}")
        message_id = str(message_id)
    if len(message_id) > MAX_ID_LENGTH:  # ids are remembered per user for de-duplication
        return Rejection(BAD_FIELD, f"messageId longer than {MAX_ID_LENGTH} characters")

    user_id = get("userId")
    anonymous_id = get("anonymousId")
    if type(user_id) is not str or type(anonymous_id) not in _ID_TYPES:
        # Slow path: ints, empty strings, missing or wrong-typed ids.
        for field, value in (("userId", user_id), ("anonymousId", anonymous_id)):
            if value is not None and type(value) not in _ID_TYPES:
                return Rejection(BAD_FIELD, f"{field} must be a string, got {_kind(value)}")
        user_id = _id_str(user_id) or _id_str(anonymous_id)
        if not user_id:
            return Rejection(MISSING_USER_ID, "neither userId nor anonymousId is set")
    elif not user_id:
        user_id = _id_str(anonymous_id)
        if not user_id:
            return Rejection(MISSING_USER_ID, "neither userId nor anonymousId is set")
    # The user id becomes a table key and a Redis key. The worker keeps its own entries in the
    # profiles table under keys that start with a NUL byte (streams.app.WATERMARK_KEY_PREFIX,
    # relying on "ids are printable"), so an id such as "\u0000watermark/0" used to overwrite a
    # partition watermark and crash ingest when that entry was loaded back as a profile (a float,
    # not a dict). Printable ids (all normal ones) pass with a single C call.
    if not user_id.isprintable() and _CONTROL_CHARS.search(user_id) is not None:
        return Rejection(BAD_FIELD, "user id contains control characters")
    linked_id = ""
    if call_type in IDENTITY_TYPES:
        linked_id = _linked_id(get, call_type, user_id)
        if isinstance(linked_id, Rejection):
            return linked_id

    event_name = get("event")
    if call_type == "track":
        if type(event_name) is not str or not event_name:
            if event_name is None or event_name == "":
                return Rejection(MISSING_EVENT_NAME, "track call without an event name")
            return Rejection(BAD_FIELD, f"event must be a string, got {_kind(event_name)}")
    else:
        if event_name is not None and type(event_name) is not str:
            return Rejection(BAD_FIELD, f"event must be a string, got {_kind(event_name)}")
        event_name = ""

    ts = _parse_timestamp(get("timestamp"))
    if isinstance(ts, Rejection):
        return ts
    if ts < min_ts or ts > now + max_future_s:
        return Rejection(
            TIMESTAMP_OUT_OF_RANGE,
            f"timestamp {ts:.3f} outside [{min_ts:.0f}, {now + max_future_s:.0f}]",
        )

    properties = get("properties")
    if properties is None:
        properties = {}
    elif type(properties) is not dict:
        return Rejection(BAD_FIELD, f"properties must be an object, got {_kind(properties)}")
    elif properties:
        problem = _check_properties(properties)
        if problem is not None:
            return problem

    context = get("context")
    if context is None:
        context = _EMPTY
    elif type(context) is not dict:
        return Rejection(BAD_FIELD, f"context must be an object, got {_kind(context)}")

    traits = get("traits")
    where = "traits"
    if traits is None:
        traits = context.get("traits")
        where = "context.traits"
    if traits is None:
        traits = {}
    elif type(traits) is not dict:
        return Rejection(BAD_FIELD, f"{where} must be an object, got {_kind(traits)}")
    elif traits:
        traits = _scrub_traits(traits)

    consent: dict[str, bool] | None = None
    prefs = None
    consent_obj = context.get("consent")
    if consent_obj is not None:
        if type(consent_obj) is not dict:
            return Rejection(
                BAD_FIELD, f"context.consent must be an object, got {_kind(consent_obj)}"
            )
        prefs = consent_obj.get("categoryPreferences")
        where = "context.consent.categoryPreferences"
    if prefs is None and event_name == CONSENT_UPDATED:
        prefs = properties.get("categoryPreferences")
        where = "properties.categoryPreferences"
    if prefs is not None:
        if type(prefs) is not dict:
            return Rejection(BAD_FIELD, f"{where} must be an object, got {_kind(prefs)}")
        consent = {k.lower(): v for k, v in prefs.items() if v is True or v is False}

    event: Event = {
        "message_id": message_id,
        "user_id": user_id,
        "type": call_type,
        "event": event_name,
        "ts": ts,
        "properties": properties,
        "traits": traits,
        "consent": consent,
    }
    if linked_id:
        event["linked_id"] = linked_id
    return event


def _linked_id(get: Any, call_type: str, user_id: str) -> str | Rejection:
    """The anonymous id an identify (``anonymousId``) or alias (``previousId``) call links to
    ``userId``; ``""`` when the call links nothing."""
    field = "previousId" if call_type == "alias" else "anonymousId"
    other, known = get(field), get("userId")
    if type(other) not in _ID_TYPES:
        return Rejection(BAD_FIELD, f"{field} must be a string, got {_kind(other)}")
    linked, known_id = _id_str(other), _id_str(known) if type(known) in _ID_TYPES else ""
    if not linked or not known_id or linked == user_id:
        return ""
    if len(linked) > MAX_ID_LENGTH or _CONTROL_CHARS.search(linked) is not None:
        return Rejection(BAD_FIELD, f"{field} is longer than {MAX_ID_LENGTH} or has controls")
    return linked


def route(payload: dict[str, Any]) -> str:
    """Input stream of a raw Segment dict: clickstream, purchases, email or identity.

    >>> route({"type": "identify", "userId": "u-1"})
    'identity'
    """
    call_type = payload.get("type")
    event_name = payload.get("event")
    return topic_kind(
        call_type if isinstance(call_type, str) else "",
        event_name if isinstance(event_name, str) else "",
    )


def partition_key(payload: dict[str, Any]) -> bytes:
    """Kafka key for a raw Segment dict: ``userId`` (else ``anonymousId``) as UTF-8 bytes.

    Matches the ``user_id`` that :func:`parse_event` derives, so a user's events share a
    partition. Returns ``b""`` when neither id is usable (the event will be rejected anyway).

    >>> partition_key({"anonymousId": "anon-7", "userId": ""})
    b'anon-7'
    """
    for field in ("userId", "anonymousId"):
        value = payload.get(field)
        if value is None or value == "" or isinstance(value, bool):
            continue
        if isinstance(value, str):
            return value.encode("utf-8", "surrogatepass")
        if isinstance(value, int):
            return str(value).encode("ascii")
        return b""  # wrong type: parse_event rejects it as bad_field
    return b""


def dead_letter_record(
    raw: bytes,
    *,
    topic: str,
    partition: int,
    offset: int,
    reason: str,
    detail: str,
    at: float,
) -> bytes:
    """JSON dead-letter record keeping the original bytes exactly (base64) plus why and where."""
    return orjson.dumps(
        {
            "reason": reason,
            "detail": detail,
            "source": {"topic": topic, "partition": partition, "offset": offset},
            "at": at,
            "value_b64": base64.b64encode(bytes(raw)).decode("ascii"),
        }
    )


def decode_dead_letter(record: bytes) -> tuple[bytes, dict[str, Any]]:
    """Inverse of :func:`dead_letter_record`: ``(original bytes, metadata without the value)``.

    Raises ``ValueError`` if ``record`` is not a dead-letter record.
    """
    try:
        meta = orjson.loads(record)
    except orjson.JSONDecodeError as exc:
        raise ValueError("dead-letter record is not JSON") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("value_b64"), str):
        raise ValueError("dead-letter record has no value_b64 string")
    encoded = meta.pop("value_b64")
    try:
        original = base64.b64decode(encoded, validate=True)
    except binascii.Error as exc:
        raise ValueError("dead-letter value_b64 is not valid base64") from exc
    return original, meta


# --- helpers ------------------------------------------------------------------------------------

_ID_TYPES = frozenset({str, int, type(None)})
_CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1 controls
_NUMBER_TYPES = frozenset({int, float})
_EMPTY: dict[str, Any] = {}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _id_str(value: object) -> str:
    """An id (already type-checked: str, int or None) as a string; ``""`` when unset."""
    if value is None:
        return ""
    return value if type(value) is str else str(value)


def _decode_failure(raw: bytes, exc: orjson.JSONDecodeError) -> Rejection:
    """Classify an ``orjson`` failure (slow path only)."""
    try:
        bytes(raw).decode("utf-8")
    except UnicodeDecodeError as err:
        return Rejection(INVALID_UTF8, f"payload is not valid UTF-8 (byte {err.start})")
    if "depth limit" in str(exc) or "recursion" in str(exc).lower():
        return Rejection(TOO_DEEP, "nesting exceeds the JSON parser's depth limit")
    return Rejection(NOT_JSON, f"payload is not valid JSON (char {exc.pos})")


def _deeper_than(node: dict[str, Any] | list[Any], budget: int) -> bool:
    """True when ``node`` (counted as one level) nests more than ``budget`` levels."""
    if budget <= 0:
        return True
    children = node.values() if type(node) is dict else node
    for child in children:
        kind = type(child)
        if (kind is dict or kind is list) and _deeper_than(child, budget - 1):
            return True
    return False


def _parse_timestamp(value: object) -> float | Rejection:
    """ISO-8601 string (``Z``/offset, optional fraction; naive means UTC) or epoch s / ms number."""
    kind = type(value)
    if kind is str:
        try:
            parsed = datetime.fromisoformat(value)  # type: ignore[arg-type]
        except ValueError:
            return Rejection(BAD_TIMESTAMP, "timestamp is not an ISO-8601 date-time")
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        try:
            return (parsed - _EPOCH).total_seconds()
        except OverflowError:
            return Rejection(BAD_TIMESTAMP, "timestamp cannot be converted to epoch seconds")
    if kind in _NUMBER_TYPES:
        ts = float(value)  # type: ignore[arg-type]
        return ts / 1000.0 if ts > _MS_THRESHOLD else ts
    if value is None:
        return Rejection(BAD_TIMESTAMP, "timestamp is missing")
    return Rejection(BAD_TIMESTAMP, f"timestamp must be a string or number, got {_kind(value)}")


def _check_numbers(obj: dict[str, Any], where: str) -> Rejection | None:
    """Reject non-number or negative money / quantity fields of ``obj``; drop ``null`` ones."""
    for key in NUMERIC_KEYS:
        value = obj.get(key)
        if type(value) in _NUMBER_TYPES:
            if value < 0:
                return Rejection(NEGATIVE_VALUE, f"{where}.{key} is negative")
        elif value is None:
            obj.pop(key, None)  # absent or null: models can rely on numbers
        else:
            return Rejection(BAD_FIELD, f"{where}.{key} must be a number, got {_kind(value)}")
    return None


def _check_properties(properties: dict[str, Any]) -> Rejection | None:
    """Validate ``properties`` (and ``products[*]``) and drop PII keys, in place.

    Only top-level keys are scrubbed: ``products[*].name`` is a product's name, not a person's.
    """
    problem = _check_numbers(properties, "properties")
    if problem is not None:
        return problem
    products = properties.get("products")
    if products is not None:
        if type(products) is not list:
            return Rejection(
                BAD_FIELD, f"properties.products must be an array, got {_kind(products)}"
            )
        for i, product in enumerate(products):
            if type(product) is not dict:
                return Rejection(
                    BAD_FIELD, f"properties.products[{i}] must be an object, got {_kind(product)}"
                )
            problem = _check_numbers(product, f"properties.products[{i}]")
            if problem is not None:
                return problem
    if not PII_KEYS.isdisjoint(map(str.lower, properties)):
        for key in [k for k in properties if k.lower() in PII_KEYS]:
            del properties[key]
    return None


def _scrub_traits(traits: dict[str, Any]) -> dict[str, Any]:
    """Copy of ``traits`` without PII keys nor any string containing ``@``, recursively."""
    out: dict[str, Any] = {}
    for key, value in traits.items():
        kind = type(value)
        if key.lower() in PII_KEYS or (kind is str and "@" in value):
            continue
        if kind is dict:
            value = _scrub_traits(value)
        elif kind is list:
            value = [
                _scrub_traits(v) if type(v) is dict else v
                for v in value
                if not (type(v) is str and "@" in v)
            ]
        out[key] = value
    return out


def _kind(value: object) -> str:
    """JSON type name of ``value`` (never the value itself: details must stay PII-free)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
