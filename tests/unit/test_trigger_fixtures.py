"""Abandoned-cart triggers on real logs (REES46, OTTO) against an independent computation.

The engine side replays the file through ``connectors.replay.read_log``, then
``connectors.segment.parse_event``, ``models.features.apply_event`` and
``models.triggers.on_event``, and calls ``fire_due`` with watermark = the largest event time seen
so far. There is no final flush at +infinity: only deadlines that the last event time reached
fire. A cart still waiting at the end of the file is not abandoned. The expected side is
``tests.unit.trigger_expectations``, plain Python over the raw rows, and the sets of
(user, episode start) must be equal. Batching and a crash/restart (state through JSON) must not
change anything.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson
import pytest

from connectors.replay import ReplayMessage, read_log
from connectors.segment import Rejection, parse_event
from models.features import apply_event, new_profile
from models.triggers import (
    AbandonedCart,
    Suppressed,
    abandoned_cart_key,
    deadline,
    fire_due,
    new_state,
    on_event,
)
from tests.conftest import DATASETS
from tests.unit.trigger_expectations import (
    abandonments,
    expected_abandoned_carts_otto,
    expected_abandoned_carts_rees46,
    read_otto_rows,
)

SAMPLES = DATASETS / "clickstream_samples"
REES46 = SAMPLES / "rees46_2019-Oct_first1000.csv"
OTTO = SAMPLES / "otto_train_first20sessions.jsonl"

pytestmark = pytest.mark.skipif(
    not (REES46.is_file() and OTTO.is_file()), reason="clickstream samples not available"
)


def run_engine(
    messages: list[ReplayMessage],
    *,
    abandon_after_minutes: float = 30.0,
    cap_hours: float = 24.0,
    fire_every: int = 1,
    restart_at: int | None = None,
) -> list[AbandonedCart | Suppressed]:
    """Replay ``messages`` as the engine would. Due timers are checked every ``fire_every``
    events and once after the last event, at the last watermark and never at +infinity.
    ``restart_at`` round-trips every profile through JSON at that point, as a crash would.
    """
    profiles: dict[str, dict[str, Any]] = {}
    watermark = -math.inf
    results: list[AbandonedCart | Suppressed] = []

    def fire_all() -> None:
        for user_id, profile in profiles.items():
            state = profile["triggers"]
            due_at = deadline(state)
            while due_at is not None and due_at <= watermark:
                result = fire_due(
                    state,
                    profile,
                    watermark=watermark,
                    user_id=user_id,
                    consent_default=True,
                    cap_hours=cap_hours,
                )
                assert result is not None
                results.append(result)
                due_at = deadline(state)

    for i, message in enumerate(messages, 1):
        event = parse_event(message.value, now=1e10)
        assert not isinstance(event, Rejection), event
        watermark = max(watermark, event["ts"])
        user_id = event["user_id"]
        profile = profiles.get(user_id)
        if profile is None:
            profile = profiles[user_id] = new_profile(user_id)
            profile["triggers"] = new_state()
        apply_event(profile, event)
        on_event(
            profile["triggers"],
            profile,
            event["event"],
            event["ts"],
            abandon_after_minutes=abandon_after_minutes,
        )
        if i % fire_every == 0:
            fire_all()
        if restart_at == i:
            profiles = orjson.loads(orjson.dumps(profiles))
    fire_all()
    return results


def pairs(results: list[AbandonedCart | Suppressed]) -> set[tuple[str, float]]:
    return {(r.user_id, r.episode_start) for r in results if isinstance(r, AbandonedCart)}


CASES = [
    ("rees46", REES46, 30.0, 24.0),
    ("rees46", REES46, 5.0, 24.0),
    ("rees46", REES46, 1.0, 24.0),
    ("otto", OTTO, 30.0, 24.0),
    ("otto", OTTO, 30.0, 168.0),
    ("otto", OTTO, 30.0, 1000.0),
    ("otto", OTTO, 2.0, 24.0),
]


@pytest.mark.parametrize(("fmt", "path", "minutes", "cap"), CASES)
def test_engine_matches_independent_expectation(
    fmt: str, path: Path, minutes: float, cap: float
) -> None:
    expect = expected_abandoned_carts_rees46 if fmt == "rees46" else expected_abandoned_carts_otto
    expected = expect(path, abandon_after_minutes=minutes, cap_hours=cap)
    results = run_engine(read_log(path, fmt).messages, abandon_after_minutes=minutes, cap_hours=cap)
    assert pairs(results) == expected
    # Consent is allowed here, so the only suppression is the cap; keys are the episode keys.
    assert {r.reason for r in results if isinstance(r, Suppressed)} <= {"capped"}
    for r in results:
        assert r.idempotency_key == abandoned_cart_key(r.user_id, r.episode_start)


def test_expected_counts_are_not_trivial() -> None:
    """Check that the comparison above is not vacuous: it finds abandonments, and the cap bites."""
    assert len(expected_abandoned_carts_rees46(REES46)) == 0  # 17 minutes of log: none passed
    assert len(expected_abandoned_carts_rees46(REES46, abandon_after_minutes=1.0)) == 2
    assert len(expected_abandoned_carts_otto(OTTO)) == 10
    assert len(expected_abandoned_carts_otto(OTTO, cap_hours=168.0)) == 9
    assert len(expected_abandoned_carts_otto(OTTO, cap_hours=0.0)) == 10


def test_abandoned_at_matches_the_gap_rule() -> None:
    expected = {
        (a.user_id, a.episode_start): a.abandoned_at for a in abandonments(read_otto_rows(OTTO))
    }
    results = run_engine(read_log(OTTO, "otto").messages)
    fired = {
        (r.user_id, r.episode_start): r.abandoned_at
        for r in results
        if isinstance(r, AbandonedCart)
    }
    assert fired.keys() == expected.keys()
    for k, at in fired.items():
        assert at == pytest.approx(expected[k], abs=1e-6)


@pytest.mark.parametrize(
    ("fmt", "path", "minutes"), [("otto", OTTO, 30.0), ("rees46", REES46, 1.0)]
)
def test_batching_and_restart_do_not_change_triggers(fmt: str, path: Path, minutes: float) -> None:
    messages = read_log(path, fmt).messages

    def run(**kwargs: Any) -> list[tuple[str, str, float, str]]:
        results = run_engine(messages, abandon_after_minutes=minutes, **kwargs)
        return sorted(
            (r.user_id, r.idempotency_key, r.abandoned_at, getattr(r, "reason", "fired"))
            for r in results
        )

    reference = run(fire_every=1)
    assert reference
    assert run(fire_every=17) == reference
    assert run(fire_every=len(messages) + 1) == reference  # one batch: fire only at the end
    assert run(fire_every=5, restart_at=len(messages) // 2) == reference
