"""Batch drain: Faust's consumer hands a whole fetch to the streams under one wait, not one each.

Faust's fetch loop (faust-streaming 0.15, ``Consumer._drain_messages``) delivers every fetched
message through ``Service.wait_first(callback(message), suspend_flow.wait())``: per message it
creates four tasks (the delivery, the suspend, stop and crash waiters), waits on all of them and
cancels three. On this machine that bookkeeping was about a tenth of the worker's CPU, more than
Faust's conversion of the records themselves.

:func:`install_batch_drain` replaces that loop on one consumer with the same loop in which the
wait covers the delivery of a whole ``getmany`` result instead of each message. Everything else
per message is kept: the periodic commit, the read-offset check, gap recording, a yield to the
event loop every 100 messages. What changes is only what a rebalance interrupts:
when ``suspend_flow`` is set (or the consumer stops), the rest of that fetch is not delivered,
where Faust would still offer each remaining message to a stream that is being torn down. Those
messages were never acknowledged, so the seek to the committed offsets after the rebalance reads
them again (the offset guard, :mod:`streams.offsets`, holds the input topics to that).

>>> class FakeConsumer:
...     _drain_messages = "faust's loop"
>>> consumer = FakeConsumer()
>>> install_batch_drain(consumer)
>>> consumer._drain_messages.__name__
'batch_drain'
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any, Protocol, cast

from faust.transport.consumer import CONSUMER_FETCHING

YIELD_EVERY = 100
"""Messages delivered between two returns to the event loop (Faust's own figure)."""


class Direct(Protocol):
    """Where a fetch's records of some topics go without Faust's callback (an intake)."""

    topics: frozenset[str]

    def put(self, message: Any) -> bool: ...  # False: full, wait for room() before the next

    async def room(self) -> None: ...


def install_batch_drain(
    consumer: Any, direct: Direct | None = None, unread_topics: Iterable[str] = ()
) -> None:
    """Make Faust's ``consumer`` deliver each fetch under one wait (idempotent).

    Records of ``direct``'s topics that are also ``unread_topics`` (topics whose read offsets
    Faust does not keep: the offset guard's, :mod:`streams.offsets`) go straight to
    ``direct.put``: of Faust's steps per message only the periodic commit applies to them, and
    the callback's coroutine per message is saved.
    """
    straight = direct.topics & frozenset(unread_topics) if direct is not None else frozenset()

    async def batch_drain(fetcher: Any) -> None:
        await _drain(consumer, fetcher, direct, straight)

    if getattr(consumer._drain_messages, "__name__", "") != "batch_drain":
        consumer._drain_messages = batch_drain


async def _drain(
    consumer: Any, fetcher: Any, direct: Direct | None, straight: frozenset[str]
) -> None:
    """The fetch loop: Faust's ``_drain_messages`` with one ``wait_first`` per fetch."""
    consumer_should_stop = consumer._stopped.is_set
    fetcher_should_stop = fetcher._stopped.is_set
    set_flag, unset_flag = consumer.diag.set_flag, consumer.diag.unset_flag
    try:
        while not (consumer_should_stop() or fetcher_should_stop()):
            set_flag(CONSUMER_FETCHING)
            fetched = cast(AsyncIterator[Any], consumer.getmany(timeout=1.0))
            await consumer.sleep(0)  # as Faust does: getmany may not yield on its own
            if not consumer.should_stop:
                delivery = _deliver(consumer, fetched, direct, straight)
                await consumer.wait_first(delivery, consumer.suspend_flow)
            unset_flag(CONSUMER_FETCHING)
    except consumer.consumer_stopped_errors:
        if consumer.transport.app.should_stop:
            consumer.log.info("Broker stopped consumer, shutting down...")
            return
        raise
    except asyncio.CancelledError:
        if consumer.transport.app.should_stop:
            consumer.log.info("Consumer shutting down for user cancel.")
            return
        raise
    except Exception as exc:
        consumer.log.exception("Drain messages raised: %r", exc)
        raise
    finally:
        unset_flag(CONSUMER_FETCHING)


async def _deliver(
    consumer: Any, fetched: AsyncIterator[Any], direct: Direct | None, straight: frozenset[str]
) -> None:
    """Hand every message of one fetch to the streams (Faust's per-message steps, in order),
    those of the ``straight`` topics to ``direct``."""
    callback = consumer.callback
    get_read_offset = consumer._read_offset.__getitem__
    set_read_offset = consumer._read_offset.__setitem__
    acks_enabled_for = consumer.app.topics.acks_enabled_for
    commit_every = consumer._commit_every
    if direct is not None:
        put, room = direct.put, direct.room
    since_yield = 0
    async for tp, message in fetched:
        since_yield += 1
        if since_yield > YIELD_EVERY:
            await asyncio.sleep(0)
            since_yield = 0
        if commit_every is not None and consumer._n_acked >= commit_every:
            consumer._n_acked = 0
            await consumer.commit()
        if message.topic in straight:
            if not put(message):
                await room()
            continue
        offset = message.offset
        read_offset = get_read_offset(tp)
        if read_offset is not None and offset < read_offset:
            continue  # read already (Faust drops these too); guarded topics keep no read offset
        if read_offset and offset - read_offset > 1 and acks_enabled_for(message.topic):
            await consumer._add_gap(tp, read_offset + 1, offset)
        await callback(message)
        set_read_offset(tp, offset)
