"""fio through crucible-nbd in several settings of the same volume, each as a
fraction of the first setting's throughput and a multiple of its CPU per IO
(all four processes), over rounds: what bench.observe and bench.security
share."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager

from bench.nbd import cpu_seconds, fio

TESTS = [
    ("rand-write-4k-qd32", "randwrite", "4k", 32),
    ("rand-read-4k-qd32", "randread", "4k", 32),
    ("seq-write-1M-qd8", "write", "1M", 8),
]
Server = Callable[[str], AbstractContextManager[tuple[str, list[int]]]]
Ratios = dict[tuple[str, str], list[float]]


def parse_rounds(ap: argparse.ArgumentParser, name: str) -> argparse.Namespace:
    """--repeat, --runtime and --size-mib added to `ap` (which may have flags
    of its own), parsed and checked, and fio there."""
    ap.add_argument("--repeat", type=int, default=3, help="rounds")
    ap.add_argument("--runtime", type=float, default=8.0, help="seconds per test")
    ap.add_argument("--size-mib", type=int, default=256, help="volume size")
    args = ap.parse_args()
    if args.repeat < 1 or args.runtime <= 0 or args.size_mib < 64:
        sys.exit(f"{name}: --repeat and --runtime must be positive, --size-mib >= 64")
    if shutil.which("fio") is None:
        sys.exit(f"{name}: fio is missing; run scripts/setup")
    return args


def compare(
    settings: list[str],
    server: Server,
    repeat: int,
    runtime: float,
    size_mib: int,
    tests: list[tuple[str, str, str, int]] = TESTS,
) -> tuple[Ratios, Ratios]:
    """Per (test, setting) other than the first: throughput ratios and CPU
    per IO ratios to the first setting, one per round. `server(setting)`
    runs the volume in that setting: (NBD URI, the pids to count CPU of).
    Every other round runs the settings in reverse order, and each setting
    starts once the disk has written back what the one before left dirty:
    neither the order nor the last run's writeback favours a setting."""
    ratios: Ratios = {}
    cpu_ratios: Ratios = {}
    for rnd in range(repeat):
        got: dict[tuple[str, str], float] = {}
        cpu: dict[tuple[str, str], float] = {}
        for setting in settings if rnd % 2 == 0 else settings[::-1]:
            os.sync()
            with server(setting) as (uri, pids):
                for name, rw, bs, depth in tests:
                    before = cpu_seconds(pids)
                    f = fio(uri, name, rw, bs, depth, size_mib, runtime)
                    us = (cpu_seconds(pids) - before) / max(1, f["ios"]) * 1e6
                    got[name, setting], cpu[name, setting] = f["mb_s"], us
                    print(
                        f"  round {rnd + 1} {setting:9} {name:20} {f['mb_s']:8.1f} MB/s"
                        f"  CPU {us:7.1f} us/IO",
                        flush=True,
                    )
        base = settings[0]
        for name, *_ in tests:
            for setting in settings[1:]:
                r = got[name, setting] / got[name, base] if got[name, base] else 0.0
                ratios.setdefault((name, setting), []).append(r)
                cpu_ratios.setdefault((name, setting), []).append(
                    cpu[name, setting] / cpu[name, base]
                )
    return ratios, cpu_ratios


def report(ratios: Ratios, cpu_ratios: Ratios, base: str, targets: dict[str, float]) -> None:
    print(f"\nguest throughput as a fraction of {base}, and CPU per IO (all four")
    print(f"processes) as a multiple of {base}; medians, spread over the rounds:")
    for (name, setting), vals in ratios.items():
        med = statistics.median(vals)
        target = targets.get(setting)
        mark = "" if target is None else f">={target} {'ok' if med >= target else 'MISS':4}"
        cv = cpu_ratios[name, setting]
        print(f"{name:20} {setting:9} {med:5.2f} ({min(vals):.2f}-{max(vals):.2f})  "
              f"{mark:12} CPU/IO {statistics.median(cv):.2f}x "
              f"({min(cv):.2f}-{max(cv):.2f})")  # fmt: skip
