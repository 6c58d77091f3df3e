"""Event-time order across the input topics of a partition, before anything is applied.

A user's events arrive on up to four topics (clickstream, purchases, email-events, identity), and
Kafka orders messages only within one topic partition: a worker catching up may read a whole day
of clickstream before the purchases of that day. Folding events into profiles in that order would
make results depend on consumer timing (a late-read order would wipe a cart whose earlier items
are read later). So valid events wait here, per partition, until every input topic of the
partition has either shown an event at least as late or been read to its end, and are then
released in event-time order (ties in arrival order).

"Read to its end" must be known as fresh as the event: a topic's end (its high watermark) is
what the last fetch that included it said, and a partition the consumer does not fetch for a
while (paused by Faust while it recovers a table after a rebalance, say) keeps an old one. An
event therefore passes a topic that is behind it only if that topic was seen at its end by a
fetch at least as recent as the one that brought the event (``fetched_at``, the consumer's
fetch times): when everything is fetched together, at once; after a pause, once the paused
topic is fetched again. With a producer that writes a log in order (each message on the broker
before the next is sent), that is exact; a producer that batches lands one topic's messages
before earlier ones of another, milliseconds of event time live, but hours when a log is
bulk-loaded while a worker reads it, and those are read out of order (preload such a log, as
``persona backtest`` does).

Live, every topic is at its end almost always and events pass straight through; replaying a log,
the slowest topic sets the pace, and the same log gives the same profiles and triggers at any
speed. Held events are not acknowledged to Kafka until released (the caller's job), so a crash
loses none of them.

>>> buffer = ReorderBuffer(topics=("clicks", "orders"))
>>> buffer.add(0, "clicks", 20.0, "view@20", fetched_at=1000)
>>> buffer.add(0, "clicks", 30.0, "view@30", fetched_at=1000)
>>> buffer.release(0, ends={"clicks": 1000})  # orders may still bring t<=30
[]
>>> buffer.add(0, "orders", 25.0, "order@25", fetched_at=1010)
>>> buffer.release(0, ends={"clicks": 1010})
['view@20', 'order@25']
>>> buffer.release(0, ends={"clicks": 1010, "orders": 990})  # its end as an older fetch saw it
[]
>>> buffer.release(0, ends={"clicks": 1010, "orders": 1010})
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
        self._held: dict[int, list[tuple[float, int, float, Any]]] = {}
        self._progress: dict[tuple[str, int], float] = {}
        self._seq = itertools.count()
        self.forced = 0

    def add(
        self, partition: int, topic: str, ts: float, item: Any, *, fetched_at: float = -math.inf
    ) -> None:
        """Hold ``item`` (event time ``ts``) read from ``topic`` on ``partition`` by a fetch at
        ``fetched_at`` (any clock the ``ends`` of :meth:`release` use)."""
        entry = (ts, next(self._seq), fetched_at, item)
        heapq.heappush(self._held.setdefault(partition, []), entry)
        key = (topic, partition)
        if ts > self._progress.get(key, -math.inf):
            self._progress[key] = ts

    def release(self, partition: int, ends: Mapping[str, float]) -> list[Any]:
        """Items now safe to apply, in event-time order.

        ``ends`` holds the topics read to their end on this partition, each with the time of
        the latest fetch that saw it there; a topic not in it may still bring older events.
        """
        heap = self._held.get(partition)
        if not heap:
            return []
        progress = [self._progress.get((topic, partition), -math.inf) for topic in self.topics]
        at_end = [ends.get(topic, math.nan) for topic in self.topics]
        every_topic_past = min(progress)
        released = []
        while heap:
            ts, _, fetched_at, item = heap[0]
            # nan (not at its end) compares false: such a topic passes only by its progress
            if ts > every_topic_past and not all(
                seen >= ts or end >= fetched_at for seen, end in zip(progress, at_end, strict=True)
            ):
                if len(heap) <= self.max_held:
                    break
                self.forced += 1
            heapq.heappop(heap)
            released.append(item)
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
        return [item for _, _, _, item in self._held.pop(partition, [])]
