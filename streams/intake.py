"""Direct intake: input records go from Faust's fetch loop straight into lingering batches.

Faust hands every message to an agent through four steps: the conductor finds the topic's
channels (flow control, producer back-pressure, an event built by the schema), puts the event on
the channel's queue, the stream's passive drainer takes it off again (current event, sensors,
processors), and a processor appends it to the batch buffer. In the benchmark that path took
about 17% of the worker's main thread, more than the Redis writes. Persona's ingest takes whole
batches anyway, so for its topics the consumer's fetch loop calls :meth:`Intake.put` instead
(:meth:`Intake.install`), which builds the same Faust event and appends it to the batch being
filled.

What Faust's path guaranteed is kept:

- **acknowledgement**: nothing is acknowledged until the batch's consumer acknowledges it (the
  worker: once the batch's writes are sent), so the committed offset never passes a record
  before its batch has been processed; a batch whose consumer raised is not acknowledged.
  Faust's stream also adds each message to the consumer's set of unacknowledged messages,
  which only ``Consumer.wait_empty`` reads: Persona turns that off (``stream_wait_empty``) and
  waits for its own batches before a rebalance, so the intake does not keep the set;
- **rebalances**: while flow control is suspended nothing is taken in nor handed over, and the
  batch being filled is dropped when it resumes (Faust clears its queues then too); a record
  of an older consumer generation is dropped as Faust's stream drops it: after a rebalance the
  consumer reads again from the committed offsets;
- **back-pressure**: at most ``max_events`` wait; the fetch loop waits for room, as it waits on
  a full channel queue;
- **lingering**: a batch is handed over once full or ``linger_s`` after its *first* event (as
  Kafka's producer counts ``linger.ms``), and the next batch fills while one is processed.
  Faust's ``take_events(max_, within)`` waits ``within`` after each batch instead, and buffers
  nothing meanwhile: an event that arrived during a batch waited for the rest of it and then a
  whole ``within`` more, although it was older than ``within`` already. So an event waits at
  most ``linger_s``, or for the batch before it if that takes longer, and under load batches
  grow with the time a batch takes.

>>> import asyncio
>>> from faust.types.tuples import Message
>>> from mode.utils.queues import FlowControlEvent
>>> flow = FlowControlEvent(initially_suspended=False)
>>> class Event:  # what Faust's app.create_event builds, reduced to what the intake uses
...     def __init__(self, key, value, headers, message):
...         self.message = message
>>> intake = Intake({"clicks"}, max_events=2, linger_s=0.05, flow_control=flow,
...                 create_event=Event)
>>> def message(offset):
...     return Message("clicks", 0, offset, 0.0, 0, None, b"u1", b"{}", None)
>>> async def demo():
...     for offset in range(3):
...         if not intake.put(message(offset)):
...             break  # full: the fetch loop would await intake.room() before offset 2
...     batches = intake.batches()
...     first = await anext(batches)  # full: handed over at once
...     intake.put(message(2))
...     second = await anext(batches)  # after 50 ms
...     return [e.message.offset for e in first], [e.message.offset for e in second]
>>> asyncio.run(demo())
([0, 1], [2])
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from mode.utils.queues import FlowControlEvent


class Intake:
    """The batch being filled for one consumer of ``topics`` (see the module docstring)."""

    def __init__(
        self,
        topics: Iterable[str],
        *,
        max_events: int,
        linger_s: float,
        flow_control: FlowControlEvent,
        create_event: Callable[[Any, Any, Any, Any], Any],
        generation: Callable[[], int] | None = None,
    ) -> None:
        if max_events < 1 or linger_s <= 0:
            raise ValueError("max_events must be at least 1 and linger_s positive")
        self.topics = frozenset(topics)
        self.max_events = max_events
        self.linger_s = linger_s
        self._flow_control = flow_control
        self._create_event = create_event
        self._generation = generation
        """The consumer's generation now (messages read before a rebalance carry an older one);
        None: no generation check (messages not read by a Faust consumer have none)."""
        self._events: list[Any] = []
        self._first_at = 0.0
        self._started = asyncio.Event()  # an event entered an empty buffer
        self._full = asyncio.Event()
        self._room = asyncio.Event()  # the full buffer was handed over
        flow_control.manage_queue(self)  # type: ignore[arg-type]  # cleared on resume

    def install(self, consumer: Any) -> None:
        """Route the records of this intake's topics from Faust's ``consumer`` to :meth:`put`;
        the rest still go to Faust's conductor (before the consumer starts)."""
        to_conductor = consumer.callback
        topics, put, room = self.topics, self.put, self.room

        async def deliver(message: Any) -> None:
            if message.topic in topics:
                if not put(message):
                    await room()
            else:
                await to_conductor(message)

        consumer.callback = deliver

    def __len__(self) -> int:
        return len(self._events)

    def put(self, message: Any) -> bool:
        """Take ``message`` in (the fetch loop's call); False when the buffer is full after it,
        and the caller waits for :meth:`room` before the next one."""
        if not self._flow_control.is_active() or self._stale(message):
            return True  # a rebalance is under way or was: the record is read again after it
        events = self._events
        if not events:
            self._first_at = asyncio.get_running_loop().time()
            self._started.set()
        events.append(self._create_event(message.key, message.value, message.headers, message))
        if len(events) >= self.max_events:
            self._full.set()
            self._room.clear()
            return False
        return True

    async def room(self) -> None:
        """Wait until the buffer has room again."""
        while len(self._events) >= self.max_events:
            await self._room.wait()

    def clear(self) -> None:
        """Drop the batch being filled, unacknowledged (flow control calls this on resume)."""
        self._events = []
        self._started.clear()
        self._full.clear()
        self._room.set()

    def _stale(self, message: Any) -> bool:
        return self._generation is not None and message.generation_id != self._generation()

    async def batches(self) -> AsyncIterator[list[Any]]:
        """Batches in arrival order, not acknowledged: their consumer acknowledges them."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._events:
                await self._started.wait()
                if not self._events:  # cleared meanwhile
                    self._started.clear()
                    continue
            remaining = self._first_at + self.linger_s - loop.time()
            if remaining > 0 and not self._full.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), remaining)
            if not self._flow_control.is_active():
                # A rebalance: nothing goes until it ends, and the resume clears the buffer.
                await self._flow_control.acquire()
                continue
            batch = self._events
            if not batch:
                continue  # cleared by a rebalance while it lingered
            self.clear()
            if self._stale(batch[0].message):  # generations only grow: the first is oldest
                batch = [e for e in batch if not self._stale(e.message)]
                if not batch:
                    continue
            yield batch
