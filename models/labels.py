"""Delayed lead-score labels: feature snapshots that become examples when the outcome is known.

What: a small JSON-serializable per-user state (kept in the profile under ``"lead"``) holding
the pending feature snapshots. :func:`on_scored` keeps a snapshot of the features a user was
scored with (at most one per ``min_gap_s`` and ``max_pending`` in all); :func:`on_purchase` turns
every pending snapshot with ``snapshot_ts < purchase_ts <= snapshot_ts + horizon`` into a
positive example; :func:`expire` turns the snapshots whose horizon has passed the watermark into
negatives. An example is ``{"features", "label", "ts" (snapshot time), "labelled_at", "key"}``;
``key`` is a deterministic id (a hash of the user, the snapshot time and the features), so a
replay emits the same examples and a trainer can drop a duplicate. It is computed when the
example is emitted, for the user the state belongs to then, not kept in the snapshot: a random
24-digit id is what compresses worst in a stored profile (13 bytes of its frame on average).

Why: the lead score predicts a purchase within a horizon, so the label of "the profile now" is
only known later. Learning from snapshots taken at scoring time is learning exactly the
question the score answers, without ever peeking into the future.

No leakage: a snapshot must describe the profile BEFORE the event that could reveal the label.
For every event the engine does, in this order:

1. ``features = feature_vector(profile, now=event.ts)``; score; ``on_scored(state, features,
   event.ts, ...)`` (the snapshot, from the profile without the event);
2. ``apply_event(profile, event)``;
3. if the event is Order Completed: ``on_purchase(state, event.ts)``.

Since a purchase only labels snapshots strictly older than itself, the snapshot taken at the
purchase event is never labelled by that same purchase. :func:`expire` runs on the watermark
(event time minus the allowed lateness), so a late purchase inside the horizon still wins.
Negatives are labelled at ``snapshot_ts + horizon`` (not at the watermark) so replays agree.

Delayed feedback: by default a positive is emitted at the purchase, up to a horizon before the
negatives of the same day. Learned (or progressively scored) in that arrival order, any feature
that tells the time (say ``days_since_first_seen`` when every user was first seen at the same
date) separates "recent snapshot" from "old snapshot", i.e. positives from negatives: on the
simulator that inflated the progressive AUC to 0.97 while the scores given live ranked worse.
``on_purchase(..., hold_until_due=True)`` keeps a resolved snapshot pending and lets
:func:`expire` emit it with the negatives, in snapshot order: unbiased, a horizon later. The
``score`` given to :func:`on_scored` (the live score) travels with the example, so the quality of
the scores users actually got can be measured whatever the order.

>>> state = new_state()
>>> on_scored(state, {"cart_value": 0.0}, 0.0)
True
>>> on_scored(state, {"cart_value": 9.0}, 3600.0)  # within min_gap_s: skipped
False
>>> on_scored(state, {"cart_value": 50.0}, 2 * 86400.0)
True
>>> [(e["label"], e["ts"]) for e in on_purchase(state, 7.5 * 86400.0, user_id="u1")]
[(1, 172800.0)]
>>> next_due(state)
604800.0
>>> [(e["label"], e["labelled_at"], len(e["key"])) for e in expire(state, 8 * 86400.0)]
[(0, 604800.0, 24)]
>>> state["pending"], next_due(state)
([], None)
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import orjson

__all__ = [
    "DEFAULT_HORIZON_S",
    "DEFAULT_MAX_PENDING",
    "DEFAULT_MIN_GAP_S",
    "STATE_KEY",
    "expire",
    "new_state",
    "next_due",
    "on_purchase",
    "on_scored",
]

STATE_KEY = "lead"
"""Key of the label state inside a profile."""
DEFAULT_HORIZON_S = 7 * 86400.0
DEFAULT_MIN_GAP_S = 86400.0
DEFAULT_MAX_PENDING = 8
DECIMALS = 4
"""Decimals of a snapshot's features."""


def new_state() -> dict[str, Any]:
    """An empty label state: no pending snapshot."""
    return {"pending": []}


def on_scored(
    state: dict[str, Any],
    features: dict[str, float],
    ts: float,
    *,
    horizon_s: float = DEFAULT_HORIZON_S,
    min_gap_s: float = DEFAULT_MIN_GAP_S,
    max_pending: int = DEFAULT_MAX_PENDING,
    score: float | None = None,
) -> bool:
    """Keep a snapshot of ``features`` taken at event time ``ts``; True if it was kept.

    Skipped when a pending snapshot is less than ``min_gap_s`` away (either side: events can
    be late) or ``max_pending`` are already waiting. The features are copied; the snapshot
    resolves at ``ts + horizon_s`` at the latest. ``score`` (the score given now) is copied
    into the example.
    """
    if horizon_s <= 0:
        raise ValueError("horizon_s must be > 0")
    pending = state.setdefault("pending", [])
    if len(pending) >= max_pending:
        return False
    for snap in pending:
        if abs(ts - snap["ts"]) < min_gap_s:
            return False
    snap = {"ts": ts, "due": ts + horizon_s, "features": _compact(features)}
    if score is not None:
        snap["score"] = float(score)
    pending.append(snap)
    pending.sort(key=_by_ts)
    return True


def _compact(features: dict[str, float]) -> dict[str, float]:
    """``features`` to :data:`DECIMALS` decimals (a snapshot waits in the state for a horizon).

    In one numpy pass: a ``round`` call per feature was a measurable share of scoring a profile.
    """
    values = np.array(list(features.values()), dtype=float).round(DECIMALS)
    return dict(zip(features, values.tolist(), strict=True))


def on_purchase(
    state: dict[str, Any], ts: float, *, user_id: str = "", hold_until_due: bool = False
) -> list[dict[str, Any]]:
    """Positive examples for the pending snapshots this purchase at ``ts`` resolves.

    A snapshot is resolved when ``snapshot_ts < ts <= snapshot_ts + horizon``; it is removed
    and returned. With ``hold_until_due`` it is marked positive and stays pending until
    :func:`expire` emits it (see "Delayed feedback" above); nothing is returned. Call AFTER
    the snapshot of this event was taken (see the module docstring). ``user_id`` (the state's
    user) enters the examples' keys.
    """
    pending = state.get("pending") or []
    hits = [s for s in pending if s["ts"] < ts <= s["due"] and "label" not in s]
    if not hits:
        return []
    if hold_until_due:
        for s in hits:
            s["label"] = 1
            s["labelled_at"] = ts
        return []
    state["pending"] = [s for s in pending if not (s["ts"] < ts <= s["due"] and "label" not in s)]
    return [_example(s, 1, ts, user_id) for s in hits]


def expire(state: dict[str, Any], watermark: float, *, user_id: str = "") -> list[dict[str, Any]]:
    """Examples for the snapshots whose horizon ended before ``watermark``, oldest first.

    Negatives, plus the positives held by ``on_purchase(..., hold_until_due=True)``. A purchase
    exactly at the end of the horizon still counts, so a snapshot expires only once
    ``due < watermark``. Negatives are labelled at their ``due`` time. ``user_id`` (the
    state's user) enters the examples' keys.
    """
    pending = state.get("pending") or []
    done = [s for s in pending if s["due"] < watermark]
    if not done:
        return []
    state["pending"] = [s for s in pending if not s["due"] < watermark]
    return [_example(s, s.get("label", 0), s.get("labelled_at", s["due"]), user_id) for s in done]


def next_due(state: dict[str, Any]) -> float | None:
    """The earliest end of horizon of a pending snapshot (for a timer index), or None."""
    pending = state.get("pending")
    if not pending:
        return None
    return min(s["due"] for s in pending)


def _by_ts(snap: dict[str, Any]) -> float:
    return snap["ts"]


def _example(snap: dict[str, Any], label: int, labelled_at: float, user_id: str) -> dict[str, Any]:
    # Snapshots stored before keys were computed at emission carry their own.
    key = snap.get("key") or _key(user_id, snap["ts"], snap["features"])
    example = {"features": snap["features"], "label": label, "ts": snap["ts"],
               "labelled_at": labelled_at, "key": key}  # fmt: skip
    if "score" in snap:
        example["score"] = snap["score"]
    return example


def _key(user_id: str, ts: float, features: dict[str, float]) -> str:
    """Deterministic id of a snapshot: a hash of the user, the time and the features."""
    text = orjson.dumps([user_id, ts, features], option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(text, digest_size=12).hexdigest()
