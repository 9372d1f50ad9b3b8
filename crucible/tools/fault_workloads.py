"""crutest's fault workloads: downstairs stopped, killed, restarted and
replaced through dsc while IO goes on; then the whole volume is verified.
Each drives one region's upstairs (`Run.up`: -t, or a VCR of one region)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from crucible.cli_util import progress
from crucible.tools import dsc
from crucible.tools.workloads import Run, WorkloadError, random_op

FAULT_WAIT = 180.0  # seconds a downstairs may take to go away or come back


async def io_until(run: Run, done: Callable[[], bool], what: str, max_blocks: int = 10) -> None:
    """Keep random IO going until `done()`; fail after FAULT_WAIT seconds."""
    deadline = time.monotonic() + FAULT_WAIT
    while not done():
        if time.monotonic() > deadline:
            states = ", ".join(f"{d.target} {d.state}" for d in run.up.info().downstairs)
            raise WorkloadError(f"{what} did not happen within {FAULT_WAIT:g} s ({states})")
        await random_op(run, max_blocks)
        await asyncio.sleep(0)


def _states(run: Run) -> list[str]:
    return [d.state for d in run.up.info().downstairs]


def _all_active(run: Run, repairs_before: int = -1) -> bool:
    """All three active, no repair running, and more repairs done than before."""
    info = run.up.info()  # one snapshot: info() walks the job table
    states = [d.state for d in info.downstairs]
    return (
        states == ["active"] * 3 and info.live_repair is None and info.live_repairs > repairs_before
    )


async def _dsc(run: Run, method: str, path: str) -> object:
    try:
        return await asyncio.to_thread(dsc.request, run.args.dsc, method, path)
    except dsc.DscError as e:
        raise WorkloadError(f"dsc: {e}") from None


async def _dsc_client(run: Run) -> tuple[int, int]:
    """A random downstairs: its dsc id and our client index (matched by port)."""
    fleet = await _dsc(run, "GET", "/list")
    assert isinstance(fleet, list)
    ports = [t[1] for t in run.targets]
    pairs = [(d["cid"], ports.index(d["port"])) for d in fleet if d["port"] in ports]
    if not pairs:
        raise WorkloadError("dsc runs none of the region's three downstairs")
    return run.rng.choice(pairs)


def _repaired_since(run: Run, before: int) -> Callable[[], bool]:
    return lambda: _all_active(run, before)


async def replay(run: Run) -> None:
    """Stop a downstairs through dsc while IO runs, start it again (it is
    replayed, or live-repaired if it missed too much); --count cycles."""
    with progress(run.count, "cycle", "replay") as bar:
        for _ in range(run.count):
            await _replay_cycle(run)
            bar.update(1)
    await run.verify_all()


async def _replay_cycle(run: Run) -> None:
    cid, i = await _dsc_client(run)
    await _dsc(run, "POST", f"/{'kill' if run.args.kill else 'stop'}/cid/{cid}")
    await io_until(run, lambda: _states(run)[i] != "active", f"downstairs {cid} going away")
    for _ in range(run.rng.randrange(50)):
        await random_op(run)
    await _dsc(run, "POST", f"/start/cid/{cid}")
    await io_until(run, lambda: _all_active(run), f"downstairs {cid} coming back")


async def repair(run: Run) -> None:
    """Stop a downstairs, write until it is faulted, start it, and verify while
    live repair brings it back under IO; --count cycles."""
    with progress(run.count, "cycle", "repair") as bar:
        for _ in range(run.count):
            await _repair_cycle(run)
            bar.update(1)
    await run.verify_all()
    run.notes.append(f"live repairs: {run.up.info().live_repairs}")


async def _repair_cycle(run: Run) -> None:
    cid, i = await _dsc_client(run)
    before = run.up.info().live_repairs
    await _dsc(run, "POST", f"/stop/cid/{cid}")

    def faulted() -> bool:
        return run.up.info().downstairs[i].mode == "faulted"

    await io_until(run, faulted, f"downstairs {cid} being faulted", run.max_blocks)
    await _dsc(run, "POST", f"/start/cid/{cid}")
    await io_until(run, _repaired_since(run, before), f"live repair of downstairs {cid}")


async def replace(run: Run) -> None:
    """Replace the region's last downstairs with the empty one at --replacement while
    IO runs; live repair fills it, then everything is verified."""
    new = run.args.replacement
    old = run.targets[-1]
    for _ in range(run.count):
        await random_op(run)
    before = run.up.info().live_repairs
    await run.up.replace(old, new)
    await io_until(run, _repaired_since(run, before), f"live repair of {new[0]}:{new[1]}")
    await run.verify_all()
    run.notes.append(f"replaced {old[0]}:{old[1]} with {new[0]}:{new[1]}")
