"""End-to-end benchmark through NBD with fio (ioengine=nbd): our export over
three local downstairs against qemu-nbd serving a raw file, in the same run.

    .venv/bin/python -m bench.nbd [--repeat 3] [--runtime 8] [--size-mib 512]
                                  [--dir DIR] [--out DIR] [-- CRUCIBLE-NBD FLAGS]

Runs sequential write at 1 MiB queue depth 8, the same writes again over
what they wrote, sequential read at 1 MiB queue depth 8, then random write
and read at 4 KiB queue depth 32. The second write pass is the steady state:
the first writes into a fresh file cost qemu-nbd page cache and block
allocation, and what that costs it moves with the machine by a factor of two
or more. For each test: MB/s, IOPS, p99 latency, and the CPU time (user +
system, from /proc) of every process serving it -- our crucible-nbd and its
three downstairs, or qemu-nbd -- per IO and per MiB, and their minor page
faults per IO. CPU per IO is the headline: unlike MB/s it barely moves with
the load of a shared machine. Each round serves both at once and runs each
test on one, then the other (each after a sync), so each ratio compares runs
seconds apart; --repeat N rounds report the median and spread of those
ratios against the targets. JSON and a PNG chart go under --out (default
bench/results). Flags after `--` go to crucible-nbd (e.g.
`-- --read-all-replicas`).
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from crucible.cli_util import stop_process
from tests.support import BIN, Cluster, free_port, wait_listening

TESTS = [
    ("seq-write-1M-qd8", "write", "1M", 8),
    ("seq-overwrite-1M-qd8", "write", "1M", 8),
    ("seq-read-1M-qd8", "read", "1M", 8),
    ("rand-write-4k-qd32", "randwrite", "4k", 32),
    ("rand-read-4k-qd32", "randread", "4k", 32),
]
# Same-run ratios to qemu-nbd: throughput at least, CPU (per IO) at most.
THROUGHPUT_TARGETS = {
    "seq-write-1M-qd8": 0.5,
    "seq-overwrite-1M-qd8": 0.5,
    "seq-read-1M-qd8": 0.5,
    "rand-write-4k-qd32": 0.35,
    "rand-read-4k-qd32": 0.5,
}
CPU_TARGETS = {
    "seq-write-1M-qd8": 3.0,
    "seq-overwrite-1M-qd8": 3.0,
    "seq-read-1M-qd8": 2.0,
    "rand-write-4k-qd32": 4.0,
    "rand-read-4k-qd32": 2.0,
}
PROCESSES = ("crucible-nbd", "downstairs 0", "downstairs 1", "downstairs 2")
TICK = os.sysconf("SC_CLK_TCK")
MIB = 1 << 20


@dataclass
class Result:
    round: int
    test: str
    server: str
    mb_s: float
    iops: float
    p99_ms: float
    ios: int
    mib: float
    # User + system of each serving process during the test, in the order
    # served: crucible-nbd, then the three downstairs (or qemu-nbd alone).
    cpu_split: list[float]
    faults_split: list[int]  # minor page faults of each, in the same order

    @property
    def faults_per_io(self) -> float:
        return sum(self.faults_split) / self.ios if self.ios else 0.0

    @property
    def cpu_s(self) -> float:
        return sum(self.cpu_split)

    @property
    def cpu_us_per_io(self) -> float:
        return self.cpu_s / self.ios * 1e6 if self.ios else 0.0

    @property
    def cpu_ms_per_mib(self) -> float:
        return self.cpu_s / self.mib * 1e3 if self.mib else 0.0

    @property
    def split_us_per_io(self) -> list[float]:
        return [s / self.ios * 1e6 if self.ios else 0.0 for s in self.cpu_split]


def build() -> str:
    """Which build of the IO path runs: mypyc-compiled (scripts/compile) or not."""
    from crucible.protocol import framing

    return "pure Python" if framing.__file__.endswith(".py") else "compiled (mypyc)"


def cpu_seconds(pids: list[int]) -> float:
    """User + system time so far of these processes (all their threads)."""
    return sum(cpu_each(pids))


def cpu_each(pids: list[int]) -> list[float]:
    """User + system time so far of each of these processes."""
    return [cpu for cpu, _ in counters(pids)]


def counters(pids: list[int]) -> list[tuple[float, int]]:
    """User + system seconds and minor page faults so far of each process: a
    page fault is memory the process touches for the first time, or again
    after giving it back."""
    out = []
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        # utime + stime, minflt
        out.append(((int(fields[11]) + int(fields[12])) / TICK, int(fields[7])))
    return out


def fio(
    uri: str, name: str, rw: str, bs: str, depth: int, size_mib: int, runtime: float
) -> dict[str, float]:
    cmd = [
        "fio",
        "--name",
        name,
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--iodepth={depth}",
        f"--size={size_mib}M",
        "--output-format=json",
        "--end_fsync=1" if "write" in rw else "--end_fsync=0",
    ]
    if rw.startswith("rand"):
        cmd += ["--time_based", f"--runtime={runtime}", "--randrepeat=0"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    pct = side["clat_ns"].get("percentile", {})
    return {
        "mb_s": side["bw_bytes"] / 1e6,
        "iops": side["iops"],
        "p99_ms": float(pct.get("99.000000", 0)) / 1e6,
        "ios": side["total_ios"],
        "mib": side["io_bytes"] / MIB,
    }


def run_test(
    test: tuple[str, str, str, int],
    uri: str,
    server: str,
    pids: list[int],
    rnd: int,
    size_mib: int,
    runtime: float,
) -> Result:
    name, rw, bs, depth = test
    before = counters(pids)
    f = fio(uri, name, rw, bs, depth, size_mib, runtime)
    after = counters(pids)
    r = Result(
        rnd,
        name,
        server,
        f["mb_s"],
        f["iops"],
        f["p99_ms"],
        int(f["ios"]),
        f["mib"],
        [a[0] - b[0] for a, b in zip(after, before, strict=True)],
        [a[1] - b[1] for a, b in zip(after, before, strict=True)],
    )
    shares = " + ".join(f"{us:.0f}" for us in r.split_us_per_io) if len(r.cpu_split) > 1 else ""
    print(
        f"  {server:9} {name:20} {r.mb_s:8.1f} MB/s {r.iops:8.0f} IOPS "
        f"p99 {r.p99_ms:7.2f} ms  CPU {r.cpu_us_per_io:8.1f} us/IO "
        f"{r.cpu_ms_per_mib:6.2f} ms/MiB  faults/IO {r.faults_per_io:6.1f}"
        + (f"  (nbd + ds0..2: {shares})" if shares else ""),
        flush=True,
    )
    return r


def run_round(base: Path, size: int, rnd: int, args: argparse.Namespace) -> list[Result]:
    """Both servers up; each test on one, then at once on the other (which
    goes first alternates by round), so a ratio compares runs seconds apart:
    a shared machine's load drifts over minutes. Each test starts once the
    disk has written back what the run before left dirty, so that the side
    that runs second does not pay for the first's writeback."""
    results = []
    with crucible_server(base, size, args.extra) as ours, qemu_server(base, size) as theirs:
        sides = [("crucible", *ours), ("qemu-nbd", *theirs)]
        if rnd % 2:
            sides.reverse()
        for test in TESTS:
            for server, uri, pids in sides:
                os.sync()
                results.append(run_test(test, uri, server, pids, rnd, args.size_mib, args.runtime))
    return results


@contextmanager
def crucible_server(
    base: Path,
    size: int,
    extra: list[str],
    ds_extra: list[list[str]] | None = None,
    create: tuple[str, ...] = (),
) -> Iterator[tuple[str, list[int]]]:
    """crucible-nbd (with `extra` flags) over three fresh downstairs (downstairs
    i with `ds_extra[i]`), their regions created with `create` flags too."""
    es = 8192
    ec = -(-size // (4096 * es))
    cluster = Cluster(
        base, "--block-size", "4096", "--extent-size", str(es), "--extent-count", str(ec), *create
    )
    try:
        if ds_extra:
            cluster.stop()
            for i, flags in enumerate(ds_extra):
                cluster.start(i, *flags)
        port = free_port()
        nbd = subprocess.Popen(
            [str(BIN / "crucible-nbd"), *cluster.target_args(), "-p", str(port), "-q", *extra]
        )
        try:
            wait_listening(port, nbd, timeout=60)
            pids = [nbd.pid] + [d.proc.pid for d in cluster.ds if d is not None]
            yield f"nbd://127.0.0.1:{port}/", pids
        finally:
            stop_process(nbd, timeout=60)
    finally:
        cluster.stop()
        for r in cluster.regions:
            shutil.rmtree(r, ignore_errors=True)


@contextmanager
def qemu_server(base: Path, size: int) -> Iterator[tuple[str, list[int]]]:
    raw = base / "raw.img"
    subprocess.run(["truncate", "-s", str(size), str(raw)], check=True)
    port = free_port()
    # Its log takes the readiness probe's connection as a failed client.
    with open(base / "qemu-nbd.log", "wb") as log:
        qemu = subprocess.Popen(
            ["qemu-nbd", "-f", "raw", "-t", "-b", "127.0.0.1", "-p", str(port), "-x", "", str(raw)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_listening(port, qemu, timeout=30)
            yield f"nbd://127.0.0.1:{port}/", [qemu.pid]
        finally:
            stop_process(qemu)
            raw.unlink()


def _median_spread(vals: list[float]) -> str:
    med = statistics.median(vals)
    if len(vals) == 1:
        return f"{med:6.2f}x"
    return f"{med:6.2f}x ({min(vals):.2f}-{max(vals):.2f})"


def summarize(results: list[Result], rounds: int) -> list[dict[str, Any]]:
    """Per test: the median (and spread) over rounds of each same-run ratio."""

    def pair(name: str, rnd: int) -> tuple[Result, Result]:
        def one(server: str) -> Result:
            return next(
                r for r in results if r.test == name and r.server == server and r.round == rnd
            )

        return one("crucible"), one("qemu-nbd")

    def ratios(name: str, f: Callable[[Result], float]) -> list[float]:
        out = []
        for rnd in range(rounds):
            ours, theirs = pair(name, rnd)
            out.append(f(ours) / f(theirs) if f(theirs) else 0.0)
        return out

    print(
        f"\n{'test':20} {'MB/s ratio':>22} {'target':>8}   {'CPU/IO ratio':>22} {'target':>8}"
        f"   {'our CPU/IO':>11} {'p99 ms':>15}"
    )
    summary: list[dict[str, Any]] = []
    for name, *_ in TESTS:
        thr = ratios(name, lambda r: r.mb_s)
        cpu = ratios(name, lambda r: r.cpu_us_per_io)
        tt, ct = THROUGHPUT_TARGETS[name], CPU_TARGETS[name]
        ours = [pair(name, k)[0] for k in range(rounds)]
        theirs = [pair(name, k)[1] for k in range(rounds)]
        us = statistics.median(r.cpu_us_per_io for r in ours)
        them = statistics.median(r.cpu_us_per_io for r in theirs)
        p99 = statistics.median(r.p99_ms for r in ours)
        qp99 = statistics.median(r.p99_ms for r in theirs)
        # Per process, the median over rounds: which of the four to work on.
        split = [
            statistics.median(col) for col in zip(*(r.split_us_per_io for r in ours), strict=True)
        ]
        thr_ok = "ok" if statistics.median(thr) >= tt else "MISS"
        cpu_ok = "ok" if statistics.median(cpu) <= ct else "MISS"
        print(
            f"{name:20} {_median_spread(thr):>22} {'>=' + str(tt):>5} {thr_ok:4}"
            f" {_median_spread(cpu):>22} {'<=' + str(ct):>5} {cpu_ok:4}"
            f" {us:8.0f} us {p99:6.1f} vs {qp99:5.1f}"
        )
        summary.append(
            {
                "test": name,
                "throughput_ratio": statistics.median(thr),
                "throughput_ratios": thr,
                "throughput_target": tt,
                "cpu_ratio": statistics.median(cpu),
                "cpu_ratios": cpu,
                "cpu_target": ct,
                "cpu_us_per_io": us,
                "cpu_us_per_io_by_process": dict(zip(PROCESSES, split, strict=True)),
                "qemu_cpu_us_per_io": them,
                "cpu_ms_per_mib": statistics.median(r.cpu_ms_per_mib for r in ours),
                "faults_per_io": statistics.median(r.faults_per_io for r in ours),
                "qemu_faults_per_io": statistics.median(r.faults_per_io for r in theirs),
                "qemu_cpu_ms_per_mib": statistics.median(r.cpu_ms_per_mib for r in theirs),
                "p99_ms": p99,
                "qemu_p99_ms": qp99,
            }
        )
    print("\nour CPU per IO by process (median us):")
    for row in summary:
        parts = "  ".join(f"{k} {v:6.0f}" for k, v in row["cpu_us_per_io_by_process"].items())
        print(f"  {row['test']:20} {parts}")
    print("\npage faults per IO, all our processes vs qemu-nbd (median):")
    for row in summary:
        print(f"  {row['test']:20} {row['faults_per_io']:8.1f} vs {row['qemu_faults_per_io']:6.1f}")
    return summary


def chart(summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests = [str(s["test"]) for s in summary]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    panels = (
        (
            axes[0],
            "throughput_ratio",
            "throughput_target",
            "MB/s, ratio to qemu-nbd (higher is better)",
        ),
        (axes[1], "cpu_ratio", "cpu_target", "CPU per IO, ratio to qemu-nbd (lower is better)"),
    )
    for ax, key, target, label in panels:
        xs = range(len(tests))
        ax.bar(xs, [float(s[key]) for s in summary], 0.5, label="crucible (median)")
        ax.scatter(
            xs, [float(s[target]) for s in summary], marker="_", s=600, c="red", label="target"
        )
        ax.set_xticks(list(xs), tests, rotation=20, fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("fio through NBD: crucible-nbd + 3 downstairs vs qemu-nbd on a raw file")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=1, help="rounds of the whole comparison")
    ap.add_argument("--runtime", type=float, default=8.0, help="seconds per random test")
    ap.add_argument("--size-mib", type=int, default=512, help="bytes each test covers")
    ap.add_argument("--dir", type=Path, default=None, help="scratch directory")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("extra", nargs="*", help="flags for crucible-nbd, after --")
    args = ap.parse_args()
    if args.repeat < 1 or args.size_mib < 1 or args.runtime <= 0:
        sys.exit("bench.nbd: --repeat, --size-mib and --runtime must be positive")
    for tool in ("fio", "qemu-nbd"):
        if shutil.which(tool) is None:
            sys.exit(f"bench.nbd: {tool} is missing; run scripts/setup")
    base = Path(tempfile.mkdtemp(prefix="crucible-bench-", dir=args.dir))
    size = max(args.size_mib, 64) << 20
    results: list[Result] = []
    print(f"build: {build()}")
    try:
        for rnd in range(args.repeat):
            print(f"round {rnd + 1} of {args.repeat}")
            results += run_round(base, size, rnd, args)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    summary = summarize(results, args.repeat)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = [
        {
            **asdict(r),
            "cpu_s": r.cpu_s,
            "cpu_us_per_io": r.cpu_us_per_io,
            "cpu_ms_per_mib": r.cpu_ms_per_mib,
            "cpu_us_per_io_by_process": r.split_us_per_io,
            "faults_per_io": r.faults_per_io,
        }
        for r in results
    ]
    (args.out / f"nbd-{stamp}.json").write_text(
        json.dumps(
            {"args": sys.argv[1:], "build": build(), "results": rows, "summary": summary}, indent=2
        )
        + "\n"
    )
    chart(summary, args.out / f"nbd-{stamp}.png")
    print(f"saved {args.out}/nbd-{stamp}.json and .png")


if __name__ == "__main__":
    main()
