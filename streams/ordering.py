"""Event-time order across the input topics of a partition, before anything is applied.

A user's events arrive on up to four topics (clickstream, purchases, email-events, identity), and
Kafka orders messages only within one topic partition: a worker catching up may read a whole day
of clickstream before the purchases of that day. Folding events into profiles in that order would
make results depend on consumer timing (a late-read order would wipe a cart whose earlier items
are read later). So valid events wait here, per partition, until every input topic of the
partition has either shown an event at least as late or been read to its end (caught up), and
are then released in event-time order (ties in arrival order).

Live, every topic is caught up almost always and events pass straight through; replaying a log,
the slowest topic sets the pace, and the same log gives the same profiles and triggers at any
speed. Held events are not acknowledged to Kafka until released (the caller's job), so a crash
loses none of them.

>>> buffer = ReorderBuffer(topics=("clicks", "orders"))
>>> buffer.add(0, "clicks", 20.0, "view@20")
>>> buffer.add(0, "clicks", 30.0, "view@30")
>>> buffer.release(0, caught_up={"clicks": True, "orders": False})  # orders may still bring t<=30
[]
>>> buffer.add(0, "orders", 25.0, "order@25")
>>> buffer.release(0, caught_up={"clicks": True, "orders": False})
['view@20', 'order@25']
>>> buffer.release(0, caught_up={"clicks": True, "orders": True})
['view@30']
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterable, Mapping
from typing import Any

DEFAULT_MAX_HELD = 50_000
"""Held events per partition beyond which the oldest go on out of order (about 200 MiB)."""


class ReorderBuffer:
    """Per-partition heaps of held items, released when every input topic has moved past them.

    ``max_held`` bounds memory per partition (a held event costs the worker about 4 KB): beyond
    it the oldest items are released even if a topic is behind (counted in :attr:`forced`),
    trading strict order for staying alive.
    """

    def __init__(self, topics: Iterable[str], *, max_held: int = DEFAULT_MAX_HELD) -> None:
        self.topics = tuple(topics)
        self.max_held = max_held
        self._held: dict[int, list[tuple[float, int, Any]]] = {}
        self._progress: dict[tuple[str, int], float] = {}
        self._seq = itertools.count()
        self.forced = 0

    def add(self, partition: int, topic: str, ts: float, item: Any) -> None:
        """Hold ``item`` (event time ``ts``) read from ``topic`` on ``partition``."""
        heapq.heappush(self._held.setdefault(partition, []), (ts, next(self._seq), item))
        key = (topic, partition)
        if ts > self._progress.get(key, -math.inf):
            self._progress[key] = ts

    def bound(self, partition: int, caught_up: Mapping[str, bool]) -> float:
        """Latest event time that no unread message of this partition can precede."""
        bound = math.inf
        for topic in self.topics:
            if not caught_up.get(topic, False):
                bound = min(bound, self._progress.get((topic, partition), -math.inf))
        return bound

    def release(self, partition: int, caught_up: Mapping[str, bool]) -> list[Any]:
        """Items now safe to apply, in event-time order."""
        heap = self._held.get(partition)
        if not heap:
            return []
        bound = self.bound(partition, caught_up)
        released = []
        while heap and (heap[0][0] <= bound or len(heap) > self.max_held):
            if heap[0][0] > bound:
                self.forced += 1
            released.append(heapq.heappop(heap)[2])
        return released

    def held(self, partition: int | None = None) -> int:
        """Items waiting (on one partition, or in all)."""
        if partition is not None:
            return len(self._held.get(partition, ()))
        return sum(len(heap) for heap in self._held.values())

    def partitions(self) -> list[int]:
        return [p for p, heap in self._held.items() if heap]

    def forget(self, partition: int) -> list[Any]:
        """The partition moved away: drop what it held (unacknowledged, so re-delivered)."""
        for topic in self.topics:
            self._progress.pop((topic, partition), None)
        return [item for _, _, item in self._held.pop(partition, [])]
