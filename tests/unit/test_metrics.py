"""Batched histogram observations equal prometheus_client's own, value by value."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram

from streams.metrics import LATENCY_STAGES, Metrics, observe_many


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_observe_many_equals_observe_one_at_a_time() -> None:
    rng = random.Random(3)
    bounds = (0.05, 0.1, 0.25, 1.0)
    values = [rng.choice((*bounds, 0.0, 7.0)) for _ in range(50)]  # on the bounds too
    values += [rng.expovariate(5.0) for _ in range(500)]
    one, many = CollectorRegistry(), CollectorRegistry()
    h_one = Histogram("h", "demo", buckets=bounds, registry=one)
    h_many = Histogram("h", "demo", buckets=bounds, registry=many)
    for v in values:
        h_one.observe(v)
    observe_many(h_many, values[:100])
    observe_many(h_many, values[100:])
    observe_many(h_many, [])
    got, want = samples(many), samples(one)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key


def test_observe_latency_skips_missing_stamps_and_clamps_clock_skew() -> None:
    metrics = Metrics()
    now = 1_700_000_000.0
    stamps = [now - 0.07, now - 0.3, None, 0.0, -1.0, now + 2.0]  # the last: a producer ahead
    metrics.observe_latency("redis_written", stamps, now=now)
    labels = {"stage": "redis_written"}
    count = metrics.registry.get_sample_value("persona_latency_seconds_count", labels)
    total = metrics.registry.get_sample_value("persona_latency_seconds_sum", labels)
    assert count == 3  # None, 0 and negative stamps are not Kafka produce times
    assert total == pytest.approx(0.37)
    assert "redis_written" in LATENCY_STAGES
