"""The offset guard against Faust's own commit rule, on a real (unstarted) Faust consumer."""

from __future__ import annotations

import asyncio
from typing import Any

import faust
import pytest
from faust.types import TP

from streams.offsets import APPLY, DONE, HOLD, OffsetGuard, commit_offset, repair_gaps

CLICKS = TP("clicks", 0)
TICKS = TP("ticks", 0)


@pytest.fixture
def consumer() -> Any:
    app = faust.App("offset-guard-test", broker="kafka://127.0.0.1:1", autodiscover=False)
    app.topic("clicks", "ticks")
    return app.consumer


def acknowledge(consumer: Any, tp: TP, *offsets: int) -> None:
    consumer._acked[tp].extend(offsets)
    consumer._acked_index[tp].update(offsets)


def test_faust_alone_commits_past_an_offset_nobody_acknowledged(consumer: Any) -> None:
    """Why the guard exists: offset 5 was never acknowledged, Faust commits past it."""
    consumer._committed_offset[CLICKS] = 5
    acknowledge(consumer, CLICKS, 6, 7, 8)
    assert consumer._new_offset(CLICKS) == 9


def test_guarded_commit_waits_for_the_head_then_takes_the_run(consumer: Any) -> None:
    OffsetGuard(frozenset({"clicks"})).install(consumer)
    consumer._committed_offset[CLICKS] = 5
    acknowledge(consumer, CLICKS, 6, 7, 8)
    assert consumer._new_offset(CLICKS) is None
    acknowledge(consumer, CLICKS, 5)
    assert consumer._new_offset(CLICKS) == 9
    assert consumer._acked[CLICKS] == [] and not consumer._acked_index[CLICKS]


def test_guarded_commit_with_nothing_committed_starts_at_the_log_start(consumer: Any) -> None:
    guard = OffsetGuard(frozenset({"clicks"}))
    guard.install(consumer)
    acknowledge(consumer, CLICKS, 3, 4)
    assert consumer._new_offset(CLICKS) is None  # log start unknown: commit nothing
    guard.log_start[CLICKS] = 0
    assert consumer._new_offset(CLICKS) is None  # 0..2 not applied yet
    acknowledge(consumer, CLICKS, 0, 1, 2)
    assert consumer._new_offset(CLICKS) == 5


def test_gaps_are_not_filled_on_guarded_topics_and_still_are_on_others(consumer: Any) -> None:
    OffsetGuard(frozenset({"clicks"})).install(consumer)
    for tp in (CLICKS, TICKS):
        consumer._committed_offset[tp] = 10
        asyncio.run(consumer._add_gap(tp, 10, 19))
        acknowledge(consumer, tp, 20)
    assert consumer._new_offset(CLICKS) is None
    assert consumer._new_offset(TICKS) == 21


def test_faust_keeps_no_read_offset_for_guarded_topics(consumer: Any) -> None:
    """Faust drops a message below the read offset: after a seek back, the guard must see it."""
    consumer._read_offset[TICKS] = 7
    OffsetGuard(frozenset({"clicks"})).install(consumer)
    consumer._read_offset[CLICKS] = 40
    consumer._read_offset.update({CLICKS: 41, TICKS: 8})
    assert consumer._read_offset[CLICKS] is None and consumer._read_offset[TICKS] == 8
    assert consumer._read_offset[TP("clicks", 9)] is None  # unknown partitions too


def test_install_twice_wraps_once(consumer: Any) -> None:
    guard = OffsetGuard(frozenset({"clicks"}))
    guard.install(consumer)
    wrapped = consumer._new_offset
    guard.install(consumer)
    assert consumer._new_offset is wrapped


@pytest.mark.parametrize(
    ("acked", "head", "holes", "expected"),
    [
        ([], 0, [], (None, 0)),
        ([0, 1, 2], 0, [], (3, 3)),
        ([1, 2], 0, [], (None, 0)),
        ([3, 4, 5, 7], 3, [], (6, 3)),
        ([1, 2, 3, 4], 3, [], (5, 4)),  # 1 and 2 are below the head: already committed
        ([0, 4, 5], 0, [(1, 4)], (6, 3)),  # a confirmed hole is passed
        ([4], 1, [(1, 4)], (5, 1)),
        ([], 1, [(1, 4)], (None, 0)),  # a hole alone commits nothing: no message confirms it
    ],
)
def test_commit_offset(
    acked: list[int], head: int, holes: list[tuple[int, int]], expected: tuple[int | None, int]
) -> None:
    assert commit_offset(acked, head, holes) == expected


def test_admission_after_a_gap_until_the_missing_offset_comes_back() -> None:
    guard = OffsetGuard(frozenset({"clicks"}))
    assert guard.admit(CLICKS, 10, committed=10) == APPLY
    assert guard.admit(CLICKS, 14, committed=10) == HOLD
    assert guard.admit(CLICKS, 15, committed=10) == HOLD  # still waiting for 11: one seek only
    assert guard.seeks_due(now=100.0) == [(CLICKS, 11)]
    assert guard.seeks_due(now=101.0) == []  # asked already
    assert guard.seeks_due(now=106.0) == [(CLICKS, 11)]  # nothing came: ask again
    assert guard.admit(CLICKS, 11, committed=10) == APPLY
    assert guard.admit(CLICKS, 12, committed=10) == APPLY
    assert guard.admit(CLICKS, 11, committed=10) == DONE  # re-delivered: acknowledged only
    assert guard.position(CLICKS, committed=10) == 13
    assert not guard.seeking


def test_a_hole_the_broker_confirms_is_passed() -> None:
    guard = OffsetGuard(frozenset({"clicks"}))
    seeks: list[tuple[TP, int]] = []

    class Consumer:
        async def seek_wait(self, partitions: dict[TP, int]) -> None:
            seeks.extend(partitions.items())

    async def broker_first_offset(tp: TP, offset: int) -> int | None:
        return {11: 13, 20: 20}.get(offset)  # 11..12 are transaction markers, 20 exists

    guard.admit(CLICKS, 10, committed=10)
    guard.admit(CLICKS, 13, committed=10)
    asyncio.run(repair_gaps(guard, Consumer(), broker_first_offset))
    assert seeks == [(CLICKS, 13)] and guard.holes[CLICKS] == [(11, 13)]
    assert guard.admit(CLICKS, 13, committed=10) == APPLY
    assert guard.admit(CLICKS, 14, committed=10) == APPLY
    assert guard.admit(CLICKS, 21, committed=10) == HOLD
    asyncio.run(repair_gaps(guard, Consumer(), broker_first_offset))
    assert seeks[-1] == (CLICKS, 15)
    guard.forget(CLICKS)
    assert guard.position(CLICKS, committed=7) == 7 and CLICKS not in guard.holes


def test_offsets_fetched_but_never_delivered_are_read_again() -> None:
    """A gap at the end of a partition: no later message reveals it, the fetch position does."""
    guard = OffsetGuard(frozenset({"clicks"}))
    guard.log_start[CLICKS] = 0
    guard.watch_fetched(CLICKS, fetched=50, committed=None, now=100.0)  # nothing delivered yet
    guard.watch_fetched(CLICKS, fetched=50, committed=None, now=102.0)
    assert not guard.seeking  # they may still be on their way
    guard.watch_fetched(CLICKS, fetched=50, committed=None, now=105.0)
    assert guard.seeks_due(now=105.0) == [(CLICKS, 0)]


def test_a_partition_that_moves_or_is_caught_up_is_not_read_again() -> None:
    guard = OffsetGuard(frozenset({"clicks"}))
    guard.admit(CLICKS, 10, committed=10)
    guard.watch_fetched(CLICKS, fetched=40, committed=10, now=100.0)
    guard.admit(CLICKS, 11, committed=10)  # progress: the clock starts again
    guard.watch_fetched(CLICKS, fetched=40, committed=10, now=104.0)
    guard.watch_fetched(CLICKS, fetched=40, committed=10, now=108.0)
    assert not guard.seeking
    guard.watch_fetched(CLICKS, fetched=12, committed=10, now=200.0)  # caught up
    guard.watch_fetched(CLICKS, fetched=12, committed=10, now=300.0)
    assert not guard.seeking and CLICKS not in guard.behind


def test_with_nothing_committed_the_first_offset_due_is_the_log_start() -> None:
    guard = OffsetGuard(frozenset({"clicks"}))
    guard.log_start[CLICKS] = 3
    assert guard.admit(CLICKS, 9, committed=None) == HOLD  # 3..8 dropped on the way
    assert guard.seeks_due(now=0.0) == [(CLICKS, 3)]
    assert guard.admit(CLICKS, 3, committed=None) == APPLY


def test_the_committed_offset_read_at_assignment_comes_before_faust_knows_it() -> None:
    """Faust learns committed offsets when its recovery seeks, after a first fetch may arrive."""
    guard = OffsetGuard(frozenset({"clicks"}))
    guard.log_start[CLICKS] = 0
    guard.committed_at_assignment[CLICKS] = 50
    assert guard.admit(CLICKS, 50, committed=None) == APPLY  # not read again from 0
    assert guard.admit(CLICKS, 49, committed=None) == DONE
    assert guard.admit(CLICKS, 53, committed=None) == HOLD
    assert guard.seeks_due(now=0.0) == [(CLICKS, 51)]
