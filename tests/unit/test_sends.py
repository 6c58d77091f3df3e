"""The send chain: order, the bound on sends in flight, and what a failed send stops."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from streams.sends import SendChain


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(main(), timeout=10.0))


def test_sends_run_one_at_a_time_in_the_order_handed_over() -> None:
    async def main() -> list[str]:
        chain, log = SendChain(depth=2), []
        running = 0

        async def send(name: str, pause: float) -> None:
            nonlocal running
            running += 1
            assert running == 1, "two sends at once"
            log.append(name)
            await asyncio.sleep(pause)
            running -= 1

        # The first send is the slowest: the later ones still wait for it.
        for name, pause in (("a", 0.05), ("b", 0.0), ("c", 0.01), ("d", 0.0)):
            await chain.submit(lambda name=name, pause=pause: send(name, pause))
        await chain.wait()
        return log

    assert run(main) == ["a", "b", "c", "d"]


def test_a_hand_off_waits_while_depth_sends_are_in_flight() -> None:
    async def main() -> list[int]:
        chain = SendChain(depth=2)
        release = asyncio.Event()
        in_flight_at_hand_off = []

        async def blocked() -> None:
            await release.wait()

        for _ in range(2):
            await chain.submit(blocked)
            in_flight_at_hand_off.append(len(chain))
        third = asyncio.ensure_future(chain.submit(blocked))
        await asyncio.sleep(0.05)
        assert not third.done(), "a third send was taken while two were in flight"
        release.set()
        await third
        await chain.wait()
        return [*in_flight_at_hand_off, len(chain)]

    assert run(main) == [1, 2, 0]


def test_a_failed_send_stops_the_ones_behind_it_and_wait_reports_the_last() -> None:
    async def main() -> list[str]:
        chain, log = SendChain(depth=3), []

        async def fail() -> None:
            log.append("failed")
            raise RuntimeError("broker gone")

        async def send() -> None:
            log.append("sent")

        await chain.submit(fail)
        await chain.submit(send)  # behind the failed one: never started
        await chain.wait()  # the last one did not fail: it was not sent
        await chain.submit(fail)
        with pytest.raises(RuntimeError, match="broker gone"):
            await chain.wait()
        return log

    assert run(main) == ["failed", "failed"]


def test_depth_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="depth"):
        SendChain(depth=0)
