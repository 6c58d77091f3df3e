"""Event-time order across input topics: the hold and its memory bound."""

from __future__ import annotations

from streams.ordering import ReorderBuffer
from streams.settings import Settings

BEHIND = {"clicks": 0.0}  # orders not read to its end: it may bring older events


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


def test_an_end_seen_before_the_event_was_fetched_holds_it_back() -> None:
    """A partition Faust paused (a table recovery) keeps the high watermark of its last fetch:
    "at its end" by that old figure says nothing about messages that came since."""
    buffer = ReorderBuffer(("clicks", "orders"))
    buffer.add(0, "orders", 50.0, "order@50", fetched_at=2000.0)
    assert buffer.release(0, {"orders": 2000.0, "clicks": 1500.0}) == []  # clicks: stale end
    assert buffer.held(0) == 1
    assert buffer.release(0, {"orders": 2000.0}) == []  # clicks no longer at its end
    buffer.add(0, "clicks", 40.0, "click@40", fetched_at=2100.0)  # what it still had to bring
    assert buffer.release(0, {"orders": 2100.0}) == ["click@40"]  # orders showed a later event
    assert buffer.release(0, {"orders": 2100.0, "clicks": 2100.0}) == ["order@50"]  # fresh end


def test_an_event_fetched_with_a_topic_at_its_end_passes_it_at_once() -> None:
    """One fetch answers for every partition it asked for: the live case, no wait."""
    buffer = ReorderBuffer(("clicks", "orders", "email"))
    buffer.add(3, "clicks", 10.0, "click@10", fetched_at=700.0)
    buffer.add(3, "clicks", 11.0, "click@11", fetched_at=710.0)
    assert buffer.release(3, {"clicks": 710.0, "orders": 700.0, "email": 710.0}) == ["click@10"]
    assert buffer.release(3, {"clicks": 710.0, "orders": 710.0, "email": 710.0}) == ["click@11"]


def test_the_worker_takes_its_bound_from_the_environment() -> None:
    assert Settings.from_env({}).reorder_max_held == 50_000
    assert Settings.from_env({"PERSONA_REORDER_MAX_HELD": "2000"}).reorder_max_held == 2000
