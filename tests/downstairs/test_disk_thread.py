"""The downstairs' disk thread: calls run in order off the loop, results and
exceptions come back, and closing waits for the call in hand."""

from __future__ import annotations

import asyncio
import threading

import pytest

from crucible.downstairs.disk_thread import DiskThread


def test_calls_run_in_order_on_another_thread() -> None:
    async def go() -> list[object]:
        disk = DiskThread()
        seen: list[tuple[int, str]] = []

        def call(i: int) -> int:
            seen.append((i, threading.current_thread().name))
            return i * 2

        try:
            results = await asyncio.gather(*(disk.run(call, i) for i in range(50)))
        finally:
            disk.close()
        assert [i for i, _ in seen] == list(range(50))
        assert {name for _, name in seen} == {"disk"}
        return list(results)

    assert asyncio.run(go()) == [i * 2 for i in range(50)]


def test_an_exception_reaches_the_caller_and_the_thread_goes_on() -> None:
    def fail() -> None:
        raise OSError(28, "No space left on device")

    async def go() -> str:
        disk = DiskThread()
        try:
            with pytest.raises(OSError, match="No space left"):
                await disk.run(fail)
            return await disk.run(str, 7)
        finally:
            disk.close()

    assert asyncio.run(go()) == "7"


def test_a_cancelled_wait_leaves_the_call_to_finish_and_close_waits_for_it() -> None:
    started, release = threading.Event(), threading.Event()
    done: list[bool] = []

    def slow() -> None:
        started.set()
        release.wait(60)
        done.append(True)

    async def go() -> None:
        disk = DiskThread()
        fut = disk.run(slow)
        await asyncio.to_thread(started.wait, 60)
        fut.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fut
        release.set()
        disk.close()  # the call in hand finishes first
        assert done == [True]

    asyncio.run(go())
