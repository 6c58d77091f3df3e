"""The normalized event: what every model and feature function receives.

Producers send Segment / RudderStack spec JSON. Ingest (``connectors.segment``) validates it and
turns it into this small, flat shape so that models never parse raw JSON nor look at
wall-clock time: ``ts`` is the event time in epoch seconds.

>>> event = Event(message_id="m-1", user_id="u-1", type="track", event="Product Added",
...               ts=1_700_000_000.0, properties={"product_id": "p-1", "price": 9.5},
...               traits={}, consent=None)
>>> event["event"]
'Product Added'
"""

from __future__ import annotations

import functools
import math
from datetime import UTC, datetime
from typing import Any, NotRequired, TypedDict


class Event(TypedDict):
    """A validated, normalized Segment-spec event."""

    message_id: str
    """``messageId``: the de-duplication key."""
    user_id: str
    """``userId``, or ``anonymousId`` when the user is not known yet: the profile key."""
    type: str
    """Segment call type: track, identify, alias, page, screen or group."""
    event: str
    """Track event name (``Product Added``); empty for other call types."""
    ts: float
    """Event time, epoch seconds."""
    properties: dict[str, Any]
    traits: dict[str, Any]
    consent: dict[str, bool] | None
    """``context.consent.categoryPreferences`` with lower-cased category names, if stated."""
    linked_id: NotRequired[str]
    """On identify and alias calls: the anonymous id (``anonymousId``, ``previousId``) the call
    links to ``userId``, when it differs. Its profile is merged into the user's."""


PRODUCT_VIEWED = "Product Viewed"
PRODUCT_ADDED = "Product Added"
PRODUCT_REMOVED = "Product Removed"
CART_VIEWED = "Cart Viewed"
CHECKOUT_STARTED = "Checkout Started"
ORDER_COMPLETED = "Order Completed"
ORDER_REFUNDED = "Order Refunded"

EMAIL_DELIVERED = "Email Delivered"
EMAIL_OPENED = "Email Opened"
EMAIL_LINK_CLICKED = "Email Link Clicked"
UNSUBSCRIBED = "Unsubscribed"
EMAIL_BOUNCED = "Email Bounced"

OFFER_VIEWED = "Offer Viewed"
OFFER_CLICKED = "Offer Clicked"

CONSENT_UPDATED = "Segment Consent Preference Updated"
ERASURE_REQUESTED = "Erasure Requested"

PURCHASE_EVENTS = frozenset({ORDER_COMPLETED, ORDER_REFUNDED})
EMAIL_EVENTS = frozenset(
    {EMAIL_DELIVERED, EMAIL_OPENED, EMAIL_LINK_CLICKED, UNSUBSCRIBED, EMAIL_BOUNCED}
)
IDENTITY_EVENTS = frozenset({CONSENT_UPDATED, ERASURE_REQUESTED})
IDENTITY_TYPES = frozenset({"identify", "alias"})
CALL_TYPES = frozenset({"track", "identify", "alias", "page", "screen", "group"})

CONSENT_CATEGORIES = ("email", "advertising")


def topic_kind(call_type: str, event_name: str) -> str:
    """Which input stream an event belongs to: clickstream, purchases, email or identity.

    >>> topic_kind("track", "Order Completed")
    'purchases'
    >>> topic_kind("identify", "")
    'identity'
    >>> topic_kind("track", "Product Viewed")
    'clickstream'
    """
    if call_type in IDENTITY_TYPES or event_name in IDENTITY_EVENTS:
        return "identity"
    if event_name in PURCHASE_EVENTS:
        return "purchases"
    if event_name in EMAIL_EVENTS:
        return "email"
    return "clickstream"


@functools.lru_cache(maxsize=4096)  # a profile's scoring formats the same few times repeatedly
def iso_utc(ts: float) -> str:
    """Epoch seconds as ISO-8601 UTC with milliseconds and ``Z``: the form of every time Persona
    writes.

    The same string as ``datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")``
    (microseconds rounded half to even, then cut to milliseconds), with the date and time of
    the whole second formatted once: a ``datetime`` per call was most of a miss's cost.

    >>> iso_utc(1_700_000_000.0), iso_utc(1_700_000_000.9999996)
    ('2023-11-14T22:13:20.000Z', '2023-11-14T22:13:21.000Z')
    """
    fraction, whole = math.modf(ts)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    elif micros < 0:
        whole, micros = whole - 1, micros + 1_000_000
    return f"{_iso_second(int(whole))}.{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=4096)
def _iso_second(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()[:-6]
