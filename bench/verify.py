"""What the background verify of the replicas costs the guest: fio through
crucible-nbd with the verify off and at a rate, alternating in the same run.

    .venv/bin/python -m bench.verify [--rate 1] [--repeat 3] [--runtime 8] [--size-mib 512]

Each round starts crucible-nbd twice on fresh regions (--verify-rate 0, then
--verify-rate RATE), fills the volume, and runs random 4 KiB reads and
writes (queue depth 32) for --runtime seconds each; it prints the guest's
throughput with the verify as a fraction of without (the target is 0.9 or
more), median and spread over the rounds.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench.nbd import crucible_server, fio

TESTS = [("rand-read-4k-qd32", "randread"), ("rand-write-4k-qd32", "randwrite")]
TARGET = 0.9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rate", type=float, default=1.0, help="MiB/s of the verify")
    ap.add_argument("--repeat", type=int, default=3, help="rounds")
    ap.add_argument("--runtime", type=float, default=8.0, help="seconds per test")
    ap.add_argument("--size-mib", type=int, default=512, help="volume size")
    args = ap.parse_args()
    if args.rate <= 0 or args.repeat < 1 or args.runtime <= 0 or args.size_mib < 64:
        sys.exit("bench.verify: --rate, --repeat and --runtime must be positive, --size-mib >= 64")
    if shutil.which("fio") is None:
        sys.exit("bench.verify: fio is missing; run scripts/setup")
    base = Path(tempfile.mkdtemp(prefix="crucible-bench-verify-"))
    ratios: dict[str, list[float]] = {t[0]: [] for t in TESTS}
    try:
        for rnd in range(args.repeat):
            got: dict[tuple[str, float], float] = {}
            for rate in (0.0, args.rate):
                flags = ["--verify-rate", f"{rate:g}"]
                with crucible_server(base, args.size_mib << 20, flags) as (uri, _):
                    fio(uri, "fill", "write", "1M", 8, args.size_mib, args.runtime)
                    for name, rw in TESTS:
                        mb = fio(uri, name, rw, "4k", 32, args.size_mib, args.runtime)["mb_s"]
                        got[name, rate] = mb
                        print(f"  round {rnd + 1} verify {rate:g} MiB/s {name:20} {mb:8.1f} MB/s")
            for name, _ in TESTS:
                off = got[name, 0.0]
                ratios[name].append(got[name, args.rate] / off if off else 0.0)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\nguest throughput with the verify at {args.rate:g} MiB/s, as a fraction of without:")
    for name, vals in ratios.items():
        med = statistics.median(vals)
        mark = "ok" if med >= TARGET else "MISS"
        print(f"{name:20} {med:5.2f} ({min(vals):.2f}-{max(vals):.2f})  >={TARGET} {mark}")


if __name__ == "__main__":
    main()
