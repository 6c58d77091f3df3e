"""Next-best-offer: an offer catalog from config and a contextual bandit choosing among it.

What: :class:`OfferCatalog` holds the offers of a config file (id, channel, eligibility rule,
cooldown, frequency cap); :class:`OfferPolicy` picks one ELIGIBLE offer per decision with a
disjoint linear UCB model (one ridge regression per offer, in numpy) and softmax exploration, and
learns from rewards. Pure functions keep the per-user offer state in the profile (``"offers"``):
:func:`record` a decision, :func:`attribute` a purchase or click to it, :func:`expire` it unpaid.

Why: every decision must be explainable (``reason``), measured against a control group (a
deterministic ``holdout`` by hashed user id gets uniform random offers) and evaluable off-policy
later (the exact ``propensity`` of the chosen offer is logged). Decisions draw their randomness
from a hash of (seed, user id, event time), so a replay gives identical decisions.

Policy: for eligible offers ``a`` with context ``x`` (:func:`offer_context`, bias first),
``ucb_a = theta_a . x + alpha * sqrt(x' A_a^-1 x)`` and the choice probabilities are
``(1 - epsilon) * softmax(ucb / temperature) + epsilon / n`` (n eligible offers), so propensities
are exact. ``A_a^-1`` is kept by Sherman-Morrison rank-1 updates (re-inverted exactly every
``refresh_every`` updates of an arm). Reward: 1 when the user clicks the offer (Offer Clicked) or
purchases (Order Completed) within ``window_s`` (default 24 h of event time) after the decision,
else 0 when the window has passed; a purchase pays the latest pending decision only (last touch).

>>> catalog = OfferCatalog.from_config({"offers": [
...     {"id": "free_shipping", "channel": "onsite", "eligibility": {"has_cart": True}},
...     {"id": "ten_percent_off", "channel": "onsite"}]})
>>> policy = OfferPolicy(catalog, holdout_share=0.0)
>>> from models.features import new_profile
>>> profile = new_profile("u-1")
>>> d = policy.decide(profile, now=1_700_000_000.0)
>>> d["offer_id"], d["propensity"], d["reason"], d["policy"]
('ten_percent_off', 1.0, 'only_eligible', 'bandit')
>>> profile["cart"] = {"p1": {"qty": 1, "price": 30.0}}; profile["cart_value"] = 30.0
>>> d = policy.decide(profile, now=1_700_000_000.0)
>>> sorted(d["eligible"]), 0.0 < d["propensity"] < 1.0
(['free_shipping', 'ten_percent_off'], True)
>>> d == policy.decide(profile, now=1_700_000_000.0)  # deterministic
True
>>> state = offer_state(profile)
>>> record(state, d)
[]
>>> [(e["offer_id"], e["reward"]) for e in attribute(state, "Order Completed", d["ts"] + 3600)]
[('free_shipping', 1.0)]
>>> policy.update(d["context"], d["offer_id"], 1.0)
>>> OfferPolicy.from_bytes(policy.to_bytes()).version
1
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.events import OFFER_CLICKED, ORDER_COMPLETED
from models.features import feature_vector, has_consent

__all__ = [
    "CHANNELS",
    "CONTEXT_FEATURES",
    "DEFAULT_CATALOG_PATH",
    "DEFAULT_WINDOW_S",
    "ELIGIBILITY_KEYS",
    "MAX_HISTORY",
    "MAX_PENDING",
    "REASONS",
    "Offer",
    "OfferCatalog",
    "OfferConfigError",
    "OfferPolicy",
    "attribute",
    "expire",
    "holdout_score",
    "load_catalog",
    "new_offer_state",
    "offer_context",
    "offer_state",
    "record",
]

DEFAULT_CATALOG_PATH = Path(__file__).resolve().parent / "config" / "offers.toml"
DEFAULT_WINDOW_S = 24 * 3600.0
"""Attribution window: a purchase this long (event time) after a decision no longer pays it."""
MAX_HISTORY = 100
"""Decisions kept per user for cooldowns and frequency caps (newest last)."""
MAX_PENDING = 20
"""Decisions awaiting a reward per user; the oldest is resolved as 0 when one more arrives."""
CHANNELS: dict[str, str | None] = {"email": "email", "ads": "advertising", "onsite": None}
"""Offer channels and the consent category each needs (None: no consent needed)."""
REASONS = ("exploit", "explore", "holdout", "only_eligible", "none_eligible")
CONTEXT_DECIMALS = 4
"""Decimals of a decision's ``context``: it waits in the user's state until its reward is known."""

_HOUR = 3600.0
_DAY = 86400.0
_LOG_YEAR = math.log1p(365.0)

# --------------------------------------------------------------------------- context

CONTEXT_FEATURES: tuple[tuple[str, str], ...] = (
    ("has_ordered", "flag"),
    ("log_orders", "log"),
    ("log_avg_order_value", "log"),
    ("recency_days", "days"),
    ("has_cart", "flag"),
    ("log_cart_value", "log"),
    ("cart_items", "count"),
    ("checkout_started", "flag"),
    ("email_open_rate", "rate"),
    ("email_click_rate", "rate"),
    ("days_since_email_open", "days"),
    ("log_views", "log"),
    ("log_events", "log"),
    ("days_since_seen", "days"),
    ("n_categories", "count"),
    ("top_category_share", "rate"),
)
"""The bandit's context: (feature of ``models.features.FEATURE_NAMES``, scaling), after a bias 1.

Scalings keep every input near [0, 1] so one ridge penalty fits all: ``flag``/``rate`` as is,
``log`` (already log1p) / 10, ``days`` log1p(days) / log1p(365), ``count`` log1p(n) / 5. They
cover recency, frequency and monetary value, the cart, email engagement and browsing breadth.
"""


def offer_context(features: Mapping[str, float]) -> list[float]:
    """The context vector (bias first) of a :func:`models.features.feature_vector` dict.

    >>> from models.features import new_profile, feature_vector
    >>> x = offer_context(feature_vector(new_profile("u"), now=0.0))
    >>> len(x) == 1 + len(CONTEXT_FEATURES), x[0], max(x)
    (True, 1.0, 1.0)
    """
    out = [1.0]
    append = out.append
    for name, kind in CONTEXT_FEATURES:
        v = features[name]
        if kind == "log":
            append(v / 10.0)
        elif kind == "days":
            append(math.log1p(v) / _LOG_YEAR)
        elif kind == "count":
            append(math.log1p(v) / 5.0)
        else:
            append(v)
    return out


# --------------------------------------------------------------------------- catalog


class OfferConfigError(ValueError):
    """An invalid offer catalog; the message is one line naming the offer and the key."""


ELIGIBILITY_KEYS: tuple[str, ...] = (
    "min_orders",
    "max_orders",
    "has_cart",
    "min_cart_value",
    "max_cart_value",
    "min_revenue",
    "max_revenue",
    "min_days_since_order",
    "max_days_since_order",
    "checkout_started",
    "min_email_open_rate",
    "segment_in",
)
"""Conditions an offer's ``eligibility`` table may hold (see ``models/config/offers.toml``)."""

_Check = Callable[[dict[str, Any], float, "str | None"], bool]


def _days_since_order(p: dict[str, Any], now: float) -> float:
    at = p["last_order_at"]
    return math.inf if at is None else (now - at) / _DAY


def _email_open_rate(p: dict[str, Any]) -> float:
    delivered = p["email_delivered"]
    return min(p["email_opened"] / delivered, 1.0) if delivered > 0 else 0.0


def _is_number(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _compile_rule(offer_id: str, key: str, value: Any) -> _Check:
    """One eligibility condition → predicate(profile, now, segment)."""

    def bad(why: str) -> OfferConfigError:
        return OfferConfigError(f"offer {offer_id!r}: eligibility.{key}: {why}")

    if key in ("has_cart", "checkout_started"):
        if type(value) is not bool:
            raise bad("must be true or false")
        if key == "has_cart":
            return lambda p, now, seg: bool(p["cart"]) is value
        return lambda p, now, seg: (p["checkout_started_at"] is not None) is value
    if key == "segment_in":
        if type(value) is not list or not value or not all(type(s) is str for s in value):
            raise bad("must be a non-empty list of segment names")
        names = frozenset(value)
        return lambda p, now, seg: seg in names
    if not _is_number(value) or value < 0:
        raise bad("must be a number >= 0")
    if key in ("min_orders", "max_orders") and value != int(value):
        raise bad("must be a whole number")
    if key == "min_email_open_rate" and value > 1:
        raise bad("must be in [0, 1]")
    v = float(value)
    getters: dict[str, Callable[[dict[str, Any], float], float]] = {
        "orders": lambda p, now: p["orders"],
        "cart_value": lambda p, now: p["cart_value"],
        "revenue": lambda p, now: p["revenue"],
        "days_since_order": _days_since_order,
        "email_open_rate": lambda p, now: _email_open_rate(p),
    }
    bound, _, quantity = key.partition("_")
    get = getters[quantity]
    if bound == "min":
        return lambda p, now, seg: get(p, now) >= v
    return lambda p, now, seg: get(p, now) <= v


@dataclass(frozen=True)
class Offer:
    """One catalog entry; durations in seconds of event time, ``frequency_cap`` None = no cap."""

    id: str
    channel: str
    eligibility: dict[str, Any]
    cooldown_s: float
    frequency_cap: int | None
    frequency_window_s: float
    checks: tuple[_Check, ...] = field(default=(), repr=False, compare=False)

    @property
    def consent(self) -> str | None:
        """The consent category this offer's channel needs, if any."""
        return CHANNELS[self.channel]


_OFFER_KEYS = frozenset(
    {"id", "channel", "eligibility", "cooldown_hours", "frequency_cap", "frequency_window_hours"}
)
_DEFAULT_KEYS = frozenset({"cooldown_hours", "frequency_cap", "frequency_window_hours"})


def _hours(offer_id: str, key: str, value: Any) -> float:
    if not _is_number(value) or value < 0:
        raise OfferConfigError(f"offer {offer_id!r}: {key}: must be a number of hours >= 0")
    return float(value) * _HOUR


def _cap(offer_id: str, key: str, value: Any) -> int | None:
    """A cap in 1..MAX_HISTORY; missing or 0 means no cap."""
    if value is None or (type(value) is int and value == 0):
        return None
    if type(value) is not int or not 0 < value <= MAX_HISTORY:
        raise OfferConfigError(f"offer {offer_id!r}: {key}: must be an integer in 0..{MAX_HISTORY}")
    return value


def _parse_offer(raw: Any, n: int, defaults: Mapping[str, Any]) -> Offer:
    if not isinstance(raw, dict):
        raise OfferConfigError(f"offer #{n}: must be a table")
    offer_id = raw.get("id")
    if type(offer_id) is not str or not offer_id.strip() or len(offer_id) > 100:
        raise OfferConfigError(f"offer #{n}: id: must be a non-empty string (at most 100 chars)")
    unknown = sorted(set(raw) - _OFFER_KEYS)
    if unknown:
        raise OfferConfigError(f"offer {offer_id!r}: {unknown[0]}: unknown key")
    channel = raw.get("channel")
    if channel not in CHANNELS:
        raise OfferConfigError(f"offer {offer_id!r}: channel: must be one of {sorted(CHANNELS)}")
    rules = raw.get("eligibility", {})
    if not isinstance(rules, dict):
        raise OfferConfigError(f"offer {offer_id!r}: eligibility: must be a table")
    checks = []
    for key, value in rules.items():
        if key not in ELIGIBILITY_KEYS:
            raise OfferConfigError(f"offer {offer_id!r}: eligibility.{key}: unknown condition")
        checks.append(_compile_rule(offer_id, key, value))
    for lo, hi in (("min_orders", "max_orders"), ("min_cart_value", "max_cart_value"),
                   ("min_revenue", "max_revenue"),
                   ("min_days_since_order", "max_days_since_order")):  # fmt: skip
        if lo in rules and hi in rules and rules[lo] > rules[hi]:
            raise OfferConfigError(f"offer {offer_id!r}: eligibility.{lo}: greater than {hi}")
    merged = {**defaults, **raw}
    cap = _cap(offer_id, "frequency_cap", merged.get("frequency_cap"))
    window_s = _hours(offer_id, "frequency_window_hours", merged.get("frequency_window_hours", 0))
    if cap is not None and window_s <= 0:
        raise OfferConfigError(
            f"offer {offer_id!r}: frequency_window_hours: must be > 0 with a frequency_cap"
        )
    return Offer(
        id=offer_id,
        channel=channel,
        eligibility=dict(rules),
        cooldown_s=_hours(offer_id, "cooldown_hours", merged.get("cooldown_hours", 0)),
        frequency_cap=cap,
        frequency_window_s=window_s,
        checks=tuple(checks),
    )


class OfferCatalog:
    """The offers of a config dict (parsed TOML), validated; offer order is config order.

    ``max_offers`` per user within ``window_s`` (the ``[limits]`` table) caps all offers together.
    """

    def __init__(
        self,
        offers: Sequence[Offer],
        *,
        max_offers: int | None = None,
        window_s: float = 0.0,
        config: dict[str, Any] | None = None,
    ) -> None:
        if not offers:
            raise OfferConfigError("offers: the catalog has no offer")
        self.offers = tuple(offers)
        self.ids = tuple(o.id for o in self.offers)
        self.index = {o.id: i for i, o in enumerate(self.offers)}
        if len(self.index) != len(self.offers):
            dup = next(i for i in self.ids if self.ids.count(i) > 1)
            raise OfferConfigError(f"offer {dup!r}: id: duplicated")
        self.max_offers = max_offers
        self.window_s = window_s
        self.config = config if config is not None else {}
        horizons = [o.cooldown_s for o in self.offers]
        horizons += [o.frequency_window_s for o in self.offers if o.frequency_cap is not None]
        if max_offers is not None:
            horizons.append(window_s)
        self.horizon_s = max(horizons)
        """How far back the history must reach for cooldowns and caps."""

    def __len__(self) -> int:
        return len(self.offers)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> OfferCatalog:
        """Validate a parsed config (``{"offers": [...], "defaults": {...}, "limits": {...}}``)."""
        if not isinstance(config, Mapping):
            raise OfferConfigError("config: must be a table")
        unknown = sorted(set(config) - {"offers", "defaults", "limits"})
        if unknown:
            raise OfferConfigError(f"config: {unknown[0]}: unknown key")
        defaults = config.get("defaults", {})
        if not isinstance(defaults, dict) or set(defaults) - _DEFAULT_KEYS:
            bad = sorted(set(defaults) - _DEFAULT_KEYS) if isinstance(defaults, dict) else []
            raise OfferConfigError(f"defaults: {bad[0] if bad else 'table'}: unknown or invalid")
        raw_offers = config.get("offers")
        if not isinstance(raw_offers, list) or not raw_offers:
            raise OfferConfigError("offers: must be a non-empty array of tables ([[offers]])")
        offers = [_parse_offer(raw, n, defaults) for n, raw in enumerate(raw_offers)]
        limits = config.get("limits", {})
        if not isinstance(limits, dict) or set(limits) - {"max_offers", "window_hours"}:
            raise OfferConfigError("limits: only max_offers and window_hours are allowed")
        max_offers = _cap("limits", "max_offers", limits.get("max_offers"))
        window_s = _hours("limits", "window_hours", limits.get("window_hours", 0))
        if max_offers is not None and window_s <= 0:
            raise OfferConfigError("offer 'limits': window_hours: must be > 0 with max_offers")
        return cls(offers, max_offers=max_offers, window_s=window_s, config=dict(config))

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> OfferCatalog:
        """From the ``[offers]`` section of the configuration: ``defaults``, ``limits`` and the
        ``catalog`` array (``[[offers.catalog]]``)."""
        if not isinstance(section, Mapping):
            raise OfferConfigError("offers: must be a table")
        unknown = sorted(set(section) - {"catalog", "defaults", "limits"})
        if unknown:
            raise OfferConfigError(f"offers: {unknown[0]}: unknown key")
        config = {k: v for k, v in section.items() if k != "catalog"}
        config["offers"] = section.get("catalog")
        return cls.from_config(config)

    def eligible(
        self,
        profile: dict[str, Any],
        *,
        now: float,
        segment: str | None = None,
        consent_default: bool = False,
    ) -> list[int]:
        """Indices of the offers ``profile`` may get at event time ``now``.

        An offer is eligible when its channel's consent is given, every eligibility condition
        holds, it was not decided within its cooldown, its frequency cap is not reached, and the
        catalog-wide cap is not reached.
        """
        state = profile.get("offers")
        history = state["history"] if state else ()
        if history and self.max_offers is not None:
            since = now - self.window_s
            if sum(1 for _, ts in history if ts > since) >= self.max_offers:
                return []
        consent: dict[str, bool] = {}
        out = []
        for i, offer in enumerate(self.offers):
            cat = offer.consent
            if cat is not None:
                ok = consent.get(cat)
                if ok is None:
                    ok = consent[cat] = has_consent(profile, cat, consent_default)
                if not ok:
                    continue
            ok = True
            for check in offer.checks:
                if not check(profile, now, segment):
                    ok = False
                    break
            if not ok:
                continue
            if history and not _allowed_by_history(offer, history, now):
                continue
            out.append(i)
        return out


def _allowed_by_history(offer: Offer, history: Sequence[Sequence[Any]], now: float) -> bool:
    oid = offer.id
    cool = now - offer.cooldown_s
    cap = offer.frequency_cap
    since = now - offer.frequency_window_s
    n = 0
    for hid, ts in history:
        if hid != oid:
            continue
        if offer.cooldown_s > 0 and ts > cool:
            return False
        if cap is not None and ts > since:
            n += 1
            if n >= cap:
                return False
    return True


def load_catalog(path: str | Path | None = None) -> OfferCatalog:
    """Read and validate the ``[offers]`` section of a TOML file (default: the built-in one)."""
    p = Path(path) if path is not None else DEFAULT_CATALOG_PATH
    try:
        config = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise OfferConfigError(f"config: {p.name}: not valid TOML: {exc}") from None
    return OfferCatalog.from_section(config.get("offers", {}))


# --------------------------------------------------------------------------- per-user state


def new_offer_state() -> dict[str, Any]:
    """Empty per-user offer state: ``history`` [[offer_id, ts]], ``pending`` decisions, ``last``."""
    return {"history": [], "pending": [], "last": None}


def offer_state(profile: dict[str, Any]) -> dict[str, Any]:
    """The profile's offer state (``profile["offers"]``), created if missing."""
    state = profile.get("offers")
    if state is None:
        state = profile["offers"] = new_offer_state()
    return state


def _example(entry: dict[str, Any], reward: float, at: float) -> dict[str, Any]:
    return {
        "decision_id": entry["decision_id"],
        "offer_id": entry["offer_id"],
        "context": entry["context"],
        "propensity": entry["propensity"],
        "policy": entry["policy"],
        "decided_at": entry["ts"],
        "resolved_at": at,
        "reward": reward,
    }


def record(
    state: dict[str, Any], decision: dict[str, Any], *, horizon_s: float = 30 * _DAY
) -> list[dict[str, Any]]:
    """Remember ``decision`` (a :meth:`OfferPolicy.decide` result) in the user's offer state.

    Appends to ``history`` (kept to :data:`MAX_HISTORY` entries within ``horizon_s`` of the
    newest, which must cover the catalog's ``horizon_s``) and to ``pending`` (awaiting a reward),
    and sets ``last``. Returns the reward-0 examples of pending decisions pushed out of the
    bounded pending list. A decision without an offer only sets ``last``. Idempotent per
    ``decision_id``. The pending entry keeps the decision's ``context`` as it is (decisions
    round it, see :data:`CONTEXT_DECIMALS`).
    """
    last = {k: decision[k] for k in ("decision_id", "offer_id", "channel", "ts", "reason",
                                     "policy", "propensity", "score", "model_version")}  # fmt: skip
    state["last"] = last
    oid = decision["offer_id"]
    if oid is None:
        return []
    pending = state["pending"]
    did = decision["decision_id"]
    if any(e["decision_id"] == did for e in pending):
        return []
    ts = decision["ts"]
    history = state["history"]
    history.append([oid, ts])
    history.sort(key=lambda h: h[1])
    newest = history[-1][1]
    keep = [h for h in history[-MAX_HISTORY:] if h[1] > newest - horizon_s]
    history[:] = keep
    pending.append({"decision_id": did, "offer_id": oid, "ts": ts,
                    "context": list(decision["context"]),
                    "propensity": decision["propensity"],
                    "policy": decision["policy"]})  # fmt: skip
    evicted = []
    while len(pending) > MAX_PENDING:
        pending.sort(key=lambda e: e["ts"])
        evicted.append(_example(pending.pop(0), 0.0, ts))
    return evicted


def attribute(
    state: dict[str, Any],
    event_name: str,
    ts: float,
    *,
    window_s: float = DEFAULT_WINDOW_S,
    offer_id: str | None = None,
) -> list[dict[str, Any]]:
    """Reward-1 examples for the pending decisions an event at ``ts`` pays.

    ``Order Completed`` pays the latest pending decision made at or before ``ts`` and less than
    ``window_s`` earlier (last touch). ``Offer Clicked`` pays the latest such decision of
    ``offer_id`` (the event's ``offer_id`` property; any offer when None). Paid decisions leave
    ``pending``; other events pay nothing. Each example holds ``decision_id, offer_id, context,
    propensity, policy, decided_at, resolved_at, reward``.
    """
    if event_name not in (ORDER_COMPLETED, OFFER_CLICKED) or not state:
        return []
    pending = state["pending"]
    best = -1
    for i, e in enumerate(pending):
        if not ts - window_s < e["ts"] <= ts:
            continue
        if event_name == OFFER_CLICKED and offer_id is not None and e["offer_id"] != offer_id:
            continue
        if best < 0 or e["ts"] > pending[best]["ts"]:
            best = i
    if best < 0:
        return []
    return [_example(pending.pop(best), 1.0, ts)]


def next_due(state: dict[str, Any], *, window_s: float = DEFAULT_WINDOW_S) -> float | None:
    """When the earliest pending decision's attribution window closes (for timers), or None.

    >>> next_due({"pending": [{"ts": 100.0}, {"ts": 50.0}]}, window_s=10.0)
    60.0
    """
    pending = state.get("pending") if state else None
    if not pending:
        return None
    return min(e["ts"] for e in pending) + window_s


def expire(
    state: dict[str, Any], watermark: float, *, window_s: float = DEFAULT_WINDOW_S
) -> list[dict[str, Any]]:
    """Reward-0 examples for pending decisions whose window closed at or before ``watermark``."""
    if not state or not state["pending"]:
        return []
    pending = state["pending"]
    done = [e for e in pending if e["ts"] + window_s <= watermark]
    if not done:
        return []
    pending[:] = [e for e in pending if e["ts"] + window_s > watermark]
    return [_example(e, 0.0, e["ts"] + window_s) for e in done]


# --------------------------------------------------------------------------- hashing


def _unit(text: str) -> float:
    """A uniform number in [0, 1) from ``text`` (SHA-256)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def holdout_score(user_id: str, salt: str) -> float:
    """sha256(salt + user_id) → [0, 1): users below the holdout share form the control group."""
    return _unit(salt + user_id)


# --------------------------------------------------------------------------- policy


class OfferPolicy:
    """Disjoint LinUCB with softmax exploration over the eligible offers of ``catalog``.

    Parameters:
        alpha: width of the upper confidence bound (optimism for little-tried offers).
        temperature: softmax temperature on the UCB scores, in reward units; 0 is greedy.
        epsilon: share of uniform exploration mixed in (a floor on every eligible propensity).
        ridge: ridge penalty (prior precision) of each offer's linear model.
        holdout_share: share of users (by hashed id) in the control group (uniform random).
        holdout_salt: salt of the holdout hash; change it to redraw the control group.
        seed: seed of the per-decision random draws.
        dim: context length; default ``1 + len(CONTEXT_FEATURES)`` (:func:`offer_context`).
        consent_default: consent assumed for users who never stated it.
        refresh_every: an arm's ``A^-1`` is re-inverted exactly after this many rank-1 updates.
    """

    def __init__(
        self,
        catalog: OfferCatalog,
        *,
        alpha: float = 0.1,
        temperature: float = 0.005,
        epsilon: float = 0.02,
        ridge: float = 1.0,
        holdout_share: float = 0.05,
        holdout_salt: str = "persona-holdout",
        seed: int = 0,
        dim: int | None = None,
        consent_default: bool = False,
        refresh_every: int = 1000,
    ) -> None:
        if alpha < 0 or temperature < 0 or ridge <= 0 or refresh_every < 1:
            raise ValueError("need alpha >= 0, temperature >= 0, ridge > 0, refresh_every >= 1")
        if not 0.0 <= epsilon <= 1.0 or not 0.0 <= holdout_share <= 1.0:
            raise ValueError("epsilon and holdout_share must be in [0, 1]")
        self.catalog = catalog
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.epsilon = float(epsilon)
        self.ridge = float(ridge)
        self.holdout_share = float(holdout_share)
        self.holdout_salt = holdout_salt
        self.seed = seed
        self.dim = dim if dim is not None else 1 + len(CONTEXT_FEATURES)
        self.consent_default = consent_default
        self.refresh_every = refresh_every
        self.version = 0
        """Examples learned so far; decisions carry it as ``model_version``."""
        k, d = len(catalog), self.dim
        self._a = np.tile(np.eye(d) * self.ridge, (k, 1, 1))
        self._a_inv = np.tile(np.eye(d) / self.ridge, (k, 1, 1))
        self._b = np.zeros((k, d))
        self._theta = np.zeros((k, d))
        self._stale = np.zeros(k, dtype=np.int64)
        self._n = np.zeros(k, dtype=np.int64)

    # --- scoring ------------------------------------------------------------------------------

    def in_holdout(self, user_id: str) -> bool:
        """Whether ``user_id`` is in the control group (deterministic)."""
        return holdout_score(user_id, self.holdout_salt) < self.holdout_share

    def ucb_many(self, contexts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(means, ucb scores), each (n, offers), for an (n, dim) context matrix."""
        x = np.asarray(contexts, dtype=float).reshape(-1, self.dim)
        means = x @ self._theta.T
        xa = np.matmul(x[None, :, :], self._a_inv)  # (offers, n, dim)
        var = (xa * x[None, :, :]).sum(axis=2).T
        return means, means + self.alpha * np.sqrt(np.maximum(var, 0.0))

    def _scores(self, x: np.ndarray) -> tuple[list[list[float]], list[list[float]]]:
        """:meth:`ucb_many` as nested lists; one row is scored without batched products."""
        if len(x) != 1:
            means, ucb = self.ucb_many(x)
            return means.tolist(), ucb.tolist()
        x0 = x[0]
        m = (self._theta @ x0).tolist()
        var = ((self._a_inv @ x0) @ x0).tolist()
        alpha, sqrt = self.alpha, math.sqrt
        return [m], [
            [mi + alpha * sqrt(v if v > 0.0 else 0.0) for mi, v in zip(m, var, strict=True)]
        ]

    def _row_probabilities(self, ucb: list[float]) -> list[float]:
        """:meth:`probabilities_many` for one row of eligible UCB scores, in plain Python."""
        n = len(ucb)
        top = max(ucb)
        if self.temperature > 0:
            e = [math.exp((u - top) / self.temperature) for u in ucb]
        else:
            e = [1.0 if u >= top else 0.0 for u in ucb]
        s = sum(e)
        keep = 1.0 - self.epsilon
        floor = self.epsilon / n
        return [keep * v / s + floor for v in e]

    def probabilities_many(self, ucb: np.ndarray, eligible: np.ndarray | None = None) -> np.ndarray:
        """Bandit choice probabilities (n, offers) from UCB scores; 0 for ineligible offers.

        ``eligible`` is an (n, offers) boolean mask (default: all). Rows with nothing eligible
        are all zero.
        """
        ucb = np.asarray(ucb, dtype=float)
        mask = np.ones(ucb.shape, dtype=bool) if eligible is None else np.asarray(eligible, bool)
        n_el = mask.sum(axis=1, keepdims=True)
        z = np.where(mask, ucb, -np.inf)
        top = z.max(axis=1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        if self.temperature > 0:
            e = np.where(mask, np.exp((z - top) / self.temperature), 0.0)
        else:  # greedy: ties share the mass
            e = np.where(mask & (z >= top), 1.0, 0.0)
        s = e.sum(axis=1, keepdims=True)
        soft = np.divide(e, s, out=np.zeros_like(e), where=s > 0)
        uniform = np.divide(mask, n_el, out=np.zeros(mask.shape), where=n_el > 0)
        return (1.0 - self.epsilon) * soft + self.epsilon * uniform

    def choose(
        self,
        context: Sequence[float] | np.ndarray,
        eligible: Sequence[int],
        *,
        user_id: str,
        ts: float,
    ) -> dict[str, Any]:
        """Decide among offer indices ``eligible`` for one context (no profile needed)."""
        x = np.asarray(context, dtype=float).reshape(1, -1)
        return self._decide_rows(x, [list(eligible)], [user_id], [ts])[0]

    def decide(
        self,
        profile: dict[str, Any],
        *,
        now: float,
        features: Mapping[str, float] | None = None,
        segment: str | None = None,
    ) -> dict[str, Any]:
        """The next-best-offer decision for ``profile`` at event time ``now``.

        Returns ``decision_id, user_id, ts, offer_id, channel, score`` (estimated reward of the
        offer), ``propensity`` (exact probability of this offer given the eligible set; 1.0 for
        no offer), ``reason`` (one of :data:`REASONS`), ``policy`` ("bandit" or "control"),
        ``model_version``, ``eligible`` (offer ids) and ``context`` (for learning later, to
        :data:`CONTEXT_DECIMALS` decimals).
        ``features`` (a :func:`~models.features.feature_vector` at ``now``) is computed when not
        given; ``segment`` defaults to ``profile.get("segment")``.
        """
        return self.decide_many([profile], now=now, features=[features], segments=[segment])[0]

    def decide_many(
        self,
        profiles: Sequence[dict[str, Any]],
        *,
        now: float | Sequence[float],
        features: Sequence[Mapping[str, float] | None] | None = None,
        segments: Sequence[str | None] | None = None,
    ) -> list[dict[str, Any]]:
        """:meth:`decide` for many profiles, scored in one batch."""
        n = len(profiles)
        nows = [float(now)] * n if isinstance(now, int | float) else [float(t) for t in now]
        rows = []
        eligible = []
        catalog = self.catalog
        consent_default = self.consent_default
        for i, p in enumerate(profiles):
            f = features[i] if features is not None else None
            if f is None:
                f = feature_vector(p, now=nows[i])
            rows.append(offer_context(f))
            seg = segments[i] if segments is not None else None
            if seg is None:
                seg = p.get("segment")
            eligible.append(
                catalog.eligible(p, now=nows[i], segment=seg, consent_default=consent_default)
            )
        x = np.array(rows, dtype=float).reshape(n, self.dim)
        return self._decide_rows(x, eligible, [p["user_id"] for p in profiles], nows)

    def _decide_rows(
        self,
        x: np.ndarray,
        eligible: Sequence[Sequence[int]],
        user_ids: Sequence[str],
        nows: Sequence[float],
    ) -> list[dict[str, Any]]:
        means_l, ucb_l = self._scores(x)
        # Rounded once for the batch: the context is kept in the user's pending decisions
        # until its reward is known, and four decimals keep that state small.
        contexts = np.round(x, CONTEXT_DECIMALS).tolist()
        offers = self.catalog.offers
        version = self.version
        out = []
        for i, uid in enumerate(user_ids):
            ts = nows[i]
            row = eligible[i]
            n = len(row)
            holdout = self.in_holdout(uid)
            digest = hashlib.sha256(f"{self.seed}|{uid}|{ts!r}".encode()).digest()
            decision: dict[str, Any] = {
                "decision_id": digest[8:20].hex(),
                "user_id": uid,
                "ts": ts,
                "offer_id": None,
                "channel": None,
                "score": 0.0,
                "propensity": 1.0,
                "reason": "none_eligible",
                "policy": "control" if holdout else "bandit",
                "model_version": version,
                "eligible": [offers[j].id for j in row],
                "context": contexts[i],
            }
            out.append(decision)
            if n == 0:
                continue
            u = int.from_bytes(digest[:8], "big") / 2**64  # the decision's one random draw
            if n == 1:
                j, p, reason = row[0], 1.0, "only_eligible"
            elif holdout:
                j, p, reason = row[min(int(u * n), n - 1)], 1.0 / n, "holdout"
            else:
                scores = [ucb_l[i][k] for k in row]
                probs = self._row_probabilities(scores)
                c, acc, target = n - 1, 0.0, u * sum(probs)
                for m, q in enumerate(probs):
                    acc += q
                    if target < acc:
                        c = m
                        break
                j, p = row[c], probs[c]
                reason = "exploit" if c == scores.index(max(scores)) else "explore"
            decision.update(offer_id=offers[j].id, channel=offers[j].channel,
                            score=means_l[i][j], propensity=p, reason=reason)  # fmt: skip
        return out

    # --- learning -----------------------------------------------------------------------------

    def _arm(self, offer_id: str | int) -> int | None:
        if isinstance(offer_id, int | np.integer):
            return int(offer_id) if 0 <= offer_id < len(self.catalog) else None
        return self.catalog.index.get(offer_id)

    def update(
        self, context: Sequence[float] | np.ndarray, offer_id: str | int, reward: float
    ) -> None:
        """Learn one (context, offer, reward) example; unknown offer ids are ignored."""
        k = self._arm(offer_id)
        if k is None:
            return
        x = np.asarray(context, dtype=float)
        a_inv = self._a_inv[k]
        ax = a_inv @ x
        a_inv -= np.outer(ax, ax) / (1.0 + x @ ax)
        self._a[k] += np.outer(x, x)
        self._b[k] += reward * x
        self._n[k] += 1
        self._stale[k] += 1
        if self._stale[k] >= self.refresh_every:
            self._a_inv[k] = np.linalg.inv(self._a[k])
            self._stale[k] = 0
        self._theta[k] = self._a_inv[k] @ self._b[k]
        self.version += 1

    def update_many(
        self,
        contexts: Sequence[Sequence[float]] | np.ndarray,
        offer_ids: Sequence[str | int],
        rewards: Sequence[float] | np.ndarray,
    ) -> None:
        """Learn a batch of examples: one exact re-inversion per touched offer."""
        x = np.asarray(contexts, dtype=float).reshape(len(offer_ids), self.dim)
        r = np.asarray(rewards, dtype=float)
        arms = np.array([-1 if (a := self._arm(o)) is None else a for o in offer_ids], dtype=int)
        for k in np.unique(arms[arms >= 0]):
            sel = arms == k
            xk = x[sel]
            self._a[k] += xk.T @ xk
            self._b[k] += xk.T @ r[sel]
            self._a_inv[k] = np.linalg.inv(self._a[k])
            self._theta[k] = self._a_inv[k] @ self._b[k]
            self._n[k] += int(sel.sum())
            self._stale[k] = 0
        self.version += int((arms >= 0).sum())

    def counts(self) -> dict[str, int]:
        """Examples learned per offer."""
        return {o: int(n) for o, n in zip(self.catalog.ids, self._n, strict=True)}

    # --- persistence --------------------------------------------------------------------------

    _PARAMS = ("alpha", "temperature", "epsilon", "ridge", "holdout_share", "holdout_salt",
               "seed", "dim", "consent_default", "refresh_every")  # fmt: skip

    def to_bytes(self) -> bytes:
        """The policy (parameters, catalog config, learned statistics) as JSON bytes."""

        def arr(a: np.ndarray) -> str:
            return base64.b64encode(np.ascontiguousarray(a, dtype="<f8").tobytes()).decode()

        doc = {
            "format": "persona-offer-policy/1",
            "params": {p: getattr(self, p) for p in self._PARAMS},
            "catalog": self.catalog.config,
            "offers": list(self.catalog.ids),
            "version": self.version,
            "n": self._n.tolist(),
            "a": arr(self._a),
            "b": arr(self._b),
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, catalog: OfferCatalog | None = None) -> OfferPolicy:
        """Rebuild a policy from :meth:`to_bytes`.

        With a new ``catalog``, learned statistics follow offers by id; new offers start fresh.
        """
        doc = json.loads(data)
        if doc.get("format") != "persona-offer-policy/1":
            raise ValueError("not a persona offer policy")
        if catalog is None:
            catalog = OfferCatalog.from_config(doc["catalog"])
        policy = cls(catalog, **doc["params"])
        d = policy.dim
        ids = doc["offers"]
        a = np.frombuffer(base64.b64decode(doc["a"]), dtype="<f8").reshape(len(ids), d, d)
        b = np.frombuffer(base64.b64decode(doc["b"]), dtype="<f8").reshape(len(ids), d)
        for old, oid in enumerate(ids):
            k = catalog.index.get(oid)
            if k is None:
                continue
            policy._a[k] = a[old]
            policy._b[k] = b[old]
            policy._a_inv[k] = np.linalg.inv(a[old])
            policy._theta[k] = policy._a_inv[k] @ b[old]
            policy._n[k] = doc["n"][old]
        policy.version = int(doc["version"])
        return policy
