"""End-to-end benchmark through NBD with fio (ioengine=nbd): our export over
three local downstairs against qemu-nbd serving a raw file, in the same run.

    .venv/bin/python -m bench.nbd [--runtime 8] [--size-mib 512] [--dir DIR] [--out DIR]

Runs sequential write and read at 1 MiB queue depth 8, then random write and
read at 4 KiB queue depth 32; prints MB/s, IOPS, p99 latency and the ratio to
qemu-nbd; saves JSON and a PNG chart under --out (default bench/results).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from crucible.cli_util import stop_process
from tests.support import BIN, Cluster, free_port, wait_listening

TESTS = [
    ("seq-write-1M-qd8", "write", "1M", 8),
    ("seq-read-1M-qd8", "read", "1M", 8),
    ("rand-write-4k-qd32", "randwrite", "4k", 32),
    ("rand-read-4k-qd32", "randread", "4k", 32),
]
TARGETS = {"seq-write-1M-qd8": 0.5, "rand-write-4k-qd32": 0.25, "rand-read-4k-qd32": 0.3}


@dataclass
class Result:
    test: str
    server: str
    mb_s: float
    iops: float
    p99_ms: float


def fio(
    uri: str, name: str, rw: str, bs: str, depth: int, size_mib: int, runtime: float
) -> tuple[float, float, float]:
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
    p99 = float(pct.get("99.000000", 0)) / 1e6
    return side["bw_bytes"] / 1e6, side["iops"], p99


def run_all(uri: str, server: str, size_mib: int, runtime: float) -> list[Result]:
    results = []
    for name, rw, bs, depth in TESTS:
        mb, iops, p99 = fio(uri, name, rw, bs, depth, size_mib, runtime)
        results.append(Result(name, server, mb, iops, p99))
        print(
            f"  {server:9} {name:20} {mb:9.1f} MB/s {iops:9.0f} IOPS  p99 {p99:8.2f} ms", flush=True
        )
    return results


def chart(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests = [t[0] for t in TESTS]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, label in ((axes[0], "mb_s", "MB/s"), (axes[1], "iops", "IOPS")):
        for k, server in enumerate(("crucible", "qemu-nbd")):
            vals = [
                next(r for r in results if r.test == t and r.server == server).__dict__[metric]
                for t in tests
            ]
            ax.bar([i + 0.4 * k for i in range(len(tests))], vals, 0.4, label=server)
        ax.set_xticks([i + 0.2 for i in range(len(tests))], tests, rotation=20, fontsize=8)
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("fio through NBD: crucible (3 replicas) vs qemu-nbd (raw file)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runtime", type=float, default=8.0, help="seconds per random test")
    ap.add_argument("--size-mib", type=int, default=512, help="bytes each test covers")
    ap.add_argument("--dir", type=Path, default=None, help="scratch directory")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    for tool in ("fio", "qemu-nbd"):
        if shutil.which(tool) is None:
            sys.exit(f"bench.nbd: {tool} is missing; run scripts/setup")
    base = Path(tempfile.mkdtemp(prefix="crucible-bench-", dir=args.dir))
    size = max(args.size_mib, 64) << 20
    es = 8192
    ec = -(-size // (4096 * es))
    results: list[Result] = []
    try:
        cluster = Cluster(
            base, "--block-size", "4096", "--extent-size", str(es), "--extent-count", str(ec)
        )
        port = free_port()
        nbd = subprocess.Popen(
            [str(BIN / "crucible-nbd"), *cluster.target_args(), "-p", str(port), "-q"]
        )
        try:
            wait_listening(port, nbd, timeout=60)
            print("crucible-nbd over three downstairs:")
            results += run_all(f"nbd://127.0.0.1:{port}/", "crucible", args.size_mib, args.runtime)
        finally:
            stop_process(nbd, timeout=60)
            cluster.stop()
        raw = base / "raw.img"
        subprocess.run(["truncate", "-s", str(ec * es * 4096), str(raw)], check=True)
        qport = free_port()
        # Its log takes the readiness probe's connection as a failed client.
        qemu_log = open(base / "qemu-nbd.log", "wb")  # noqa: SIM115 - closed below
        qemu = subprocess.Popen(
            [
                "qemu-nbd",
                "-f",
                "raw",
                "-t",
                "-b",
                "127.0.0.1",
                "-p",
                str(qport),
                "-x",
                "",
                str(raw),
            ],
            stdout=qemu_log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_listening(qport, qemu, timeout=30)
            print("qemu-nbd on a raw file:")
            results += run_all(f"nbd://127.0.0.1:{qport}/", "qemu-nbd", args.size_mib, args.runtime)
        finally:
            stop_process(qemu)
            qemu_log.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print(f"\n{'test':20} {'crucible':>12} {'qemu-nbd':>12} {'ratio':>7} {'target':>7}")
    summary = []
    for name, *_ in TESTS:
        ours = next(r for r in results if r.test == name and r.server == "crucible")
        theirs = next(r for r in results if r.test == name and r.server == "qemu-nbd")
        ratio = ours.mb_s / theirs.mb_s if theirs.mb_s else 0.0
        target = TARGETS.get(name)
        mark = "" if target is None else f">={target}" + (" ok" if ratio >= target else " MISS")
        print(f"{name:20} {ours.mb_s:9.1f} MB {theirs.mb_s:9.1f} MB {ratio:6.2f}x {mark}")
        summary.append({"test": name, "ratio": ratio, "target": target})
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"nbd-{stamp}.json").write_text(
        json.dumps({"results": [asdict(r) for r in results], "summary": summary}, indent=2) + "\n"
    )
    chart(results, args.out / f"nbd-{stamp}.png")
    print(f"saved {args.out}/nbd-{stamp}.json and .png")


if __name__ == "__main__":
    main()
