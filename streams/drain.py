"""Batch drain: Faust's consumer hands a whole fetch to the streams under one wait, not one each.

Faust's fetch loop (faust-streaming 0.15, ``Consumer._drain_messages``) delivers every fetched
message through ``Service.wait_first(callback(message), suspend_flow.wait())``: per message it
creates four tasks (the delivery, the suspend, stop and crash waiters), waits on all of them and
cancels three. On this machine that bookkeeping was about a tenth of the worker's CPU, more than
Faust's conversion of the records themselves.

:func:`install_batch_drain` replaces that loop on one consumer with the same loop in which the
wait covers the delivery of a whole ``getmany`` result instead of each message. Everything else
per message is kept in the same order: the read-offset check, gap recording, the periodic commit,
a yield to the event loop every 100 messages. What changes is only what a rebalance interrupts:
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
from collections.abc import AsyncIterator
from typing import Any, cast

from faust.transport.consumer import CONSUMER_FETCHING

YIELD_EVERY = 100
"""Messages delivered between two returns to the event loop (Faust's own figure)."""


def install_batch_drain(consumer: Any) -> None:
    """Make Faust's ``consumer`` deliver each fetch under one wait (idempotent)."""

    async def batch_drain(fetcher: Any) -> None:
        await _drain(consumer, fetcher)

    if getattr(consumer._drain_messages, "__name__", "") != "batch_drain":
        consumer._drain_messages = batch_drain


async def _drain(consumer: Any, fetcher: Any) -> None:
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
                await consumer.wait_first(_deliver(consumer, fetched), consumer.suspend_flow)
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


async def _deliver(consumer: Any, fetched: AsyncIterator[Any]) -> None:
    """Hand every message of one fetch to the streams (Faust's per-message steps, in order)."""
    callback = consumer.callback
    get_read_offset = consumer._read_offset.__getitem__
    set_read_offset = consumer._read_offset.__setitem__
    acks_enabled_for = consumer.app.topics.acks_enabled_for
    commit_every = consumer._commit_every
    since_yield = 0
    async for tp, message in fetched:
        since_yield += 1
        if since_yield > YIELD_EVERY:
            await asyncio.sleep(0)
            since_yield = 0
        offset = message.offset
        read_offset = get_read_offset(tp)
        if read_offset is not None and offset < read_offset:
            continue  # read already (Faust drops these too); guarded topics keep no read offset
        if read_offset and offset - read_offset > 1 and acks_enabled_for(message.topic):
            await consumer._add_gap(tp, read_offset + 1, offset)
        if commit_every is not None and consumer._n_acked >= commit_every:
            consumer._n_acked = 0
            await consumer.commit()
        await callback(message)
        set_read_offset(tp, offset)
