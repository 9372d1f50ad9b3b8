"""Block status and sparse copies: `nbdinfo --map` and `nbdcopy` to null of
a volume, empty and half full, against qemu-nbd serving a raw file with the
same content, in the same run.

    .venv/bin/python -m bench.blockstatus [--size-gib 2] [--repeat 3] [--dir DIR] [--out DIR]

The volume has the demo's geometry (4 KiB blocks, 32 MiB extents). Prints
the median seconds of each command over --repeat runs and the ratio to
qemu-nbd's (lower is better; 1.0 is as fast); saves JSON under --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from crucible.cli_util import stop_process
from tests.support import BIN, Cluster, free_port, wait_listening

BS, ES = 4096, 8192  # the demo's geometry


def timed(cmd: list[str], repeat: int) -> float:
    """Median wall seconds of a command over `repeat` runs."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(uri: str, repeat: int) -> dict[str, float]:
    return {
        "map": timed(["nbdinfo", "--map", uri], repeat),
        "copy": timed(["nbdcopy", uri, "null:"], repeat),
    }


def fill_half(uri: str, size: int) -> None:
    """The first half written with a pattern (the rest never written)."""
    cmd = ["qemu-io", "-f", "raw", "-c", f"write -P 0x5a 0 {size // 2}", uri]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


@contextmanager
def serving(cmd: list[str], port: int, log: Path) -> Iterator[str]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_listening(port, proc, timeout=60)
            yield f"nbd://127.0.0.1:{port}/"
        finally:
            stop_process(proc, timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-gib", type=int, default=2, help="volume size (2 GiB, the demo's)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each command (median)")
    ap.add_argument("--dir", type=Path, default=None, help="scratch directory")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    for tool in ("nbdinfo", "nbdcopy", "qemu-nbd", "qemu-io"):
        if shutil.which(tool) is None:
            sys.exit(f"bench.blockstatus: {tool} is missing; run scripts/setup")
    size = args.size_gib << 30
    base = Path(tempfile.mkdtemp(prefix="crucible-bench-", dir=args.dir))
    results: dict[str, dict[str, float]] = {}
    try:
        geometry = ("--block-size", str(BS), "--extent-size", str(ES))
        cluster = Cluster(base, *geometry, "--extent-count", str(size // (BS * ES)))
        try:
            port = free_port()
            cmd = [str(BIN / "crucible-nbd"), *cluster.target_args(), "-p", str(port), "-q"]
            with serving(cmd, port, base / "nbd.log") as uri:
                results["crucible empty"] = measure(uri, args.repeat)
                fill_half(uri, size)
                results["crucible half"] = measure(uri, args.repeat)
        finally:
            cluster.stop()
        raw = base / "raw.img"
        subprocess.run(["truncate", "-s", str(size), str(raw)], check=True)
        port = free_port()
        cmd = ["qemu-nbd", "-f", "raw", "-t", "-b", "127.0.0.1", "-p", str(port), "-x", ""]
        with serving([*cmd, str(raw)], port, base / "qemu-nbd.log") as uri:
            results["qemu-nbd empty"] = measure(uri, args.repeat)
            fill_half(uri, size)
            results["qemu-nbd half"] = measure(uri, args.repeat)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print(
        f"{args.size_gib} GiB volume, median of {args.repeat} runs (seconds; ratio = ours/theirs)"
    )
    print(f"{'':16} {'crucible':>10} {'qemu-nbd':>10} {'ratio':>8}")
    summary = []
    for content in ("empty", "half"):
        for what in ("map", "copy"):
            ours = results[f"crucible {content}"][what]
            theirs = results[f"qemu-nbd {content}"][what]
            ratio = ours / theirs if theirs else 0.0
            name = f"{what} {content}"
            print(f"{name:16} {ours:10.3f} {theirs:10.3f} {ratio:7.2f}x")
            summary.append({"test": name, "crucible_s": ours, "qemu_nbd_s": theirs, "ratio": ratio})
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"blockstatus-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"size_gib": args.size_gib, "summary": summary}, indent=2) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
