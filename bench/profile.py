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

from bench.nbd import PROCESSES, TESTS, build, cpu_each, crucible_server, fio

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
    # mypyc's functions make no Python frames: only native unwinding sees
    # them, and that needs py-spy to pause the process for each sample.
    which = build()
    spy = [str(PY_SPY), "record", "-r", "200", "-d", str(int(args.seconds))]
    spy += ["--nonblocking"] if which == "pure Python" else ["--native"]
    print(f"build: {which}", flush=True)
    base = Path(tempfile.mkdtemp(prefix="crucible-profile-"))
    try:
        with crucible_server(base, args.size_mib << 20, args.extra) as (uri, pids):
            for name, rw, bs, depth in TESTS:
                if name not in wanted:
                    continue
                if "read" in rw:  # read what was written, not holes
                    fio(uri, "fill", "write", "1M", 8, args.size_mib, 5)
                # The CPU figures from a run nobody samples (a paused process
                # costs more per IO), then the same test again for the graphs
                # (its reads find cached what the first run's reads left).
                before = cpu_each(pids)
                ios = run_for(args.seconds, uri, (name, rw, bs, depth), args.size_mib)
                after = cpu_each(pids)
                per = [(a - b) / ios * 1e6 for a, b in zip(after, before, strict=True)]
                split = ", ".join(f"{n} {us:.0f}" for n, us in zip(PROCESSES, per, strict=True))
                print(f"{name:20} CPU us per IO: {split}; all {sum(per):.0f}", flush=True)
                spies = [
                    subprocess.Popen(
                        [*spy, "-p", str(pid), "-o", str(svg)],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                    )
                    for pid, svg in (
                        (pids[0], args.out / f"profile-{name}-nbd.svg"),
                        (pids[1], args.out / f"profile-{name}-downstairs.svg"),
                    )
                ]
                run_for(args.seconds, uri, (name, rw, bs, depth), args.size_mib)
                for s in spies:
                    _, err = s.communicate()
                    if s.returncode:
                        sys.exit(f"bench.profile: py-spy failed: {err.decode().strip()}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"flame graphs in {args.out}/profile-*.svg")


def run_for(seconds: float, uri: str, test: tuple[str, str, str, int], size_mib: int) -> int:
    """Run the fio test again and again for at least `seconds`; the IOs done."""
    ios = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        ios += int(fio(uri, *test, size_mib, seconds)["ios"])
    return ios


if __name__ == "__main__":
    main()
