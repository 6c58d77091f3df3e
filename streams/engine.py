"""The models at work on one worker: per-event bookkeeping, per-batch scoring, due timers.

:class:`Engine` holds this worker's model *replicas* (segment rules, clusters, lead model, offer
policy) and turns changed profiles into what Persona publishes: Redis fields, trigger messages
and training examples. It is plain Python over ``models`` and ``connectors.payloads``: the Faust
agent in ``streams.app`` calls it and does the I/O, so this logic is tested without a broker.
Learning does not happen here: examples go to the trainers (``streams.training``), whose
snapshots replace the replicas (:meth:`Engine.swap`).

Call order, which the label logic relies on (no leakage):
1. :meth:`after_event` for each applied event, in event-time order (cart episodes; a purchase
   labels the lead snapshots taken *before* it and pays the offer decided before it),
2. :meth:`score` once per changed profile, on the profile after the whole batch: segment,
   cluster, lead score (and a new feature snapshot for its label), next-best-offer;
3. between batches, :meth:`run_due` for profiles whose deadline the partition watermark has
   passed (abandoned carts, horizons and attribution windows that closed: negative examples),
   and :meth:`score` again for the profiles it changed. Deadlines are points in event time, so
   running them a little later changes nothing: an event past a cart's deadline lapses that
   cart first (``triggers.on_event``), and labels compare event times, not arrival.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from connectors.payloads import (
    abandoned_cart_payload,
    hot_lead_payload,
    offer_payload,
    segment_change_payload,
)
from models import labels, offers, profile_codec, triggers
from models.events import OFFER_CLICKED, ORDER_COMPLETED, Event
from models.features import feature_vector, summary
from models.lead import LeadModel
from models.offers import OfferCatalog, OfferPolicy
from models.segments import ProfileClusters, RuleSegmenter
from models.triggers import AbandonedCart, TriggerConfig
from streams.clock import TimerIndex

TRIGGERS_KEY = "triggers"
LEAD_KEY = "lead"
OFFERS_KEY = "offers"
CLUSTER_DAY_KEY = "cluster_day"
TRIGGER_KIND = {
    "abandoned_cart": "abandoned_cart",
    "offers": "offer",
    "segment_changes": "segment_change",
    "hot_leads": "hot_lead",
    "tombstones": "tombstone",
}
"""Output topic kind → the ``kind`` label of the trigger metrics."""
MODELS = ("lead", "offers", "clusters")
REPLICA_ATTRIBUTE = {"lead": "lead", "offers": "policy", "clusters": "clusters"}
"""Model name → the :class:`Engine` attribute that serves its replica."""


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
    decisions: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    """(offer id, policy, reason) → offer decisions published."""

    def examples_by_model(self) -> dict[str, list[dict[str, Any]]]:
        """The training examples per model name, in order (a trainer learns them in batches)."""
        by_model: dict[str, list[dict[str, Any]]] = {}
        for model, example in self.examples:
            by_model.setdefault(model, []).append(example)
        return by_model

    def extend(self, other: Outputs) -> None:
        self.emissions += other.emissions
        self.examples += other.examples
        for user_id, fields in other.redis_fields.items():
            self.redis_fields.setdefault(user_id, {}).update(fields)
        self.lead_scores.update(other.lead_scores)
        self.suppressed.update(other.suppressed)
        self.decisions.update(other.decisions)


@dataclass(frozen=True, slots=True)
class EngineOptions:
    consent_default: bool = False
    lead_horizon_s: float = 7 * 86400.0
    attribution_window_s: float = 24 * 3600.0
    holdout_share: float = 0.05
    pseudonym_secret: str = "change-me"
    seed: int = 0


class Engine:
    """Model replicas and the decisions made with them."""

    def __init__(self, config: dict[str, Any], options: EngineOptions | None = None) -> None:
        self.options = options or EngineOptions()
        self.segmenter = RuleSegmenter.from_config({"segments": config["segments"]})
        self.trigger_config = TriggerConfig.from_config(config)
        self.catalog = OfferCatalog.from_section(config["offers"])
        self.clusters = ProfileClusters(seed=self.options.seed)
        self.lead = LeadModel(horizon_s=self.options.lead_horizon_s)
        self.policy = self.new_policy()
        self._examples: list[tuple[str, dict[str, Any]]] = []

    def new_policy(self) -> OfferPolicy:
        return OfferPolicy(
            self.catalog,
            holdout_share=self.options.holdout_share,
            seed=self.options.seed,
            consent_default=self.options.consent_default,
        )

    def new_model(self, name: str) -> Any:
        """A fresh, untrained model (what a trainer starts from)."""
        if name == "lead":
            return LeadModel(horizon_s=self.options.lead_horizon_s)
        if name == "offers":
            return self.new_policy()
        if name == "clusters":
            return ProfileClusters(seed=self.options.seed)
        raise KeyError(name)

    def load_model(self, name: str, payload: bytes) -> Any:
        if name == "lead":
            return LeadModel.from_bytes(payload)
        if name == "offers":
            return OfferPolicy.from_bytes(payload, catalog=self.catalog)
        if name == "clusters":
            return ProfileClusters.from_bytes(payload)
        raise KeyError(name)

    def replica(self, name: str) -> Any:
        """The replica of ``name`` served now."""
        return getattr(self, REPLICA_ATTRIBUTE[name])

    def swap(self, name: str, model: Any) -> None:
        """Serve a new replica of ``name`` (from a verified snapshot)."""
        setattr(self, REPLICA_ATTRIBUTE[name], model)

    # -- per event ---------------------------------------------------------------------------

    def after_event(self, profile: dict[str, Any], event: Event) -> None:
        """Bookkeeping that must see every event, in order, right after ``apply_event``."""
        name, ts = event["event"], event["ts"]
        state = profile.setdefault(TRIGGERS_KEY, triggers.new_state())
        triggers.on_event(
            state,
            profile,
            name,
            ts,
            abandon_after_minutes=self.trigger_config.abandon_after_minutes,
        )
        if name == ORDER_COMPLETED:
            # Positives wait for their horizon like negatives, so the trainer sees labels in
            # the order of the snapshots (an early flood of positives would bias the model).
            labels.on_purchase(
                profile.setdefault(LEAD_KEY, labels.new_state()), ts, hold_until_due=True
            )
        if name in (ORDER_COMPLETED, OFFER_CLICKED):
            offer_id = event["properties"].get("offer_id") if name == OFFER_CLICKED else None
            paid = offers.attribute(
                offers.offer_state(profile),
                name,
                ts,
                window_s=self.options.attribution_window_s,
                offer_id=str(offer_id) if offer_id is not None else None,
            )
            self._examples += [("offers", example) for example in paid]

    def merge_state(self, merged: dict[str, Any], anonymous: dict[str, Any]) -> None:
        """Fold the anonymous profile's model state into ``merged`` (after ``merge_profiles``).

        The open cart episode comes along when the known user has none (the cart was kept), so
        its abandonment timer runs on the known profile; the trigger cap, offer history (for
        frequency caps), pending offer decisions and label snapshots are the person's too.
        """
        theirs = anonymous.get(TRIGGERS_KEY) or {}
        mine = merged.setdefault(TRIGGERS_KEY, triggers.new_state())
        if mine.get("cart") is None and theirs.get("cart") is not None and merged["cart"]:
            mine["cart"] = theirs["cart"]
        mine["due"] = list(mine.get("due") or []) + list(theirs.get("due") or [])
        sent = [t for t in (mine.get("sent_at"), theirs.get("sent_at")) if t is not None]
        mine["sent_at"] = max(sent) if sent else None
        their_offers = anonymous.get(OFFERS_KEY)
        if their_offers:
            state = offers.offer_state(merged)
            state["history"] = sorted(
                state["history"] + their_offers.get("history", []), key=lambda entry: entry[1]
            )
            state["pending"] = state["pending"] + their_offers.get("pending", [])
        their_labels = (anonymous.get(LEAD_KEY) or {}).get("pending")
        if their_labels:
            state = merged.setdefault(LEAD_KEY, labels.new_state())
            state["pending"] = state.get("pending", []) + their_labels

    def take_examples(self) -> list[tuple[str, dict[str, Any]]]:
        """The training examples :meth:`after_event` produced since the last call."""
        examples, self._examples = self._examples, []
        return examples

    # -- per batch ---------------------------------------------------------------------------

    def score(self, profiles: dict[str, dict[str, Any]], now_of: dict[str, float]) -> Outputs:
        """Segment, cluster, lead score and next-best-offer for each changed profile.

        ``now_of`` is each user's "now" in event time (its partition's clock).
        """
        out = Outputs()
        if not profiles:
            return out
        user_ids = list(profiles)
        plist = [profiles[u] for u in user_ids]
        nows = [now_of[u] for u in user_ids]
        vectors = [feature_vector(p, now=t) for p, t in zip(plist, nows, strict=True)]
        clusters = self.clusters.assign_many(vectors) if self.clusters.ready else None
        scores, explanations = self.lead.predict_explain_many(vectors, top_k=3)
        segments = [self.segmenter.assign(p, now=t) for p, t in zip(plist, nows, strict=True)]
        decisions = self.policy.decide_many(
            plist, now=nows, features=vectors, segments=[s for s, _ in segments]
        )
        lead_version = str(self.lead.version)
        enter, leave = self.trigger_config.hot_enter, self.trigger_config.hot_exit
        for i, user_id in enumerate(user_ids):
            profile, now, vector = plist[i], nows[i], vectors[i]
            score = float(scores[i])
            segment, reason = segments[i]
            state = profile.setdefault(TRIGGERS_KEY, triggers.new_state())
            key = user_id.encode()

            change = triggers.segment_transition(state, segment)
            if change is not None:
                payload = segment_change_payload(
                    user_id=user_id, old_segment=change[0], new_segment=change[1],
                    reason=reason, at=now,
                )  # fmt: skip
                out.emissions.append(Emission("segment_changes", key, payload))

            explanation = explanations[i]
            transition = triggers.hot_lead_transition(state, score, enter=enter, exit=leave)
            if transition is not None:
                payload = hot_lead_payload(
                    profile, score=score, explanation=explanation, model_version=lead_version,
                    at=now, transition=transition,
                )  # fmt: skip
                out.emissions.append(Emission("hot_leads", key, payload))
            lead_state = profile.setdefault(LEAD_KEY, labels.new_state())
            lead_state["score"] = round(score, 4)
            labels.on_scored(
                lead_state,
                vector,
                now,
                horizon_s=self.options.lead_horizon_s,
                score=score,
            )

            decision = decisions[i]
            self._publish_offer(out, profile, decision, now)

            fields = summary(profile, now=now)
            fields["segment"] = segment
            fields["segment_reason"] = reason
            fields["cluster"] = "" if clusters is None or clusters[i] < 0 else str(clusters[i])
            fields["lead_score"] = f"{score:.4f}"
            fields["lead_model_version"] = lead_version
            fields["lead_explanation"] = orjson.dumps(
                [{"feature": f, "contribution": round(c, 4)} for f, c in explanation]
            ).decode()
            last = (profile.get(OFFERS_KEY) or {}).get("last") or {}
            fields["offer_id"] = last.get("offer_id") or ""
            fields["offer_channel"] = last.get("channel") or ""
            fields["offer_reason"] = last.get("reason") or ""
            fields["offer_policy"] = last.get("policy") or ""
            propensity = last.get("propensity")
            fields["offer_propensity"] = "" if propensity is None else f"{propensity:.4f}"
            out.redis_fields[user_id] = fields
            out.lead_scores[user_id] = score
            day = int(now // 86400)
            if profile.get(CLUSTER_DAY_KEY) != day:  # one cluster sample per user and day
                profile[CLUSTER_DAY_KEY] = day
                out.examples.append(("clusters", {"vector": vector}))
        out.examples += self.take_examples()
        return out

    def _publish_offer(
        self, out: Outputs, profile: dict[str, Any], decision: dict[str, Any], now: float
    ) -> None:
        """Record and publish a decision when the best offer changed or its refresh is due."""
        offer_id = decision["offer_id"]
        if offer_id is None:
            return
        state = profile.setdefault(TRIGGERS_KEY, triggers.new_state())
        refresh = self.trigger_config.offer_refresh_hours
        if not triggers.offer_changed(state, offer_id, ts=now, refresh_hours=refresh):
            return
        evicted = offers.record(offers.offer_state(profile), decision)
        out.examples += [("offers", example) for example in evicted]
        out.decisions[(offer_id, decision["policy"], decision["reason"])] += 1
        if decision["channel"] != "ads":
            return  # email and onsite offers are served from the Redis profile
        if decision["policy"] == "control":
            # The holdout's control is "no targeted ads": its ad offers are recorded (so their
            # conversions measure the baseline) but never sent to the ad platforms.
            out.suppressed[("offer", "holdout")] += 1
            return
        payload = offer_payload(
            profile,
            secret=self.options.pseudonym_secret,
            consent_default=self.options.consent_default,
            offer_id=offer_id,
            channel=decision["channel"],
            score=float(decision["score"]),
            propensity=float(decision["propensity"]),
            reason=decision["reason"],
            policy=decision["policy"],
            decided_at=now,
        )
        if payload is None:
            out.suppressed[("offer", "no_consent")] += 1
            return
        out.emissions.append(Emission("offers", payload["pseudonymous_id"].encode(), payload))

    # -- timers ------------------------------------------------------------------------------

    def run_due(
        self,
        timers: TimerIndex,
        partition: int,
        watermark: float,
        changed: dict[str, dict[str, Any]],
        stored: Callable[[bytes], bytes | None],
        limit: int | None = None,
    ) -> tuple[Outputs, list[tuple[str, dict[str, Any]]]]:
        """Run the timers of ``partition`` due at ``watermark``: their outputs, and the profiles
        they changed (to score and write back). At most ``limit`` users: a watermark that
        passes thousands of deadlines at once (label horizons and attribution windows of a busy
        hour) would otherwise hold one batch, and every event queued behind it, for seconds.

        A due user is taken from ``changed`` (this batch's profiles, by user id) or loaded with
        ``stored`` (its stored bytes by table key, see :mod:`models.profile_codec`). A timer
        can be stale (the user's deadline moved on since, or a label horizon ends exactly at
        ``watermark``): when the stored profile has nothing due, the timer is scheduled again
        and the profile is neither scored nor written.
        """
        outputs = Outputs()
        touched = []
        for key in timers.pop_due(partition, watermark, limit):
            user_id = key.decode()
            profile, raw = changed.get(user_id), None
            if profile is None:
                raw = stored(key)
                if raw is None:
                    continue  # erased since it was scheduled
                raw = profile_codec.json_of(raw)
                profile = orjson.loads(raw)
                due = self.next_due(profile)
                if due is None or due > watermark:  # stale: the deadline moved on
                    if due is not None:
                        timers.schedule(partition, due, key)
                    continue
            fired = self.on_due(user_id, profile, watermark)
            idle = not (fired.emissions or fired.examples or fired.suppressed)
            if idle and raw is not None and orjson.dumps(profile) == raw:
                # Nothing came due after all (a label horizon ends only once the watermark is
                # past it): look again later, write nothing.
                due = self.next_due(profile)
                if due is not None:
                    timers.schedule(partition, due, key)
                continue
            outputs.extend(fired)
            touched.append((user_id, profile))  # timer state may change without a trigger
        return outputs, touched

    def next_due(self, profile: dict[str, Any]) -> float | None:
        """Earliest event time at which :meth:`on_due` has work for this profile."""
        candidates = [
            triggers.deadline(profile.get(TRIGGERS_KEY) or {}),
            labels.next_due(profile.get(LEAD_KEY) or {}),
            offers.next_due(
                profile.get(OFFERS_KEY) or {}, window_s=self.options.attribution_window_s
            ),
        ]
        due = [c for c in candidates if c is not None]
        return min(due) if due else None

    def on_due(self, user_id: str, profile: dict[str, Any], watermark: float) -> Outputs:
        """Fire what the watermark made due: abandoned carts (gated), closed label horizons and
        attribution windows (negative examples)."""
        out = Outputs()
        state = profile.setdefault(TRIGGERS_KEY, triggers.new_state())
        while True:
            result = triggers.fire_due(
                state,
                profile,
                watermark=watermark,
                user_id=user_id,
                consent_default=self.options.consent_default,
                cap_hours=self.trigger_config.cap_hours,
                erased=bool(profile.get("erased")),
            )
            if result is None:
                break
            if isinstance(result, AbandonedCart):
                last_offer = (profile.get(OFFERS_KEY) or {}).get("last")
                payload = abandoned_cart_payload(
                    result,
                    segment=state.get("segment"),
                    lead_score=(profile.get(LEAD_KEY) or {}).get("score"),
                    next_best_offer=last_offer if (last_offer or {}).get("offer_id") else None,
                )
                out.emissions.append(Emission("abandoned_cart", user_id.encode(), payload))
            else:
                out.suppressed[("abandoned_cart", result.reason)] += 1
        for example in labels.expire(profile.get(LEAD_KEY) or {}, watermark, user_id=user_id):
            out.examples.append(("lead", example))
        expired = offers.expire(
            profile.get(OFFERS_KEY) or {}, watermark, window_s=self.options.attribution_window_s
        )
        out.examples += [("offers", example) for example in expired]
        return out


def due_limit(per_chunk: int, partitions: int) -> int:
    """Each partition's share of a chunk of ``per_chunk`` due profiles (at least one).

    >>> due_limit(200, 3), due_limit(200, 0), due_limit(2, 4)
    (66, 200, 1)
    """
    return max(1, per_chunk // max(partitions, 1))


def move_segment(
    counts: dict[int, Counter[str]], partition: int, old: str | None, new: str | None
) -> None:
    """Keep ``partition``'s users-per-segment count as a user moves from segment ``old`` to
    ``new`` (``None``: no segment, a new or a removed user).

    >>> counts = {}
    >>> move_segment(counts, 0, None, "new"); move_segment(counts, 0, "new", "loyal")
    >>> move_segment(counts, 0, "loyal", None); counts
    {0: Counter({'new': 0, 'loyal': 0})}
    """
    if new == old:
        return
    partition_counts = counts.setdefault(partition, Counter())
    if old:
        partition_counts[old] -= 1
    if new is not None:
        partition_counts[new] += 1


def segment_sizes(counts: dict[int, Counter[str]], partitions: Iterable[int]) -> dict[str, int]:
    """The ``<partition>/<segment>`` → users fields of ``partitions`` (Redis' segment sizes).

    >>> segment_sizes({0: Counter(new=2), 1: Counter(loyal=1)}, [0, 2])
    {'0/new': 2}
    """
    return {
        f"{partition}/{segment}": count
        for partition in partitions
        for segment, count in counts.get(partition, Counter()).items()
    }


def now_for(profile: dict[str, Any], watermark: float) -> float:
    """A profile's "now" in event time: its partition's clock, or its own latest event."""
    last_seen = profile.get("last_seen") or -math.inf
    return max(last_seen, watermark)
