"""Batch drain: Faust's consumer hands a whole fetch to the streams under one wait, not one each.

Faust's fetch loop (faust-streaming 0.15, ``Consumer._drain_messages``) delivers every fetched
message through ``Service.wait_first(callback(message), suspend_flow.wait())``: per message it
creates four tasks (the delivery, the suspend, stop and crash waiters), waits on all of them and
cancels three. On this machine that bookkeeping was about a tenth of the worker's CPU, more than
Faust's conversion of the records themselves.

:func:`install_batch_drain` replaces that loop on one consumer with the same loop in which the
wait covers the delivery of a whole ``getmany`` result instead of each message. Everything else
per message is kept: the periodic commit, the read-offset check, gap recording, a yield to the
event loop every 100 messages. What changes is what a rebalance interrupts: when
``suspend_flow`` is set (or the consumer stops), the rest of that fetch is not delivered, where
Faust would still offer each remaining message to a stream that is being torn down; and what a
fetch took from the Kafka client but did not deliver (the flow stopped, the generation changed,
a partition paused meanwhile) is read again (:func:`_rewind`), where Faust's ``getmany`` drops
it. Input messages dropped were never acknowledged, so the seek to the committed offsets after
the rebalance would read them again (the offset guard, :mod:`streams.offsets`, holds the input
topics to that); changelog records are not committed, and a table recovery that started
during the fetch waited for the dropped ones forever (a takeover under load).

>>> class FakeConsumer:
...     _drain_messages = "faust's loop"
>>> consumer = FakeConsumer()
>>> install_batch_drain(consumer)
>>> consumer._drain_messages.__name__
'batch_drain'
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from aiokafka import TopicPartition
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
    the callback's coroutine per message is saved; what a fetch drained of them and did not
    deliver is left to the offset guard to read again.
    """
    guarded = frozenset(unread_topics)
    straight = direct.topics & guarded if direct is not None else frozenset()

    async def batch_drain(fetcher: Any) -> None:
        await _drain(consumer, fetcher, direct, straight, guarded)

    if getattr(consumer._drain_messages, "__name__", "") != "batch_drain":
        consumer._drain_messages = batch_drain


async def _drain(
    consumer: Any,
    fetcher: Any,
    direct: Direct | None,
    straight: frozenset[str],
    guarded: frozenset[str],
) -> None:
    """The fetch loop: Faust's ``_drain_messages`` with one ``wait_first`` per fetch, and what a
    fetch drained but did not deliver read again (:func:`_rewind`)."""
    consumer_should_stop = consumer._stopped.is_set
    fetcher_should_stop = fetcher._stopped.is_set
    set_flag, unset_flag = consumer.diag.set_flag, consumer.diag.unset_flag
    try:
        while not (consumer_should_stop() or fetcher_should_stop()):
            set_flag(CONSUMER_FETCHING)
            records, active = await consumer._wait_next_records(1.0)
            await consumer.sleep(0)  # as Faust does: the fetch may not yield on its own
            if records and not consumer.should_stop:
                left = {tp: batch[0].offset for tp, batch in records.items() if batch}
                delivery = _deliver(consumer, records, active, direct, straight, left)
                await consumer.wait_first(delivery, consumer.suspend_flow)
                last = {tp: batch[-1].offset for tp, batch in records.items() if batch}
                # The guarded topics are read again by the offset guard (from the committed
                # offsets after a rebalance, or where a gap shows): a seek here would race its own.
                undelivered = {
                    tp: offset
                    for tp, offset in left.items()
                    if offset <= last[tp] and tp.topic not in guarded
                }
                if undelivered:
                    await _rewind(consumer, undelivered)
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
    consumer: Any,
    records: Mapping[Any, list[Any]],
    active: set[Any] | None,
    direct: Direct | None,
    straight: frozenset[str],
    left: dict[Any, int],
) -> None:
    """Hand the records of one fetch to the streams (Faust's ``getmany`` and its per-message
    steps, in order), those of the ``straight`` topics to ``direct``; ``left`` keeps each
    partition's first record not handed over.

    Faust's ``getmany`` drops the rest of a fetch when the flow stops or the generation changes,
    and skips the records of a partition no longer active, after the Kafka client has moved
    past them: here they stay in ``left``, and the caller reads them again.
    """
    generation = consumer.app.consumer_generation_id
    buffered = consumer._buffered_partitions
    to_message, highwater = consumer._to_message, consumer.highwater
    track_end_offset = consumer.app.monitor.track_tp_end_offset
    callback = consumer.callback
    get_read_offset = consumer._read_offset.__getitem__
    set_read_offset = consumer._read_offset.__setitem__
    acks_enabled_for = consumer.app.topics.acks_enabled_for
    commit_every = consumer._commit_every
    if direct is not None:
        put, room = direct.put, direct.room
    since_yield = 0
    stopped: set[Any] = set()  # partitions not active any more: read again from ``left``
    tracked: set[Any] = set()
    for tp, record in consumer.scheduler.iterate(records):
        if not consumer.flow_active or consumer.app.consumer_generation_id != generation:
            return
        if tp in stopped:
            continue
        if not (active is None or tp in active or tp in buffered):
            stopped.add(tp)
            left[tp] = record.offset
            continue
        if tp not in tracked:  # one fetch has one end per partition: read it once
            tracked.add(tp)
            track_end_offset(tp, highwater(tp))
        message = to_message(tp, record)
        since_yield += 1
        if since_yield > YIELD_EVERY:
            await asyncio.sleep(0)
            since_yield = 0
        if commit_every is not None and consumer._n_acked >= commit_every:
            consumer._n_acked = 0
            await consumer.commit()
        if message.topic in straight:
            left[tp] = record.offset + 1
            if not put(message):
                await room()
            continue
        offset = message.offset
        read_offset = get_read_offset(tp)
        if read_offset is not None and offset < read_offset:
            left[tp] = offset + 1
            continue  # read already (Faust drops these too); guarded topics keep no read offset
        if read_offset and offset - read_offset > 1 and acks_enabled_for(message.topic):
            await consumer._add_gap(tp, read_offset + 1, offset)
        await callback(message)
        left[tp] = offset + 1
        set_read_offset(tp, offset)


async def _rewind(consumer: Any, offsets: Mapping[Any, int]) -> None:
    """Move each partition back to the first record the fetch loop drained but did not hand
    over, so it is fetched again, unless the partition's position is already at or before it
    (a recovery that sought it back meanwhile): never forwards, so at worst a record comes twice.

    Without it a table recovery that started during a fetch could wait for changelog records
    the fetch had taken from the Kafka client and dropped, and never finish.
    """
    thread = consumer._thread
    client = thread._ensure_consumer()

    async def rewind() -> None:
        subscription = client._subscription
        for tp, offset in offsets.items():
            kafka_tp = TopicPartition(tp.topic, tp.partition)
            if not subscription.is_assigned(kafka_tp):
                continue
            state = subscription.subscription.assignment.state_value(kafka_tp)
            if state.has_valid_position and state.position > offset:
                consumer.log.info("reading %s again from %d (fetched, not delivered)", tp, offset)
                client.seek(kafka_tp, offset)

    await thread.call_thread(rewind)
