"""Where the CPU of an IO goes: the fio tests of bench.nbd against one export,
with each serving process's CPU time per IO, and a py-spy flame graph of
crucible-nbd and of one downstairs for each test.

    .venv/bin/python -m bench.profile [--seconds 8] [--size-mib 256] [--out DIR]
                                      [--tests seq-write-1M-qd8,...] [-- CRUCIBLE-NBD FLAGS]

SVGs go to --out (default bench/results) as profile-TEST-nbd.svg and
profile-TEST-downstairs.svg. py-spy samples from outside the process
(ptrace): run as root, or allow ptrace for your user.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.nbd import PROCESSES, TESTS, cpu_each, crucible_server, fio

PY_SPY = Path(sys.executable).parent / "py-spy"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="sampled per test")
    ap.add_argument("--size-mib", type=int, default=256, help="volume size")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--tests", default=",".join(t[0] for t in TESTS), help="which tests")
    ap.add_argument("extra", nargs="*", help="flags for crucible-nbd, after --")
    args = ap.parse_args()
    if not PY_SPY.exists():
        sys.exit("bench.profile: py-spy is missing; run scripts/setup")
    if shutil.which("fio") is None:
        sys.exit("bench.profile: fio is missing; run scripts/setup")
    wanted = args.tests.split(",")
    unknown = set(wanted) - {t[0] for t in TESTS}
    if unknown:
        sys.exit(f"bench.profile: unknown tests {sorted(unknown)}")
    args.out.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="crucible-profile-"))
    try:
        with crucible_server(base, args.size_mib << 20, args.extra) as (uri, pids):
            for name, rw, bs, depth in TESTS:
                if name not in wanted:
                    continue
                if "read" in rw:  # read what was written, not holes
                    fio(uri, "fill", "write", "1M", 8, args.size_mib, 5)
                secs = str(int(args.seconds))
                spy = [str(PY_SPY), "record", "--nonblocking", "-r", "200", "-d", secs, "-p"]
                spies = [
                    subprocess.Popen(
                        [*spy, str(pid), "-o", str(svg)],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    for pid, svg in (
                        (pids[0], args.out / f"profile-{name}-nbd.svg"),
                        (pids[1], args.out / f"profile-{name}-downstairs.svg"),
                    )
                ]
                before = cpu_each(pids)
                ios = 0
                t0 = time.monotonic()
                while time.monotonic() - t0 < args.seconds:
                    ios += int(fio(uri, name, rw, bs, depth, args.size_mib, args.seconds)["ios"])
                after = cpu_each(pids)
                for s in spies:
                    s.wait()
                per = [(a - b) / ios * 1e6 for a, b in zip(after, before, strict=True)]
                split = ", ".join(f"{n} {us:.0f}" for n, us in zip(PROCESSES, per, strict=True))
                print(f"{name:20} CPU us per IO: {split}; all {sum(per):.0f}", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"flame graphs in {args.out}/profile-*.svg")


if __name__ == "__main__":
    main()
