"""Event-time order across input topics: the hold and its memory bound."""

from __future__ import annotations

from streams.ordering import ReorderBuffer
from streams.settings import Settings

BEHIND = {"clicks": True, "orders": False}  # orders not read to its end: it may bring older events


def test_events_wait_for_a_topic_that_is_behind() -> None:
    buffer = ReorderBuffer(("clicks", "orders"), max_held=10)
    for ts in (1.0, 2.0, 3.0):
        buffer.add(0, "clicks", ts, f"click@{ts:.0f}")
    assert buffer.release(0, BEHIND) == []
    assert buffer.held(0) == 3 and buffer.forced == 0


def test_beyond_max_held_the_oldest_go_on_out_of_order_and_are_counted() -> None:
    buffer = ReorderBuffer(("clicks", "orders"), max_held=3)
    for ts in (5.0, 1.0, 4.0, 2.0, 3.0):
        buffer.add(0, "clicks", ts, f"click@{ts:.0f}")
    assert buffer.release(0, BEHIND) == ["click@1", "click@2"]  # oldest first
    assert buffer.held(0) == 3 and buffer.forced == 2
    buffer.add(0, "orders", 4.5, "order@4.5")  # orders caught up to 4.5: 3 and 4 are safe now
    assert buffer.release(0, BEHIND) == ["click@3", "click@4", "order@4.5"]
    assert buffer.forced == 2


def test_the_worker_takes_its_bound_from_the_environment() -> None:
    assert Settings.from_env({}).reorder_max_held == 50_000
    assert Settings.from_env({"PERSONA_REORDER_MAX_HELD": "2000"}).reorder_max_held == 2000
