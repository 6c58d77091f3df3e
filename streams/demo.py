"""``persona demo``: the whole engine on one machine, with simulated shoppers and a live view.

Starts the embedded broker and Redis on free ports, creates the topics, starts a real worker
process (the same ``persona worker`` production runs), produces simulated shoppers' events at a
steady rate and shows what the engine does, from the worker's own ``/metrics`` and from Redis.
After ``--duration`` seconds or Ctrl-C it stops everything it started, also on error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

from connectors.kafka import produce_all
from connectors.redis_cache import ProfileCache
from connectors.simulator import ShopperSimulator
from streams.local import local_stack
from streams.settings import Settings
from streams.worker import WorkerProcess


@dataclass(slots=True)
class EngineStats:
    """What the worker reports on /metrics, summed over labels."""

    consumed: int = 0
    ok: int = 0
    duplicates: int = 0
    deadletter: int = 0
    profile_writes: int = 0
    deadletter_reasons: dict[str, int] = field(default_factory=dict)
    segments: dict[str, int] = field(default_factory=dict)
    triggers: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_exposition(cls, text: str) -> EngineStats:
        stats = cls()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "persona_events_total":
                    count = int(sample.value)
                    stats.consumed += count
                    outcome = sample.labels["outcome"]
                    if outcome == "ok":
                        stats.ok += count
                    elif outcome == "duplicate":
                        stats.duplicates += count
                    else:
                        stats.deadletter += count
                elif sample.name == "persona_deadletter_total":
                    stats.deadletter_reasons[sample.labels["reason"]] = int(sample.value)
                elif sample.name == "persona_profile_writes_total":
                    stats.profile_writes = int(sample.value)
                elif sample.name == "persona_segment_size":
                    stats.segments[sample.labels["segment"]] = int(sample.value)
                elif sample.name == "persona_triggers_total":
                    kind = sample.labels["kind"]
                    stats.triggers[kind] = stats.triggers.get(kind, 0) + int(sample.value)
        return stats


def run_demo(args: argparse.Namespace) -> int:
    data_dir = Path(tempfile.mkdtemp(prefix="persona-demo-"))
    out = sys.stdout
    print(f"persona demo: logs and state in {data_dir}", file=out, flush=True)
    overrides: dict[str, Any] = {
        "app_id": "persona-demo",
        "partitions": args.partitions,
        "live_clock": False,  # simulated shoppers live in compressed event time
    }
    if args.web_port:
        overrides["web_port"] = args.web_port
    with local_stack(data_dir, **overrides) as stack:
        print(
            f"broker {stack.broker.bootstrap}  redis {stack.redis.host}:{stack.redis.port}  "
            f"metrics {stack.worker.metrics_url()}",
            file=out,
            flush=True,
        )
        try:
            result = asyncio.run(_drive(args, stack.settings, stack.worker))
        except KeyboardInterrupt:
            print("\ninterrupted: stopping", file=out, flush=True)
            return 130
    if args.json:
        print(orjson.dumps(result, option=orjson.OPT_SORT_KEYS).decode(), file=out, flush=True)
    return 0


async def _drive(
    args: argparse.Namespace, settings: Settings, worker: WorkerProcess
) -> dict[str, Any]:
    """Produce the simulated shoppers for ``--duration`` seconds while drawing the live view."""
    simulator = ShopperSimulator(args.users, args.seed, invalid_rate=args.invalid_rate)
    topics = settings.input_topics
    messages = ((topics[s], key, value) for s, key, value in simulator.raw_messages())
    cache = ProfileCache(settings.redis_url)
    produced = 0

    def on_progress(sent: int) -> None:
        nonlocal produced
        produced = sent

    started = time.monotonic()
    producer = asyncio.create_task(
        produce_all(
            settings.broker_url, messages, on_progress=on_progress, rate_per_s=args.rate or None
        )
    )
    view = LiveView(sys.stdout)
    first_consumed_at: float | None = None
    last_change_at = started
    stats = EngineStats()
    try:
        while True:
            await asyncio.sleep(1.0)
            elapsed = time.monotonic() - started
            text = await asyncio.to_thread(worker.scrape)
            if text is not None:
                new = EngineStats.from_exposition(text)
                now = time.monotonic()
                if new.consumed and first_consumed_at is None:
                    first_consumed_at = now
                if new.consumed != stats.consumed:
                    last_change_at = now
                stats = new
            profiles = await cache.count_profiles()
            view.draw(elapsed, produced, stats, profiles, args.duration)
            done_producing = producer.done() or elapsed >= args.duration
            if done_producing and not producer.done():
                producer.cancel()
            if done_producing and (stats.consumed >= produced or elapsed >= args.duration + 15):
                break
        with contextlib.suppress(asyncio.CancelledError):
            await producer
        profiles = await cache.count_profiles()
    finally:
        if not producer.done():
            producer.cancel()
        await cache.close()
    view.finish()
    active = max(last_change_at - (first_consumed_at or started), 1e-9)
    return {
        "events_produced": produced,
        "events_in": stats.consumed,
        "events_ok": stats.ok,
        "duplicates": stats.duplicates,
        "events_per_s": round(stats.consumed / active, 1) if stats.consumed else 0.0,
        "deadletter": stats.deadletter,
        "deadletter_reasons": stats.deadletter_reasons,
        "profiles_in_redis": profiles,
        "segments": stats.segments,
        "triggers": stats.triggers,
    }


class LiveView:
    """A small terminal dashboard; redraws in place on a terminal, prints lines otherwise."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.lines_drawn = 0
        self.previous: tuple[float, int] = (0.0, 0)

    def draw(
        self, elapsed: float, produced: int, stats: EngineStats, profiles: int, duration: float
    ) -> None:
        then, consumed_then = self.previous
        rate = (stats.consumed - consumed_then) / max(elapsed - then, 1e-9)
        self.previous = (elapsed, stats.consumed)
        lines = [
            f"t={elapsed:5.1f}s/{duration:.0f}s  produced {produced:>8}"
            f"  consumed {stats.consumed:>8}  {rate:8.0f} events/s",
            f"  ok {stats.ok:>8}  duplicates {stats.duplicates:>6}"
            f"  dead letters {stats.deadletter:>6}  profiles in redis {profiles:>7}",
            f"  segments {_fmt(stats.segments)}",
            f"  triggers {_fmt(stats.triggers)}",
        ]
        if self.tty:
            if self.lines_drawn:
                self.out.write(f"\x1b[{self.lines_drawn}F\x1b[J")
            self.out.write("\n".join(lines) + "\n")
            self.lines_drawn = len(lines)
        else:
            self.out.write(" | ".join(line.strip() for line in lines) + "\n")
        self.out.flush()

    def finish(self) -> None:
        self.out.flush()


def _fmt(counts: dict[str, int]) -> str:
    return "  ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "(none yet)"
