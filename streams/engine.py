"""The models at work on one worker: per-event bookkeeping, per-batch scoring, due timers.

:class:`Engine` holds this worker's model *replicas* (segment rules, clusters, lead model, offer
policy) and turns changed profiles into what Persona publishes: Redis fields, trigger messages
and training examples. It is plain Python over ``models`` and ``connectors.payloads``: the Faust
agent in ``streams.app`` calls it and does the I/O, so this logic is tested without a broker.

Call order per batch, which the label logic relies on (no leakage):
1. ``after_event`` for each applied event (cart episodes, delayed labels, offer rewards),
2. ``score`` once per changed profile, on the profile after the whole batch (a lead snapshot is
   taken here, so a purchase in the batch can only label snapshots taken *before* it),
3. ``on_due`` for profiles whose deadline the partition watermark has passed.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson

from connectors.payloads import (
    abandoned_cart_payload,
    segment_change_payload,
)
from models import triggers
from models.events import Event
from models.features import feature_vector, summary
from models.segments import ProfileClusters, RuleSegmenter
from models.triggers import AbandonedCart, TriggerConfig

TRIGGERS_KEY = "triggers"
TRIGGER_KIND = {
    "abandoned_cart": "abandoned_cart",
    "offers": "offer",
    "segment_changes": "segment_change",
    "hot_leads": "hot_lead",
}
"""Output topic kind → the ``kind`` label of the trigger metrics."""


@dataclass(slots=True)
class Emission:
    """A message for an output topic: ``kind`` names the topic (see ``Settings.topics``)."""

    kind: str
    key: bytes
    payload: dict[str, Any]


@dataclass(slots=True)
class Outputs:
    """Everything one batch produces besides the profiles themselves."""

    emissions: list[Emission] = field(default_factory=list)
    examples: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    """(model name, training example) for the training-examples topic."""
    redis_fields: dict[str, dict[str, str]] = field(default_factory=dict)
    lead_scores: dict[str, float] = field(default_factory=dict)
    suppressed: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(trigger kind, gate reason) → count."""

    def extend(self, other: Outputs) -> None:
        self.emissions += other.emissions
        self.examples += other.examples
        for user_id, fields in other.redis_fields.items():
            self.redis_fields.setdefault(user_id, {}).update(fields)
        self.lead_scores.update(other.lead_scores)
        self.suppressed.update(other.suppressed)


class Engine:
    """Model replicas and the decisions made with them."""

    def __init__(self, config: dict[str, Any], *, consent_default: bool, seed: int = 0) -> None:
        self.segmenter = RuleSegmenter.from_config({"segments": config["segments"]})
        self.clusters = ProfileClusters(seed=seed)
        self.trigger_config = TriggerConfig.from_config(config)
        self.consent_default = consent_default

    # -- per event ---------------------------------------------------------------------------

    def after_event(self, profile: dict[str, Any], event: Event) -> None:
        """Bookkeeping that must see every event in order (after ``apply_event``)."""
        state = profile.setdefault(TRIGGERS_KEY, triggers.new_state())
        triggers.on_event(
            state,
            profile,
            event["event"],
            event["ts"],
            abandon_after_minutes=self.trigger_config.abandon_after_minutes,
        )

    # -- per batch ---------------------------------------------------------------------------

    def score(self, profiles: dict[str, dict[str, Any]], now_of: dict[str, float]) -> Outputs:
        """Segments and clusters for each changed profile; ``now_of`` is each user's event time."""
        out = Outputs()
        if not profiles:
            return out
        user_ids = list(profiles)
        vectors = [feature_vector(profiles[u], now=now_of[u]) for u in user_ids]
        clusters = self.clusters.assign_many(vectors) if self.clusters.ready else None
        for i, user_id in enumerate(user_ids):
            profile = profiles[user_id]
            now = now_of[user_id]
            state = profile.setdefault(TRIGGERS_KEY, triggers.new_state())
            segment, reason = self.segmenter.assign(profile, now=now)
            change = triggers.segment_transition(state, segment)
            if change is not None:
                old, new = change
                out.emissions.append(
                    Emission(
                        "segment_changes",
                        user_id.encode(),
                        segment_change_payload(
                            user_id=user_id,
                            old_segment=old,
                            new_segment=new,
                            reason=reason,
                            at=now,
                        ),
                    )
                )
            fields = summary(profile, now=now)
            fields["segment"] = segment
            fields["segment_reason"] = reason
            fields["cluster"] = "" if clusters is None or clusters[i] < 0 else str(clusters[i])
            out.redis_fields[user_id] = fields
        return out

    def cluster_examples(
        self, profiles: dict[str, dict[str, Any]], now_of: dict[str, float]
    ) -> list[dict[str, float]]:
        """Feature vectors the cluster trainer learns from."""
        return [feature_vector(p, now=now_of[u]) for u, p in profiles.items()]

    # -- timers ------------------------------------------------------------------------------

    def next_due(self, profile: dict[str, Any]) -> float | None:
        """Earliest event time at which :meth:`on_due` has work for this profile."""
        due = triggers.deadline(profile.get(TRIGGERS_KEY) or {})
        return due

    def on_due(self, user_id: str, profile: dict[str, Any], watermark: float) -> Outputs:
        """Fire what the watermark has made due: abandoned carts (gated), label expiries."""
        out = Outputs()
        state = profile.setdefault(TRIGGERS_KEY, triggers.new_state())
        segment = state.get("segment")
        while True:
            result = triggers.fire_due(
                state,
                profile,
                watermark=watermark,
                user_id=user_id,
                consent_default=self.consent_default,
                cap_hours=self.trigger_config.cap_hours,
                erased=bool(profile.get("erased")),
            )
            if result is None:
                break
            if isinstance(result, AbandonedCart):
                payload = abandoned_cart_payload(result, segment=segment)
                out.emissions.append(Emission("abandoned_cart", user_id.encode(), payload))
            else:
                out.suppressed[("abandoned_cart", result.reason)] += 1
        return out


def segment_of(profile: dict[str, Any]) -> str | None:
    return (profile.get(TRIGGERS_KEY) or {}).get("segment")


def encode(payload: dict[str, Any]) -> bytes:
    return orjson.dumps(payload)


def now_for(profile: dict[str, Any], watermark: float) -> float:
    """A profile's "now" in event time: its partition's clock, or its own latest event."""
    last_seen = profile.get("last_seen") or -math.inf
    return max(last_seen, watermark)
