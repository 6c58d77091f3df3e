"""The per-user profile: pure functions of (state, event) → state, and state → features.

Every model in Persona reads the same small profile, kept per user in a changelog-backed Faust
table. It is a plain JSON-serializable dict (str keys; int, float, str, bool, None, nested dicts)
so it stores with orjson unchanged, and it is updated by :func:`apply_event`, a function of the
previous state and one event only. Time is *event time* only: "now" is an event's ``ts`` or an
explicit ``now=`` argument, never the wall clock, so replaying a log rebuilds the same profile.

Out-of-order events are expected (Kafka, retries, ESP webhooks): ``last_seen`` and the other
"last" timestamps only move forward, counts do not depend on order, a late cart event older than
the last order does not resurrect the cart, and a late event adds a decayed affinity weight
instead of moving the decay clock back.

>>> from models.events import Event
>>> def ev(name, ts, **props):
...     return Event(message_id=f"m-{ts}", user_id="u-1", type="track", event=name, ts=ts,
...                  properties=props, traits={}, consent=None)
>>> p = new_profile("u-1")
>>> for e in [ev("Product Viewed", 1_700_000_000.0, product_id="p1", category="shoes"),
...           ev("Product Added", 1_700_000_060.0, product_id="p1", price=49.9, quantity=2,
...              category="shoes"),
...           ev("Checkout Started", 1_700_000_120.0)]:
...     p = apply_event(p, e)
>>> p["cart_value"], p["checkout_started_at"] is not None
(99.8, True)
>>> p = apply_event(p, ev("Order Completed", 1_700_000_180.0, total=104.8,
...                       products=[{"product_id": "p1", "price": 49.9, "quantity": 2,
...                                  "category": "shoes"}]))
>>> p["orders"], p["revenue"], p["cart"], p["checkout_started_at"]
(1, 104.8, {}, None)
>>> s = summary(p, now=1_700_086_580.0)
>>> s["recency_days"], s["top_category"], s["updated_at"]
('1.000', 'shoes', '2023-11-14T22:16:20.000Z')
>>> list(feature_vector(p, now=1_700_086_580.0)) == list(FEATURE_NAMES)
True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from models.events import (
    CHECKOUT_STARTED,
    EMAIL_BOUNCED,
    EMAIL_DELIVERED,
    EMAIL_LINK_CLICKED,
    EMAIL_OPENED,
    OFFER_CLICKED,
    OFFER_VIEWED,
    ORDER_COMPLETED,
    ORDER_REFUNDED,
    PRODUCT_ADDED,
    PRODUCT_REMOVED,
    PRODUCT_VIEWED,
    UNSUBSCRIBED,
    Event,
    iso_utc,
)

__all__ = [
    "AFFINITY_WEIGHTS",
    "DEFAULT_AFFINITY_HALF_LIFE_S",
    "FEATURE_NAMES",
    "MAX_CART_LINES",
    "MAX_CATEGORIES",
    "PROFILE_VERSION",
    "apply_event",
    "feature_vector",
    "has_consent",
    "new_profile",
    "summary",
]

PROFILE_VERSION = 1
DEFAULT_AFFINITY_HALF_LIFE_S = 14 * 86400.0
MAX_CATEGORIES = 20
"""Category affinities kept per profile; a new category replaces the lowest-scored one."""
MAX_CART_LINES = 100
"""Cart lines kept; adding a new product to a full cart drops the oldest line."""
AFFINITY_WEIGHTS = {PRODUCT_VIEWED: 1.0, PRODUCT_ADDED: 3.0, ORDER_COMPLETED: 5.0}

_DAY = 86400.0
_CAP_DAYS = 365.0
_MAX_AMOUNT = 1e12  # larger (or non-finite) amounts are treated as missing
_MAX_QTY = 1_000_000
_MAX_STR = 200  # category / product name length kept
_EMPTY: dict[str, Any] = {}  # read-only default for missing properties
_CONSENT_CATEGORIES = ("email", "advertising")


def new_profile(user_id: str) -> dict[str, Any]:
    """An empty profile for ``user_id``. Timestamps are epoch seconds (event time) or None."""
    return {
        "v": PROFILE_VERSION,
        "user_id": user_id,
        "events": 0,
        "first_seen": None,
        "last_seen": None,
        "views": 0,
        "pages": 0,
        "orders": 0,
        "revenue": 0.0,
        "refunds": 0,
        "first_order_at": None,
        "last_order_at": None,
        "cart": {},
        "cart_value": 0.0,
        "cart_updated_at": None,
        "cart_cleared_at": None,
        "checkout_started_at": None,
        "email_delivered": 0,
        "email_opened": 0,
        "email_clicked": 0,
        "email_bounced": 0,
        "last_email_open_at": None,
        "last_email_click_at": None,
        "unsubscribed": False,
        "affinity": {},
        "affinity_at": None,
        "consent": {"email": None, "advertising": None},
        "consent_at": {"email": None, "advertising": None},
        "offers_viewed": 0,
        "offers_clicked": 0,
    }


# --------------------------------------------------------------------------- value parsing


def _num(x: Any) -> float | None:
    """A finite, sane float from a number or numeric string; None otherwise (bools too)."""
    t = type(x)
    if t is float or t is int:
        v = float(x)
    elif t is str:
        try:
            v = float(x)
        except ValueError:
            return None
    else:
        return None
    if v != v or v > _MAX_AMOUNT or v < -_MAX_AMOUNT:  # NaN, ±inf, absurd
        return None
    return v


def _qty(x: Any) -> int:
    """A positive integer quantity; 1 when missing or invalid."""
    v = _num(x)
    if v is None or v < 1:
        return 1
    return int(v) if v < _MAX_QTY else _MAX_QTY


def _text(x: Any) -> str | None:
    if type(x) is str and x:
        return x if len(x) <= _MAX_STR else x[:_MAX_STR]
    return None


def _product_id(props: dict[str, Any]) -> str | None:
    pid = props.get("product_id")
    if pid is None:
        pid = props.get("sku")
    if pid is None or type(pid) is bool:
        return None
    pid = pid if type(pid) is str else str(pid)
    return pid[:_MAX_STR] if pid else None


def _amount(props: dict[str, Any]) -> float:
    """Order amount: ``revenue``, else ``total``, else the sum of products price * quantity."""
    v = _num(props.get("revenue"))
    if v is None:
        v = _num(props.get("total"))
    if v is None:
        v = 0.0
        products = props.get("products")
        if type(products) is list:
            for item in products:
                if type(item) is dict:
                    price = _num(item.get("price"))
                    if price is not None and price > 0:
                        v += price * _qty(item.get("quantity"))
    return v if v > 0 else 0.0


# --------------------------------------------------------------------------- pieces


def _add_affinity(p: dict[str, Any], category: Any, weight: float, ts: float, hl: float) -> None:
    """Add ``weight`` to a category, decaying lazily from ``affinity_at`` (half-life ``hl``)."""
    cat = _text(category)
    if cat is None:
        return
    aff = p["affinity"]
    at = p["affinity_at"]
    if at is None:
        p["affinity_at"] = ts
    elif ts > at:
        f = 2.0 ** ((at - ts) / hl)
        for k in aff:
            aff[k] *= f
        p["affinity_at"] = ts
    elif ts < at:  # late event: its weight has already decayed by the age difference
        weight *= 2.0 ** ((ts - at) / hl)
    old = aff.get(cat)
    if old is not None:
        aff[cat] = old + weight
        return
    if len(aff) >= MAX_CATEGORIES:  # a new interest always enters; the weakest other leaves
        del aff[min(aff.items(), key=_score_then_name)[0]]
    aff[cat] = weight


def _score_then_name(kv: tuple[str, float]) -> tuple[float, str]:
    return kv[1], kv[0]


def _cart_total(cart: dict[str, dict[str, Any]]) -> float:
    total = 0.0
    for line in cart.values():
        total += line["price"] * line["qty"]
    return round(total, 2)


def _cart_event_is_stale(p: dict[str, Any], ts: float) -> bool:
    """A cart event at or before the last completed order belongs to a cart already bought."""
    cleared = p["cart_cleared_at"]
    return cleared is not None and ts <= cleared


def _cart_touched(p: dict[str, Any], ts: float) -> None:
    p["cart_value"] = _cart_total(p["cart"])
    at = p["cart_updated_at"]
    if at is None or ts > at:
        p["cart_updated_at"] = ts


def _set_consent(p: dict[str, Any], category: str, value: bool, ts: float) -> None:
    """Newest statement wins; on a tie in event time, a refusal wins (order-independent)."""
    at_map = p["consent_at"]
    at = at_map[category]
    if at is None or ts > at or (ts == at and not value):
        p["consent"][category] = value
        at_map[category] = ts


def _apply_consent(p: dict[str, Any], consent: dict[str, Any], ts: float) -> None:
    for cat in _CONSENT_CATEGORIES:
        v = consent.get(cat)
        if v is None:
            continue
        if cat == "email" and p["unsubscribed"]:
            continue  # Unsubscribed is sticky: a stale CMP "email: true" must not re-grant it
        _set_consent(p, cat, bool(v), ts)


# --------------------------------------------------------------------------- handlers

_Handler = Callable[[dict[str, Any], dict[str, Any], float, float], None]


def _on_product_viewed(p: dict[str, Any], props: dict[str, Any], ts: float, hl: float) -> None:
    p["views"] += 1
    _add_affinity(p, props.get("category"), AFFINITY_WEIGHTS[PRODUCT_VIEWED], ts, hl)


def _on_product_added(p: dict[str, Any], props: dict[str, Any], ts: float, hl: float) -> None:
    _add_affinity(p, props.get("category"), AFFINITY_WEIGHTS[PRODUCT_ADDED], ts, hl)
    pid = _product_id(props)
    if pid is None or _cart_event_is_stale(p, ts):
        return
    cart = p["cart"]
    q = _qty(props.get("quantity"))
    price = _num(props.get("price"))
    line = cart.get(pid)
    if line is None:
        if len(cart) >= MAX_CART_LINES:
            del cart[next(iter(cart))]
        line = cart[pid] = {"qty": q, "price": price if price is not None and price > 0 else 0.0}
    else:
        line["qty"] = min(line["qty"] + q, _MAX_QTY)
        if price is not None and price > 0:
            line["price"] = price
    name = _text(props.get("name"))
    if name is not None:
        line["name"] = name
    category = _text(props.get("category"))
    if category is not None:
        line["category"] = category
    _cart_touched(p, ts)


def _on_product_removed(p: dict[str, Any], props: dict[str, Any], ts: float, hl: float) -> None:
    pid = _product_id(props)
    if pid is None or _cart_event_is_stale(p, ts):
        return
    cart = p["cart"]
    line = cart.get(pid)
    if line is None:
        return
    qty = line["qty"] - _qty(props.get("quantity"))
    if qty <= 0:
        del cart[pid]
    else:
        line["qty"] = qty
    _cart_touched(p, ts)


def _on_checkout_started(p: dict[str, Any], props: dict[str, Any], ts: float, hl: float) -> None:
    if _cart_event_is_stale(p, ts):
        return
    at = p["checkout_started_at"]
    if at is None or ts > at:
        p["checkout_started_at"] = ts


def _on_order_completed(p: dict[str, Any], props: dict[str, Any], ts: float, hl: float) -> None:
    p["orders"] += 1
    p["revenue"] = round(p["revenue"] + _amount(props), 2)
    first, last = p["first_order_at"], p["last_order_at"]
    if first is None or ts < first:
        p["first_order_at"] = ts
    if last is None or ts > last:
        p["last_order_at"] = ts
    products = props.get("products")
    if type(products) is not list:
        products = ()
    weight = AFFINITY_WEIGHTS[ORDER_COMPLETED]
    for item in products:
        if type(item) is dict:
            _add_affinity(p, item.get("category"), weight, ts, hl)
    # Cart: everything at or before the order was bought.
    cleared = p["cart_cleared_at"]
    if cleared is None or ts > cleared:
        p["cart_cleared_at"] = ts
    checkout = p["checkout_started_at"]
    if checkout is not None and checkout <= ts:
        p["checkout_started_at"] = None
    cart = p["cart"]
    if not cart:
        return
    updated = p["cart_updated_at"]
    if updated is None or ts >= updated:
        cart.clear()
    else:  # a late order: the cart changed since, so only take out what this order bought
        for item in products:
            if type(item) is dict:
                pid = _product_id(item)
                line = cart.get(pid) if pid is not None else None
                if line is not None:
                    qty = line["qty"] - _qty(item.get("quantity"))
                    if qty <= 0:
                        del cart[pid]
                    else:
                        line["qty"] = qty
    _cart_touched(p, ts)


def _on_order_refunded(p: dict[str, Any], props: dict[str, Any], ts: float, hl: float) -> None:
    p["refunds"] += 1
    revenue = p["revenue"] - _amount(props)
    p["revenue"] = round(revenue, 2) if revenue > 0 else 0.0


def _on_email_delivered(p: dict[str, Any], props: dict[str, Any], ts: float, hl: float) -> None:
    p["email_delivered"] += 1


def _on_email_opened(p: dict[str, Any], props: dict[str, Any], ts: float, hl: float) -> None:
    p["email_opened"] += 1
    at = p["last_email_open_at"]
    if at is None or ts > at:
        p["last_email_open_at"] = ts


def _on_email_clicked(p: dict[str, Any], props: dict[str, Any], ts: float, hl: float) -> None:
    p["email_clicked"] += 1
    at = p["last_email_click_at"]
    if at is None or ts > at:
        p["last_email_click_at"] = ts


def _on_email_bounced(p: dict[str, Any], props: dict[str, Any], ts: float, hl: float) -> None:
    p["email_bounced"] += 1


def _on_unsubscribed(p: dict[str, Any], props: dict[str, Any], ts: float, hl: float) -> None:
    p["unsubscribed"] = True
    p["consent"]["email"] = False
    at = p["consent_at"]["email"]
    if at is None or ts > at:
        p["consent_at"]["email"] = ts


def _on_offer_viewed(p: dict[str, Any], props: dict[str, Any], ts: float, hl: float) -> None:
    p["offers_viewed"] += 1


def _on_offer_clicked(p: dict[str, Any], props: dict[str, Any], ts: float, hl: float) -> None:
    p["offers_clicked"] += 1


_HANDLERS: dict[str, _Handler] = {
    PRODUCT_VIEWED: _on_product_viewed,
    PRODUCT_ADDED: _on_product_added,
    PRODUCT_REMOVED: _on_product_removed,
    CHECKOUT_STARTED: _on_checkout_started,
    ORDER_COMPLETED: _on_order_completed,
    ORDER_REFUNDED: _on_order_refunded,
    EMAIL_DELIVERED: _on_email_delivered,
    EMAIL_OPENED: _on_email_opened,
    EMAIL_LINK_CLICKED: _on_email_clicked,
    EMAIL_BOUNCED: _on_email_bounced,
    UNSUBSCRIBED: _on_unsubscribed,
    OFFER_VIEWED: _on_offer_viewed,
    OFFER_CLICKED: _on_offer_clicked,
}
_PAGE_TYPES = frozenset({"page", "screen"})


def apply_event(
    profile: dict[str, Any],
    event: Event,
    *,
    affinity_half_life_s: float = DEFAULT_AFFINITY_HALF_LIFE_S,
) -> dict[str, Any]:
    """Fold one event into ``profile``: (state, event) → state.

    Mutates ``profile`` in place (for speed) and returns it. The result depends only on the
    previous state and the event, so replaying the same events in the same order gives an
    identical dict. ``affinity_half_life_s`` must be > 0.
    """
    p = profile
    ts = event["ts"]
    p["events"] += 1
    first = p["first_seen"]
    if first is None or ts < first:
        p["first_seen"] = ts
    last = p["last_seen"]
    if last is None or ts > last:
        p["last_seen"] = ts
    consent = event.get("consent")
    if consent:
        _apply_consent(p, consent, ts)
    handler = _HANDLERS.get(event["event"])
    if handler is not None:
        handler(p, event.get("properties") or _EMPTY, ts, affinity_half_life_s)
    elif event["type"] in _PAGE_TYPES:
        p["pages"] += 1
    return p


# --------------------------------------------------------------------------- reading


def has_consent(profile: dict[str, Any], category: str, default: bool) -> bool:
    """Whether ``category`` ("email", "advertising") is allowed; ``default`` if never stated.

    After Unsubscribed, email is always refused.
    """
    category = category.lower()
    if category == "email" and profile["unsubscribed"]:
        return False
    value = profile["consent"].get(category)
    return default if value is None else bool(value)


def top_category(profile: dict[str, Any]) -> str:
    """The category with the highest affinity ('' if none); ties go to the smaller name."""
    aff = profile["affinity"]
    if not aff:
        return ""
    return min(aff.items(), key=lambda kv: (-kv[1], kv[0]))[0]


def _iso(ts: float | None) -> str:
    return "" if ts is None else iso_utc(ts)


def _days(now: float, ts: float | None) -> float | None:
    if ts is None:
        return None
    d = (now - ts) / _DAY
    return d if d > 0 else 0.0


def _fmt(x: float | None, digits: int = 3) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _flag(x: bool | None) -> str:
    return "" if x is None else ("1" if x else "0")


def _cart_items(profile: dict[str, Any]) -> int:
    return sum(line["qty"] for line in profile["cart"].values())


def summary(profile: dict[str, Any], *, now: float) -> dict[str, str]:
    """The flat string fields of the Redis hash ``persona:profile:{<user id>}``.

    ``now`` is event time (the watermark), never the wall clock. Unknown values are ''.
    """
    p = profile
    consent = p["consent"]
    return {
        "user_id": p["user_id"],
        "events": str(p["events"]),
        "orders": str(p["orders"]),
        "revenue": f"{p['revenue']:.2f}",
        "recency_days": _fmt(_days(now, p["last_order_at"])),
        "days_since_seen": _fmt(_days(now, p["last_seen"])),
        "cart_items": str(_cart_items(p)),
        "cart_value": f"{p['cart_value']:.2f}",
        "checkout_started": "1" if p["checkout_started_at"] is not None else "0",
        "email_delivered": str(p["email_delivered"]),
        "email_opened": str(p["email_opened"]),
        "email_clicked": str(p["email_clicked"]),
        "unsubscribed": "1" if p["unsubscribed"] else "0",
        "consent_email": _flag(consent.get("email")),
        "consent_advertising": _flag(consent.get("advertising")),
        "top_category": top_category(p),
        "first_seen": _fmt(p["first_seen"]),
        "last_seen": _fmt(p["last_seen"]),
        "updated_at": _iso(p["last_seen"]),
    }


FEATURE_NAMES: tuple[str, ...] = (
    "recency_days",
    "has_ordered",
    "log_orders",
    "log_revenue",
    "log_avg_order_value",
    "refund_rate",
    "cart_value",
    "log_cart_value",
    "cart_items",
    "has_cart",
    "cart_age_days",
    "checkout_started",
    "email_open_rate",
    "email_click_rate",
    "days_since_email_open",
    "unsubscribed",
    "log_views",
    "log_events",
    "days_since_seen",
    "days_since_first_seen",
    "top_category_share",
    "n_categories",
    "offer_click_rate",
)
"""Keys of :func:`feature_vector`, in order. Day counts are capped at 365 (365 = never)."""


def _capped_days(now: float, ts: float | None) -> float:
    d = _days(now, ts)
    return _CAP_DAYS if d is None or d > _CAP_DAYS else d


def _rate(num: int, den: int) -> float:
    if den <= 0:
        return 0.0
    r = num / den
    return r if r < 1.0 else 1.0


def feature_vector(profile: dict[str, Any], *, now: float) -> dict[str, float]:
    """Numeric model features at event time ``now``; keys are :data:`FEATURE_NAMES`, all finite."""
    p = profile
    orders = p["orders"]
    revenue = p["revenue"]
    cart_value = p["cart_value"]
    has_cart = bool(p["cart"])
    aff = p["affinity"]
    aff_total = sum(aff.values())
    top_share = max(aff.values()) / aff_total if aff_total > 0 else 0.0
    return {
        "recency_days": _capped_days(now, p["last_order_at"]),
        "has_ordered": 1.0 if orders > 0 else 0.0,
        "log_orders": math.log1p(orders),
        "log_revenue": math.log1p(revenue),
        "log_avg_order_value": math.log1p(revenue / orders) if orders > 0 else 0.0,
        "refund_rate": _rate(p["refunds"], orders),
        "cart_value": float(cart_value),
        "log_cart_value": math.log1p(cart_value),
        "cart_items": float(_cart_items(p)),
        "has_cart": 1.0 if has_cart else 0.0,
        "cart_age_days": _capped_days(now, p["cart_updated_at"]) if has_cart else 0.0,
        "checkout_started": 1.0 if p["checkout_started_at"] is not None else 0.0,
        "email_open_rate": _rate(p["email_opened"], p["email_delivered"]),
        "email_click_rate": _rate(p["email_clicked"], p["email_delivered"]),
        "days_since_email_open": _capped_days(now, p["last_email_open_at"]),
        "unsubscribed": 1.0 if p["unsubscribed"] else 0.0,
        "log_views": math.log1p(p["views"]),
        "log_events": math.log1p(p["events"]),
        "days_since_seen": _capped_days(now, p["last_seen"]),
        "days_since_first_seen": _capped_days(now, p["first_seen"]),
        "top_category_share": float(top_share),
        "n_categories": float(len(aff)),
        "offer_click_rate": _rate(p["offers_clicked"], p["offers_viewed"]),
    }
