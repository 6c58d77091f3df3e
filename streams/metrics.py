"""Prometheus metrics of one worker, served on its web port at ``/metrics``.

Each worker builds its own registry (so several apps can live in one test process); label values
are bounded sets (topic names, outcomes, reason codes), never user ids.

>>> metrics = Metrics()
>>> metrics.events.labels(topic="clickstream", outcome="ok").inc(3)
>>> b"persona_events_total" in metrics.exposition()
True
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The worker's counters, gauges and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "persona_events",
            "Input events consumed, by topic and outcome (ok, duplicate, deadletter)",
            ["topic", "outcome"],
            registry=r,
        )
        self.deadletters = Counter(
            "persona_deadletter",
            "Messages sent to the dead-letter topic, by reason",
            ["reason"],
            registry=r,
        )
        self.profile_writes = Counter(
            "persona_profile_writes", "Profile updates written to the table and Redis", registry=r
        )
        self.batch_seconds = Histogram(
            "persona_batch_seconds",
            "Time to process one batch, decode to Redis written",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.batch_events = Histogram(
            "persona_batch_events",
            "Events per processed batch",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000),
            registry=r,
        )
        self.redis_write_seconds = Histogram(
            "persona_redis_write_seconds",
            "Time of one pipelined Redis batch write, retries included",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.redis_errors = Counter(
            "persona_redis_errors", "Failed Redis write attempts (each is retried)", registry=r
        )
        self.event_time_watermark = Gauge(
            "persona_event_time_seconds",
            "Largest event time seen by this worker (epoch seconds)",
            registry=r,
        )

    def exposition(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
