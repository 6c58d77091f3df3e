"""Event time per partition: watermarks and the timer index that runs on them.

Every deadline in Persona (cart abandonment, label horizons, attribution windows) is a point in
event time, checked against the partition's *watermark*: the largest event time seen on that
partition, less an allowed lateness. Replaying a log therefore gives the same triggers whatever
the replay speed. In live mode a partition that receives no events still moves on: after
``idle_after_s`` of wall-clock silence, ticks advance its watermark with the wall clock, so a quiet
shop still gets its abandoned-cart emails.

Deadlines themselves live in the profiles (changelog-backed), so they survive restarts and
rebalances; :class:`TimerIndex` is only an in-memory index over them, rebuilt from the table when a
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
from collections.abc import Iterator


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
    """Which profiles to look at when event time passes: per partition, each user's earliest
    deadline asked for, in buckets of ``bucket_s`` seconds of event time.

    At most one live deadline per user: scheduling a later or equal one while an earlier one
    waits adds nothing (looking at the profile then schedules its next deadline again);
    scheduling an earlier one replaces it, and the user's name in the old bucket is skipped
    when that bucket comes up. Every profile change asks for its deadline again, so without
    this the index held about three entries per user.

    Why buckets and not a heap of (deadline, user) pairs: a pair is a tuple of its own, 56
    bytes on top of the user's deadline and name, for every profile the worker holds (with
    RocksDB the index is most of what a profile costs in Python). A bucket is a list of names
    (8 bytes each); the buckets' numbers are in a small heap. Popping sorts the due users of a
    bucket by deadline, so users come out earliest first, ties by id, as from a heap.

    >>> timers = TimerIndex()
    >>> for due in (50.0, 70.0, 50.0):
    ...     timers.schedule(0, due, "u1")
    >>> len(timers), timers.scheduled(0, "u1")
    (1, 50.0)
    >>> timers.schedule(0, 10.0, "u1")  # earlier: replaces the deadline at 50
    >>> timers.pop_due(0, watermark=100.0), timers.pop_due(0, watermark=100.0)
    (['u1'], [])
    """

    def __init__(self, bucket_s: float = 60.0) -> None:
        if not bucket_s > 0:
            raise ValueError("bucket_s must be > 0")
        self.bucket_s = bucket_s
        self._due: dict[int, dict[str, float]] = {}
        """Per partition, each user's live deadline."""
        self._buckets: dict[int, dict[int, list[str]]] = {}
        """Per partition, bucket number → users scheduled into it (stale names included)."""
        self._numbers: dict[int, list[int]] = {}
        """Per partition, a heap of the numbers of its buckets."""

    def _number(self, due: float) -> int:
        return math.floor(due / self.bucket_s)

    def _last_number(self, watermark: float) -> float:
        """The last bucket that may hold a deadline at or before ``watermark``."""
        return self._number(watermark) if math.isfinite(watermark) else watermark

    def has(self, partition: int) -> bool:
        """True once the partition's index was built (or started) on this worker."""
        return partition in self._due

    def start(self, partition: int) -> None:
        self._due.setdefault(partition, {})
        self._buckets.setdefault(partition, {})
        self._numbers.setdefault(partition, [])

    def schedule(self, partition: int, due: float, user_id: str) -> None:
        dues = self._due.get(partition)
        if dues is None:
            self.start(partition)
            dues = self._due[partition]
        current = dues.get(user_id)
        if current is not None and current <= due:
            return
        dues[user_id] = due
        number = self._number(due)
        buckets = self._buckets[partition]
        users = buckets.get(number)
        if users is None:
            buckets[number] = [user_id]
            heapq.heappush(self._numbers[partition], number)
        else:
            users.append(user_id)

    def scheduled(self, partition: int, user_id: str) -> float | None:
        """The user's live deadline, if any."""
        return self._due.get(partition, {}).get(user_id)

    def _live_names(self, partition: int, number: int) -> Iterator[tuple[str, float]]:
        """The names in bucket ``number`` whose live deadline is in it, with the deadline (a
        user scheduled into the bucket twice comes twice)."""
        dues, of = self._due[partition], self._number
        for user in self._buckets[partition][number]:
            due = dues.get(user)
            if due is not None and of(due) == number:
                yield user, due

    def _live(self, partition: int, number: int) -> dict[str, float]:
        """The users whose live deadline is in bucket ``number``, with it (each once)."""
        return dict(self._live_names(partition, number))

    def pop_due(self, partition: int, watermark: float, limit: int | None = None) -> list[str]:
        """Users with a deadline at or before ``watermark``, each once, earliest first; at
        most ``limit`` of them (the rest stay for a later call)."""
        numbers = self._numbers.get(partition)
        if not numbers:
            return []
        dues, buckets = self._due[partition], self._buckets[partition]
        last = self._last_number(watermark)
        popped: list[str] = []
        while numbers and numbers[0] <= last:
            if limit is not None and len(popped) >= limit:
                break
            number = numbers[0]
            live = self._live(partition, number)
            ready = sorted((due, user) for user, due in live.items() if due <= watermark)
            if limit is not None:
                ready = ready[: limit - len(popped)]
            for _, user in ready:
                del dues[user]
                popped.append(user)
            waiting = [user for user in live if user in dues]
            if waiting:  # not due yet (so no later bucket is), or past the limit
                buckets[number] = waiting
                break
            del buckets[number]
            heapq.heappop(numbers)
        return popped

    def has_due(self, partition: int, watermark: float) -> bool:
        """True if a user's deadline is before ``watermark`` (see :meth:`due_count`)."""
        numbers = self._numbers.get(partition)
        last = self._last_number(watermark)
        while numbers and numbers[0] <= last:
            live = False
            for _, due in self._live_names(partition, numbers[0]):
                if due < watermark:
                    return True
                live = True
            if live:  # the earliest live bucket: a later one holds only later deadlines
                return False
            del self._buckets[partition][heapq.heappop(numbers)]  # only stale names left
        return False

    def due_count(self, partition: int, watermark: float) -> int:
        """How many users have a deadline before ``watermark``: the backlog.

        Looks only at the buckets up to ``watermark``.

        >>> timers = TimerIndex()
        >>> for due, user in [(5.0, "a"), (1.0, "b"), (9.0, "c"), (3.0, "d")]:
        ...     timers.schedule(0, due, user)
        >>> timers.due_count(0, 4.0), timers.due_count(0, 3.0), timers.due_count(1, 4.0)
        (2, 1, 0)
        """
        last = self._last_number(watermark)
        return sum(
            sum(due < watermark for due in self._live(partition, number).values())
            for number in self._numbers.get(partition, ())
            if number <= last
        )

    def forget(self, partition: int) -> None:
        self._due.pop(partition, None)
        self._buckets.pop(partition, None)
        self._numbers.pop(partition, None)

    def __len__(self) -> int:
        """Users with a live deadline."""
        return sum(len(dues) for dues in self._due.values())
