"""What watching a volume costs its guest: fio through crucible-nbd with
nothing on, with metrics on (and scraped each second), and with metrics plus
tracing of every job (sample 1.0) to a local receiver, in the same run.

    .venv/bin/python -m bench.observe [--repeat 3] [--runtime 8] [--size-mib 256]
                                      [--endpoint jaeger|http]

Each round starts the volume three times on fresh regions, once per setting,
and runs random 4 KiB writes (queue depth 32) and sequential 1 MiB writes
(queue depth 8). It prints the guest's throughput in each setting as a
fraction of nothing on, median and spread over the rounds, against the
targets (0.9 with metrics, 0.7 with tracing). The receiver reads and drops
what it is sent (a Jaeger agent's UDP port, or an OTLP/HTTP endpoint that
answers 200), so its own cost stays out of the figures.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench.nbd import cpu_seconds, crucible_server, fio
from tests.support import free_port

TESTS = [
    ("rand-write-4k-qd32", "randwrite", "4k", 32),
    ("seq-write-1M-qd8", "write", "1M", 8),
]
SETTINGS = ["off", "metrics", "tracing"]
TARGETS = {"metrics": 0.9, "tracing": 0.7}


@contextmanager
def udp_sink() -> Iterator[int]:
    """A UDP port that takes datagrams and drops them."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    stop = threading.Event()

    def drain() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            with suppress(TimeoutError):
                sock.recv(65536)

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        t.join()
        sock.close()


@contextmanager
def http_sink() -> Iterator[int]:
    """An OTLP/HTTP endpoint that reads each request and answers 200."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def scraper(ports: list[int]) -> Iterator[None]:
    """GET each /metrics once a second, as Prometheus would."""
    stop = threading.Event()

    def scrape() -> None:
        while not stop.wait(1.0):
            for p in ports:
                with suppress(OSError):
                    urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=5).read()

    t = threading.Thread(target=scrape, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def flags(setting: str, endpoint: str) -> tuple[list[str], list[list[str]], list[int]]:
    """(crucible-nbd's flags, each downstairs', the metrics ports)."""
    if setting == "off":
        return [], [[], [], []], []
    ports = [free_port() for _ in range(4)]
    nbd = ["--metrics", f"127.0.0.1:{ports[0]}"]
    ds = [["--metrics", f"127.0.0.1:{p}"] for p in ports[1:]]
    if setting == "tracing":
        trace = ["--trace-endpoint", endpoint, "--trace-sample", "1.0"]
        nbd += trace
        ds = [d + trace for d in ds]
    return nbd, ds, ports


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="rounds")
    ap.add_argument("--runtime", type=float, default=8.0, help="seconds per test")
    ap.add_argument("--size-mib", type=int, default=256, help="volume size")
    ap.add_argument("--endpoint", choices=["jaeger", "http"], default="jaeger", help="receiver")
    args = ap.parse_args()
    if args.repeat < 1 or args.runtime <= 0 or args.size_mib < 64:
        sys.exit("bench.observe: --repeat and --runtime must be positive, --size-mib >= 64")
    if shutil.which("fio") is None:
        sys.exit("bench.observe: fio is missing; run scripts/setup")
    base = Path(tempfile.mkdtemp(prefix="crucible-bench-observe-"))
    ratios: dict[tuple[str, str], list[float]] = {}
    cpu_ratios: dict[tuple[str, str], list[float]] = {}
    sink = udp_sink() if args.endpoint == "jaeger" else http_sink()
    try:
        with sink as port:
            endpoint = (
                f"127.0.0.1:{port}" if args.endpoint == "jaeger" else f"http://127.0.0.1:{port}"
            )
            for rnd in range(args.repeat):
                got: dict[tuple[str, str], float] = {}
                cpu: dict[tuple[str, str], float] = {}
                for setting in SETTINGS:
                    nbd_flags, ds_flags, ports = flags(setting, endpoint)
                    server = crucible_server(
                        base, args.size_mib << 20, ["--verify-rate", "0", *nbd_flags], ds_flags
                    )
                    with server as (uri, pids), scraper(ports):
                        for name, rw, bs, depth in TESTS:
                            before = cpu_seconds(pids)
                            f = fio(uri, name, rw, bs, depth, args.size_mib, args.runtime)
                            us = (cpu_seconds(pids) - before) / max(1, f["ios"]) * 1e6
                            got[name, setting], cpu[name, setting] = f["mb_s"], us
                            print(
                                f"  round {rnd + 1} {setting:8} {name:20} {f['mb_s']:8.1f} MB/s"
                                f"  CPU {us:7.1f} us/IO",
                                flush=True,
                            )
                for name, *_ in TESTS:
                    off = got[name, "off"]
                    for setting in SETTINGS[1:]:
                        r = got[name, setting] / off if off else 0.0
                        ratios.setdefault((name, setting), []).append(r)
                        c = cpu[name, setting] / cpu[name, "off"]
                        cpu_ratios.setdefault((name, setting), []).append(c)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("\nguest throughput as a fraction of nothing on, and CPU per IO (all four")
    print("processes) as a multiple of nothing on; medians, spread over the rounds:")
    for (name, setting), vals in ratios.items():
        med = statistics.median(vals)
        target = TARGETS[setting]
        mark = "ok" if med >= target else "MISS"
        cv = cpu_ratios[name, setting]
        print(f"{name:20} {setting:8} {med:5.2f} ({min(vals):.2f}-{max(vals):.2f})  "
              f">={target} {mark:4}  CPU/IO {statistics.median(cv):.2f}x "
              f"({min(cv):.2f}-{max(cv):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
