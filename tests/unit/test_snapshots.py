"""Unit tests for models.snapshots: signed model snapshots, verified before any unpickling."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest

from models import snapshots
from models.lead import LeadModel
from models.snapshots import Snapshot, SnapshotSignatureError, sign, verify_and_load

SECRET = b"a shared secret of the deployment"


def trained_model() -> LeadModel:
    model = LeadModel()
    model.learn_many([{"a": 1.0, "plan": "vip"}, {"a": 0.0, "plan": "free"}] * 10, [1, 0] * 10)
    model.version = 4
    return model


def snapshot(payload: bytes, **kw: object) -> Snapshot:
    fields: dict[str, object] = {
        "name": "lead",
        "version": 4,
        "examples_seen": 20,
        "training_offset": {0: 10, 3: 7},
        "metrics": {"rolling_auc": 0.8, "examples": 20},
        "created_at": 1_700_000_000.5,
        "payload": payload,
    }
    fields.update(kw)
    return Snapshot(**fields)  # type: ignore[arg-type]


class _CreatesFile:
    """Unpickling this calls Path.touch(target): proof of code execution."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.target,))


def evil_pickle(target: Path) -> bytes:
    return pickle.dumps(_CreatesFile(target))


def test_round_trip_with_a_real_model() -> None:
    model = trained_model()
    blob = sign(snapshot(model.to_bytes()), SECRET)
    snap = verify_and_load(blob, SECRET)
    assert snap == snapshot(model.to_bytes())
    loaded = LeadModel.from_bytes(snap.payload)
    assert loaded.version == 4
    assert loaded.predict_one({"a": 1.0, "plan": "vip"}) == model.predict_one(
        {"a": 1.0, "plan": "vip"}
    )


def test_int_offset_and_non_finite_metrics() -> None:
    snap = verify_and_load(
        sign(snapshot(b"x", training_offset=12, metrics={"auc": math.nan, "n": 3}), SECRET),
        SECRET,
    )
    assert snap.training_offset == 12
    assert snap.metrics == {"auc": None, "n": 3}


def test_the_evil_pickle_really_runs_code_when_unpickled(tmp_path: Path) -> None:
    """Sanity check of the payload used below: unpickling it does create the file."""
    target = tmp_path / "pwned"
    pickle.loads(evil_pickle(target))
    assert target.exists()


def test_tampered_payload_with_code_is_never_executed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "pwned"
    evil = evil_pickle(target)
    good = sign(snapshot(trained_model().to_bytes()), SECRET)

    # No unpickling at all may happen while verifying: make it loud if it does.
    def no_unpickling(*args: object, **kwargs: object) -> object:
        raise AssertionError("verify_and_load unpickled something")

    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "Unpickler", no_unpickling)

    head_end = len(good) - 32 - len(trained_model().to_bytes())
    decoy = sign(snapshot(bytes(len(evil))), SECRET)  # a genuine blob, payload as long as evil
    attacks = {
        # the payload swapped, header and tag kept
        "swapped payload": good[:head_end] + evil + good[-32:],
        # same length as the header says, so only the tag can tell
        "same-length payload": decoy[: -32 - len(evil)] + evil + decoy[-32:],
        # signed by someone with another secret
        "other secret": sign(snapshot(evil), b"attacker"),
        # a valid header and tag from another blob, evil payload appended
        "appended": good[:-32] + evil + good[-32:],
        "truncated": good[:20],
        "not an envelope": evil,
        "empty": b"",
    }
    for name, blob in attacks.items():
        with pytest.raises(SnapshotSignatureError):
            verify_and_load(blob, SECRET)
        assert not target.exists(), name
    # Even a correctly signed evil payload is only returned as bytes, never unpickled here.
    snap = verify_and_load(sign(snapshot(evil), SECRET), SECRET)
    assert snap.payload == evil
    assert not target.exists()


def test_any_flipped_byte_is_detected() -> None:
    blob = sign(snapshot(b"payload bytes"), SECRET)
    for i in range(len(blob)):
        tampered = bytearray(blob)
        tampered[i] ^= 0x01
        with pytest.raises(SnapshotSignatureError):
            verify_and_load(bytes(tampered), SECRET)


def test_malformed_envelopes() -> None:
    blob = sign(snapshot(b"p"), SECRET)
    huge_len = snapshots.MAGIC + (2**31).to_bytes(4, "big") + blob[10:]
    for bad in (huge_len, b"XXXXXX" + blob[6:], blob[:-1], "not bytes"):
        with pytest.raises(SnapshotSignatureError):
            verify_and_load(bad, SECRET)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        verify_and_load(blob, b"")
    with pytest.raises(ValueError):
        sign(snapshot(b"p"), b"")
