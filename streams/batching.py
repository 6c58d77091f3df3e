"""Lingering batches: a batch is handed over when it is full or its first event is old enough.

Faust's ``Stream.take_events(max_, within)`` waits ``within`` seconds *after each batch* before it
hands over the next one (unless ``max_`` events came first), and it does not buffer while a batch
is processed. At moderate load that wait adds to the time the previous batch took: an event that
arrives while a batch is processed waits for the rest of that batch, then a whole ``within``
more, although it is already older than ``within``. In the benchmark's paced run that was most
events.

:func:`take_lingering` counts the wait from the first event in the buffer instead, as Kafka's
producer counts ``linger.ms``, and the next batch fills while one is processed: an event waits
at most ``linger_s`` to be handed over, or for the batch before it to finish if that takes
longer; an idle stream still collects its first events for ``linger_s`` into one batch. The
buffer sees an event when the stream is drained, which happens only while the consumer awaits
(in the worker: its Redis write and its sends, late in a batch), so under a steady flow a batch
goes about every ``linger_s`` plus the part of a batch before its first await (13 to 15 batches
a second at 1,600 events/s, each taking 20 to 30 ms). The rest
is Faust's own ``take_events`` (faust-streaming 0.15): the processor that fills the buffer, the
stream drained passively in the background, at most ``max_events`` buffered, acknowledgements
once the consumer is done with a batch, the generator registered with the stream so that
stopping the stream closes it.

>>> import asyncio, faust
>>> app = faust.App("doc", store="memory://")
>>> @app.agent()
... async def printer(stream):
...     async for events in take_lingering(stream, max_events=2, linger_s=0.05):
...         print([event.value for event in events])
>>> async def send(*values):
...     async with printer.test_context() as agent:
...         for value in values:
...             await agent.put(value)
...         await asyncio.sleep(0.2)
>>> asyncio.run(send("a", "b", "c"))
['a', 'b']
['c']
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from faust.types import EventT, StreamT


def take_lingering(
    stream: StreamT[Any], max_events: int, linger_s: float
) -> AsyncGenerator[list[EventT], None]:
    """Batches of at most ``max_events`` events of ``stream``, each handed over once full or
    ``linger_s`` after its first event arrived (see the module docstring)."""
    if max_events < 1 or linger_s <= 0:
        raise ValueError("max_events must be at least 1 and linger_s positive")
    batches = _lingering(stream, max_events, linger_s)
    # As Faust registers its own buffering generators: stopping the stream closes this one.
    active = getattr(stream, "_active_agens", None)
    if active is not None:
        active.add(batches)
    return batches


async def _lingering(
    stream: StreamT[Any], max_events: int, linger_s: float
) -> AsyncGenerator[list[EventT], None]:
    loop = asyncio.get_running_loop()
    events: list[EventT] = []
    first_at = 0.0
    started = asyncio.Event()  # set when an event enters an empty buffer
    full = asyncio.Event()
    taken = asyncio.Event()  # the full buffer was handed over: the next one may fill

    async def add_to_buffer(value: Any) -> Any:
        nonlocal first_at
        try:
            event = stream.current_event
            if event is None:
                raise RuntimeError("take_lingering: a value came without its event")
            if not events:
                first_at = loop.time()
                started.set()
            events.append(event)
            if len(events) >= max_events:
                full.set()
                taken.clear()
                await stream.wait(taken)  # never more than max_events in one batch
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # as Faust's take_events: the stream crashes, never hangs
            await stream.crash(exc)  # type: ignore[attr-defined]
        return value

    acks_were_enabled = stream.enable_acks
    stream.enable_acks = False  # acknowledged below, once the consumer is done with a batch
    stream.add_processor(add_to_buffer)
    stream._enable_passive(aiter(stream.channel))  # type: ignore[attr-defined]
    try:
        while not stream.should_stop:
            if not events:
                await stream.wait_for_stopped(started, timeout=1.0)
                continue
            remaining = first_at + linger_s - loop.time()
            if remaining > 0 and not full.is_set():
                await stream.wait_for_stopped(full, timeout=remaining)
            # Unlike Faust's take_events, the next batch fills while this one is processed:
            # its events' linger runs meanwhile.
            batch, events = events, []
            started.clear()
            full.clear()
            taken.set()
            try:
                yield batch
            finally:
                for event in batch:
                    await stream.ack(event)
    finally:
        stream.enable_acks = acks_were_enabled
        stream._processors.remove(add_to_buffer)  # type: ignore[attr-defined]
