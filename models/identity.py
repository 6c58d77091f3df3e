"""Identity stitching: fold an anonymous visitor's profile into the known user's profile.

A shopper browses as ``anonymousId`` and later logs in: an ``identify`` call then links that
anonymous id to a ``userId``. Both profiles describe one person, so :func:`merge_profiles` makes
one: counts add, first/last times widen, carts join (unless the known user has ordered since the
anonymous cart last changed: that cart was bought), category interests add after decaying to a
common time, applied message ids are kept so a re-delivered event still counts once. Consent is
the known user's where the known user stated it (the person who logged in decides), the
anonymous visitor's otherwise; an unsubscribe on either side stays.

Pure: no Kafka, Redis or Faust. The stream side (``streams.identity``) moves the anonymous profile
to the known user's partition and forwards later events of the anonymous id there.

>>> from models.features import new_profile
>>> known, anonymous = new_profile("u-1"), new_profile("anon-9")
>>> known.update(events=3, orders=1, revenue=40.0, first_seen=2_000.0, last_seen=3_000.0)
>>> known["consent"] = {"email": False, "advertising": None}
>>> anonymous.update(events=2, first_seen=1_000.0, last_seen=2_500.0, cart_updated_at=2_500.0)
>>> anonymous["cart"] = {"p1": {"qty": 2, "price": 9.5}}
>>> anonymous["consent"] = {"email": True, "advertising": True}
>>> merged = merge_profiles(known, anonymous)
>>> merged["user_id"], merged["events"], merged["orders"], merged["first_seen"]
('u-1', 5, 1, 1000.0)
>>> merged["cart"], merged["cart_value"]
({'p1': {'qty': 2, 'price': 9.5}}, 19.0)
>>> merged["consent"], merged["merged_from"]
({'email': False, 'advertising': True}, ['anon-9'])
"""

from __future__ import annotations

from typing import Any

import orjson

from models import dedupe
from models.features import (
    DEFAULT_AFFINITY_HALF_LIFE_S,
    MAX_CART_LINES,
    MAX_CATEGORIES,
    new_profile,
)

__all__ = [
    "MAX_MERGED_IDS",
    "MERGED_FROM_KEY",
    "SUMMED",
    "already_merged",
    "merge_profiles",
    "record_merged",
]

MERGED_FROM_KEY = "merged_from"
"""Anonymous ids folded into a profile: a re-delivered merge is recognised and skipped, and an
erasure of the user reaches the aliases too."""
MAX_MERGED_IDS = 50
SUMMED = (
    "events",
    "views",
    "pages",
    "orders",
    "revenue",
    "refunds",
    "email_delivered",
    "email_opened",
    "email_clicked",
    "email_bounced",
    "offers_viewed",
    "offers_clicked",
)
_EARLIEST = ("first_seen", "first_order_at")
_LATEST = (
    "last_seen",
    "last_order_at",
    "cart_cleared_at",
    "last_email_open_at",
    "last_email_click_at",
)
_MAX_QTY = 1_000_000


def already_merged(known: dict[str, Any], anonymous_id: str) -> bool:
    """Whether ``anonymous_id`` was already folded into ``known``."""
    return anonymous_id in known.get(MERGED_FROM_KEY, ())


def record_merged(profile: dict[str, Any], anonymous_id: str) -> None:
    """Note in ``profile`` that ``anonymous_id`` was merged into it (the last 50 are kept).

    >>> p = {}; record_merged(p, "a-1"); record_merged(p, "a-1"); p
    {'merged_from': ['a-1']}
    """
    ids = [i for i in profile.get(MERGED_FROM_KEY, []) if i != anonymous_id]
    profile[MERGED_FROM_KEY] = [*ids, anonymous_id][-MAX_MERGED_IDS:]


def merge_profiles(
    known: dict[str, Any] | None,
    anonymous: dict[str, Any],
    *,
    user_id: str | None = None,
    affinity_half_life_s: float = DEFAULT_AFFINITY_HALF_LIFE_S,
    dedupe_window: int = 256,
) -> dict[str, Any]:
    """The known user's profile with ``anonymous`` folded in (a new dict; inputs untouched).

    ``known`` may be None (the user has no profile yet): then ``user_id`` names the result.
    """
    if known is None:
        if user_id is None:
            raise ValueError("user_id is required when there is no known profile")
        known = new_profile(user_id)
    merged = orjson.loads(orjson.dumps(known))  # a deep copy, ten times faster than copy's
    for key in SUMMED:
        merged[key] = merged.get(key, 0) + anonymous.get(key, 0)
    merged["revenue"] = round(merged["revenue"], 2)
    for key in _EARLIEST:
        merged[key] = _pick(min, merged.get(key), anonymous.get(key))
    for key in _LATEST:
        merged[key] = _pick(max, merged.get(key), anonymous.get(key))
    merged["unsubscribed"] = bool(merged.get("unsubscribed") or anonymous.get("unsubscribed"))
    _merge_consent(merged, anonymous)
    _merge_cart(merged, anonymous)
    _merge_affinity(merged, anonymous, affinity_half_life_s)
    merged["seen"] = dedupe.merged(
        merged.get("seen", []), anonymous.get("seen", []), window=dedupe_window
    )
    record_merged(merged, anonymous["user_id"])
    return merged


def _pick(choose: Any, a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return float(choose(a, b))


def _merge_consent(merged: dict[str, Any], anonymous: dict[str, Any]) -> None:
    consent = merged.setdefault("consent", {})
    consent_at = merged.setdefault("consent_at", {})
    for category, value in (anonymous.get("consent") or {}).items():
        if consent.get(category) is None and value is not None:
            consent[category] = value
            consent_at[category] = (anonymous.get("consent_at") or {}).get(category)


def _merge_cart(merged: dict[str, Any], anonymous: dict[str, Any]) -> None:
    updated, cleared = anonymous.get("cart_updated_at"), merged.get("cart_cleared_at")
    if not anonymous.get("cart") or (
        cleared is not None and (updated is None or updated <= cleared)
    ):
        return  # the known user ordered after the anonymous cart last changed
    cart = merged["cart"]
    for product_id, line in anonymous["cart"].items():
        mine = cart.get(product_id)
        if mine is None:
            if len(cart) >= MAX_CART_LINES:
                del cart[next(iter(cart))]
            cart[product_id] = dict(line)
        else:
            mine["qty"] = min(mine["qty"] + line["qty"], _MAX_QTY)
    merged["cart_value"] = round(sum(line["price"] * line["qty"] for line in cart.values()), 2)
    merged["cart_updated_at"] = _pick(max, merged.get("cart_updated_at"), updated)
    merged["checkout_started_at"] = _pick(
        max, merged.get("checkout_started_at"), anonymous.get("checkout_started_at")
    )


def _merge_affinity(merged: dict[str, Any], anonymous: dict[str, Any], half_life_s: float) -> None:
    theirs, their_at = anonymous.get("affinity") or {}, anonymous.get("affinity_at")
    if not theirs or their_at is None:
        return
    mine, my_at = merged["affinity"], merged.get("affinity_at")
    at = their_at if my_at is None else max(my_at, their_at)
    mine_decay = 2.0 ** ((my_at - at) / half_life_s) if my_at is not None else 1.0
    their_decay = 2.0 ** ((their_at - at) / half_life_s)
    scores = {category: weight * mine_decay for category, weight in mine.items()}
    for category, weight in theirs.items():
        scores[category] = scores.get(category, 0.0) + weight * their_decay
    top = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_CATEGORIES]
    merged["affinity"] = dict(top)
    merged["affinity_at"] = at
