"""crutest: workloads run through an upstairs against three downstairs, every
read checked against a verify log that can be saved and loaded across runs."""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from crucible.cli_util import fail, positive_int, progress, run_async
from crucible.common.errors import CrucibleError
from crucible.tools import dsc
from crucible.tools.common import activate, add_target_options, check_targets, target
from crucible.tools.verify_log import VerifyLog
from crucible.upstairs.guest import MAX_IO_BYTES, Upstairs
from crucible.upstairs.options import Options

PROG = "crutest"
log = logging.getLogger("crucible.crutest")


class VerifyError(Exception):
    pass


class WorkloadError(Exception):
    """The workload could not go on (a downstairs never came back, dsc is gone)."""


@dataclass
class Run:
    up: Upstairs
    vlog: VerifyLog
    rng: random.Random
    count: int
    args: argparse.Namespace
    gen: int = 1
    writes: int = 0
    reads: int = 0
    flushes: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def bs(self) -> int:
        return self.vlog.block_size

    @property
    def total(self) -> int:
        return self.vlog.total_blocks

    @property
    def max_blocks(self) -> int:
        return max(1, MAX_IO_BYTES // self.bs)

    async def write(self, start: int, count: int) -> None:
        data = self.vlog.next_data(start, count)
        await self.up.write(start, data)
        self.writes += 1
        self.bytes_written += len(data)

    async def read(self, start: int, count: int, allow_range: bool = False) -> None:
        data = await self.up.read(start, count)
        self.reads += 1
        self.bytes_read += len(data)
        problems = self.vlog.check(start, data, allow_range)
        if problems:
            more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
            raise VerifyError("; ".join(problems[:10]) + more)

    async def flush(self) -> None:
        await self.up.flush()
        self.flushes += 1
        self.vlog.commit()

    def snapshot(self, start: int, count: int) -> VerifyLog:
        """The verify log as it stands now, for a read whose answer comes later."""
        snap = VerifyLog(self.bs, self.total)
        snap.current[start : start + count] = self.vlog.current[start : start + count]
        return snap

    def random_range(self, max_blocks: int) -> tuple[int, int]:
        n = self.rng.randint(1, min(max_blocks, self.total))
        return self.rng.randrange(self.total - n + 1), n

    async def verify_all(self, allow_range: bool = False) -> None:
        step = self.max_blocks
        with progress(self.total * self.bs, "B", "verify") as bar:
            for start in range(0, self.total, step):
                n = min(step, self.total - start)
                await self.read(start, n, allow_range)
                bar.update(n * self.bs)


Workload = Callable[[Run], Awaitable[None]]


async def one(run: Run) -> None:
    start, n = run.random_range(1)
    await run.write(start, n)
    await run.flush()
    await run.read(start, n)


async def fill(run: Run) -> None:
    with progress(run.total * run.bs, "B", "fill") as bar:
        for start in range(0, run.total, run.max_blocks):
            n = min(run.max_blocks, run.total - start)
            await run.write(start, n)
            bar.update(n * run.bs)
    await run.flush()
    await run.verify_all()


async def big(run: Run) -> None:
    """Write, flush and read back the volume in 1 MiB pieces."""
    with progress(run.total * run.bs, "B", "big") as bar:
        for start in range(0, run.total, run.max_blocks):
            n = min(run.max_blocks, run.total - start)
            await run.write(start, n)
            await run.flush()
            await run.read(start, n)
            bar.update(n * run.bs)


async def rand(run: Run) -> None:
    """Random writes and reads of random sizes, each read verified."""
    with progress(run.count, "op", "rand") as bar:
        for _ in range(run.count):
            start, n = run.random_range(64)
            if run.rng.random() < 0.6:
                await run.write(start, n)
            else:
                await run.read(start, n)
            bar.update(1)
    await run.flush()


async def burst(run: Run) -> None:
    """Bursts of writes in flight together, then a flush and a read of each."""
    with progress(run.count, "burst", "burst") as bar:
        for _ in range(run.count):
            ranges = [run.random_range(16) for _ in range(16)]
            for start, n in ranges:  # queued back to back, acked on queueing
                await run.write(start, n)
            await run.flush()
            await asyncio.gather(*(run.read(s, n) for s, n in ranges))
            bar.update(1)


async def span(run: Run) -> None:
    """IO across every extent boundary."""
    r = run.up.core.region
    assert r is not None
    es = r.extent_size
    for boundary in range(es, run.total, es):
        start = max(0, boundary - 1)
        n = min(2 if es > 1 else 1, run.total - start)
        await run.write(start, n)
        await run.read(start, n)
    if run.total > 2 * es:
        await run.write(es // 2, 2 * es)
        await run.read(es // 2, 2 * es)
    await run.flush()
    await run.verify_all()


async def dep(run: Run) -> None:
    """Overlapping writes and reads in flight together: a read sees exactly
    the writes queued before it, never one queued after."""
    with progress(run.count, "round", "dep") as bar:
        for _ in range(run.count):
            base, width = run.random_range(8)
            pending: list[tuple[asyncio.Task[bytes], VerifyLog, int, int]] = []
            for _ in range(20):
                start = base + run.rng.randrange(width)
                n = run.rng.randint(1, base + width - start)
                if run.rng.random() < 0.4:
                    expect = run.snapshot(start, n)
                    task = asyncio.ensure_future(run.up.read(start, n))
                    await asyncio.sleep(0)  # let it queue before the next write
                    pending.append((task, expect, start, n))
                else:
                    await run.write(start, n)
            for task, expect, start, n in pending:
                got = await task
                run.reads += 1
                run.bytes_read += len(got)
                problems = expect.check(start, got)
                if problems:
                    raise VerifyError(
                        f"read of blocks {start}..{start + n} does not hold what was "
                        f"queued before it: {problems[0]}"
                    )
            bar.update(1)
    await run.flush()


async def random_op(run: Run, max_blocks: int = 10) -> None:
    """A write, read or flush of up to `max_blocks` blocks, chosen at random."""
    p = run.rng.random()
    start, n = run.random_range(max_blocks)
    if p < 0.45:
        await run.write(start, n)
    elif p < 0.9:
        await run.read(start, n)
    else:
        await run.flush()


async def generic(run: Run) -> None:
    """Random writes, reads and flushes, one at a time, up to 10 blocks each."""
    with progress(run.count, "op", "generic") as bar:
        for _ in range(run.count):
            await random_op(run)
            bar.update(1)


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
    ports = [t[1] for t in run.args.target]
    pairs = [(d["cid"], ports.index(d["port"])) for d in fleet if d["port"] in ports]
    if not pairs:
        raise WorkloadError("dsc runs none of the targets given with -t")
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
    """Replace the last -t downstairs with the empty one at --replacement while
    IO runs; live repair fills it, then everything is verified."""
    new = run.args.replacement
    old = run.args.target[-1]
    for _ in range(run.count):
        await random_op(run)
    before = run.up.info().live_repairs
    await run.up.replace(old, new)
    await io_until(run, _repaired_since(run, before), f"live repair of {new[0]}:{new[1]}")
    await run.verify_all()
    run.notes.append(f"replaced {old[0]}:{old[1]} with {new[0]}:{new[1]}")


async def deactivate(run: Run) -> None:
    """Activate, do IO, deactivate, bump the generation, repeat; data survives."""
    with progress(run.count, "round", "deactivate") as bar:
        for _ in range(run.count):
            touched = [run.random_range(16) for _ in range(8)]
            for start, n in touched:
                await run.write(start, n)
            await run.up.deactivate()  # flushes first
            run.vlog.commit()
            run.gen += 1
            await run.up.activate(run.gen)
            for start, n in touched:
                await run.read(start, n)
            bar.update(1)


async def verify(run: Run) -> None:
    if run.args.verify_in is None:
        raise VerifyError("the verify workload needs --verify-in FILE")
    # --verify-in already read and checked the whole volume before the workload.


async def perf(run: Run) -> None:
    """IOPS and bandwidth at a chosen IO size and queue depth."""
    size = run.args.io_size
    if size % run.bs:
        raise VerifyError(f"--io-size {size} is not a multiple of the block size {run.bs}")
    n = size // run.bs
    slots = run.total // n
    if slots < 1:
        raise VerifyError(f"--io-size {size} is larger than the volume")
    depth = run.args.io_depth
    payload = bytes(run.rng.getrandbits(8) for _ in range(size))
    results = []
    for kind in ("write", "read"):
        flushes_before = run.flushes
        done, secs = await _perf_phase(run, kind, n, slots, depth, payload)
        results.append((kind, done, secs, run.flushes - flushes_before))
    for kind, done, secs, fl in results:
        line = (
            f"perf {kind}: {done} IOs of {size} bytes at depth {depth} in {secs:.2f} s: "
            f"{done / secs:.0f} IOPS, {done * size / secs / 1e6:.1f} MB/s, "
            f"{fl} guest flushes"
        )
        run.notes.append(line)


async def _perf_phase(
    run: Run, kind: str, n: int, slots: int, depth: int, payload: bytes
) -> tuple[int, float]:
    done = 0
    deadline = time.monotonic() + run.args.time

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < deadline and done < run.count:
            done += 1
            block = run.rng.randrange(slots) * n
            if kind == "write":
                await run.up.write(block, payload)
            else:
                await run.up.read(block, n)

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(depth)))
    if kind == "write":
        await run.up.flush()  # honest: the data is durable when the clock stops
        run.flushes += 1
    return done, time.monotonic() - t0


WORKLOADS: dict[str, Workload] = {
    "one": one,
    "fill": fill,
    "big": big,
    "rand": rand,
    "burst": burst,
    "span": span,
    "dep": dep,
    "generic": generic,
    "verify": verify,
    "perf": perf,
    "deactivate": deactivate,
    "replay": replay,
    "repair": repair,
    "replace": replace,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("workload", choices=sorted(WORKLOADS), help="what to run")
    add_target_options(p)
    p.add_argument(
        "-c",
        "--count",
        type=positive_int,
        default=None,
        help="operations, rounds or bursts (default depends on the workload)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    p.add_argument("--verify-out", type=Path, help="save the verify log here at the end")
    p.add_argument(
        "--verify-in",
        type=Path,
        help="load a verify log and check the whole volume against it first",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (printed if not given)")
    p.add_argument("--io-size", type=positive_int, default=4096, help="perf: bytes per IO")
    p.add_argument("--io-depth", type=positive_int, default=32, help="perf: IOs in flight")
    p.add_argument("--time", type=float, default=5.0, help="perf: seconds per phase")
    p.add_argument(
        "--read-only",
        action="store_true",
        help="open the volume read-only (downstairs run with --mode ro)",
    )
    p.add_argument(
        "--dsc",
        type=target,
        metavar="HOST:PORT",
        help="replay, repair: the control API of the dsc running the downstairs",
    )
    p.add_argument(
        "--kill", action="store_true", help="replay: SIGKILL the downstairs instead of a stop"
    )
    p.add_argument(
        "--replacement",
        type=target,
        metavar="HOST:PORT",
        help="replace: a downstairs with an empty region to take the last target's place",
    )
    p.add_argument(
        "--no-deactivate",
        action="store_true",
        help="end without the final flush and deactivation (leaves work unflushed)",
    )
    return p


DEFAULT_COUNTS = {
    "rand": 200,
    "burst": 10,
    "dep": 20,
    "generic": 500,
    "perf": 1 << 62,
    "deactivate": 5,
    "replay": 5,
    "repair": 1,
    "replace": 200,
}


def main() -> None:
    p = build_parser()
    args = p.parse_args()
    check_targets(p, args.target)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(message)s",
        stream=sys.stdout,
    )
    if args.verify_out is not None and args.workload == "perf":
        p.error("perf writes data the verify log does not track; drop --verify-out")
    if args.workload in ("replay", "repair") and args.dsc is None:
        p.error(f"{args.workload} needs --dsc HOST:PORT, the control API of a running dsc")
    if args.workload == "replace" and args.replacement is None:
        p.error("replace needs --replacement HOST:PORT, a downstairs with an empty region")
    try:
        code = run_async(_main(args))
    except CrucibleError as e:
        fail(PROG, str(e.detail or e))
    except VerifyError as e:
        fail(PROG, f"verify failed: {e}")
    except WorkloadError as e:
        fail(PROG, str(e))
    except ValueError as e:
        fail(PROG, str(e))
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


async def _main(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    async with Upstairs(args.target, Options(read_only=args.read_only)) as up:
        gen = await activate(up, args.gen, args.activate_timeout)
        info = up.info()
        if args.verify_in is not None:
            vlog = VerifyLog.load(args.verify_in)
            if (vlog.block_size, vlog.total_blocks) != (up.block_size, up.total_blocks):
                raise ValueError(
                    f"verify log {args.verify_in} is for {vlog.total_blocks} "
                    f"blocks of {vlog.block_size}, the volume has "
                    f"{up.total_blocks} of {up.block_size}"
                )
        else:
            vlog = VerifyLog(up.block_size, up.total_blocks)
        count = args.count or DEFAULT_COUNTS.get(args.workload, 1)
        run = Run(up, vlog, random.Random(seed), count, args, gen)
        if args.verify_out is not None:
            vlog.journal_to(args.verify_out)  # survives a kill: every write is logged first
        print(
            f"crutest {args.workload}: gen {gen}, seed {seed}, {up.total_blocks} blocks of "
            f"{up.block_size} bytes ({info.extent_count} extents of "
            f"{info.extent_size})"
        )
        t0 = time.monotonic()
        if args.verify_in is not None:
            await run.verify_all(allow_range=True)
            print(f"volume matches verify log {args.verify_in}")
        await WORKLOADS[args.workload](run)
        if not args.no_deactivate and not args.read_only:
            await run.flush()
        if args.verify_out is not None:
            vlog.save(args.verify_out)
            print(f"verify log saved to {args.verify_out}")
        if not args.no_deactivate:
            await up.deactivate()
        secs = time.monotonic() - t0
        for note in run.notes:
            print(note)
        print(
            f"done: {run.writes} writes ({run.bytes_written} bytes), {run.reads} reads "
            f"({run.bytes_read} bytes), {run.flushes} flushes in {secs:.2f} s; "
            f"integrity errors: {up.info().integrity_errors}"
        )
    return 0


if __name__ == "__main__":
    main()
