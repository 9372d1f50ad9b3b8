"""Reconciliation benchmark: three 1 GiB regions whose every extent is dirty
and different, repaired at activation; against `cp` copying the same extent
files to the same destinations, in the same run.

    .venv/bin/python -m bench.reconcile [--size-mib 1024] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import xxhash

from crucible.common.definition import RegionDefinition
from crucible.protocol.messages import BlockContext
from crucible.region.layout import extent_path
from crucible.region.region import Region
from crucible.upstairs.guest import Upstairs
from tests.support import Cluster

BS = 4096
ES = (32 << 20) // BS  # 32 MiB extents


def make_regions(base: Path, size: int, diverge: bool = True) -> list[Path]:
    """Three regions with the same full data, then (`diverge`) one different
    dirty block in every extent of every region (no flush): all of them must
    be repaired."""
    ec = size // (BS * ES)
    image = os.urandom(1 << 20) * (BS * ES // (1 << 20))
    paths = []
    for i in range(3):
        path = base / f"ds{i}"
        region = Region.create(path, RegionDefinition(BS, ES, ec, uuid.uuid4()))
        for eid in range(ec):
            ctxs = [
                BlockContext(xxhash.xxh64_intdigest(image[j : j + BS]))
                for j in range(0, len(image), BS)
            ]
            region.write(eid * ES, ctxs, image)
        region.flush(1, 1)
        for eid in range(ec if diverge else 0):
            block = bytes([i + 1]) * BS
            region.write(eid * ES + i, [BlockContext(xxhash.xxh64_intdigest(block))], block)
        region.close()
        paths.append(path)
    return paths


async def activate(cluster: Cluster) -> tuple[float, int]:
    async with Upstairs(cluster.targets) as up:
        t0 = time.perf_counter()
        await up.activate(2)
        took = time.perf_counter() - t0
        repaired = up.core.activation.done
        await up.deactivate()
    return took, repaired


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--dir", type=Path, default=None)
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="crucible-bench-", dir=args.dir))
    try:
        print(f"preparing three {args.size_mib} MiB regions ...", flush=True)
        regions = make_regions(base, args.size_mib << 20)
        ec = (args.size_mib << 20) // (BS * ES)
        # cp: the source's extent files to two destinations, as the repair does.
        scratch = base / "cp"
        scratch.mkdir()
        subprocess.run(["sync"], check=True)  # the preparation's writes are not cp's cost
        t0 = time.perf_counter()
        for eid in range(ec):
            src = extent_path(regions[0], eid)
            for d in (1, 2):
                subprocess.run(["cp", str(src), str(scratch / f"{d}-{eid}")], check=True)
        subprocess.run(["sync"], check=True)
        cp_secs = time.perf_counter() - t0
        shutil.rmtree(scratch)

        subprocess.run(["sync"], check=True)
        cluster = Cluster(base, regions=regions)
        try:
            secs, repaired = asyncio.run(activate(cluster))
        finally:
            cluster.stop()
        moved = 2 * ec * ES * BS
        print(
            f"reconciliation: {repaired} extents ({moved >> 20} MiB copied) in {secs:.2f} s "
            f"= {moved / secs / 1e6:.0f} MB/s"
        )
        print(
            f"cp of the same files:               {cp_secs:.2f} s "
            f"= {moved / cp_secs / 1e6:.0f} MB/s"
        )
        print(f"ratio reconciliation/cp time: {secs / cp_secs:.2f}x (target <= 3x)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
