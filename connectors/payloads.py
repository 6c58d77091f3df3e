"""Output payloads: the dicts Persona publishes on its trigger topics (the engine encodes them).

What: one builder per output topic. There are abandoned-cart records for the email platform,
offers for ad platforms, segment changes, hot leads, and tombstones after an erasure. Every
record has ``type``, ``schema_version`` and a deterministic ``idempotency_key``. Times are
ISO-8601 UTC strings with milliseconds and a ``Z``. The JSON Schemas in ``infra/schemas/``
describe each field, and the unit tests validate every builder against them.

Why: these records leave Persona. They must be safe and stable. No raw PII leaves: profile
summaries are a whitelist of aggregates. Ad platforms get only a pseudonymous id, the
HMAC-SHA256 of the user id with a secret key (:func:`pseudonymize`), and :func:`offer_payload`
returns None without advertising consent. A consumer that sees the same key twice (at-least-once
delivery, a replay) can drop the second copy.

>>> from models.features import new_profile
>>> profile = new_profile("u-1")
>>> args = dict(secret=b"k", consent_default=False, offer_id="free-shipping", channel="ads",
...             score=0.4, propensity=0.8, reason="bandit", policy="linucb",
...             decided_at=1_700_000_000.0)
>>> print(offer_payload(profile, **args))  # no advertising consent: nothing leaves
None
>>> profile["consent"]["advertising"] = True
>>> offer = offer_payload(profile, **args)
>>> offer["pseudonymous_id"] == pseudonymize("u-1", b"k") != "u-1", offer["expires_at"]
(True, '2023-11-15T22:13:20.000Z')
>>> tombstone("u-1", at=1_700_000_000.0)["type"]
'tombstone'
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Iterable, Mapping
from hashlib import sha256
from typing import Any

from models.events import iso_utc
from models.features import has_consent, top_category
from models.triggers import AbandonedCart, idempotency_key, to_ms

__all__ = [
    "SCHEMA_VERSION",
    "abandoned_cart_payload",
    "hot_lead_payload",
    "offer_payload",
    "profile_summary",
    "pseudonymize",
    "segment_change_payload",
    "tombstone",
]

SCHEMA_VERSION = 1
"""Bumped on any incompatible change of a payload (and of its JSON Schema)."""

_DAY = 86400.0
_HOUR = 3600.0


def _iso_or_none(ts: float | None) -> str | None:
    return None if ts is None else iso_utc(ts)


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def pseudonymize(user_id: str, secret: bytes | str) -> str:
    """HMAC-SHA256 of ``user_id`` keyed with ``secret``, hex. Stable per key; not reversible."""
    key = secret.encode() if isinstance(secret, str) else bytes(secret)
    if not key:
        raise ValueError("pseudonymize needs a non-empty secret")
    return hmac.new(key, user_id.encode("utf-8", "surrogatepass"), sha256).hexdigest()


# --------------------------------------------------------------------------- abandoned cart


def abandoned_cart_payload(
    trigger: AbandonedCart,
    *,
    segment: str | None = None,
    lead_score: float | None = None,
    next_best_offer: Mapping[str, Any] | None = None,
    currency: str | None = None,
) -> dict[str, Any]:
    """The abandoned-cart record for the email platform. Cart content is as of the lapse.

    ``next_best_offer`` is a mapping with ``offer_id`` and ``channel`` (other keys are dropped).
    """
    items = []
    for line in trigger.items:
        item: dict[str, Any] = {"product_id": line["product_id"]}
        for key in ("name", "category"):  # the product's name (Segment spec), not a person's
            if line.get(key):
                item[key] = line[key]
        item["quantity"] = line["quantity"]
        item["price"] = line["price"]
        items.append(item)
    offer = None
    if next_best_offer is not None:
        offer = {
            "offer_id": str(next_best_offer["offer_id"]),
            "channel": str(next_best_offer["channel"]),
        }
    return {
        "type": "abandoned_cart",
        "schema_version": SCHEMA_VERSION,
        "idempotency_key": trigger.idempotency_key,
        "user_id": trigger.user_id,
        "items": items,
        "cart_value": trigger.cart_value,
        "currency": currency,
        "abandoned_at": iso_utc(trigger.abandoned_at),
        "episode_started_at": iso_utc(trigger.episode_start),
        "cart_updated_at": _iso_or_none(trigger.cart_updated_at),
        "segment": segment,
        "lead_score": _finite(lead_score),
        "next_best_offer": offer,
        "flags": ["checkout_started"] if trigger.checkout_started else [],
    }


# --------------------------------------------------------------------------- offers


def offer_payload(
    profile: dict[str, Any],
    *,
    secret: bytes | str,
    consent_default: bool,
    offer_id: str,
    channel: str,
    score: float,
    propensity: float,
    reason: str,
    policy: str,
    decided_at: float,
    ttl_hours: float = 24.0,
) -> dict[str, Any] | None:
    """The offer record for ad platforms, or None without advertising consent.

    The user is identified only by :func:`pseudonymize`. ``propensity`` is the probability with
    which ``policy`` chose this offer (for off-policy evaluation). The offer expires
    ``ttl_hours`` after ``decided_at``.
    """
    if not has_consent(profile, "advertising", consent_default):
        return None
    pseudonymous_id = pseudonymize(profile["user_id"], secret)
    return {
        "type": "offer",
        "schema_version": SCHEMA_VERSION,
        "idempotency_key": idempotency_key("offer", pseudonymous_id, offer_id, to_ms(decided_at)),
        "pseudonymous_id": pseudonymous_id,
        "offer_id": offer_id,
        "channel": channel,
        "score": float(score),
        "propensity": float(propensity),
        "reason": reason,
        "policy": policy,
        "decided_at": iso_utc(decided_at),
        "expires_at": iso_utc(decided_at + ttl_hours * _HOUR),
    }


# --------------------------------------------------------------------------- segments, leads


def segment_change_payload(
    *, user_id: str, old_segment: str | None, new_segment: str | None, reason: str, at: float
) -> dict[str, Any]:
    """A segment change (``old_segment`` is None for a first assignment)."""
    return {
        "type": "segment_change",
        "schema_version": SCHEMA_VERSION,
        "idempotency_key": idempotency_key(
            "segment-change", user_id, old_segment, new_segment, to_ms(at)
        ),
        "user_id": user_id,
        "old_segment": old_segment,
        "new_segment": new_segment,
        "reason": reason,
        "at": iso_utc(at),
    }


def _days_since(now: float, ts: float | None) -> float | None:
    if ts is None:
        return None
    return round(max(now - ts, 0.0) / _DAY, 3)


def profile_summary(profile: dict[str, Any], *, now: float) -> dict[str, Any]:
    """A whitelist of behavioural aggregates at event time ``now``: never an id nor PII."""
    p = profile
    return {
        "orders": p["orders"],
        "revenue": p["revenue"],
        "cart_items": sum(line["qty"] for line in p["cart"].values()),
        "cart_value": p["cart_value"],
        "checkout_started": p["checkout_started_at"] is not None,
        "top_category": top_category(p) or None,
        "days_since_last_order": _days_since(now, p["last_order_at"]),
        "days_since_seen": _days_since(now, p["last_seen"]),
        "email_opened": p["email_opened"],
        "email_clicked": p["email_clicked"],
    }


def _explanation(
    contributions: Mapping[str, float] | Iterable[tuple[str, float]], limit: int
) -> list[dict[str, Any]]:
    pairs = contributions.items() if isinstance(contributions, Mapping) else contributions
    clean = [(str(f), float(c)) for f, c in pairs if math.isfinite(c)]
    clean.sort(key=lambda fc: (-abs(fc[1]), fc[0]))
    return [{"feature": f, "contribution": c} for f, c in clean[:limit]]


def hot_lead_payload(
    profile: dict[str, Any],
    *,
    score: float,
    explanation: Mapping[str, float] | Iterable[tuple[str, float]],
    model_version: str,
    at: float,
    transition: str = "entered",
    max_features: int = 10,
) -> dict[str, Any]:
    """A hot-lead change (``transition`` is ``entered`` or ``left``, see hot_lead_transition).

    ``explanation`` gives each feature's contribution to the score. The ``max_features``
    largest by magnitude are kept.
    """
    user_id = profile["user_id"]
    return {
        "type": "hot_lead",
        "schema_version": SCHEMA_VERSION,
        "idempotency_key": idempotency_key("hot-lead", user_id, transition, to_ms(at)),
        "user_id": user_id,
        "transition": transition,
        "score": float(score),
        "explanation": _explanation(explanation, max_features),
        "model_version": model_version,
        "profile": profile_summary(profile, now=at),
        "at": iso_utc(at),
    }


# --------------------------------------------------------------------------- erasure


def tombstone(user_id: str, *, at: float, secret: bytes | str | None = None) -> dict[str, Any]:
    """The record that tells a downstream system to forget a user after an erasure request.

    With ``secret`` (for the offers topic), it carries the pseudonymous id and never the raw id.
    """
    record: dict[str, Any] = {"type": "tombstone", "schema_version": SCHEMA_VERSION}
    if secret is None:
        ident = user_id
        record["user_id"] = user_id
    else:
        ident = pseudonymize(user_id, secret)
        record["pseudonymous_id"] = ident
    record["at"] = iso_utc(at)
    record["idempotency_key"] = idempotency_key("tombstone", ident, to_ms(at))
    return record
