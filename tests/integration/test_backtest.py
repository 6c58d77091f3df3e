"""Backtests: the whole engine over a log in event time, outputs checked against the raw files.

Abandoned-cart triggers must not depend on how fast or in which batches the log is consumed:
the same log at batch size 1 and 1000, on 1 or 4 partitions, gives the same idempotency keys,
and on the real REES46 and OTTO samples they equal an independent computation from the raw rows
(``tests/unit/trigger_expectations.py``). Every produced message validates against its schema.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

from connectors.simulator import ShopperSimulator
from streams.backtest import run_backtest
from tests.conftest import DATASETS, REPO
from tests.unit.trigger_expectations import (
    expected_abandoned_carts_otto,
    expected_abandoned_carts_rees46,
)

pytestmark = pytest.mark.integration

SCHEMA_OF = {
    "abandoned_cart": "abandoned-cart",
    "offers": "offers",
    "segment_changes": "segment-changes",
    "hot_leads": "hot-leads",
    "deadletter": "deadletter",
}
OTTO = DATASETS / "clickstream_samples" / "otto_train_first20sessions.jsonl"
REES46 = DATASETS / "clickstream_samples" / "rees46_2019-Oct_first1000.csv"


def lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line]


def episodes(out: Path) -> set[tuple[str, float]]:
    found = set()
    for trigger in lines(out / "abandoned_cart.jsonl"):
        start = datetime.fromisoformat(trigger["episode_started_at"]).timestamp()
        found.add((trigger["user_id"], round(start, 3)))
    return found


def keys(out: Path) -> set[str]:
    return {t["idempotency_key"] for t in lines(out / "abandoned_cart.jsonl")}


AS_OF_WRITE = ("days_since_seen", "recency_days", "segment", "segment_reason", "cluster")
"""Fields relative to the partition's clock when the profile was last written (batch-dependent)."""
MODEL_OUTPUTS = ("lead_", "offer_")
"""Scores and decisions depend on which model snapshot was serving: they vary with timing."""


def stable_fields(out: Path) -> list[dict[str, Any]]:
    profiles = lines(out / "profiles.jsonl")
    return [
        {k: v for k, v in p.items() if k not in AS_OF_WRITE and not k.startswith(MODEL_OUTPUTS)}
        for p in profiles
    ]


def assert_outputs_match_schemas(out: Path) -> None:
    def validator(name: str) -> Draft202012Validator:
        schema = json.loads((REPO / "infra" / "schemas" / f"{name}.schema.json").read_text())
        return Draft202012Validator(schema)

    tombstones = validator("tombstone")
    for kind, schema_name in SCHEMA_OF.items():
        records = validator(schema_name)
        for message in lines(out / f"{kind}.jsonl"):
            check = tombstones if message.get("type") == "tombstone" else records
            errors = sorted(check.iter_errors(message), key=str)
            assert not errors, f"{kind}: {errors[0].message} in {message}"


def rounded(expected: set[tuple[str, float]]) -> set[tuple[str, float]]:
    return {(user, round(start, 3)) for user, start in expected}


@pytest.fixture
def allow_consent(monkeypatch: pytest.MonkeyPatch) -> None:
    """The public samples carry no consent: treat unstated consent as given."""
    monkeypatch.setenv("PERSONA_CONSENT_DEFAULT", "allow")


def test_otto_triggers_equal_an_independent_computation_at_any_batch_size(
    tmp_path: Path, allow_consent: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not OTTO.exists():
        pytest.skip(f"dataset missing: {OTTO}")
    expected = rounded(expected_abandoned_carts_otto(OTTO))
    assert len(expected) == 10
    monkeypatch.setenv("PERSONA_BATCH_SIZE", "1")
    one = run_backtest(OTTO, "otto", tmp_path / "one", partitions=1)
    monkeypatch.setenv("PERSONA_BATCH_SIZE", "1000")
    many = run_backtest(OTTO, "otto", tmp_path / "many", partitions=4)
    assert one["abandoned_cart"] == many["abandoned_cart"] == len(expected)
    assert episodes(tmp_path / "one") == episodes(tmp_path / "many") == expected
    assert keys(tmp_path / "one") == keys(tmp_path / "many")
    assert one["profiles"] == many["profiles"] == 20
    assert_outputs_match_schemas(tmp_path / "many")


def test_rees46_triggers_equal_an_independent_computation(
    tmp_path: Path, allow_consent: None
) -> None:
    if not REES46.exists():
        pytest.skip(f"dataset missing: {REES46}")
    # The sample spans 17 minutes: a 1-minute abandonment window makes it say something.
    config = tmp_path / "persona.toml"
    config.write_text("[triggers.abandoned_cart]\nabandon_after_minutes = 1.0\n")
    expected = rounded(expected_abandoned_carts_rees46(REES46, abandon_after_minutes=1.0))
    assert expected, "the independent computation should find abandoned carts"
    counts = run_backtest(REES46, "rees46", tmp_path / "out", config_path=config)
    assert episodes(tmp_path / "out") == expected
    assert counts["events"] == 1000
    assert_outputs_match_schemas(tmp_path / "out")


def test_simulated_log_gives_the_same_triggers_and_profiles_at_any_speed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    simulator = ShopperSimulator(150, seed=3, days=10.0, invalid_rate=0.01, duplicate_rate=0.02)
    log = tmp_path / "sim.jsonl"
    with log.open("wb") as f:
        for _stream, _key, value in simulator.raw_messages():
            f.write(value.replace(b"\n", b" ") + b"\n")
    runs = {}
    for name, batch, partitions in (("slow", "7", 1), ("fast", "1000", 4)):
        monkeypatch.setenv("PERSONA_BATCH_SIZE", batch)
        runs[name] = run_backtest(log, "segment-jsonl", tmp_path / name, partitions=partitions)
    slow, fast = tmp_path / "slow", tmp_path / "fast"
    assert runs["slow"]["abandoned_cart"] > 0, "the simulated shoppers should abandon carts"
    assert keys(slow) == keys(fast)
    assert stable_fields(slow) == stable_fields(fast)
    assert runs["slow"]["deadletter"] == runs["fast"]["deadletter"] > 0
    for dead in lines(fast / "deadletter.jsonl"):
        assert dead["reason"] and dead["source"]["topic"]
    assert_outputs_match_schemas(fast)
