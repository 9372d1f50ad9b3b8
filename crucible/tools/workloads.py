"""crutest's workloads: IO patterns through the volume's guest API (one
region's upstairs itself, or a volume of several and perhaps a read-only
parent), every read checked against the verify log. The workloads that need
one region's upstairs by nature (verify-replicas here; the fault workloads)
use `Run.up`, which the tool only offers for a volume of one region."""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from crucible.cli_util import progress
from crucible.protocol.wire import SocketAddr
from crucible.tools.common import region_starts
from crucible.tools.verify_log import VerifyLog
from crucible.upstairs.blockio import BlockIO, ReadResult, settle
from crucible.upstairs.guest import MAX_IO_BYTES, Upstairs
from crucible.volume.build import VolumeParts

MIB = 1 << 20


class VerifyError(Exception):
    pass


class WorkloadError(Exception):
    """The workload could not go on (a downstairs never came back, dsc is gone)."""


@dataclass
class Run:
    parts: VolumeParts
    vlog: VerifyLog
    rng: random.Random
    count: int
    args: argparse.Namespace
    gens: list[int] = field(default_factory=list)  # each region's generation
    writes: int = 0
    reads: int = 0
    flushes: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def dev(self) -> BlockIO:
        """What the guest drives: the whole volume (one region's upstairs
        itself when that is all there is)."""
        return self.parts.device

    @property
    def up(self) -> Upstairs:
        """The one region's upstairs, for a workload that drives it."""
        if len(self.parts.regions) != 1:
            raise WorkloadError(f"{len(self.parts.regions)} regions, not the one expected")
        return self.parts.regions[0][0]

    @property
    def targets(self) -> list[SocketAddr]:
        """The one region's three downstairs (-t's, or its VCR's)."""
        region = self.parts.regions[0][1] if len(self.parts.regions) == 1 else None
        return list(region.opts.target) if region else list(self.args.target)

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
        await self.dev.write(start, data)
        self.writes += 1
        self.bytes_written += len(data)

    async def read(self, start: int, count: int, allow_range: bool = False) -> None:
        data = await self.dev.read(start, count)
        self.reads += 1
        self.bytes_read += len(data)
        problems = self.vlog.check(start, data, allow_range)
        if problems:
            more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
            raise VerifyError("; ".join(problems[:10]) + more)

    async def flush(self) -> None:
        await self.dev.flush()
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
    """IO across every extent boundary (in a volume of several regions, the
    boundaries between them too), then pieces of two extents across the first
    boundary and across each sub-volume boundary."""
    if not run.parts.regions:
        raise WorkloadError("span: the volume has no region to write to")
    es = run.parts.regions[0][0].region.extent_size
    for boundary in extent_starts(run.parts)[1:]:
        start = max(0, boundary - 1)
        n = min(2 if es > 1 else 1, run.total - start)
        await run.write(start, n)
        await run.read(start, n)
    if run.total > 2 * es:
        await run.write(es // 2, 2 * es)
        await run.read(es // 2, 2 * es)
    for boundary in region_starts(run.parts)[1:]:
        start = max(0, boundary - es)
        n = min(2 * es, run.total - start)
        await run.write(start, n)
        await run.read(start, n)
    await run.flush()
    await run.verify_all()


def extent_starts(parts: VolumeParts) -> list[int]:
    """The block at which each extent starts: every sub-volume's in turn."""
    out: list[int] = []
    for (up, _), start in zip(parts.regions, region_starts(parts), strict=True):
        r = up.region
        out += range(start, start + r.total_blocks, r.extent_size)
    return out


async def dep(run: Run) -> None:
    """Overlapping writes and reads in flight together: a read sees exactly
    the writes queued before it, never one queued after."""
    with progress(run.count, "round", "dep") as bar:
        for _ in range(run.count):
            base, width = run.random_range(8)
            pending: list[tuple[asyncio.Future[ReadResult], VerifyLog, int, int]] = []
            for _ in range(20):
                start = base + run.rng.randrange(width)
                n = run.rng.randint(1, base + width - start)
                if run.rng.random() < 0.4:
                    expect = run.snapshot(start, n)
                    read: asyncio.Future[ReadResult] = asyncio.get_running_loop().create_future()
                    run.dev.submit_read(start, n, settle(read))
                    # Queued now; a volume over a parent queues its pieces a step later.
                    await asyncio.sleep(0)
                    pending.append((read, expect, start, n))
                else:
                    await run.write(start, n)
            for read, expect, start, n in pending:
                data, _ = await read
                got = bytes(data)
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


async def snapshot(run: Run) -> None:
    """--count times: a few random writes, then a flush that every downstairs
    records as a snapshot (crutest-ID-N, listed by `crucible-downstairs
    snapshot list`); then every block read back."""
    tag = uuid.uuid4().hex[:8]
    with progress(run.count, "snapshot", "snapshot") as bar:
        for i in range(run.count):
            for _ in range(run.rng.randint(1, 8)):
                await run.write(*run.random_range(10))
            name = f"crutest-{tag}-{i}"
            await run.dev.flush(snapshot=name)
            run.flushes += 1
            run.vlog.commit()
            bar.update(1)
    run.notes.append(f"snapshots crutest-{tag}-0 .. crutest-{tag}-{run.count - 1}")
    await run.verify_all()


async def deactivate(run: Run) -> None:
    """Activate, do IO, deactivate, bump the generation, repeat; data survives.
    In a volume every region goes down and up again (and the parent's scrub
    stops meanwhile, going on where it was)."""
    with progress(run.count, "round", "deactivate") as bar:
        for _ in range(run.count):
            touched = [run.random_range(16) for _ in range(8)]
            for start, n in touched:
                await run.write(start, n)
            await run.parts.deactivate()  # each region flushes first
            run.vlog.commit()
            run.gens = [g + 1 for g in run.gens]
            for (up, _), gen in zip(run.parts.regions, run.gens, strict=True):
                await up.activate(gen)
            run.parts.volume.start_scrub()
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
                await run.dev.write(block, payload)
            else:
                await run.dev.read(block, n)

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(depth)))
    if kind == "write":
        await run.dev.flush()  # honest: the data is durable when the clock stops
        run.flushes += 1
    return done, time.monotonic() - t0


async def verify_replicas(run: Run) -> None:
    """Compare the three replicas over the whole volume (--verify-rate MiB/s,
    0: no limit); a replica differing from the two others is rewritten.
    Fails if blocks were found on which no two replicas agree."""
    up = run.up
    rate = run.args.verify_rate * MIB
    t0 = time.monotonic()
    pass_ = asyncio.ensure_future(up.verify_replicas(rate))
    with progress(run.total, "block", "verify-replicas") as bar:
        while not pass_.done():
            await asyncio.wait([pass_], timeout=0.2)
            v = up.info().verify
            bar.n = run.total if pass_.done() else v.position
            bar.refresh()
    status = pass_.result()
    await run.flush()  # the rewrites are done once it is
    secs = time.monotonic() - t0
    info = up.info()
    run.notes.append(
        f"verify-replicas: {run.total} blocks compared on 3 replicas in {secs:.2f} s: "
        f"{status.divergent} differing, {info.blocks_rewritten} rewritten, "
        f"{status.unresolved} on which no two replicas agree"
    )
    if status.unresolved:
        raise WorkloadError(
            f"{status.unresolved} blocks differ on every replica: see the log for where"
        )
