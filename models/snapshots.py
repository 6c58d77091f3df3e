"""Signed model snapshots: what the trainer publishes and every worker loads.

What: a :class:`Snapshot` is a model's bytes plus what a worker and a resuming trainer need to
know: name, version, examples seen, the training offset (per partition, or one int), metrics
and the event time it was taken at. :func:`sign` wraps it in an envelope::

    b"PSNAP1" | header length (4 bytes, big-endian) | header (JSON) | payload | HMAC-SHA256

with the tag computed over everything before it. :func:`verify_and_load` checks the envelope's
shape and the tag (constant-time compare) and raises :class:`SnapshotSignatureError` before
anything is parsed or unpickled, so a forged or corrupted snapshot never reaches ``pickle``.

Why: model payloads are pickles, and unpickling runs code. Snapshots travel through a Kafka
topic (the GlobalTable changelog) that more services can write to than should run code on the
workers; the shared secret makes "who may publish a model" explicit.

>>> snap = Snapshot(name="lead", version=3, examples_seen=1200, training_offset={0: 41, 1: 17},
...                 metrics={"rolling_auc": 0.81}, created_at=1_700_000_000.0, payload=b"model")
>>> blob = sign(snap, b"secret")
>>> verify_and_load(blob, b"secret") == snap
True
>>> verify_and_load(blob, b"other secret")
Traceback (most recent call last):
...
models.snapshots.SnapshotSignatureError: bad signature
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAGIC", "MAX_HEADER_BYTES", "Snapshot", "SnapshotSignatureError", "sign",
           "verify_and_load"]  # fmt: skip

MAGIC = b"PSNAP1"
MAX_HEADER_BYTES = 1 << 20
_LEN_BYTES = 4
_TAG_BYTES = hashlib.sha256().digest_size
_MIN_BLOB = len(MAGIC) + _LEN_BYTES + _TAG_BYTES


class SnapshotSignatureError(ValueError):
    """The blob is not a well-formed snapshot signed with the given secret."""


@dataclass(frozen=True)
class Snapshot:
    """One published model state. ``created_at`` is event time (epoch seconds)."""

    name: str
    version: int
    examples_seen: int
    training_offset: dict[int, int] | int
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    payload: bytes = b""


def sign(snapshot: Snapshot, secret: bytes) -> bytes:
    """The signed envelope of ``snapshot`` (see the module docstring)."""
    key = _key(secret)
    offset = snapshot.training_offset
    if isinstance(offset, dict):
        offset_json: Any = {str(int(p)): int(o) for p, o in offset.items()}
    else:
        offset_json = int(offset)
    header = {
        "name": snapshot.name,
        "version": int(snapshot.version),
        "examples_seen": int(snapshot.examples_seen),
        "training_offset": offset_json,
        "metrics": {k: _json_value(v) for k, v in snapshot.metrics.items()},
        "created_at": float(snapshot.created_at),
        "payload_len": len(snapshot.payload),
    }
    head = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    if len(head) > MAX_HEADER_BYTES:
        raise ValueError("snapshot header too large")
    body = MAGIC + len(head).to_bytes(_LEN_BYTES, "big") + head + bytes(snapshot.payload)
    return body + hmac.new(key, body, hashlib.sha256).digest()


def verify_and_load(blob: bytes, secret: bytes) -> Snapshot:
    """The :class:`Snapshot` in ``blob`` if its signature checks out.

    Raises :class:`SnapshotSignatureError` when the envelope is malformed or the tag does not
    match, before parsing the header; the payload is returned as bytes, never unpickled here.
    """
    key = _key(secret)
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise SnapshotSignatureError("not bytes")
    blob = bytes(blob)
    if len(blob) < _MIN_BLOB or not blob.startswith(MAGIC):
        raise SnapshotSignatureError("not a snapshot envelope")
    head_len = int.from_bytes(blob[len(MAGIC) : len(MAGIC) + _LEN_BYTES], "big")
    head_start = len(MAGIC) + _LEN_BYTES
    if head_len > MAX_HEADER_BYTES or head_start + head_len > len(blob) - _TAG_BYTES:
        raise SnapshotSignatureError("bad header length")
    body, tag = blob[:-_TAG_BYTES], blob[-_TAG_BYTES:]
    if not hmac.compare_digest(hmac.new(key, body, hashlib.sha256).digest(), tag):
        raise SnapshotSignatureError("bad signature")
    # Authentic from here on; still refuse a header that does not describe this payload.
    payload = body[head_start + head_len :]
    try:
        header = json.loads(body[head_start : head_start + head_len])
        if header["payload_len"] != len(payload):
            raise ValueError("payload length mismatch")
        offset = header["training_offset"]
        training_offset: dict[int, int] | int = (
            {int(p): int(o) for p, o in offset.items()} if isinstance(offset, dict) else int(offset)
        )
        return Snapshot(
            name=str(header["name"]),
            version=int(header["version"]),
            examples_seen=int(header["examples_seen"]),
            training_offset=training_offset,
            metrics=dict(header["metrics"]),
            created_at=float(header["created_at"]),
            payload=payload,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SnapshotSignatureError(f"malformed header: {exc}") from None


def _key(secret: bytes) -> bytes:
    if not isinstance(secret, bytes) or not secret:
        raise ValueError("secret must be non-empty bytes")
    return secret


def _json_value(v: Any) -> Any:
    """Metric values as strict JSON: NaN and infinities become None."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item") and not isinstance(v, str | bytes | dict | list):  # numpy scalar
        return _json_value(v.item())
    return v
