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
>>> timers.schedule(0, due=900.0, user=b"u1")
>>> timers.schedule(0, due=2_000.0, user=b"u2")
>>> timers.pop_due(0, clocks.watermark(0))
[b'u1']

A budget leaves the rest of what is due, in order, for the next call (a user due twice counts
once):

>>> for due, user in [(1.0, b"a"), (2.0, b"b"), (2.5, b"a"), (3.0, b"c")]:
...     timers.schedule(1, due, user)
>>> timers.pop_due(1, watermark=10.0, limit=2)
[b'a', b'b']
>>> timers.pop_due(1, watermark=10.0, limit=2)
[b'c']
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable


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

    Users are named by their table key (bytes): the worker passes the very object it writes
    the profile under, so with the memory store the index shares the table's key instead of
    holding a copy of the id (a str id cost 57 bytes per profile held).

    At most one live deadline per user: scheduling a later or equal one while an earlier one
    waits adds nothing (looking at the profile then schedules its next deadline again);
    scheduling an earlier one replaces it, and the user's name in the old bucket is skipped
    when that bucket comes up. Every profile change asks for its deadline again, so without
    this the index held about three entries per user.

    Why buckets and not a heap of (deadline, user) pairs: a pair is a tuple of its own, 56
    bytes on top of the user's deadline and name, for every profile the worker holds (with
    RocksDB the index is most of what a profile costs in Python). A bucket is a list of names
    (8 bytes each); the buckets' numbers are in a small heap. The earliest bucket is *opened*
    when it comes up: its live users become one heap of (deadline, user) pairs, so users come
    out earliest first, ties by name, and a call with a ``limit`` takes the next few from the
    heap instead of sorting the bucket again (a minute of a busy shop's deadlines is thousands
    of users, popped a few hundred at a time). Only opened buckets hold pairs.

    >>> timers = TimerIndex()
    >>> for due in (50.0, 70.0, 50.0):
    ...     timers.schedule(0, due, b"u1")
    >>> len(timers), timers.scheduled(0, b"u1")
    (1, 50.0)
    >>> timers.schedule(0, 10.0, b"u1")  # earlier: replaces the deadline at 50
    >>> timers.pop_due(0, watermark=100.0), timers.pop_due(0, watermark=100.0)
    ([b'u1'], [])
    """

    def __init__(self, bucket_s: float = 60.0) -> None:
        if not bucket_s > 0:
            raise ValueError("bucket_s must be > 0")
        self.bucket_s = bucket_s
        self._due: dict[int, dict[bytes, float]] = {}
        """Per partition, each user's live deadline."""
        self._buckets: dict[int, dict[int, list[bytes]]] = {}
        """Per partition, bucket number → users scheduled into it (stale names included)."""
        self._opened: dict[int, dict[int, list[tuple[float, bytes]]]] = {}
        """Per partition, bucket number → a heap of (deadline, user) for the buckets opened
        (stale pairs included: a pair is live while it is the user's deadline)."""
        self._numbers: dict[int, list[int]] = {}
        """Per partition, a heap of the numbers of its buckets, opened or not."""

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
        self._opened.setdefault(partition, {})
        self._numbers.setdefault(partition, [])

    def schedule(self, partition: int, due: float, user: bytes) -> None:
        dues = self._due.get(partition)
        if dues is None:
            self.start(partition)
            dues = self._due[partition]
        current = dues.get(user)
        if current is not None and current <= due:
            return
        dues[user] = due
        number = self._number(due)
        opened = self._opened[partition].get(number)
        if opened is not None:
            heapq.heappush(opened, (due, user))
            return
        buckets = self._buckets[partition]
        users = buckets.get(number)
        if users is None:
            buckets[number] = [user]
            heapq.heappush(self._numbers[partition], number)
        else:
            users.append(user)

    def scheduled(self, partition: int, user: bytes) -> float | None:
        """The user's live deadline, if any."""
        return self._due.get(partition, {}).get(user)

    def _live(self, partition: int, number: int, names: Iterable[bytes]) -> dict[bytes, float]:
        """Of ``names`` found in bucket ``number``, the users whose live deadline is in that
        bucket, with it (each once: a user scheduled into a bucket twice is there twice)."""
        dues, of = self._due[partition], self._number
        return {user: dues[user] for user in names if user in dues and of(dues[user]) == number}

    def _earliest(self, partition: int, last: float) -> list[tuple[float, bytes]] | None:
        """The heap of the earliest bucket with a live user, if its number is at most
        ``last``: opened now if it was not, stale pairs on top dropped, empty buckets removed.
        """
        numbers, dues = self._numbers.get(partition), self._due[partition]
        opened = self._opened[partition]
        while numbers and numbers[0] <= last:
            number = numbers[0]
            heap = opened.get(number)
            if heap is None:
                live = self._live(partition, number, self._buckets[partition].pop(number))
                heap = [(due, user) for user, due in live.items()]
                heapq.heapify(heap)
                opened[number] = heap
            while heap and dues.get(heap[0][1]) != heap[0][0]:
                heapq.heappop(heap)  # replaced by an earlier deadline, or popped
            if heap:
                return heap
            del opened[number]
            heapq.heappop(numbers)
        return None

    def pop_due(self, partition: int, watermark: float, limit: int | None = None) -> list[bytes]:
        """Users with a deadline at or before ``watermark``, each once, earliest first; at
        most ``limit`` of them (the rest stay for a later call)."""
        if not self._numbers.get(partition):
            return []
        dues = self._due[partition]
        last = self._last_number(watermark)
        popped: list[bytes] = []
        while limit is None or len(popped) < limit:
            heap = self._earliest(partition, last)
            if heap is None or heap[0][0] > watermark:
                break
            _, user = heapq.heappop(heap)
            del dues[user]
            popped.append(user)
        return popped

    def has_due(self, partition: int, watermark: float) -> bool:
        """True if a user's deadline is before ``watermark`` (see :meth:`due_count`)."""
        if not self._numbers.get(partition):
            return False
        heap = self._earliest(partition, self._last_number(watermark))
        return heap is not None and heap[0][0] < watermark

    def due_count(self, partition: int, watermark: float) -> int:
        """How many users have a deadline before ``watermark``: the backlog.

        Looks only at the buckets up to ``watermark``.

        >>> timers = TimerIndex()
        >>> for due, user in [(5.0, b"a"), (1.0, b"b"), (9.0, b"c"), (3.0, b"d")]:
        ...     timers.schedule(0, due, user)
        >>> timers.due_count(0, 4.0), timers.due_count(0, 3.0), timers.due_count(1, 4.0)
        (2, 1, 0)
        """
        last = self._last_number(watermark)
        backlog: set[bytes] = set()
        for number in self._numbers.get(partition, ()):
            if number > last:
                continue
            heap = self._opened[partition].get(number)
            names = (user for _, user in heap) if heap is not None else (
                self._buckets[partition][number])  # fmt: skip
            live = self._live(partition, number, names)
            backlog.update(user for user, due in live.items() if due < watermark)
        return len(backlog)

    def forget(self, partition: int) -> None:
        self._due.pop(partition, None)
        self._buckets.pop(partition, None)
        self._opened.pop(partition, None)
        self._numbers.pop(partition, None)

    def __len__(self) -> int:
        """Users with a live deadline."""
        return sum(len(dues) for dues in self._due.values())
