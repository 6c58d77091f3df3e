"""Trainers: one learner per model, fed by the training-examples topic, publishing snapshots.

Scoring happens on every worker on model *replicas*; learning happens in one place per model.
Examples are keyed by model name, so all of a model's examples land in one partition of
``training-examples`` and its trainer runs wherever that partition is assigned. The trainer:

- learns each batch of examples (lead: predict first, for progressive validation, then learn),
- checkpoints after every batch, before the batch is acknowledged: the signed snapshot goes to
  the ``trainer-state`` table (changelog-backed, co-partitioned with the examples) with the
  offset of the last example learned, so a trainer that restarts or moves resumes from the
  checkpoint and skips examples at or below that offset: no example is lost or learned twice,
- publishes the snapshot to the ``model-snapshots`` GlobalTable every
  ``PERSONA_SNAPSHOT_EVERY_EXAMPLES`` examples or ``PERSONA_SNAPSHOT_EVERY_S`` seconds; every
  worker checks the table before each batch and swaps its replica when the version changed.

Snapshots are signed (HMAC-SHA256, ``PERSONA_SNAPSHOT_SECRET``); one that fails verification is
refused before it is unpickled, and the replica keeps serving the previous model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from models.evaluation import ProgressiveValidator
from models.snapshots import Snapshot, SnapshotSignatureError, sign, verify_and_load

log = logging.getLogger(__name__)


@dataclass(slots=True)
class TrainerState:
    """One model's learner on this worker."""

    name: str
    model: Any
    version: int = 0
    examples_seen: int = 0
    offsets: dict[int, int] = field(default_factory=dict)
    """Training-examples partition → offset of the last example learned."""
    unpublished: int = 0
    published_at: float = 0.0
    validator: ProgressiveValidator | None = None
    conversions: dict[tuple[str, str], int] = field(default_factory=dict)

    def already_learned(self, partition: int, offset: int) -> bool:
        return offset <= self.offsets.get(partition, -1)

    def metrics(self, published_at: float | None = None) -> dict[str, Any]:
        metrics: dict[str, Any] = {"examples_seen": self.examples_seen}
        if published_at is not None:
            metrics["published_at"] = published_at
        if self.validator is not None:
            metrics.update(self.validator.snapshot())
        return metrics

    def snapshot(self, published_at: float | None = None) -> Snapshot:
        return Snapshot(
            name=self.name,
            version=self.version,
            examples_seen=self.examples_seen,
            training_offset=dict(self.offsets),
            metrics=self.metrics(published_at),
            created_at=published_at or 0.0,
            payload=self.model.to_bytes(),
        )


def learn(state: TrainerState, examples: list[dict[str, Any]]) -> int:
    """Teach ``state.model`` a batch of its examples; returns the drift alarms raised."""
    model = state.model
    drifts = 0
    if state.name == "lead":
        xs = [e["features"] for e in examples]
        ys = [int(e["label"]) for e in examples]
        if state.validator is None:
            state.validator = ProgressiveValidator()
        state.validator.update_many(ys, model.predict_many(xs))
        drifts = int(state.validator.drift_detected)
        model.learn_many(xs, ys)
    elif state.name == "offers":
        model.update_many(
            [e["context"] for e in examples],
            [e["offer_id"] for e in examples],
            [float(e["reward"]) for e in examples],
        )
        for e in examples:
            if e["reward"] > 0:
                key = (e["offer_id"], e["policy"])
                state.conversions[key] = state.conversions.get(key, 0) + 1
    elif state.name == "clusters":
        model.learn_many([e["vector"] for e in examples])
    else:
        raise KeyError(state.name)
    state.examples_seen += len(examples)
    state.unpublished += len(examples)
    state.version += 1
    if hasattr(model, "version"):
        model.version = state.version
    return drifts


def restore(blob: bytes | None, secret: bytes, load: Any, fresh: Any, name: str) -> TrainerState:
    """The trainer state from its last checkpoint, or a fresh model when there is none.

    A checkpoint that fails verification is refused (logged), and training starts over rather
    than running code from an untrusted pickle.
    """
    if blob:
        try:
            snap = verify_and_load(blob, secret)
        except SnapshotSignatureError as exc:
            log.error("refusing the %s trainer checkpoint: %s", name, exc)
        else:
            offsets = snap.training_offset
            return TrainerState(
                name=name,
                model=load(snap.payload),
                version=snap.version,
                examples_seen=snap.examples_seen,
                offsets={int(p): int(o) for p, o in dict(offsets).items()}
                if isinstance(offsets, dict)
                else {},
                published_at=time.monotonic(),
            )
    return TrainerState(name=name, model=fresh(), published_at=time.monotonic())


def should_publish(state: TrainerState, *, every_examples: int, every_s: float) -> bool:
    if state.unpublished <= 0:
        return False
    due = time.monotonic() - state.published_at >= every_s
    return state.unpublished >= every_examples or due


def checkpoint(state: TrainerState, secret: bytes, *, published_at: float | None) -> bytes:
    """The signed snapshot of ``state`` now (``published_at``: wall time, when published)."""
    return sign(state.snapshot(published_at), secret)


def group_by_model(
    items: Iterable[tuple[int, int, dict[str, Any]]],
) -> dict[str, list[tuple[int, int, dict[str, Any]]]]:
    """(partition, offset, message) → per model name, keeping order."""
    grouped: dict[str, list[tuple[int, int, dict[str, Any]]]] = {}
    for partition, offset, message in items:
        grouped.setdefault(message["model"], []).append((partition, offset, message))
    return grouped
