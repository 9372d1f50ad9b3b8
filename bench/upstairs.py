"""Upstairs benchmark: `crutest perf` through three local downstairs, against
the storage engine alone doing the same IO (bench.engine) in the same run.

    .venv/bin/python -m bench.upstairs [--seconds 5] [--dir DIR]

Prints IOPS, MB/s and the ratio crutest/engine for 4 KiB random writes at
queue depth 32 and 1 MiB random writes at depth 8 (each ending with a flush).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.engine import Case, run_engine
from tests.support import Cluster

BIN = Path(sys.executable).parent


def crutest_perf(c: Cluster, size: int, depth: int, seconds: float) -> float:
    """Write IOPS reported by crutest perf."""
    r = subprocess.run(
        [
            str(BIN / "crutest"),
            "perf",
            *c.target_args(),
            "-q",
            "--io-size",
            str(size),
            "--io-depth",
            str(depth),
            "--time",
            str(seconds),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    m = re.search(r"perf write: .* ([0-9.]+) IOPS", r.stdout)
    if not m:
        raise RuntimeError(f"unexpected crutest output: {r.stdout}")
    print("  " + "\n  ".join(line for line in r.stdout.splitlines() if "perf" in line))
    return float(m.group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--dir", type=Path, default=None)
    p.add_argument("--size-mib", type=int, default=512)
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="crucible-bench-", dir=args.dir))
    bs = 4096
    es = (32 << 20) // bs
    ec = (args.size_mib << 20) // (es * bs)
    rows = []
    try:
        cluster = Cluster(
            base / "cluster",
            "--block-size",
            str(bs),
            "--extent-size",
            str(es),
            "--extent-count",
            str(ec),
        )
        try:
            cases = [(4096, 32), (1 << 20, 8)]
            for size, depth in cases:
                print(f"crutest perf --io-size {size} --io-depth {depth}:")
                up_iops = crutest_perf(cluster, size, depth, args.seconds)
                bufs = [os.urandom(size) for _ in range(8)]
                eng = run_engine(
                    Case(f"{size}", size, 1 << 40, "rand"),
                    base / "engine",
                    args.size_mib << 20,
                    bs,
                    bufs,
                    args.seconds,
                )
                shutil.rmtree(base / "engine")
                rows.append((size, depth, up_iops, eng.iops))
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(
        f"{'io size':>8} {'depth':>5} {'crutest IOPS':>12} {'MB/s':>8} {'engine IOPS':>11} "
        f"{'MB/s':>8} {'ratio':>6}"
    )
    for size, depth, up, eng_iops in rows:
        print(
            f"{size:8} {depth:5} {up:12.0f} {up * size / 1e6:8.1f} {eng_iops:11.0f} "
            f"{eng_iops * size / 1e6:8.1f} {up / eng_iops:6.2f}x"
        )


if __name__ == "__main__":
    main()
