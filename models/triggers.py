"""Trigger logic: when an abandoned cart, a hot lead, a segment change or a new offer is an event.

What: pure functions over a small per-user state dict (JSON-serializable; the engine keeps it in
the profile under ``"triggers"``) and the event-time watermark. The engine calls
:func:`on_event` after :func:`models.features.apply_event`, keeps :func:`deadline` in its durable
timer index, and calls :func:`fire_due` when the watermark reaches that deadline.

Why: triggers are what customers see. An abandoned-cart email to the wrong person, or a duplicate
one, is the worst failure. So decisions use event time only (never the wall clock), and each
trigger carries a deterministic idempotency key. Replaying the same log at any speed, in any
batching, or after a crash decides the same triggers with the same keys (see the gates below for
the one exception, which only ever stops a send).

Abandoned cart, precisely:

* Cart activity means Product Added, Product Removed, Cart Viewed and Checkout Started. Other
  events (views, email) never move a deadline. A cart event that :mod:`models.features` ignores
  as stale (at or before the last order) is ignored here too.
* Episode: it opens with the first cart activity that leaves the cart holding items while no
  episode is open (the first add to an empty cart). It ends with Order Completed or when the cart
  becomes empty. Its ``start`` is the event time of that opening event. Late events never change
  the start.
* Deadline: the latest cart activity of the episode plus ``abandon_after_minutes``. The cart is
  abandoned when event time reaches the deadline, either by the watermark (:func:`fire_due`) or
  by an event of the same user at or after the deadline (:func:`on_event` records the lapse
  *before* it applies that event, so an order placed after the deadline does not cancel the
  trigger). So for events in order, the rule is a pure gap rule: a cart is abandoned if the gap
  between a cart activity and the next cart activity or order is at least the timeout. This holds
  whatever the batching or the watermark's lateness.
* At most one trigger per episode, fired or suppressed, at its first lapse. Later activity in the
  same episode does not re-arm it.
* Key: hex SHA-256 of the JSON array ``["abandoned-cart", user_id, start_ms]``, where
  ``start_ms`` is the episode start in integer milliseconds (see :func:`abandoned_cart_key`).
* Late events: an event older than a lapse already decided never undoes it. The trigger fired
  (or suppressed) is final. Its key does not change, because the key depends on the episode start
  only. A late cart activity that arrives before the lapse is decided moves the deadline forward,
  never back. A late order (older than the cart's last change) that leaves items in the cart ends
  the episode and opens a new one that starts at the order's time. An order older than the
  episode's start belongs to an earlier cart and is ignored.
* Gates are checked when the trigger is emitted, in this order (the reason is a metric label):
  ``erased``; ``unsubscribed``; ``no_consent`` (email consent, ``consent_default`` when never
  stated); ``capped`` (another abandoned-cart trigger was emitted less than ``cap_hours`` of event
  time earlier, comparing ``abandoned_at``). A suppressed lapse is not retried. Only emitted
  triggers count towards the cap. Which lapses happen, with their keys and times, depends on the
  log alone. The gates read the profile *when emitting*, so a consent withdrawal processed
  before the emission always wins, even when its event time is after the deadline. This is the
  only way processing timing can change an outcome, and it only ever stops a send.

>>> from models.features import apply_event, new_profile
>>> T = 1_700_000_000.0
>>> profile, state = new_profile("u-1"), new_state()
>>> for name, ts in [("Product Added", T), ("Checkout Started", T + 600)]:
...     event = {"message_id": str(ts), "user_id": "u-1", "type": "track", "event": name,
...              "ts": ts, "properties": {"product_id": "p1", "price": 20.0}, "traits": {},
...              "consent": None}
...     _ = apply_event(profile, event)
...     on_event(state, profile, name, ts)
>>> deadline(state) - T  # the last cart activity + 30 minutes
2400.0
>>> print(fire_due(state, profile, watermark=T + 2399, user_id="u-1", consent_default=True))
None
>>> fired = fire_due(state, profile, watermark=T + 2400, user_id="u-1", consent_default=True)
>>> fired.abandoned_at - T, fired.checkout_started, fired.cart_value
(2400.0, True, 20.0)
>>> fired.idempotency_key == abandoned_cart_key("u-1", T)
True
>>> print(fire_due(state, profile, watermark=T + 9999, user_id="u-1", consent_default=True))
None
>>> [hot_lead_transition(state, s) for s in (0.72, 0.65, 0.69, 0.59, 0.65)]
['entered', None, None, 'left', None]
>>> segment_transition(state, "vip"), segment_transition(state, "vip")
((None, 'vip'), None)
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import orjson

from models.events import (
    CART_VIEWED,
    CHECKOUT_STARTED,
    ORDER_COMPLETED,
    PRODUCT_ADDED,
    PRODUCT_REMOVED,
)
from models.features import has_consent

__all__ = [
    "CAPPED",
    "CART_ACTIVITY",
    "ERASED",
    "HOT_ENTERED",
    "HOT_LEFT",
    "NO_CONSENT",
    "SUPPRESSION_REASONS",
    "UNSUBSCRIBED",
    "AbandonedCart",
    "Suppressed",
    "TriggerConfig",
    "abandoned_cart_key",
    "deadline",
    "fire_due",
    "hot_lead_transition",
    "idempotency_key",
    "new_state",
    "offer_changed",
    "on_event",
    "segment_transition",
    "to_ms",
]

CART_ACTIVITY = frozenset({PRODUCT_ADDED, PRODUCT_REMOVED, CART_VIEWED, CHECKOUT_STARTED})
"""Events that open an episode (on an empty cart) or move its deadline."""

ERASED = "erased"
UNSUBSCRIBED = "unsubscribed"
NO_CONSENT = "no_consent"
CAPPED = "capped"
SUPPRESSION_REASONS: tuple[str, ...] = (ERASED, UNSUBSCRIBED, NO_CONSENT, CAPPED)
"""Every :attr:`Suppressed.reason`, in gate order (e.g. to pre-create metric label values)."""

HOT_ENTERED = "entered"
HOT_LEFT = "left"


_MINUTE = 60.0
_HOUR = 3600.0
_SNAPSHOT_KEYS = ("items", "value", "updated_at")


# --------------------------------------------------------------------------- keys


def to_ms(ts: float) -> int:
    """Epoch seconds as integer milliseconds: the time component of every idempotency key."""
    return round(ts * 1000.0)


def idempotency_key(*parts: str | int | None) -> str:
    """Hex SHA-256 of the compact JSON array of ``parts``: unambiguous and the same everywhere.

    >>> key = idempotency_key("abandoned-cart", "u-1", 1_700_000_000_000)
    >>> key == hashlib.sha256(b'["abandoned-cart","u-1",1700000000000]').hexdigest()
    True
    """
    text: bytes | None
    try:
        text = orjson.dumps(parts)
    except orjson.JSONEncodeError:  # an integer beyond 64 bits
        text = None
    if text is None or not text.isascii() or b"\x7f" in text:  # the key is json's escaping
        text = json.dumps(list(parts), separators=(",", ":")).encode("ascii")
    return hashlib.sha256(text).hexdigest()


def abandoned_cart_key(user_id: str, episode_start: float) -> str:
    """Idempotency key of a cart episode's abandoned-cart trigger (fired or suppressed)."""
    return idempotency_key("abandoned-cart", user_id, to_ms(episode_start))


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class AbandonedCart:
    """An abandoned-cart trigger to emit. Items and value are the cart as of the lapse."""

    user_id: str
    idempotency_key: str
    episode_start: float
    abandoned_at: float
    """The deadline: event time of the abandonment."""
    cart_updated_at: float | None
    cart_value: float
    items: tuple[dict[str, Any], ...]
    """``{product_id, quantity, price, name?, category?}`` per cart line."""
    checkout_started: bool
    """Checkout Started happened in the episode before the deadline."""


@dataclass(frozen=True, slots=True)
class Suppressed:
    """A lapse that a gate stopped: ``reason`` is one of :data:`SUPPRESSION_REASONS`."""

    user_id: str
    idempotency_key: str
    episode_start: float
    abandoned_at: float
    reason: str


# --------------------------------------------------------------------------- state


def new_state() -> dict[str, Any]:
    """An empty trigger state. Every function here also accepts ``{}``.

    ``cart`` is the open episode or None. ``due`` lists lapses seen by :func:`on_event` that have
    not been emitted yet. ``sent_at`` is the ``abandoned_at`` of the last emitted trigger, for
    the cap. ``hot``, ``segment`` and ``offer`` hold the last published value of each.
    """
    return {"cart": None, "due": [], "sent_at": None, "hot": False, "segment": None, "offer": None}


def _timeout_s(abandon_after_minutes: float) -> float:
    if not (math.isfinite(abandon_after_minutes) and abandon_after_minutes > 0):
        raise ValueError("abandon_after_minutes must be a positive number")
    return abandon_after_minutes * _MINUTE


def _snapshot(episode: dict[str, Any], profile: dict[str, Any]) -> None:
    """Copy the cart into the episode, so a lapse seen after a later event has its cart."""
    items = []
    for product_id, line in profile["cart"].items():
        item = {"product_id": product_id, "quantity": line["qty"], "price": line["price"]}
        for key in ("name", "category"):
            if key in line:
                item[key] = line[key]
        items.append(item)
    episode["items"] = items
    episode["value"] = profile["cart_value"]
    episode["updated_at"] = profile["cart_updated_at"]


def _open(start: float, last: float, deadline_at: float, checkout: bool) -> dict[str, Any]:
    return {"start": start, "last": last, "deadline": deadline_at, "checkout": checkout}


def _lapse(state: dict[str, Any], episode: dict[str, Any]) -> dict[str, Any]:
    """Decide the episode's lapse: move its data to ``due``. The decision is final."""
    due = {
        "start": episode["start"],
        "deadline": episode["deadline"],
        "checkout": episode["checkout"],
        "items": episode.get("items", []),
        "value": episode.get("value", 0.0),
        "updated_at": episode.get("updated_at"),
    }
    dues = state.get("due")
    if dues is None:
        dues = state["due"] = []
    dues.append(due)
    episode["deadline"] = None  # at most one trigger per episode
    for key in _SNAPSHOT_KEYS:
        episode.pop(key, None)
    return due


def on_event(
    state: dict[str, Any],
    profile_after: dict[str, Any],
    event_name: str,
    ts: float,
    *,
    abandon_after_minutes: float = 30.0,
) -> None:
    """Update the cart episode after ``apply_event`` has folded the event into the profile.

    ``profile_after`` is the profile *after* the event. ``ts`` is the event's time. Events other
    than cart activity and Order Completed are no-ops.
    """
    is_order = event_name == ORDER_COMPLETED
    if not is_order and event_name not in CART_ACTIVITY:
        return
    timeout = _timeout_s(abandon_after_minutes)
    episode = state.get("cart")
    if episode is not None and episode["deadline"] is not None and ts >= episode["deadline"]:
        _lapse(state, episode)  # event time passed the deadline before this event happened
    cart = profile_after["cart"]
    if is_order:
        if episode is None:
            return
        if not cart:
            state["cart"] = None
        elif ts >= episode["start"]:  # a late order that bought part of a cart changed since
            checkout_at = profile_after["checkout_started_at"]
            fresh = _open(
                ts,
                episode["last"],
                episode["last"] + timeout,
                checkout_at is not None and checkout_at > ts,
            )
            _snapshot(fresh, profile_after)
            state["cart"] = fresh
        return
    cleared = profile_after["cart_cleared_at"]
    if cleared is not None and ts <= cleared:
        return  # stale: belongs to a cart already bought (features ignored it too)
    if not cart:
        state["cart"] = None
        return
    if episode is None:
        episode = _open(ts, ts, ts + timeout, event_name == CHECKOUT_STARTED)
        _snapshot(episode, profile_after)
        state["cart"] = episode
        return
    if ts > episode["last"]:
        episode["last"] = ts
    if episode["deadline"] is None:
        return  # this episode's lapse is decided: nothing re-arms it
    if ts + timeout > episode["deadline"]:
        episode["deadline"] = ts + timeout
    if event_name == CHECKOUT_STARTED:
        episode["checkout"] = True
    _snapshot(episode, profile_after)


def deadline(state: dict[str, Any]) -> float | None:
    """The earliest event time at which :func:`fire_due` has something to do, or None."""
    dues = state.get("due")
    if dues:
        return dues[0]["deadline"]
    episode = state.get("cart")
    return None if episode is None else episode["deadline"]


def fire_due(
    state: dict[str, Any],
    profile: dict[str, Any],
    *,
    watermark: float,
    user_id: str,
    consent_default: bool,
    cap_hours: float = 24.0,
    erased: bool = False,
) -> AbandonedCart | Suppressed | None:
    """Emit the next lapse whose deadline the watermark has reached, or None.

    Handles one lapse per call, oldest first. Call again while it returns a result (more than
    one lapse can be pending after a large batch). Gates use ``profile`` as it is now, so an
    Unsubscribed processed before emission always wins.
    """
    if not cap_hours >= 0:
        raise ValueError("cap_hours must be >= 0")
    dues = state.get("due")
    if dues:
        if dues[0]["deadline"] > watermark:
            return None
        due = dues.pop(0)
    else:
        episode = state.get("cart")
        if episode is None or episode["deadline"] is None or episode["deadline"] > watermark:
            return None
        due = _lapse(state, episode)
        state["due"].pop()
    key = abandoned_cart_key(user_id, due["start"])
    at = due["deadline"]
    sent_at = state.get("sent_at")
    if erased:
        reason = ERASED
    elif profile["unsubscribed"]:
        reason = UNSUBSCRIBED
    elif not has_consent(profile, "email", consent_default):
        reason = NO_CONSENT
    elif sent_at is not None and at - sent_at < cap_hours * _HOUR:
        reason = CAPPED
    else:
        state["sent_at"] = at
        return AbandonedCart(
            user_id=user_id,
            idempotency_key=key,
            episode_start=due["start"],
            abandoned_at=at,
            cart_updated_at=due["updated_at"],
            cart_value=due["value"],
            items=tuple(due["items"]),
            checkout_started=due["checkout"],
        )
    return Suppressed(user_id, key, due["start"], at, reason)


# --------------------------------------------------------------------------- other triggers


def hot_lead_transition(
    state: dict[str, Any], score: float, *, enter: float = 0.7, exit: float = 0.6
) -> str | None:
    """``"entered"`` when the score reaches ``enter``, ``"left"`` when it drops below ``exit``.

    The gap between the two lines is a hysteresis band. A score that hovers around either line
    flips the state once, then stays. A non-finite score changes nothing.
    """
    if not 0.0 <= exit <= enter <= 1.0:
        raise ValueError("need 0 <= exit <= enter <= 1")
    if not math.isfinite(score):
        return None
    hot = state.get("hot", False)
    if not hot and score >= enter:
        state["hot"] = True
        return HOT_ENTERED
    if hot and score < exit:
        state["hot"] = False
        return HOT_LEFT
    return None


def segment_transition(
    state: dict[str, Any], new_segment: str | None
) -> tuple[str | None, str | None] | None:
    """``(old, new)`` when the segment changed (``old`` is None the first time), else None."""
    old = state.get("segment")
    if new_segment == old:
        return None
    state["segment"] = new_segment
    return old, new_segment


def offer_changed(
    state: dict[str, Any], offer_id: str, *, ts: float, refresh_hours: float = 24.0
) -> bool:
    """Whether to publish ``offer_id`` now. When True, it is recorded as published at ``ts``.

    True when it differs from the last published offer, or when ``refresh_hours`` of event time
    have passed since that one was published. A late ``ts`` never moves the refresh clock back.

    >>> state = {}
    >>> [offer_changed(state, o, ts=t * 3600.0) for o, t in [("a", 0), ("a", 23), ("a", 24),
    ...                                                       ("b", 25)]]
    [True, False, True, True]
    """
    last = state.get("offer")
    if last is not None and last["id"] == offer_id and not ts - last["at"] >= refresh_hours * _HOUR:
        return False
    at = ts if last is None or ts > last["at"] else last["at"]
    state["offer"] = {"id": offer_id, "at": at}
    return True


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class TriggerConfig:
    """Trigger parameters. The defaults are those of ``models/config/triggers.toml``."""

    abandon_after_minutes: float = 30.0
    cap_hours: float = 24.0
    hot_enter: float = 0.7
    hot_exit: float = 0.6
    offer_refresh_hours: float = 24.0

    def __post_init__(self) -> None:
        _timeout_s(self.abandon_after_minutes)
        if not (self.cap_hours >= 0 and self.offer_refresh_hours >= 0):
            raise ValueError("cap_hours and offer_refresh_hours must be >= 0")
        if not 0.0 <= self.hot_exit <= self.hot_enter <= 1.0:
            raise ValueError("hot_lead needs 0 <= exit <= enter <= 1")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TriggerConfig:
        """From the ``[triggers]`` section of the configuration (``models.config``).

        >>> from models.config import load_config
        >>> TriggerConfig.from_config(load_config(None)).abandon_after_minutes
        30.0
        """
        section = config.get("triggers", {})
        cart = section.get("abandoned_cart", {})
        hot = section.get("hot_lead", {})
        offer = section.get("offer", {})
        defaults = cls()
        return cls(
            abandon_after_minutes=float(
                cart.get("abandon_after_minutes", defaults.abandon_after_minutes)
            ),
            cap_hours=float(cart.get("cap_hours", defaults.cap_hours)),
            hot_enter=float(hot.get("enter", defaults.hot_enter)),
            hot_exit=float(hot.get("exit", defaults.hot_exit)),
            offer_refresh_hours=float(offer.get("refresh_hours", defaults.offer_refresh_hours)),
        )
