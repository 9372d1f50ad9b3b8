"""The flags every long-running command shares for what it tells about
itself (--trace-endpoint, --trace-sample, --metrics, --log-format), and
their start and end."""

from __future__ import annotations

import argparse
import logging
import math

from prometheus_client import CollectorRegistry

from crucible.common.address import host_port
from crucible.observe import logs
from crucible.observe.metrics import MetricsError, serve
from crucible.observe.tracing import TraceError, Tracing
from crucible.tls import TlsFiles

log = logging.getLogger("crucible.observe")


def listen_address(text: str) -> tuple[str, int]:
    """ADDR:PORT ([ADDR]:PORT for IPv6; port 0 takes any free one)."""
    try:
        return host_port(text, "ADDR:PORT", port_zero=True)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def ratio(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return v


def add_options(p: argparse.ArgumentParser, metrics: bool = True) -> None:
    g = p.add_argument_group("observability")
    g.add_argument(
        "--trace-endpoint",
        metavar="ENDPOINT",
        help="send traces to a Jaeger agent (HOST:PORT or jaeger://HOST:PORT, UDP, e.g. "
        "localhost:6831) or an OTLP collector (http://HOST:4318 or grpc://HOST:4317)",
    )
    g.add_argument(
        "--trace-sample",
        type=ratio,
        default=1.0,
        metavar="RATIO",
        help="share of jobs traced, 0 to 1 (default 1.0)",
    )
    if metrics:
        g.add_argument(
            "--metrics",
            type=listen_address,
            metavar="ADDR:PORT",
            help="serve Prometheus metrics at http://ADDR:PORT/metrics",
        )
    g.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        default="text",
        help="log lines as text (default) or one JSON object each",
    )


class Observing:
    """What the flags asked for. Neither a bad endpoint nor a busy metrics port
    stops the command: each is said once, and it runs without that part."""

    def __init__(
        self,
        args: argparse.Namespace,
        service: str,
        tls: TlsFiles | None = None,
        attrs: dict[str, str] | None = None,
    ) -> None:
        self.registry: CollectorRegistry | None = None
        self.tracing: Tracing | None = None
        addr = getattr(args, "metrics", None)
        if addr is not None:
            registry = CollectorRegistry()
            try:
                serve(addr[0], addr[1], registry, tls)
                self.registry = registry
                scheme = "https" if tls else "http"
                log.info("metrics at %s://%s:%d/metrics", scheme, addr[0], addr[1])
            except MetricsError as e:
                log.warning("%s; running without metrics", e)
        endpoint = getattr(args, "trace_endpoint", None)
        if endpoint:
            try:
                self.tracing = Tracing(endpoint, args.trace_sample, service, **(attrs or {}))
                log.info("traces to %s (sampling %g)", endpoint, args.trace_sample)
            except TraceError as e:
                log.warning("%s; running without tracing", e)

    def close(self) -> None:
        """Send the spans still queued (bounded by the export timeout)."""
        if self.tracing is not None:
            self.tracing.shutdown()
            self.tracing = None
