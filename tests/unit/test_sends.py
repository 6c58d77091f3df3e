"""The send chain: each stage in hand-over order, sends overlapping, the bound on sends in
flight, and what a failed send stops."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from streams.sends import CHANGELOG, MESSAGES, REDIS, SendChain, Turn


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(main(), timeout=10.0))


async def staged(turn: Turn, name: str, pauses: dict[str, float], log: list[str]) -> None:
    """A send like the worker's: each stage in turn, then acknowledged after the one before."""
    for stage in (MESSAGES, CHANGELOG, REDIS):
        await turn.wait(stage)
        await asyncio.sleep(pauses.get(stage, 0.0))
        log.append(f"{name} {stage}")
        turn.passed(stage)
    await turn.wait_previous()
    log.append(f"{name} acknowledged")


def test_each_stage_and_the_acknowledgements_keep_the_hand_over_order() -> None:
    async def main() -> list[str]:
        chain, log = SendChain(depth=4), []
        # The first send's Redis write is slow: the later ones overtake it in no stage.
        sends = [("a", {REDIS: 0.05}), ("b", {}), ("c", {MESSAGES: 0.01}), ("d", {})]
        for name, pauses in sends:
            await chain.submit(
                lambda turn, name=name, pauses=pauses: staged(turn, name, pauses, log)
            )
        await chain.wait()
        return log

    log = run(main)
    for stage in (MESSAGES, CHANGELOG, REDIS, "acknowledged"):
        assert [entry[0] for entry in log if entry.endswith(stage)] == ["a", "b", "c", "d"]
    # b's messages went out while a was still writing Redis: the sends overlap.
    assert log.index("b messages") < log.index("a redis")


def test_a_hand_off_waits_while_depth_sends_are_in_flight() -> None:
    async def main() -> list[int]:
        chain = SendChain(depth=2)
        release = asyncio.Event()
        in_flight_at_hand_off = []

        async def blocked(turn: Turn) -> None:
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


def test_a_failed_send_stops_the_ones_behind_it_at_their_next_wait() -> None:
    async def main() -> list[str]:
        chain, log = SendChain(depth=4), []

        async def fail_at_changelog(turn: Turn) -> None:
            turn.passed(MESSAGES)
            await asyncio.sleep(0.01)
            log.append("failed")
            raise RuntimeError("broker gone")

        async def send(turn: Turn, name: str) -> None:
            await staged(turn, name, {}, log)

        await chain.submit(fail_at_changelog)
        await chain.submit(lambda turn: send(turn, "behind"))
        await chain.submit(lambda turn: send(turn, "further"))
        await chain.wait()  # the last one did not fail: it was abandoned
        await chain.submit(fail_at_changelog)
        with pytest.raises(RuntimeError, match="broker gone"):
            await chain.wait()
        return log

    # The sends behind passed the stage the failed one had passed, and no other.
    assert run(main) == ["behind messages", "further messages", "failed", "failed"]


def test_depth_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="depth"):
        SendChain(depth=0)
