"""Lingering batches on a real Faust agent (its test context: an in-process channel, no broker)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import faust
import pytest

from streams.batching import take_lingering


def collect(values: list[str], *, max_events: int, linger_s: float, busy_s: float = 0.0,
            gap_s: float = 0.0) -> list[tuple[list[str], float, float]]:  # fmt: skip
    """Put ``values`` into an agent that takes lingering batches: (values, handed over at,
    done at) per batch, seconds from the first put. Each batch keeps the agent ``busy_s``; the
    values after the first come ``gap_s`` apart."""
    app = faust.App(f"batching-{time.monotonic_ns()}", store="memory://")
    batches: list[tuple[list[str], float, float]] = []
    started = 0.0

    @app.agent()
    async def agent(stream: Any) -> None:
        async for events in take_lingering(stream, max_events, linger_s):
            handed_over = time.monotonic() - started
            await asyncio.sleep(busy_s)
            batches.append(([e.value for e in events], handed_over, time.monotonic() - started))

    async def run() -> None:
        nonlocal started
        async with agent.test_context() as running:
            started = time.monotonic()
            for i, value in enumerate(values):
                if i and gap_s:
                    await asyncio.sleep(gap_s)
                await running.put(value)
            deadline = time.monotonic() + 10.0
            while sum(len(b) for b, _, _ in batches) < len(values):
                assert time.monotonic() < deadline, f"only {batches} came out of {values}"
                await asyncio.sleep(0.01)

    asyncio.run(run())
    return batches


def test_a_full_batch_goes_at_once_and_holds_at_most_max_events() -> None:
    batches = collect(list("abcde"), max_events=3, linger_s=5.0)
    assert [b for b, _, _ in batches] == [["a", "b", "c"], ["d", "e"]]
    assert batches[0][1] < 5.0  # full: not held for the linger


def test_an_idle_stream_collects_its_first_events_for_the_linger() -> None:
    batches = collect(["a", "b"], max_events=100, linger_s=0.5, gap_s=0.1)
    assert [b for b, _, _ in batches] == [["a", "b"]]
    assert batches[0][1] >= 0.5 - 0.01  # from the first event, not the last


def test_events_that_waited_during_a_batch_are_handed_over_when_it_ends() -> None:
    # "b" arrives while "a" is processed for 1 s: by then it is older than the linger, so it
    # goes as soon as the agent asks (Faust's take_events would wait a whole linger more).
    batches = collect(["a", "b"], max_events=100, linger_s=0.5, busy_s=1.0, gap_s=0.6)
    assert [b for b, _, _ in batches] == [["a"], ["b"]]
    first_done, second_handed_over = batches[0][2], batches[1][1]
    assert second_handed_over - first_done < 0.5


@pytest.mark.parametrize(("max_events", "linger_s"), [(0, 1.0), (10, 0.0)])
def test_bad_arguments_are_refused(max_events: int, linger_s: float) -> None:
    app = faust.App("batching-args", store="memory://")
    with pytest.raises(ValueError, match="max_events"):
        take_lingering(app.channel().stream(), max_events, linger_s)
