"""The direct intake: lingering batches, acknowledgement, back-pressure and rebalances, with
Faust's own events, messages and flow control (no broker)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import faust
import pytest
from faust.types.tuples import Message
from mode.utils.queues import FlowControlEvent

from streams.intake import Intake

APP = faust.App("intake-test", store="memory://")


def message(offset: int, topic: str = "clicks") -> Message:
    return Message(topic, 0, offset, 0.0, 0, None, b"u1", str(offset).encode(), None)


def intake(max_events: int, linger_s: float, flow: FlowControlEvent | None = None) -> Intake:
    return Intake(
        {"clicks"},
        max_events=max_events,
        linger_s=linger_s,
        flow_control=flow or FlowControlEvent(initially_suspended=False),
        create_event=APP.create_event,
    )


def offsets(batch: list[Any]) -> list[int]:
    return [event.message.offset for event in batch]


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(main(), timeout=10.0))


def test_a_full_batch_goes_at_once_and_the_fetch_loop_waits_for_room() -> None:
    buffer = intake(max_events=3, linger_s=5.0)

    async def main() -> tuple[list[bool], list[int], bool, bool, float]:
        accepted = [buffer.put(message(i)) for i in range(3)]
        room = asyncio.ensure_future(buffer.room())
        await asyncio.sleep(0.05)
        waited_while_full = not room.done()
        started = time.monotonic()
        first = await anext(buffer.batches())
        handed_after = time.monotonic() - started
        await asyncio.sleep(0)
        return accepted, offsets(first), waited_while_full, room.done(), handed_after

    accepted, first, waited_while_full, room_after, handed_after = run(main)
    assert accepted == [True, True, False]  # the third filled it
    assert first == [0, 1, 2]
    assert handed_after < 5.0  # full: not held for the linger
    assert waited_while_full and room_after


def test_an_idle_intake_collects_its_first_events_for_the_linger() -> None:
    buffer = intake(max_events=100, linger_s=0.5)

    async def main() -> tuple[list[int], float]:
        started = time.monotonic()
        buffer.put(message(0))
        batches = buffer.batches()
        waiting = asyncio.ensure_future(anext(batches))
        await asyncio.sleep(0.1)
        buffer.put(message(1))
        batch = await waiting
        return offsets(batch), time.monotonic() - started

    batch, handed_after = run(main)
    assert batch == [0, 1]
    assert handed_after >= 0.5 - 0.01  # counted from the first event, not the last


def test_events_that_came_during_a_batch_go_as_soon_as_it_ends() -> None:
    # Offset 1 arrives while batch [0] is processed for 0.8 s: by then it is older than the
    # linger, so it goes as soon as the consumer asks (take_events would wait a linger more).
    buffer = intake(max_events=100, linger_s=0.5)

    async def main() -> tuple[list[int], float]:
        buffer.put(message(0))
        batches = buffer.batches()
        await anext(batches)
        buffer.put(message(1))
        await asyncio.sleep(0.8)  # processing batch [0]
        asked = time.monotonic()
        second = await anext(batches)
        return offsets(second), time.monotonic() - asked

    second, waited = run(main)
    assert second == [1]
    assert waited < 0.5  # not a whole linger more


def test_batches_are_handed_over_unacknowledged_and_their_consumer_acknowledges_them() -> None:
    buffer = intake(max_events=2, linger_s=0.05)
    sent = [message(i) for i in range(4)]

    async def main() -> None:
        buffer.put(sent[0])
        buffer.put(sent[1])
        with pytest.raises(RuntimeError):
            async for batch in buffer.batches():
                if offsets(batch) == [2, 3]:
                    raise RuntimeError("the batch failed")
                assert offsets(batch) == [0, 1]
                buffer.put(sent[2])
                buffer.put(sent[3])
                assert not any(m.acked for m in sent)  # the intake acknowledges nothing
                for event in batch:
                    event.ack()  # the consumer's acknowledgement, once it is done

    run(main)
    assert [m.acked for m in sent] == [True, True, False, False]  # the failed batch: never


def test_a_rebalance_drops_what_was_not_handed_over_and_nothing_is_taken_in_meanwhile() -> None:
    flow = FlowControlEvent(initially_suspended=False)
    buffer = intake(max_events=2, linger_s=0.3, flow=flow)
    dropped, during, after = message(0), message(1), message(2)

    async def main() -> list[int]:
        buffer.put(dropped)
        batches = buffer.batches()
        waiting = asyncio.ensure_future(anext(batches))  # lingering on offset 0
        await asyncio.sleep(0.05)
        flow.suspend()
        assert buffer.put(during)  # not taken: read again after the seek
        await asyncio.sleep(0.5)
        assert not waiting.done()  # the linger is over, but nothing goes during a rebalance
        flow.resume()  # Faust resumes after seeking to the committed offsets: clears the intake
        assert len(buffer) == 0
        buffer.put(after)
        return offsets(await waiting)

    assert run(main) == [2]
    assert during.refcount == 0 and not during.acked
    assert not dropped.acked  # never processed, never acknowledged


def test_install_routes_the_intake_topics_and_leaves_the_rest_to_faust() -> None:
    to_conductor: list[int] = []

    async def conductor(message: Any) -> None:
        to_conductor.append(message.offset)

    class Consumer:  # the attribute of Faust's consumer the intake uses
        callback = staticmethod(conductor)

    consumer = Consumer()
    buffer = intake(max_events=10, linger_s=0.05)
    buffer.install(consumer)

    async def main() -> list[int]:
        await consumer.callback(message(0))
        await consumer.callback(message(1, topic="model-snapshots"))
        return offsets(await anext(buffer.batches()))

    assert run(main) == [0]
    assert to_conductor == [1]


@pytest.mark.parametrize(("max_events", "linger_s"), [(0, 1.0), (10, 0.0)])
def test_bad_arguments_are_refused(max_events: int, linger_s: float) -> None:
    with pytest.raises(ValueError, match="max_events"):
        intake(max_events, linger_s)


def test_records_of_an_older_consumer_generation_are_dropped() -> None:
    generation = 1
    buffer = Intake(
        {"clicks"},
        max_events=10,
        linger_s=0.05,
        flow_control=FlowControlEvent(initially_suspended=False),
        create_event=APP.create_event,
        generation=lambda: generation,
    )
    old, late, new = message(0), message(1), message(2)
    old.generation_id = late.generation_id = 0
    new.generation_id = 1

    async def main() -> list[int]:
        buffer.put(old)  # read before the rebalance
        assert len(buffer) == 0
        nonlocal generation
        generation = 0
        buffer.put(late)  # taken in generation 0, but handed over in generation 1
        generation = 1
        buffer.put(new)
        return offsets(await anext(buffer.batches()))

    assert run(main) == [2]
    assert not old.acked and not late.acked
