"""Volumes: the scrub of a read-only parent against cp of it, the latency of
a snapshot, and the guest's write throughput while a scrub runs, each in
the same run as its baseline.

    .venv/bin/python -m bench.volume [--size-mib 1024] [--repeat 3] [--runtime 8]

1. A parent file of SIZE (random data) under a volume of fresh regions:
   seconds until the scrub has copied it in, against `cp` of the file and
   `sync` (target: within 3x of cp).
2. A snapshot through the control API of a volume holding SIZE of data:
   seconds until it is taken, and whether the filesystem cloned (reflink).
3. fio random 4 KiB writes (QD32) through NBD while the scrub runs slowed
   down, as a fraction of the same with no parent (target: >= 0.7).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.nbd import fio
from crucible.cli_util import stop_process
from tests.support import BIN, Cluster, free_port, run_tool, wait_listening

EXTENT = 8192  # blocks of 4 KiB: 32 MiB extents


@contextmanager
def volume(
    base: Path, size: int, *nbd_args: str, parent: Path | None = None
) -> Iterator[tuple[str, int, Path]]:
    """crucible-nbd over fresh regions (and a parent file): (URI, control port, log)."""
    ec = -(-size // (4096 * EXTENT))
    c = Cluster(base / "v", "--block-size", "4096", "--extent-size", str(EXTENT),
                "--extent-count", str(ec))  # fmt: skip
    try:
        extra = ["--parent-file", str(parent)] if parent else []
        vcr = base / "vol.json"
        r = run_tool("crucible-vcr", "create", *c.target_args(), *extra, "-o", str(vcr))
        assert r.returncode == 0, r.stderr
        port, ctl = free_port(), free_port()
        log = base / f"nbd-{port}.log"
        with open(log, "wb") as out:
            nbd = subprocess.Popen(
                [str(BIN / "crucible-nbd"), "--vcr", str(vcr), "-p", str(port), "--verify-rate",
                 "0", "--control", f"127.0.0.1:{ctl}", *nbd_args], stdout=out, stderr=out,
            )  # fmt: skip
            try:
                wait_listening(port, nbd, timeout=120)
                yield f"nbd://127.0.0.1:{port}/", ctl, log
            finally:
                stop_process(nbd, timeout=120)
    finally:
        c.stop()
        shutil.rmtree(base / "v", ignore_errors=True)


def wait_for(log: Path, text: str, limit: float = 3600) -> float:
    start = time.monotonic()
    while text not in log.read_text():
        if time.monotonic() - start > limit:
            sys.exit(f"bench.volume: no {text!r} after {limit} s")
        time.sleep(0.05)
    return time.monotonic() - start


def cp_seconds(src: Path, base: Path) -> float:
    dst = base / "copy.raw"
    start = time.monotonic()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    subprocess.run(["sync"], check=True)
    took = time.monotonic() - start
    dst.unlink()
    return took


def scrub_seconds(base: Path, size: int, parent: Path) -> float:
    with volume(base, size, parent=parent) as (_, _, log):
        start = time.monotonic()
        wait_for(log, "scrub: copying")
        wait_for(log, "the parent is dropped")
        return time.monotonic() - start


def snapshot_seconds(base: Path, size: int, parent: Path) -> float:
    with volume(base, size, parent=parent) as (_, ctl, log):
        wait_for(log, "the parent is dropped")  # the volume holds SIZE of data
        body = json.dumps({"name": "b"}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{ctl}/snapshot", data=body, method="POST")
        start = time.monotonic()
        urllib.request.urlopen(req, timeout=3600).read()
        return time.monotonic() - start


def writes(uri: str, runtime: float) -> float:
    """MB/s of fio's random 4 KiB writes at QD32 over the first 256 MiB."""
    return fio(uri, "w", "randwrite", "4k", 32, 256, runtime)["mb_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024, help="the parent's size")
    ap.add_argument("--repeat", type=int, default=3, help="rounds")
    ap.add_argument("--runtime", type=float, default=8.0, help="seconds of fio per run")
    ap.add_argument("--dir", type=Path, default=None, help="where the regions go (default: /tmp)")
    args = ap.parse_args()
    if args.size_mib < 64 or args.repeat < 1:
        sys.exit("bench.volume: --size-mib >= 64, --repeat >= 1")
    base = Path(tempfile.mkdtemp(prefix="crucible-bench-volume-", dir=args.dir))
    size = args.size_mib << 20
    results: dict[str, list[float]] = {k: [] for k in ("cp", "scrub", "snap", "alone", "scrubbing")}
    try:
        parent = base / "parent.raw"
        with open(parent, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        for rnd in range(args.repeat):
            results["cp"].append(cp_seconds(parent, base))
            results["scrub"].append(scrub_seconds(base, size, parent))
            results["snap"].append(snapshot_seconds(base, size, parent))
            with volume(base, size) as (uri, _, _):
                results["alone"].append(writes(uri, args.runtime))
            with volume(base, size, "--scrub-pause", "0.05", parent=parent) as (uri, _, log):
                wait_for(log, "scrub: copying")
                results["scrubbing"].append(writes(uri, args.runtime))
            line = ", ".join(f"{k} {v[-1]:.2f}" for k, v in results.items())
            print(f"  round {rnd + 1}: {line}", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    ratio = med["scrub"] / med["cp"]
    print(
        f"\nscrub of a {args.size_mib} MiB parent: {med['scrub']:.2f} s, cp + sync "
        f"{med['cp']:.2f} s: {ratio:.2f}x of cp (target <= 3) {'ok' if ratio <= 3 else 'MISS'}"
    )
    print(f"snapshot of a {args.size_mib} MiB region: {med['snap']:.2f} s")
    w = med["scrubbing"] / med["alone"]
    mark = "ok" if w >= 0.7 else "MISS"
    print(f"4 KiB random writes during a scrub: {med['scrubbing']:.1f} MB/s, "
          f"{med['alone']:.1f} without: {w:.2f} (target >= 0.7) {mark}")  # fmt: skip


if __name__ == "__main__":
    main()
