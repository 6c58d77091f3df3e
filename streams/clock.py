"""Event time per partition: watermarks and the timer index that runs on them.

Every deadline in Persona (cart abandonment, label horizons, attribution windows) is a point in
event time, checked against the partition's *watermark*: the largest event time seen on that
partition, less an allowed lateness. Replaying a log therefore gives the same triggers whatever
the replay speed. In live mode a partition that receives no events still moves on: after
``idle_after_s`` of wall-clock silence, ticks advance its watermark with the wall clock, so a quiet
shop still gets its abandoned-cart emails.

Deadlines themselves live in the profiles (changelog-backed), so they survive restarts and
rebalances; :class:`TimerIndex` is only an in-memory heap over them, rebuilt from the table when a
partition is (re)assigned, and checked lazily: an entry is a hint to look at the profile again,
not a promise.

>>> clocks = PartitionClocks(lateness_s=60.0)
>>> clocks.observe(0, event_ts=1_000.0, wall_now=50_000.0)
>>> clocks.watermark(0)
940.0
>>> timers = TimerIndex()
>>> timers.schedule(0, due=900.0, user_id="u1")
>>> timers.schedule(0, due=2_000.0, user_id="u2")
>>> timers.pop_due(0, clocks.watermark(0))
['u1']

A budget leaves the rest of what is due, in order, for the next call (a user due twice counts
once):

>>> for due, user in [(1.0, "a"), (2.0, "b"), (2.5, "a"), (3.0, "c")]:
...     timers.schedule(1, due, user)
>>> timers.pop_due(1, watermark=10.0, limit=2)
['a', 'b']
>>> timers.pop_due(1, watermark=10.0, limit=2)
['c']
"""

from __future__ import annotations

import heapq
import math


class PartitionClocks:
    """Watermark per partition, from event time and, in live mode, from idle wall-clock ticks."""

    def __init__(
        self, *, lateness_s: float = 0.0, idle_after_s: float = 5.0, live: bool = False
    ) -> None:
        self.lateness_s = lateness_s
        self.idle_after_s = idle_after_s
        self.live = live
        self._watermark: dict[int, float] = {}
        self._last_event_wall: dict[int, float] = {}

    def watermark(self, partition: int) -> float:
        """The partition's watermark; ``-inf`` before its first event."""
        return self._watermark.get(partition, -math.inf)

    def restore(self, partition: int, watermark: float) -> None:
        """Start from a persisted watermark (after a restart); never moves it back."""
        if watermark > self.watermark(partition):
            self._watermark[partition] = watermark

    def observe(self, partition: int, event_ts: float, wall_now: float) -> None:
        """An event with time ``event_ts`` arrived on ``partition``."""
        candidate = event_ts - self.lateness_s
        if candidate > self.watermark(partition):
            self._watermark[partition] = candidate
        self._last_event_wall[partition] = wall_now

    def tick(self, partition: int, wall_now: float) -> bool:
        """A wall-clock tick; in live mode, advances an idle partition. True if it moved."""
        if not self.live:
            return False
        last = self._last_event_wall.get(partition, -math.inf)
        if wall_now - last < self.idle_after_s:
            return False
        candidate = wall_now - self.lateness_s
        if candidate > self.watermark(partition):
            self._watermark[partition] = candidate
            return True
        return False

    def advance_to(self, partition: int, event_time: float) -> None:
        """Declare that event time reached ``event_time`` (a replay's end: nothing later comes)."""
        if event_time > self.watermark(partition):
            self._watermark[partition] = event_time

    def forget(self, partition: int) -> None:
        """The partition moved to another worker."""
        self._watermark.pop(partition, None)
        self._last_event_wall.pop(partition, None)


class TimerIndex:
    """Min-heaps of (due, user id) per partition: which profiles to look at when time passes.

    At most one live entry per user: the earliest deadline asked for. Scheduling a later or
    equal deadline while an earlier entry waits adds nothing (looking at the profile then
    schedules its next deadline again); scheduling an earlier one replaces the entry, and the
    replaced one stays in the heap, skipped when it comes up. Every profile change asks for its
    deadline again, so without this the heap held about three entries per user, each with its
    own id string: a third of a profile's memory.

    >>> timers = TimerIndex()
    >>> for due in (50.0, 70.0, 50.0):
    ...     timers.schedule(0, due, "u1")
    >>> len(timers), timers.scheduled(0, "u1")
    (1, 50.0)
    >>> timers.schedule(0, 10.0, "u1")  # earlier: replaces the entry due at 50
    >>> timers.pop_due(0, watermark=100.0), timers.pop_due(0, watermark=100.0)
    (['u1'], [])
    """

    def __init__(self) -> None:
        self._heaps: dict[int, list[tuple[float, str]]] = {}
        self._live: dict[int, dict[str, tuple[float, str]]] = {}
        """Per partition, each user's live heap entry (the very tuple in the heap)."""

    def has(self, partition: int) -> bool:
        """True once the partition's index was built (or started) on this worker."""
        return partition in self._heaps

    def start(self, partition: int) -> None:
        self._heaps.setdefault(partition, [])
        self._live.setdefault(partition, {})

    def schedule(self, partition: int, due: float, user_id: str) -> None:
        live = self._live.get(partition)
        if live is None:
            self.start(partition)
            live = self._live[partition]
        entry = live.get(user_id)
        if entry is not None:
            if entry[0] <= due:
                return
            user_id = entry[1]  # one id string per user, however often it is scheduled
        entry = (due, user_id)
        live[user_id] = entry
        heapq.heappush(self._heaps[partition], entry)

    def scheduled(self, partition: int, user_id: str) -> float | None:
        """The deadline of the user's live entry, if any."""
        entry = self._live.get(partition, {}).get(user_id)
        return entry[0] if entry is not None else None

    def pop_due(self, partition: int, watermark: float, limit: int | None = None) -> list[str]:
        """Users with an entry due at or before ``watermark``, each once, earliest first; at
        most ``limit`` of them (the rest stay for a later call)."""
        heap = self._heaps.get(partition)
        if not heap:
            return []
        live = self._live[partition]
        due_users: list[str] = []
        while heap and heap[0][0] <= watermark:
            entry = heap[0]
            if live.get(entry[1]) is not entry:  # replaced by an earlier one, or looked at
                heapq.heappop(heap)
                continue
            if limit is not None and len(due_users) >= limit:
                break
            heapq.heappop(heap)
            del live[entry[1]]
            due_users.append(entry[1])
        return due_users

    def has_due(self, partition: int, watermark: float) -> bool:
        """True if an entry's deadline is before ``watermark`` (see :meth:`due_count`)."""
        heap = self._heaps.get(partition)
        return bool(heap) and heap[0][0] < watermark

    def due_count(self, partition: int, watermark: float) -> int:
        """How many entries have a deadline before ``watermark``: the backlog (replaced entries
        not yet skipped included).

        Walks only that part of the heap: O(entries counted), not O(entries).

        >>> timers = TimerIndex()
        >>> for due, user in [(5.0, "a"), (1.0, "b"), (9.0, "c"), (3.0, "d")]:
        ...     timers.schedule(0, due, user)
        >>> timers.due_count(0, 4.0), timers.due_count(0, 3.0), timers.due_count(1, 4.0)
        (2, 1, 0)
        """
        heap = self._heaps.get(partition) or []
        count, stack = 0, [0] if heap else []
        while stack:
            i = stack.pop()
            if heap[i][0] < watermark:
                count += 1
                stack += [c for c in (2 * i + 1, 2 * i + 2) if c < len(heap)]
        return count

    def forget(self, partition: int) -> None:
        self._heaps.pop(partition, None)
        self._live.pop(partition, None)

    def __len__(self) -> int:
        """Users with a live entry."""
        return sum(len(live) for live in self._live.values())
