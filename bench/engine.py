"""Storage-engine benchmark (like Crucible's dynamometer): region writes with a
flush every N writes, against os.pwrite + fsync of the same bytes to a plain
file, in the same run. Prints bandwidth, IOPS and the ratio engine/raw.

    .venv/bin/python -m bench.engine [--seconds 5] [--dir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import xxhash

from crucible.common.definition import RegionDefinition
from crucible.protocol.messages import BlockContext
from crucible.region.region import Region


@dataclass
class Case:
    name: str
    io_bytes: int
    flush_every: int
    pattern: str  # "seq" or "rand"


@dataclass
class Result:
    case: str
    target: str
    ios: int
    seconds: float

    @property
    def iops(self) -> float:
        return self.ios / self.seconds

    def mib_s(self, io_bytes: int) -> float:
        return self.iops * io_bytes / (1 << 20)


CASES = [
    Case("4KiB seq, flush/32", 4096, 32, "seq"),
    Case("4KiB rand, flush/32", 4096, 32, "rand"),
    Case("1MiB seq, flush/8", 1 << 20, 8, "seq"),
]


def offsets(case: Case, total: int, count: int, seed: int) -> list[int]:
    slots = total // case.io_bytes
    if case.pattern == "seq":
        return [(i % slots) * case.io_bytes for i in range(count)]
    import random

    rng = random.Random(seed)
    return [rng.randrange(slots) * case.io_bytes for _ in range(count)]


def timed(
    seconds: float, step: Callable[[int], None], flush: Callable[[], None], flush_every: int
) -> tuple[int, float]:
    """Run step(i) until `seconds` pass, flushing every N and at the end."""
    start = time.perf_counter()
    i = 0
    while True:
        step(i)
        i += 1
        if i % flush_every == 0:
            flush()
        if time.perf_counter() - start >= seconds:
            break
    if i % flush_every:
        flush()
    return i, time.perf_counter() - start


def run_raw(case: Case, path: Path, total: int, bufs: list[bytes], seconds: float) -> Result:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, total)
        os.fsync(fd)
        offs = offsets(case, total, 1 << 16, 1)

        def step(i: int) -> None:
            os.pwrite(fd, bufs[i % len(bufs)], offs[i % len(offs)])

        n, secs = timed(seconds, step, lambda: os.fsync(fd), case.flush_every)
    finally:
        os.close(fd)
    return Result(case.name, "raw pwrite+fsync", n, secs)


def run_engine(
    case: Case, directory: Path, total: int, bs: int, bufs: list[bytes], seconds: float
) -> Result:
    extent_size = (32 << 20) // bs
    region = Region.create(
        directory, RegionDefinition(bs, extent_size, total // (bs * extent_size), uuid.uuid4())
    )
    try:
        # Contexts come from the upstairs; build them outside the timed loop.
        ctxs = [
            [BlockContext(xxhash.xxh64_intdigest(b[i : i + bs])) for i in range(0, len(b), bs)]
            for b in bufs
        ]
        offs = offsets(case, total, 1 << 16, 1)
        flush_no = [0]

        def step(i: int) -> None:
            k = i % len(bufs)
            region.write(offs[i % len(offs)] // bs, ctxs[k], bufs[k])

        def flush() -> None:
            flush_no[0] += 1
            region.flush(flush_no[0], 1)

        n, secs = timed(seconds, step, flush, case.flush_every)
    finally:
        region.close()
    return Result(case.name, "crucible engine", n, secs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="time per case and target")
    p.add_argument("--size-mib", type=int, default=512, help="region and file size")
    p.add_argument("--block-size", type=int, default=4096)
    p.add_argument("--dir", type=Path, default=None, help="where to put the files (default: tmp)")
    p.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="crucible-bench-", dir=args.dir))
    total = args.size_mib << 20
    rows = []
    try:
        for case in CASES:
            bufs = [os.urandom(case.io_bytes) for _ in range(8)]
            raw = run_raw(case, base / "raw.img", total, bufs, args.seconds)
            (base / "raw.img").unlink()
            eng = run_engine(case, base / "region", total, args.block_size, bufs, args.seconds)
            shutil.rmtree(base / "region")
            ratio = eng.iops / raw.iops
            rows.append((case, raw, eng, ratio))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(
        f"{'case':22} {'raw MiB/s':>10} {'raw IOPS':>9} {'eng MiB/s':>10} {'eng IOPS':>9} "
        f"{'ratio':>6}"
    )
    for case, raw, eng, ratio in rows:
        print(
            f"{case.name:22} {raw.mib_s(case.io_bytes):10.1f} {raw.iops:9.0f} "
            f"{eng.mib_s(case.io_bytes):10.1f} {eng.iops:9.0f} {ratio:6.2f}x"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                [
                    {"case": asdict(c), "raw_iops": r.iops, "engine_iops": e.iops, "ratio": q}
                    for c, r, e, q in rows
                ],
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
