"""The bench's measuring window, from the counts workers export (no broker needed)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from streams import bench


class ScriptedWorker:
    """Answers /metrics scrapes with the event counts of a script, one per scrape; the last
    count repeats. ``None`` is a worker not answering yet."""

    pid = None
    running = True
    log_path = Path("/nonexistent/worker.log")

    def __init__(self, counts: list[int | None]) -> None:
        self._counts: Iterator[int | None] = iter(counts)
        self._last = counts[-1]

    def scrape(self) -> str | None:
        count = next(self._counts, self._last)
        if count is None:
            return None
        return f'persona_events_total{{topic="clicks",outcome="ok"}} {count}.0\n'


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "POLL_S", 0.01)


def test_the_rate_leaves_out_the_first_batch() -> None:
    result = bench._Poll([ScriptedWorker([None, 0, 1000, 3000, 5000])]).until(5000, timeout_s=5)

    assert result.seconds > 0
    assert result.events_per_s == pytest.approx(4000 / result.seconds)


def test_everything_between_two_polls_gives_a_lower_bound_not_zero() -> None:
    # A small run on two fast workers: the first poll that sees any event sees them all.
    result = bench._Poll([ScriptedWorker([None, 0, 0, 5000])]).until(5000, timeout_s=5)

    assert result.seconds > 0 and math.isfinite(result.events_per_s)
    assert result.events_per_s == pytest.approx(5000 / result.seconds)


def test_counts_of_several_workers_add_up() -> None:
    pair = [ScriptedWorker([0, 500, 2500]), ScriptedWorker([0, 500, 2500])]

    result = bench._Poll(pair).until(5000, timeout_s=5)

    assert result.events_per_s == pytest.approx(4000 / result.seconds)


def test_a_stalled_count_fails_with_what_was_counted() -> None:
    with pytest.raises(bench.BenchError, match="counted 10 of 5000"):
        bench._Poll([ScriptedWorker([0, 10])]).until(5000, timeout_s=5, stall_s=0.1)
