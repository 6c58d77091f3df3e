"""The timer index against a plain model of what it promises."""

from __future__ import annotations

import math
import random

import pytest

from streams.clock import TimerIndex


class PlainTimers:
    """What :class:`TimerIndex` promises, the slow way: each user's earliest deadline asked for
    since it was last popped; popped earliest first (ties by user id)."""

    def __init__(self) -> None:
        self.earliest: dict[int, dict[bytes, float]] = {}

    def schedule(self, partition: int, due: float, user_id: bytes) -> None:
        users = self.earliest.setdefault(partition, {})
        users[user_id] = min(due, users.get(user_id, math.inf))

    def pop_due(self, partition: int, watermark: float, limit: int | None) -> list[bytes]:
        users = self.earliest.get(partition, {})
        due = sorted((d, u) for u, d in users.items() if d <= watermark)[:limit]
        for _, user in due:
            del users[user]
        return [user for _, user in due]

    def backlog(self, partition: int, watermark: float) -> int:
        return sum(d < watermark for d in self.earliest.get(partition, {}).values())


@pytest.mark.parametrize(("bucket_s", "users"), [(0.5, 40), (7.0, 40), (60.0, 40), (60.0, 400)])
@pytest.mark.parametrize("seed", range(5))
def test_the_index_pops_what_the_plain_model_pops(seed: int, bucket_s: float, users: int) -> None:
    rng = random.Random(seed)
    timers, plain = TimerIndex(bucket_s), PlainTimers()
    watermark = 0.0
    for _ in range(3000):
        partition = rng.randrange(2)
        if rng.random() < 0.7:
            due, user = watermark + rng.uniform(-5, 50), b"u%d" % rng.randrange(users)
            timers.schedule(partition, due, user)
            plain.schedule(partition, due, user)
        else:
            watermark += rng.uniform(0, 10)
            limit = rng.choice([None, 1, 3, 25])
            assert timers.pop_due(partition, watermark, limit) == plain.pop_due(
                partition, watermark, limit
            )
        live = sum(len(entries) for entries in plain.earliest.values())
        assert len(timers) == live
        probe = watermark + rng.uniform(-5, 20)
        backlog = plain.backlog(partition, probe)
        assert timers.due_count(partition, probe) == backlog
        assert timers.has_due(partition, probe) == (backlog > 0)
    assert timers.due_count(0, math.inf) == len(plain.earliest.get(0, {}))


def test_one_entry_per_user_however_often_a_deadline_is_asked_for() -> None:
    timers = TimerIndex()
    for _ in range(100):
        timers.schedule(0, 500.0, b"u1")
        timers.schedule(0, 900.0, b"u1")

    assert timers.due_count(0, math.inf) == 1
    assert timers.scheduled(0, b"u1") == 500.0


def test_a_replaced_entry_is_skipped_and_a_forgotten_partition_is_empty() -> None:
    timers = TimerIndex()
    timers.schedule(3, 50.0, b"u1")
    timers.schedule(3, 20.0, b"u1")

    assert timers.pop_due(3, 30.0) == [b"u1"]
    assert timers.pop_due(3, 60.0) == []  # the entry at 50 was replaced, not a second timer
    timers.schedule(3, 70.0, b"u2")
    timers.forget(3)
    assert not timers.has(3) and len(timers) == 0 and timers.pop_due(3, 100.0) == []
