"""Offset guard: the committed offset of an input partition never passes an event not applied.

Faust commits, per partition, the first run of consecutive acknowledged offsets. For topics that
must lose nothing that rule has four holes (faust-streaming 0.15, ``transport/consumer.py``):

1. any jump in fetched offsets is recorded as a *gap* and later committed as if processed (meant
   for compacted topics; a jump on an input topic means offsets were not delivered);
2. the run may start one past the committed offset (``min(acked) - committed > 1``), so a
   single unacknowledged offset at the head (an event waiting in the reorder buffer) is skipped;
3. with nothing committed yet the run may start anywhere;
4. a message below the partition's *read offset* is dropped unseen, and the read offset is
   raised by every message of a fetch already under way, so messages read again after a seek
   back can be dropped for good.

After a restart or a takeover each of these committed offsets that no worker had applied, and a
crash then lost those events for good. For the guarded topics this module replaces that rule: a
commit advances only through acknowledged offsets in order, starting at the committed offset
(or the log start); Faust keeps no read offset for them (every delivered message reaches the
guard); a jump in delivered offsets is read again (:meth:`OffsetGuard.admit` asks for a seek),
and so are offsets the consumer fetched that never reached the guard
(:meth:`OffsetGuard.watch_fetched`: a gap at the end of a partition, with no later message to
reveal it); only a hole the broker itself confirms (transaction markers, retention) is passed.

>>> guard = OffsetGuard(frozenset({"clicks"}))
>>> tp = ("clicks", 0)
>>> guard.admit(tp, 5, committed=5), guard.admit(tp, 6, committed=5)
('apply', 'apply')
>>> guard.admit(tp, 9, committed=5)  # 7 and 8 never arrived: hold 9, read again from 7
'hold'
>>> guard.seeks_due(now=0.0)
[(('clicks', 0), 7)]
>>> guard.admit(tp, 6, committed=5)  # applied already: acknowledge, do not apply again
'done'
>>> guard.admit(tp, 7, committed=5), guard.admit(tp, 8, committed=5)
('apply', 'apply')
>>> guard.watch_fetched(tp, fetched=12, committed=5, now=0.0)  # 9..11 fetched, none delivered
>>> guard.watch_fetched(tp, fetched=12, committed=5, now=6.0)  # still not, 6 s on: read again
>>> guard.seeks_due(now=6.0)
[(('clicks', 0), 9)]
>>> commit_offset([5, 6, 9], head=5)  # acknowledged 5, 6 and 9: commit up to 7 only
(7, 2)
>>> commit_offset([6, 7], head=5)  # 5 not acknowledged yet: nothing to commit
(None, 0)
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

APPLY, HOLD, DONE = "apply", "hold", "done"
"""What to do with a delivered message: apply it; hold it unacknowledged (it comes after a gap
and will be delivered again); acknowledge it without applying (applied already)."""
SEEK_RETRY_S = 5.0
"""A seek that has not brought the missing offset after this long is made again."""


def commit_offset(
    acked: Sequence[int], head: int, holes: Sequence[tuple[int, int]] = ()
) -> tuple[int | None, int]:
    """The offset to commit after the sorted ``acked`` offsets, and how many of them it uses.

    ``head`` is the first offset not yet committed; ``holes`` are ``[start, end)`` ranges the
    broker confirmed hold no message. Offsets below ``head`` are already committed and used up.
    """
    position = head
    used = 0
    for offset in acked:
        while True:
            hole = _hole_at(holes, position)
            if hole is None:
                break
            position = hole[1]
        if offset < position:
            used += 1
        elif offset == position:
            position += 1
            used += 1
        else:
            break
    return (position if position > head else None), used


def _hole_at(holes: Sequence[tuple[int, int]], position: int) -> tuple[int, int] | None:
    for start, end in holes:
        if start <= position < end:
            return start, end
    return None


@dataclass
class _Seek:
    offset: int
    asked_at: float | None = None  # None: not sent yet


@dataclass
class OffsetGuard:
    """Per partition of the guarded topics: next offset due, pending seeks, confirmed holes."""

    topics: frozenset[str]
    next_offset: dict[Hashable, int] = field(default_factory=dict)
    """One past the last offset admitted, per partition."""
    log_start: dict[Hashable, int] = field(default_factory=dict)
    committed_at_assignment: dict[Hashable, int] = field(default_factory=dict)
    """The group's committed offsets, read when the partition was assigned: Faust learns them
    only when its start-up recovery seeks, and a first fetch can be delivered before that."""
    holes: dict[Hashable, list[tuple[int, int]]] = field(default_factory=dict)
    seeking: dict[Hashable, _Seek] = field(default_factory=dict)
    behind: dict[Hashable, tuple[int, float]] = field(default_factory=dict)
    """Partitions whose consumer fetched past the guard's position: (position, since when)."""

    def admit(self, tp: Hashable, offset: int, committed: int | None) -> str:
        """:data:`APPLY`, :data:`HOLD` or :data:`DONE` for the message at ``offset``.

        ``committed`` is the group's committed offset as Faust knows it (None: not yet, or
        nothing committed). The first offset due after an assignment is the committed offset,
        else the log start: Faust can drop a first fetch (see :meth:`watch_fetched`), and the
        first message delivered is then not the first due.
        """
        expected = self.position(tp, committed)
        while (hole := _hole_at(self.holes.get(tp, ()), expected or 0)) is not None:
            expected = hole[1]
        if expected is None or offset == expected:
            self.next_offset[tp] = offset + 1
            self.seeking.pop(tp, None)
            return APPLY
        if offset < expected:
            return DONE
        pending = self.seeking.get(tp)
        if pending is None or pending.offset != expected:
            self.seeking[tp] = _Seek(expected)
        return HOLD

    def seeks_due(self, now: float) -> list[tuple[Hashable, int]]:
        """Partitions to seek back (and where): new gaps, and seeks that brought nothing yet."""
        due = []
        for tp, pending in self.seeking.items():
            if pending.asked_at is None or now - pending.asked_at >= SEEK_RETRY_S:
                pending.asked_at = now
                due.append((tp, pending.offset))
        return due

    def watch_fetched(self, tp: Hashable, fetched: int, committed: int | None, now: float) -> None:
        """Notice offsets the consumer fetched that never reached the guard.

        ``fetched`` is the consumer's fetch position on ``tp``. A gap is noticed when a later
        message arrives; a gap at the end of a partition has none after it. Faust drops the
        rest of a fetch when its flow stops (the start-up recovery, a rebalance), after the
        consumer's position moved past it: with no later message those offsets were never
        read, and the partition never counted as caught up. A position that stays behind
        ``fetched`` for :data:`SEEK_RETRY_S` is read again from there.
        """
        position = self.position(tp, committed)
        if position is None or fetched <= position or tp in self.seeking:
            self.behind.pop(tp, None)
            return
        since = self.behind.get(tp)
        if since is None or since[0] != position:
            self.behind[tp] = (position, now)
        elif now - since[1] >= SEEK_RETRY_S:
            self.seeking[tp] = _Seek(position)
            del self.behind[tp]

    def confirm_hole(self, tp: Hashable, start: int, end: int) -> None:
        """The broker holds no message in ``[start, end)``: commits and admission pass it."""
        holes = self.holes.setdefault(tp, [])
        bisect.insort(holes, (start, end))
        self.seeking.pop(tp, None)

    def position(self, tp: Hashable, committed: int | None) -> int | None:
        """The next offset this worker will apply on ``tp``: after the last one admitted, else
        where ``tp`` starts (:meth:`start`)."""
        if tp in self.next_offset:
            return self.next_offset[tp]
        return self.start(tp, committed)

    def start(self, tp: Hashable, committed: int | None) -> int | None:
        """Where ``tp`` starts after an assignment: the committed offset (Faust's, else the one
        read at assignment), else the log start (None while none of them is known)."""
        if committed is not None:
            return committed
        return self.committed_at_assignment.get(tp, self.log_start.get(tp))

    def forget(self, tp: Hashable) -> None:
        """``tp`` moved to another worker: its state is rebuilt from Kafka if it comes back."""
        for state in (
            self.next_offset,
            self.log_start,
            self.committed_at_assignment,
            self.holes,
            self.seeking,
            self.behind,
        ):
            state.pop(tp, None)

    def install(self, consumer: Any) -> None:
        """Make Faust's ``consumer`` commit the guarded topics by :func:`commit_offset`."""
        if getattr(consumer, "_persona_offset_guard", None) is self:
            return
        original_new_offset: Callable[[Any], int | None] = consumer._new_offset
        original_add_gap = consumer._add_gap

        def _new_offset(tp: Any) -> int | None:
            if tp.topic not in self.topics:
                return original_new_offset(tp)
            acked = consumer._acked[tp]
            head = self.start(tp, consumer._committed_offset[tp])
            if not acked or head is None:
                return None
            acked.sort()
            offset, used = commit_offset(acked, head, self.holes.get(tp, ()))
            consumer._acked_index[tp].difference_update(acked[:used])
            del acked[:used]
            return offset

        async def _add_gap(tp: Any, offset_from: int, offset_to: int) -> None:
            if tp.topic not in self.topics:  # guarded topics are read again, never filled
                await original_add_gap(tp, offset_from, offset_to)

        consumer._new_offset = _new_offset
        consumer._add_gap = _add_gap
        consumer._read_offset = _ReadOffsets(self.topics, consumer._read_offset)
        consumer._persona_offset_guard = self


class _ReadOffsets(dict[Any, int | None]):
    """Faust's read offsets, kept as unknown (None) for the guarded topics: Faust then neither
    drops a message read again after a seek back nor records a gap; the guard decides."""

    def __init__(self, guarded: frozenset[str], offsets: dict[Any, int | None]) -> None:
        super().__init__()
        self.guarded = guarded
        self.update(offsets)

    def __missing__(self, tp: Any) -> None:
        return None

    def __setitem__(self, tp: Any, offset: int | None) -> None:
        super().__setitem__(tp, None if tp.topic in self.guarded else offset)

    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        for tp, offset in dict(*args, **kwargs).items():
            self[tp] = offset


async def repair_gaps(
    guard: OffsetGuard,
    consumer: Any,
    first_offset_from: Callable[[Any, int], Any],
    on_seek: Callable[[Any, int], None] = lambda tp, offset: None,
) -> None:
    """Seek each partition with a gap back to its missing offset, or pass a confirmed hole.

    ``first_offset_from(tp, offset)`` asks the broker for the first offset it holds at or after
    ``offset`` (None when none): an answer past ``offset`` proves the hole is in the log.

    The seek is ``seek_wait``, not Faust's ``seek``: Faust runs the Kafka client in a thread of
    its own, and ``seek`` changes that client's fetch state from the calling thread.
    """
    for tp, offset in guard.seeks_due(time.monotonic()):
        first = await first_offset_from(tp, offset)
        if first is not None and first > offset:
            log.info("offsets %d..%d of %s hold no message: passing them", offset, first - 1, tp)
            guard.confirm_hole(tp, offset, first)
            await consumer.seek_wait({tp: first})
            continue
        log.warning("offsets skipped on %s from %d: reading them again", tp, offset)
        on_seek(tp, offset)
        await consumer.seek_wait({tp: offset})
