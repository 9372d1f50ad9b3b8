"""Fault benchmarks, each against a reference in the same run.

    .venv/bin/python -m bench.faults [--size-mib 1024] [--seconds 60] [--dir DIR]

memory:  the upstairs' resident memory while the guest writes 1 MiB blocks at
         queue depth 8 for --seconds with one downstairs stopped (it is
         faulted, its jobs skipped), against the same load with all three up.
repair:  live repair of a downstairs that missed a write in every extent of a
         --size-mib region, against `cp` of the same extent files plus sync;
         then the guest's 1 MiB write throughput while a repair runs, as a
         fraction of the same load without one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.reconcile import BS, ES, make_regions
from crucible.region.layout import extent_path
from crucible.upstairs.guest import Upstairs
from crucible.upstairs.options import Options
from tests.support import Cluster

IO = 1 << 20
DEPTH = 8


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def write_load(up: Upstairs, until: Callable[[], bool], on_tick: Callable[[], None]) -> int:
    """1 MiB writes at depth 8 over the volume until `until()`; bytes written."""
    blocks = IO // up.block_size
    slots = up.total_blocks // blocks
    written = 0
    payload = os.urandom(IO)

    async def worker(k: int) -> None:
        nonlocal written
        i = k
        while not until():
            await up.write((i % slots) * blocks, payload)
            written += IO
            i += DEPTH
            on_tick()

    await asyncio.gather(*(worker(k) for k in range(DEPTH)))
    await up.flush()
    return written


async def timed_load(up: Upstairs, seconds: float) -> tuple[float, int]:
    """The write load for `seconds`: peak RSS seen (MiB) and bytes written."""
    peak = rss_mib()
    end = time.monotonic() + seconds

    def sample() -> None:
        nonlocal peak
        peak = max(peak, rss_mib())

    n = await write_load(up, lambda: time.monotonic() > end, sample)
    return peak, n


async def memory(c: Cluster, seconds: float) -> None:
    async with Upstairs(c.targets) as up:
        await up.activate(3)
        for label, stop_one in (("all three up", False), ("one stopped", True)):
            if stop_one:
                c.stop(2)
            peak, n = await timed_load(up, seconds)
            state = up.info().downstairs[2].mode
            print(
                f"memory, {label:13s}: peak RSS {peak:.0f} MiB over {seconds:g} s of 1 MiB "
                f"writes QD{DEPTH} ({n / seconds / 1e6:.0f} MB/s; downstairs 2 {state}) "
                "- target < 256 MiB"
            )
        await up.deactivate()


async def fault_and_diverge(c: Cluster, up: Upstairs) -> None:
    """Stop downstairs 2, write a block in every extent so each one differs, and
    keep writing until it is faulted; then flush."""
    c.stop(2, signal.SIGKILL)
    ec = up.region.extent_count
    block = os.urandom(BS)
    while up.info().downstairs[2].mode != "faulted":
        for e in range(ec):
            await up.write(e * ES, block)
        await asyncio.sleep(0.01)
    for e in range(ec):
        await up.write(e * ES + 1, block)
    await up.flush()


def repaired(up: Upstairs, before: int) -> bool:
    info = up.info()
    return info.live_repairs > before and info.live_repair is None


async def repair(c: Cluster, size: int) -> tuple[float, float]:
    """Seconds for a live repair without guest IO, and the guest's throughput
    during a repair as a fraction of the same load without one."""
    async with Upstairs(c.targets, Options(offline_max_jobs=64)) as up:
        await up.activate(2)
        # The guest load alone first, for the comparison below.
        _, n = await timed_load(up, 10.0)
        alone = n / 10.0
        await fault_and_diverge(c, up)
        c.start(2)
        while up.info().live_repair is None:
            await asyncio.sleep(0.001)
        t0 = time.perf_counter()
        while not repaired(up, 0):
            await asyncio.sleep(0.001)
        secs = time.perf_counter() - t0
        print(f"live repair of {size >> 20} MiB (every extent copied): {secs:.2f} s")

        await fault_and_diverge(c, up)
        c.start(2)
        while up.info().live_repair is None:
            await asyncio.sleep(0.001)
        t0 = time.perf_counter()
        n = await write_load(up, lambda: repaired(up, 1), lambda: None)
        took = time.perf_counter() - t0
        during = n / took
        print(
            f"guest 1 MiB writes QD{DEPTH}: {alone / 1e6:.0f} MB/s alone, {during / 1e6:.0f} MB/s "
            f"during a live repair (which then took {took:.2f} s): "
            f"{during / alone:.2f} of the throughput"
        )
        await up.deactivate()
        return secs, during / alone


def cp_time(src: Path, ec: int, scratch: Path) -> float:
    scratch.mkdir()
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    for eid in range(ec):
        subprocess.run(["cp", str(extent_path(src, eid)), str(scratch / str(eid))], check=True)
    subprocess.run(["sync"], check=True)
    secs = time.perf_counter() - t0
    shutil.rmtree(scratch)
    return secs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--seconds", type=float, default=60.0, help="memory: seconds of writes")
    p.add_argument("--dir", type=Path, default=None)
    p.add_argument("--only", choices=["memory", "repair"], default=None)
    args = p.parse_args()
    size = args.size_mib << 20
    base = Path(tempfile.mkdtemp(prefix="crucible-bench-", dir=args.dir))
    try:
        print(f"preparing three {args.size_mib} MiB regions ...", flush=True)
        regions = make_regions(base, size, diverge=False)
        cluster = Cluster(base, regions=regions)
        try:
            if args.only in (None, "repair"):
                secs, _ = asyncio.run(repair(cluster, size))
                cp = cp_time(regions[0], size // (BS * ES), base / "cp")
                print(f"cp of the same extent files + sync: {cp:.2f} s")
                print(f"ratio live repair/cp time: {secs / cp:.2f}x (target <= 3x)")
            if args.only in (None, "memory"):
                asyncio.run(memory(cluster, args.seconds))
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
