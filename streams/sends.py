"""Send chain: batches' sends overlap, each of their stages in the order the batches came.

A batch's sends wait on the network: its outputs (triggers, training examples) to the broker,
then, once the broker has them, its table changelog, and its Redis write beside those. Run one
send after another, each of those round trips waited for all of the previous batch's: with the
broker and the worker sharing two cores, a run of due timers (a send after nearly every batch)
kept the chain busy 99% of the time, and the batch lock was held 16% of the time waiting to hand
a batch over.

So a send goes through named stages (:data:`MESSAGES`, :data:`CHANGELOG`, :data:`REDIS`), and
each waits only for the send before it to have *passed the same stage*
(:meth:`Turn.wait`), not to have finished. Messages of a later batch go to the producer right
after the earlier batch's were handed to it, so a partition gets them in batch order; the same
for changelog records and for Redis writes. What needs everything before it done, acknowledging
a batch's events, waits for the previous send to have finished (:meth:`Turn.wait_previous`).
At most ``depth`` sends are in flight.

If a send fails, every stage it had not passed counts as failed: the send behind it stops at its
next wait (:class:`Abandoned`), and so on down the chain (the failure stops the worker; the
events of those batches stay unacknowledged and are delivered again). A later send may have
passed a stage before that (its messages are on the broker): re-delivery sends them again, with
the same idempotency keys.

>>> import asyncio
>>> async def demo():
...     chain, log = SendChain(depth=2), []
...     async def send(turn, name, pause):
...         await turn.wait(MESSAGES)
...         log.append(f"{name} messages")
...         turn.passed(MESSAGES)
...         await asyncio.sleep(pause)  # waiting for the broker, say
...         await turn.wait_previous()
...         log.append(f"{name} acknowledged")
...     for name, pause in (("a", 0.02), ("b", 0.0)):
...         await chain.submit(lambda turn, name=name, pause=pause: send(turn, name, pause))
...     await chain.wait()
...     return log
>>> asyncio.run(demo())
['a messages', 'b messages', 'a acknowledged', 'b acknowledged']
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable

MESSAGES, CHANGELOG, REDIS = "messages", "changelog", "redis"
STAGES = (MESSAGES, CHANGELOG, REDIS)


class Abandoned(Exception):
    """The send before this one failed before passing the stage waited for."""


class Turn:
    """One send's place in the chain: what it waits for from the send before, and what it tells
    the send after."""

    def __init__(self, previous: Turn | None) -> None:
        self._previous = previous
        loop = asyncio.get_running_loop()
        self._passed = {stage: loop.create_future() for stage in STAGES}
        self._finished: asyncio.Future[bool] = loop.create_future()

    async def wait(self, stage: str) -> None:
        """Wait until the send before this one passed ``stage`` (at once if there is none)."""
        if self._previous is not None and not await asyncio.shield(self._previous._passed[stage]):
            raise Abandoned(stage)

    def passed(self, stage: str) -> None:
        """This send is past ``stage``: the one behind it may do its own."""
        if not self._passed[stage].done():
            self._passed[stage].set_result(True)

    async def wait_previous(self) -> None:
        """Wait until the send before this one finished."""
        if self._previous is not None and not await asyncio.shield(self._previous._finished):
            raise Abandoned("finished")

    def _finish(self, ok: bool) -> None:
        for future in (*self._passed.values(), self._finished):
            if not future.done():
                future.set_result(ok)
        self._previous = None  # the chain behind this one no longer needs it


Send = Callable[[Turn], Awaitable[None]]


class SendChain:
    """Sends started as they are handed over, each in its :class:`Turn`; at most ``depth``
    handed over and not yet finished."""

    def __init__(self, depth: int) -> None:
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self.depth = depth
        self._in_flight: deque[asyncio.Future[None]] = deque()
        self._last: Turn | None = None

    def __len__(self) -> int:
        """Sends handed over and not finished."""
        self._forget_done()
        return len(self._in_flight)

    async def submit(self, send: Send) -> None:
        """Wait until fewer than ``depth`` sends are in flight, then start ``send(turn)``;
        returns without waiting for it."""
        self._forget_done()
        while len(self._in_flight) >= self.depth:
            with contextlib.suppress(Exception):
                await self._in_flight[0]
            self._forget_done()
        turn = Turn(self._last)
        self._last = turn
        self._in_flight.append(asyncio.ensure_future(_run(turn, send)))

    async def wait(self) -> None:
        """Wait until every send handed over is done (or abandoned, behind a failed one);
        raises the error of the last one if it failed."""
        if self._in_flight:
            await self._in_flight[-1]

    def _forget_done(self) -> None:
        while self._in_flight and self._in_flight[0].done():
            done = self._in_flight.popleft()
            if not done.cancelled():
                done.exception()  # retrieved: a failure is reported where the send ran


async def _run(turn: Turn, send: Send) -> None:
    ok = False
    try:
        await send(turn)
        ok = True
    except Abandoned:
        return  # the failure stops the worker where it happened; this one is not finished
    finally:
        turn._finish(ok)
