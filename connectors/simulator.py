"""Seeded, deterministic shopper simulator producing Segment-spec events.

What: :class:`ShopperSimulator` draws ``users`` shoppers, each of one latent
:data:`SHOPPER_TYPES` type (window shopper, cart abandoner, bargain hunter, loyal VIP, newsletter
reader, dormant), and simulates ``days`` of their behaviour: browsing sessions (Product Viewed /
Added / Removed, Cart Viewed, Checkout Started, Order Completed), a twice-weekly newsletter
(Email Delivered / Opened / Link Clicked, Unsubscribed; a click may start a session) and one
``identify`` per user (plan, created_at, consent). :meth:`ShopperSimulator.events` yields the
raw Segment dicts a producer would send, merged in event-time order;
:meth:`ShopperSimulator.raw_messages` yields the same messages as ``(stream, key, value)`` Kafka
records, optionally mixed with hostile bytes and at-least-once re-sends.

Why: the engine's segmenter, lead scorer and offer policy must be tested against a known truth.
:meth:`ShopperSimulator.ground_truth` gives, per user, the latent type, the true probability of
ordering within 7 days (from the type's parameters and the user's activity level) and the best
offer of :data:`OFFER_IDS` for its type (the oracle for the bandit).

Everything is a pure function of the seed: private ``random.Random`` instances seeded from it,
event times derived from ``start`` (never the wall clock), ``messageId`` = ``sim-<seed>-<n>-`` in
emission order followed by 32 random hex digits (128 bits, as random as the UUIDs real libraries
send). Generation is a discrete-event simulation: a heap of session starts and
newsletter sends, and per-minute buckets of generated events that are sorted and emitted once
the simulation clock has passed them, so memory is bounded by what is in flight, not by
``users * days``. Users without email consent receive no email; Unsubscribed stops it.

>>> sim = ShopperSimulator(users=3, seed=4, days=1.0)
>>> for g in sim.ground_truth():
...     print(g["user_id"], g["type"], g["best_offer"], g["purchase_propensity"])
u00000 cart_abandoner free_shipping 0.02949
u00001 newsletter_reader newsletter_exclusive 0.526106
u00002 window_shopper bundle_deal 0.001578
>>> events = list(sim.events())
>>> len(events), events[0]["type"], events[0]["context"]["consent"]["categoryPreferences"]
(32, 'identify', {'email': True, 'advertising': True})
>>> view = next(e for e in events if e.get("event") == "Product Viewed")
>>> view["messageId"], view["userId"], view["timestamp"]
('sim-4-9-1b1448472d36c4adfbc69ef6de41c40c', 'u00001', '2023-11-15T12:43:01.734Z')
>>> view["properties"]
{'product_id': 'p-2013', 'price': 44.99, 'category': 'home', 'name': 'Vase 14'}
>>> list(sim.events()) == events  # same seed, same stream
True
>>> stream, key, value = next(iter(sim.raw_messages()))
>>> stream, key, value.startswith(b'{"type":"identify"')
('identity', b'u00001', True)
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
import random
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from statistics import NormalDist
from typing import Any

import orjson

from models import jsonbytes
from models.events import (
    CART_VIEWED,
    CHECKOUT_STARTED,
    EMAIL_DELIVERED,
    EMAIL_LINK_CLICKED,
    EMAIL_OPENED,
    ORDER_COMPLETED,
    PRODUCT_ADDED,
    PRODUCT_REMOVED,
    PRODUCT_VIEWED,
    UNSUBSCRIBED,
    topic_kind,
)

__all__ = [
    "CATALOG",
    "CATEGORIES",
    "DEFAULT_TYPE_WEIGHTS",
    "HOSTILE_KINDS",
    "OFFER_IDS",
    "SHOPPER_TYPES",
    "ShopperSimulator",
    "ShopperType",
]

OFFER_IDS: tuple[str, ...] = (
    "free_shipping",
    "ten_percent_off",
    "vip_early_access",
    "bundle_deal",
    "newsletter_exclusive",
)
"""The fixed offer catalog whose conversion probabilities each type knows."""

CURRENCY = "EUR"
CAMPAIGN_INTERVAL_DAYS = 3.5
"""A newsletter goes to every subscribed, email-consenting user twice a week."""
CLICK_SESSION_PROB = 0.9
"""Probability that an email link click lands in a browsing session."""
PROPENSITY_HORIZON_DAYS = 7.0
ADS_CONSENT_RATE = (0.85, 0.3)
"""Probability of advertising consent for users with / without email consent."""
ACTIVITY_SIGMA = 0.25
"""Per-user log-normal multiplier (mean 1) on the type's session rate."""
HOSTILE_KINDS: tuple[str, ...] = (
    "not_json",
    "missing_message_id",
    "negative_price",
    "bad_timestamp",
    "unknown_type",
)
"""Kinds of invalid messages :meth:`ShopperSimulator.raw_messages` mixes in."""

_DAY_MS = 86_400_000
_MINUTE_MS = 60_000
_HOUR_MS = 3_600_000
_MEAN_GAP_MS = 30_000  # mean pause between two events of a session (plus 1 s minimum)
_LIBRARY = {"name": "persona-simulator", "version": "1.0"}
_ESP_LIBRARY = {"name": "persona-simulator-esp", "version": "1.0"}
# Relative activity per UTC hour; the busiest hour is 1.0 (thinning acceptance probability).
_DIURNAL: tuple[float, ...] = (
    0.25, 0.15, 0.08, 0.05, 0.05, 0.08, 0.2, 0.4, 0.6, 0.7, 0.75, 0.8,
    0.9, 0.85, 0.8, 0.8, 0.85, 0.9, 1.0, 1.0, 0.95, 0.8, 0.6, 0.4,
)  # fmt: skip
_DIURNAL_MEAN = sum(_DIURNAL) / len(_DIURNAL)


@dataclass(frozen=True)
class ShopperType:
    """Parameters of one latent shopper type (all probabilities in [0, 1])."""

    name: str
    sessions_per_day: float
    """Organic browsing sessions per day (times the user's activity multiplier)."""
    views_per_session: float
    """Mean Product Viewed per session (1 + geometric)."""
    add_to_cart: float
    """Probability of Product Added after each view."""
    remove_from_cart: float
    """Per session, probability of a Product Removed when the cart holds 2+ lines."""
    cart_view: float
    """Per session ending with a non-empty cart, probability of Cart Viewed."""
    checkout: float
    """Per session with at least one add, probability of Checkout Started."""
    order: float
    """Probability of Order Completed given Checkout Started."""
    price_level: float
    """Price quantile (0 cheap .. 1 expensive) of products looked at within a category."""
    quantity_two: float
    """Probability that an add is of quantity 2 rather than 1."""
    categories: tuple[str, ...]
    """Preferred categories (80% of views)."""
    email_open: float
    """Probability of opening a delivered email."""
    email_click: float
    """Probability of clicking a link given an open."""
    unsubscribe: float
    """Probability of unsubscribing per delivered email."""
    email_consent: float
    """Probability that a user of this type consents to email."""
    premium_plan: float
    """Probability of the ``premium`` plan trait (else ``plus`` or ``free``)."""
    offer_conversion: dict[str, float] = field(hash=False)
    """Probability of converting when shown each offer of :data:`OFFER_IDS`."""

    @property
    def best_offer(self) -> str:
        """The offer with the highest conversion probability (ties: catalog order)."""
        return max(OFFER_IDS, key=lambda o: self.offer_conversion[o])

    def add_in_session(self) -> float:
        """Probability that a session has at least one Product Added."""
        v, a = self.views_per_session, self.add_to_cart
        q = (v - 1.0) / v if v > 1.0 else 0.0  # geometric ratio of the extra views
        # N = 1 + G, P(G = k) = (1 - q) q^k  =>  E[(1 - a)^N] = (1 - a)(1 - q) / (1 - q(1 - a)).
        return 1.0 - (1.0 - a) * (1.0 - q) / (1.0 - q * (1.0 - a))

    def order_per_session(self) -> float:
        """Probability that a session ends with Order Completed."""
        return self.add_in_session() * self.checkout * self.order

    def sessions_per_day_for(self, activity: float, email_consent: bool) -> float:
        """Expected sessions per day, organic plus newsletter clicks (ignoring unsubscribes)."""
        email = 0.0
        if email_consent:
            email = self.email_open * self.email_click * CLICK_SESSION_PROB
            email /= CAMPAIGN_INTERVAL_DAYS
        return self.sessions_per_day * activity + email

    def purchase_propensity(
        self, activity: float, email_consent: bool, horizon_days: float = PROPENSITY_HORIZON_DAYS
    ) -> float:
        """True probability of at least one order within ``horizon_days``.

        Organic sessions are Poisson; newsletters arrive every :data:`CAMPAIGN_INTERVAL_DAYS`,
        each leading to a session with probability open * click * :data:`CLICK_SESSION_PROB`.
        Unsubscribing is ignored (it is rare for every type that orders).
        """
        p_order = self.order_per_session()
        p_none = math.exp(-horizon_days * self.sessions_per_day * activity * p_order)
        if email_consent:
            p_email = self.email_open * self.email_click * CLICK_SESSION_PROB * p_order
            p_none *= (1.0 - p_email) ** (horizon_days / CAMPAIGN_INTERVAL_DAYS)
        return 1.0 - p_none


def _offers(
    free_shipping: float, ten_percent_off: float, vip: float, bundle: float, newsletter: float
) -> dict[str, float]:
    values = (free_shipping, ten_percent_off, vip, bundle, newsletter)
    return dict(zip(OFFER_IDS, values, strict=True))


SHOPPER_TYPES: dict[str, ShopperType] = {
    t.name: t
    for t in (
        ShopperType(
            name="window_shopper", sessions_per_day=0.5, views_per_session=4.5,
            add_to_cart=0.012, remove_from_cart=0.1, cart_view=0.3, checkout=0.05, order=0.2,
            price_level=0.55, quantity_two=0.05, categories=("fashion", "electronics", "home"),
            email_open=0.08, email_click=0.1, unsubscribe=0.005, email_consent=0.85,
            premium_plan=0.05, offer_conversion=_offers(0.03, 0.02, 0.005, 0.05, 0.01),
        ),
        ShopperType(
            name="cart_abandoner", sessions_per_day=0.4, views_per_session=2.0,
            add_to_cart=0.6, remove_from_cart=0.3, cart_view=0.9, checkout=0.35, order=0.04,
            price_level=0.5, quantity_two=0.1, categories=("fashion", "beauty", "electronics"),
            email_open=0.25, email_click=0.2, unsubscribe=0.01, email_consent=0.85,
            premium_plan=0.1, offer_conversion=_offers(0.22, 0.12, 0.02, 0.06, 0.04),
        ),
        ShopperType(
            name="bargain_hunter", sessions_per_day=0.5, views_per_session=4.0,
            add_to_cart=0.2, remove_from_cart=0.1, cart_view=0.5, checkout=0.8, order=0.9,
            price_level=0.05, quantity_two=0.15, categories=("grocery", "books", "toys"),
            email_open=0.2, email_click=0.2, unsubscribe=0.01, email_consent=0.85,
            premium_plan=0.03, offer_conversion=_offers(0.1, 0.3, 0.01, 0.18, 0.06),
        ),
        ShopperType(
            name="loyal_vip", sessions_per_day=0.6, views_per_session=2.0,
            add_to_cart=0.6, remove_from_cart=0.05, cart_view=0.5, checkout=0.85, order=0.95,
            price_level=0.9, quantity_two=0.15, categories=("electronics", "fashion"),
            email_open=0.45, email_click=0.3, unsubscribe=0.001, email_consent=0.95,
            premium_plan=0.7, offer_conversion=_offers(0.08, 0.12, 0.35, 0.1, 0.08),
        ),
        ShopperType(
            name="newsletter_reader", sessions_per_day=0.1, views_per_session=2.5,
            add_to_cart=0.35, remove_from_cart=0.05, cart_view=0.5, checkout=0.8, order=0.9,
            price_level=0.45, quantity_two=0.1, categories=("books", "beauty", "home"),
            email_open=0.9, email_click=0.6, unsubscribe=0.002, email_consent=1.0,
            premium_plan=0.15, offer_conversion=_offers(0.05, 0.08, 0.03, 0.04, 0.25),
        ),
        ShopperType(
            name="dormant", sessions_per_day=0.06, views_per_session=1.5,
            add_to_cart=0.12, remove_from_cart=0.0, cart_view=0.3, checkout=0.3, order=0.5,
            price_level=0.4, quantity_two=0.05, categories=("sports", "toys"),
            email_open=0.04, email_click=0.1, unsubscribe=0.01, email_consent=1.0,
            premium_plan=0.02, offer_conversion=_offers(0.015, 0.03, 0.002, 0.01, 0.005),
        ),
    )
}  # fmt: skip
"""The latent types by name; ``SHOPPER_TYPES[t].best_offer`` is the offer oracle."""

DEFAULT_TYPE_WEIGHTS: dict[str, float] = {
    "window_shopper": 0.22,
    "cart_abandoner": 0.16,
    "bargain_hunter": 0.16,
    "loyal_vip": 0.1,
    "newsletter_reader": 0.16,
    "dormant": 0.2,
}

_CATEGORY_BASE_PRICE = {
    "electronics": 180.0,
    "fashion": 45.0,
    "home": 60.0,
    "beauty": 25.0,
    "sports": 55.0,
    "books": 15.0,
    "toys": 30.0,
    "grocery": 8.0,
}
_CATEGORY_NOUNS = {
    "electronics": ("Headphones", "Speaker", "Charger", "Monitor", "Camera", "Tablet"),
    "fashion": ("Sneakers", "Jacket", "Scarf", "Jeans", "Dress", "Boots"),
    "home": ("Lamp", "Cushion", "Vase", "Rug", "Kettle", "Clock"),
    "beauty": ("Serum", "Lipstick", "Perfume", "Cream", "Shampoo", "Mascara"),
    "sports": ("Yoga Mat", "Dumbbell", "Racket", "Bottle", "Helmet", "Ball"),
    "books": ("Novel", "Cookbook", "Atlas", "Comic", "Biography", "Poetry"),
    "toys": ("Puzzle", "Robot", "Blocks", "Plush", "Kite", "Board Game"),
    "grocery": ("Coffee", "Tea", "Olive Oil", "Chocolate", "Pasta", "Honey"),
}
CATEGORIES: tuple[str, ...] = tuple(_CATEGORY_BASE_PRICE)
_PRODUCTS_PER_CATEGORY = 40


def _build_catalog() -> dict[str, tuple[dict[str, Any], ...]]:
    """A fixed product catalog (same for every seed), each category sorted by price."""
    rng = random.Random("persona-simulator-catalog")
    catalog: dict[str, tuple[dict[str, Any], ...]] = {}
    for c, category in enumerate(CATEGORIES):
        prices = sorted(
            max(1.0, round(_CATEGORY_BASE_PRICE[category] * rng.lognormvariate(0.0, 0.6))) - 0.01
            for _ in range(_PRODUCTS_PER_CATEGORY)
        )
        catalog[category] = tuple(
            {
                "product_id": f"p-{c}{i:03d}",
                "price": round(price, 2),
                "category": category,
                "name": f"{rng.choice(_CATEGORY_NOUNS[category])} {i + 1}",
            }
            for i, price in enumerate(prices)
        )
    return catalog


CATALOG: dict[str, tuple[dict[str, Any], ...]] = _build_catalog()
"""Products by category: dicts with product_id, price (EUR), category, name; cheap first."""


@dataclass(frozen=True)
class _User:
    """Static (per seed) latent attributes of one simulated user."""

    index: int
    user_id: str
    anonymous_id: str
    kind: ShopperType
    activity: float
    email_consent: bool
    ads_consent: bool
    plan: str
    created_at: str


class _State:
    """Mutable per-user state during one :meth:`ShopperSimulator.events` pass."""

    __slots__ = ("cart", "cart_no", "unsubscribed")

    def __init__(self) -> None:
        self.cart: list[tuple[dict[str, Any], int]] = []
        self.cart_no = 0
        self.unsubscribed = False


_day_prefixes: dict[int, str] = {}


def _minute_prefix(minute: int) -> str:
    """Epoch minute → ``YYYY-MM-DDTHH:MM:`` (UTC)."""
    day, minute_of_day = divmod(minute, 1440)
    head = _day_prefixes.get(day)
    if head is None:
        head = datetime.fromtimestamp(day * 86400, UTC).strftime("%Y-%m-%dT")
        if len(_day_prefixes) < 100_000:
            _day_prefixes[day] = head
    hours, minutes = divmod(minute_of_day, 60)
    return f"{head}{hours:02d}:{minutes:02d}:"


def _iso(ts_ms: int) -> str:
    """Epoch milliseconds → ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (UTC)."""
    minute, rest = divmod(ts_ms, 60_000)
    secs, ms = divmod(rest, 1000)
    return f"{_minute_prefix(minute)}{secs:02d}.{ms:03d}Z"


_log = math.log

# Agenda item kinds.
_ORGANIC = 0
_EMAIL_SESSION = 1
_CAMPAIGN = 2


class ShopperSimulator:
    """Deterministic simulator of ``users`` shoppers over ``days`` from ``start`` (epoch s).

    ``type_weights`` (by :data:`SHOPPER_TYPES` name, normalized; default
    :data:`DEFAULT_TYPE_WEIGHTS`) sets the type mix. ``invalid_rate`` is the fraction of
    :meth:`raw_messages` that are hostile; ``duplicate_rate`` the fraction of valid messages
    re-sent later with the same ``messageId``. Neither changes :meth:`events`.
    """

    def __init__(
        self,
        users: int,
        seed: int,
        *,
        start: float = 1_700_000_000.0,
        days: float = 30.0,
        type_weights: dict[str, float] | None = None,
        invalid_rate: float = 0.0,
        duplicate_rate: float = 0.0,
    ) -> None:
        if users < 0:
            raise ValueError("users must be >= 0")
        if days <= 0:
            raise ValueError("days must be > 0")
        if not 0.0 <= invalid_rate < 1.0:
            raise ValueError("invalid_rate must be in [0, 1)")
        if not 0.0 <= duplicate_rate <= 1.0:
            raise ValueError("duplicate_rate must be in [0, 1]")
        weights = dict(DEFAULT_TYPE_WEIGHTS if type_weights is None else type_weights)
        unknown = set(weights) - set(SHOPPER_TYPES)
        if unknown:
            raise ValueError(f"unknown shopper types: {sorted(unknown)}")
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError("type_weights must be non-negative with a positive sum")
        self.users = users
        self.seed = seed
        self.start = float(start)
        self.days = float(days)
        self.invalid_rate = invalid_rate
        self.duplicate_rate = duplicate_rate
        self.type_weights = weights
        self._start_ms = round(self.start * 1000)
        self._end_ms = self._start_ms + round(self.days * _DAY_MS)
        self._users = self._draw_users()
        self._by_id = {u.user_id: u for u in self._users}

    @property
    def end(self) -> float:
        """End of the simulated window (epoch seconds, exclusive)."""
        return self._end_ms / 1000.0

    # --- latent truth ---------------------------------------------------------------------------

    def _draw_users(self) -> list[_User]:
        rng = random.Random(f"persona-simulator:{self.seed}:users")
        names = [n for n in SHOPPER_TYPES if self.type_weights.get(n, 0.0) > 0]
        cum = list(itertools.accumulate(self.type_weights[n] for n in names))
        width = max(5, len(str(max(self.users - 1, 0))))
        users = []
        for i in range(self.users):
            kind = SHOPPER_TYPES[rng.choices(names, cum_weights=cum)[0]]
            activity = rng.lognormvariate(-(ACTIVITY_SIGMA**2) / 2, ACTIVITY_SIGMA)
            email_consent = rng.random() < kind.email_consent
            ads_consent = rng.random() < ADS_CONSENT_RATE[0 if email_consent else 1]
            u = rng.random()
            plan = (
                "premium"
                if u < kind.premium_plan
                else ("plus" if u < kind.premium_plan + 0.2 else "free")
            )
            created_ms = self._start_ms - round(rng.uniform(1.0, 720.0) * _DAY_MS)
            anonymous_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            users.append(
                _User(
                    index=i,
                    user_id=f"u{i:0{width}d}",
                    anonymous_id=anonymous_id,
                    kind=kind,
                    activity=activity,
                    email_consent=email_consent,
                    ads_consent=ads_consent,
                    plan=plan,
                    created_at=_iso(created_ms),
                )
            )
        return users

    def ground_truth(self) -> list[dict[str, Any]]:
        """Per user: user_id, type, purchase_propensity (7 days), best_offer, activity, consent."""
        return [
            {
                "user_id": u.user_id,
                "type": u.kind.name,
                "purchase_propensity": round(
                    u.kind.purchase_propensity(u.activity, u.email_consent), 6
                ),
                "best_offer": u.kind.best_offer,
                "activity": round(u.activity, 6),
                "consent": {"email": u.email_consent, "advertising": u.ads_consent},
            }
            for u in self._users
        ]

    def write_ground_truth(self, path: str | Path) -> None:
        """Write :meth:`ground_truth` as JSON Lines."""
        with Path(path).open("wb") as f:
            for row in self.ground_truth():
                f.write(orjson.dumps(row) + b"\n")

    def offer_converts(self, user_id: str, offer_id: str, nonce: int | str = 0) -> bool:
        """Deterministic Bernoulli draw: does ``user_id`` convert when shown ``offer_id``?

        Uses the user's type's ``offer_conversion`` and a hash of (seed, user, offer, nonce), so
        a policy evaluation gets the same outcome for the same decision.
        """
        user = self._by_id.get(user_id)
        if user is None:
            raise KeyError(user_id)
        p = user.kind.offer_conversion[offer_id]
        digest = hashlib.blake2b(
            f"{self.seed}|{user_id}|{offer_id}|{nonce}".encode(), digest_size=8
        ).digest()
        return int.from_bytes(digest, "big") / 2**64 < p

    # --- event stream ---------------------------------------------------------------------------

    def events(self) -> Iterator[dict[str, Any]]:
        """All users' Segment-spec events in non-decreasing event time (a fresh pass each call)."""
        run = _Run(self)
        users = self._users
        user_ids = [u.user_id for u in users]
        anonymous_ids = [u.anonymous_id for u in users]
        identified = bytearray(len(users))
        end_ms = self._end_ms
        buckets = run.buckets
        agenda = run.agenda
        pop = heapq.heappop
        push = heapq.heappush
        counter = itertools.count()
        prefix = f"sim-{self.seed}-"
        # Random like the UUIDs Segment's and RudderStack's libraries send (a stored profile
        # remembers its last ids, and a counter alone would compress to almost nothing).
        id_bits = random.Random(f"persona-simulator:{self.seed}:message-ids").getrandbits

        def message_id() -> str:
            return f"{prefix}{next(counter)}-{id_bits(128):032x}"

        esp = _ESP_LIBRARY
        lib_name, esp_name, version = _LIBRARY["name"], esp["name"], _LIBRARY["version"]
        # Every event is generated at or after the agenda time that produced it, so when the
        # agenda reaches minute M, all buckets before M are complete and can be emitted.
        minute = self._start_ms // _MINUTE_MS
        last_minute = (end_ms - 1) // _MINUTE_MS
        done = False
        while not done:
            if agenda and agenda[0][0] < end_ms:
                t, _, kind, ui, extra = pop(agenda)
                upto = t // _MINUTE_MS
            else:
                upto = last_minute + 1
                done = True
            while minute < upto:
                bucket = buckets.pop(minute, None)
                minute += 1
                if not bucket:
                    continue
                bucket.sort()
                head = _minute_prefix(minute - 1)
                for ts, _, ui_e, name, props, ctx in bucket:
                    if ts >= end_ms:
                        break
                    secs, ms = divmod(ts % _MINUTE_MS, 1000)
                    timestamp = f"{head}{secs:02d}.{ms:03d}Z"
                    if not identified[ui_e]:
                        identified[ui_e] = 1
                        yield self._identify(users[ui_e], message_id(), timestamp)
                    if ctx is None:
                        context: dict[str, Any] = {
                            "library": {"name": lib_name, "version": version}
                        }
                    elif ctx is esp:
                        context = {"library": {"name": esp_name, "version": version}}
                    else:
                        context = {
                            "library": {"name": lib_name, "version": version},
                            "campaign": dict(ctx),
                        }
                    yield {
                        "type": "track",
                        "event": name,
                        "userId": user_ids[ui_e],
                        "anonymousId": anonymous_ids[ui_e],
                        "messageId": message_id(),
                        "timestamp": timestamp,
                        "properties": props,
                        "context": context,
                    }
            if done:
                break
            if kind == _CAMPAIGN:
                run.campaign(t, extra)
            else:
                run.session(t, ui, extra)
                if kind == _ORGANIC:
                    nxt = run.next_organic(ui, t)
                    if nxt is not None:
                        push(agenda, (nxt, next(run.seq), _ORGANIC, ui, None))

    @staticmethod
    def _identify(user: _User, message_id: str, timestamp: str) -> dict[str, Any]:
        """The ``identify`` call sent just before a user's first event."""
        return {
            "type": "identify",
            "userId": user.user_id,
            "anonymousId": user.anonymous_id,
            "messageId": message_id,
            "timestamp": timestamp,
            "traits": {"plan": user.plan, "created_at": user.created_at},
            "context": {
                "library": dict(_LIBRARY),
                "consent": {
                    "categoryPreferences": {
                        "email": user.email_consent,
                        "advertising": user.ads_consent,
                    }
                },
            },
        }

    # --- wire format ----------------------------------------------------------------------------

    def raw_messages(self) -> Iterator[tuple[str, bytes, bytes]]:
        """``(stream, key, value)`` records: :meth:`events` as orjson bytes keyed by userId.

        ``stream`` is ``models.events.topic_kind`` of the event. Hostile messages (see
        :data:`HOSTILE_KINDS`; ``messageId`` ``sim-<seed>-bad-<k>`` where there is one) make up
        about ``invalid_rate`` of all records; about ``duplicate_rate`` of valid records are sent
        again 1-100 records later, byte for byte.
        """
        rng = random.Random(f"persona-simulator:{self.seed}:noise")
        p_bad = self.invalid_rate / (1.0 - self.invalid_rate)
        p_dup = self.duplicate_rate
        resend: list[tuple[int, int, tuple[str, bytes, bytes]]] = []
        n = 0
        bad = 0
        for event in self.events():
            record = (topic_kind(event["type"], event.get("event", "")),
                      event["userId"].encode(), jsonbytes.dumps(event))  # fmt: skip
            out = [record]
            if p_dup and rng.random() < p_dup:
                heapq.heappush(resend, (n + rng.randint(1, 100), n, record))
            while resend and resend[0][0] <= n:
                out.append(heapq.heappop(resend)[2])
            for item in out:
                yield item
                n += 1
                if p_bad and rng.random() < p_bad:
                    yield self._hostile(rng, event, bad)
                    bad += 1
        while resend:
            yield heapq.heappop(resend)[2]
            if p_bad and rng.random() < p_bad:
                yield self._hostile(rng, event, bad)
                bad += 1

    def _hostile(
        self, rng: random.Random, event: dict[str, Any], k: int
    ) -> tuple[str, bytes, bytes]:
        """An invalid record modelled on ``event`` (same key and stream where it makes sense)."""
        stream = topic_kind(event["type"], event.get("event", ""))
        key = event["userId"].encode()
        kind = (
            HOSTILE_KINDS[k % len(HOSTILE_KINDS)]
            if k < len(HOSTILE_KINDS)
            else rng.choice(HOSTILE_KINDS)
        )
        bad = {**event, "messageId": f"sim-{self.seed}-bad-{k}"}
        if kind == "not_json":
            body = orjson.dumps(event)
            choice = rng.randrange(4)
            if choice == 0:
                value = body[: rng.randrange(1, len(body))]  # truncated object
            elif choice == 1:
                value = b"\xff\xfe\x00garbage"
            elif choice == 2:
                value = b"not json at all"
            else:
                value = b"{'type': 'track', 'event': 'Product Viewed'}"
            return stream, key, value
        if kind == "missing_message_id":
            del bad["messageId"]
        elif kind == "negative_price":
            product = dict(rng.choice(CATALOG[rng.choice(CATEGORIES)]))
            product["price"] = -product["price"]
            if rng.random() < 0.5:
                bad.update(type="track", event=PRODUCT_ADDED, properties={**product, "quantity": 1})
            else:
                bad.update(
                    type="track",
                    event=ORDER_COMPLETED,
                    properties={"order_id": f"o-bad-{k}", "revenue": product["price"],
                                "currency": CURRENCY, "products": [{**product, "quantity": 1}]},
                )  # fmt: skip
            bad.pop("traits", None)
            stream = topic_kind("track", bad["event"])
        elif kind == "bad_timestamp":
            bad["timestamp"] = rng.choice(
                ("yesterday", "2023-02-30T25:61:00Z", "9999-12-31T23:59:59.999Z", "", True)
            )
        else:  # unknown_type
            bad["type"] = rng.choice(("bogus", "TRACK", "purchase"))
        return stream, key, jsonbytes.dumps(bad)


_TABLE_SIZE = 4096
_MAX_CART_LINES = 6


def _view_table(kind: ShopperType) -> tuple[dict[str, Any], ...]:
    """Products a ``kind`` shopper views, as an equiprobable table (index with one draw).

    80% from the preferred categories, else any; within a category the price quantile is
    N(price_level, 0.15) clipped. Fixed per type (its own RNG), so the same for every seed.
    """
    rng = random.Random(f"persona-simulator-views:{kind.name}")
    normal = NormalDist(kind.price_level, 0.15)
    table = []
    for j in range(_TABLE_SIZE):
        pool = kind.categories if rng.random() < 0.8 else CATEGORIES
        products = CATALOG[rng.choice(pool)]
        level = min(max(normal.inv_cdf((j + 0.5) / _TABLE_SIZE), 0.0), 0.999)
        table.append(products[int(level * len(products))])
    return tuple(table)


def _exp_table(mean_ms: float) -> tuple[int, ...]:
    """Quantiles of an exponential(mean) in ms, as an equiprobable table."""
    n = _TABLE_SIZE
    return tuple(int(-math.log(1.0 - (j + 0.5) / n) * mean_ms) for j in range(n))


_VIEW_TABLES = {name: _view_table(kind) for name, kind in SHOPPER_TYPES.items()}
_GAPS = _exp_table(_MEAN_GAP_MS)


class _Run:
    """State of one pass of :meth:`ShopperSimulator.events`: RNG, heaps and per-user state."""

    def __init__(self, sim: ShopperSimulator) -> None:
        self.sim = sim
        self.rng = random.Random(f"persona-simulator:{sim.seed}:events")
        self.users = sim._users
        self.states = [_State() for _ in self.users]
        self.end_ms = sim._end_ms
        self.seq = itertools.count()
        # Generated, not yet emitted events by epoch minute: (ts_ms, seq, user, event, props, ctx).
        self.buckets: defaultdict[int, list[tuple[Any, ...]]] = defaultdict(list)
        self.agenda: list[tuple[Any, ...]] = []  # (ts_ms, seq, kind, user, extra)
        # Organic session rate before diurnal thinning, per millisecond.
        self.rates = [
            u.kind.sessions_per_day * u.activity / _DIURNAL_MEAN / _DAY_MS for u in self.users
        ]
        push = heapq.heappush
        for u in self.users:
            t = self.next_organic(u.index, sim._start_ms)
            if t is not None:
                push(self.agenda, (t, next(self.seq), _ORGANIC, u.index, None))
        for k in range(math.ceil(sim.days / CAMPAIGN_INTERVAL_DAYS)):
            offset = (k * CAMPAIGN_INTERVAL_DAYS + 0.5) * _DAY_MS
            t = sim._start_ms + round(offset + self.rng.random() * 2 * _HOUR_MS)
            if t < self.end_ms:
                push(self.agenda, (t, next(self.seq), _CAMPAIGN, -1, k))

    def next_organic(self, ui: int, after_ms: int) -> int | None:
        """Next organic session start of user ``ui`` after ``after_ms`` (diurnal thinning)."""
        rate = self.rates[ui]
        if rate <= 0:
            return None
        rand = self.rng.random
        t = after_ms
        while True:
            t += 1 + int(-_log(1.0 - rand()) / rate)
            if t >= self.end_ms:
                return None
            if rand() < _DIURNAL[(t // _HOUR_MS) % 24]:
                return t

    def session(self, t: int, ui: int, ctx: dict[str, str] | None) -> None:
        """One browsing session of user ``ui`` from ``t``: views, adds, maybe checkout, order.

        ``ctx`` is the ``context.campaign`` of a session started by an email click.
        """
        user = self.users[ui]
        state = self.states[ui]
        kind = user.kind
        rand = self.rng.random
        b, m, seq = self.buckets, _MINUTE_MS, self.seq
        views, gaps, size = _VIEW_TABLES[kind.name], _GAPS, _TABLE_SIZE
        cart = state.cart
        cart_id = f"cart-{user.user_id}-{state.cart_no}"
        add_p, qty2_p = kind.add_to_cart, kind.quantity_two
        n_views = 1
        if kind.views_per_session > 1.0:
            q = (kind.views_per_session - 1.0) / kind.views_per_session
            n_views += int(_log(1.0 - rand()) / _log(q))
        added = False
        for _ in range(n_views):
            product = views[int(rand() * size)]
            b[t // m].append((t, next(seq), ui, PRODUCT_VIEWED, product.copy(), ctx))
            t += 1000 + gaps[int(rand() * size)]
            if rand() < add_p:
                if len(cart) >= _MAX_CART_LINES:  # a full cart: the oldest line goes first
                    old, old_qty = cart.pop(0)
                    props = {**old, "quantity": old_qty, "cart_id": cart_id}
                    b[t // m].append((t, next(seq), ui, PRODUCT_REMOVED, props, ctx))
                    t += 1000 + gaps[int(rand() * size)]
                qty = 2 if rand() < qty2_p else 1
                cart.append((product, qty))
                added = True
                props = {**product, "quantity": qty, "cart_id": cart_id}
                b[t // m].append((t, next(seq), ui, PRODUCT_ADDED, props, ctx))
                t += 1000 + gaps[int(rand() * size)]
        if len(cart) >= 2 and rand() < kind.remove_from_cart:
            product, qty = cart.pop(int(rand() * len(cart)))
            props = {**product, "quantity": qty, "cart_id": cart_id}
            b[t // m].append((t, next(seq), ui, PRODUCT_REMOVED, props, ctx))
            t += 1000 + gaps[int(rand() * size)]
        if cart and rand() < kind.cart_view:
            props = {"cart_id": cart_id, "products": _lines(cart)}
            b[t // m].append((t, next(seq), ui, CART_VIEWED, props, ctx))
            t += 1000 + gaps[int(rand() * size)]
        if added and rand() < kind.checkout:
            order_id = f"o-{self.sim.seed}-{user.user_id}-{state.cart_no}"
            lines = _lines(cart)
            total = round(sum(p["price"] * p["quantity"] for p in lines), 2)
            props = {"order_id": order_id, "value": total, "revenue": total,
                     "currency": CURRENCY, "products": lines}  # fmt: skip
            b[t // m].append((t, next(seq), ui, CHECKOUT_STARTED, props, ctx))
            t += 5000 + 2 * gaps[int(rand() * size)]
            if rand() < kind.order:
                props = {"order_id": order_id, "revenue": total, "currency": CURRENCY,
                         "products": _lines(cart)}  # fmt: skip
                b[t // m].append((t, next(seq), ui, ORDER_COMPLETED, props, ctx))
                cart.clear()
                state.cart_no += 1

    def campaign(self, t: int, k: int) -> None:
        """Send newsletter ``k`` at ``t`` to every subscribed, email-consenting user."""
        rand = self.rng.random
        b, m, seq = self.buckets, _MINUTE_MS, self.seq
        agenda = self.agenda
        push = heapq.heappush
        esp = _ESP_LIBRARY
        seed = self.sim.seed
        campaign_id = f"cmp-{k:03d}"
        campaign_name = f"Newsletter #{k + 1}"
        link = f"https://shop.example/newsletter/{k + 1}"
        context = {"source": "newsletter", "medium": "email", "name": campaign_name}
        for user, state in zip(self.users, self.states, strict=True):
            if not user.email_consent or state.unsubscribed:
                continue
            kind = user.kind
            ui = user.index
            base = {"campaign_id": campaign_id, "campaign_name": campaign_name,
                    "email_id": f"e-{seed}-{k}-{ui}"}  # fmt: skip
            td = t + int(rand() * 30 * 60_000)
            b[td // m].append((td, next(seq), ui, EMAIL_DELIVERED, dict(base), esp))
            if rand() < kind.email_open:
                to = td + 1000 + int(-_log(1.0 - rand()) * 4 * _HOUR_MS)
                b[to // m].append((to, next(seq), ui, EMAIL_OPENED, dict(base), esp))
                if rand() < kind.email_click:
                    tc = to + 2000 + int(-_log(1.0 - rand()) * 90_000)
                    props = {**base, "link_url": link}
                    b[tc // m].append((tc, next(seq), ui, EMAIL_LINK_CLICKED, props, esp))
                    if rand() < CLICK_SESSION_PROB:
                        start = tc + 1000 + int(rand() * 10_000)
                        push(agenda, (start, next(seq), _EMAIL_SESSION, ui, context))
            if rand() < kind.unsubscribe:
                delay = min(int(-_log(1.0 - rand()) * 3 * _HOUR_MS), 12 * _HOUR_MS)
                tu = td + 60_000 + delay
                b[tu // m].append((tu, next(seq), ui, UNSUBSCRIBED, dict(base), esp))
                state.unsubscribed = True


def _lines(cart: list[tuple[dict[str, Any], int]]) -> list[dict[str, Any]]:
    """Cart lines as Segment ``products`` entries."""
    return [{**p, "quantity": q} for p, q in cart]
