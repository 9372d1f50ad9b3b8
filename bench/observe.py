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
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from bench.nbd import crucible_server
from bench.settings import TESTS, compare, parse_rounds, report
from tests.support import free_port, http_server

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

    with http_server(Handler) as port:
        yield port


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
    ap.add_argument("--endpoint", choices=["jaeger", "http"], default="jaeger", help="receiver")
    args = parse_rounds(ap, "bench.observe")
    base = Path(tempfile.mkdtemp(prefix="crucible-bench-observe-"))
    sink = udp_sink() if args.endpoint == "jaeger" else http_sink()
    try:
        with sink as port:
            endpoint = (
                f"127.0.0.1:{port}" if args.endpoint == "jaeger" else f"http://127.0.0.1:{port}"
            )

            @contextmanager
            def server(setting: str) -> Iterator[tuple[str, list[int]]]:
                nbd_flags, ds_flags, ports = flags(setting, endpoint)
                extra = ["--verify-rate", "0", *nbd_flags]
                with (
                    crucible_server(base, args.size_mib << 20, extra, ds_flags) as s,
                    scraper(ports),
                ):
                    yield s

            tests = [t for t in TESTS if t[1] != "randread"]
            ratios, cpu_ratios = compare(
                SETTINGS, server, args.repeat, args.runtime, args.size_mib, tests
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    report(ratios, cpu_ratios, "nothing on", TARGETS)


if __name__ == "__main__":
    main()
