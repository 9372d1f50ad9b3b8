"""The pantry keeps a bounded number of jobs: results nobody asked for are
forgotten oldest first; with every kept job still running, a new one is
refused."""

from __future__ import annotations

import asyncio

import pytest

from crucible.pantry import service
from crucible.pantry.service import Job, Pantry, PantryError


async def nothing(job: Job) -> None:
    return None


def test_jobs_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "MAX_JOBS", 3)

    async def go() -> None:
        p = Pantry()
        for i in range(3):
            p.start_job(f"j{i}", "nothing", nothing)
        await asyncio.sleep(0)  # they finish
        p.start_job("j3", "nothing", nothing)
        assert sorted(p.jobs) == ["j1", "j2", "j3"]  # j0 forgotten
        stop = asyncio.Event()

        async def wait(job: Job) -> None:
            await stop.wait()

        for jid in list(p.jobs):
            del p.jobs[jid]
        for i in range(3):
            p.start_job(f"w{i}", "waiting", wait)
        with pytest.raises(PantryError) as e:
            p.start_job("w3", "waiting", wait)
        assert e.value.status == 503
        stop.set()
        await asyncio.gather(*(j.task for j in p.jobs.values()))

    asyncio.run(go())
