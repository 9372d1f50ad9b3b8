"""Tracing: spans built from the probes (probes.py), exported in the
background to a Jaeger agent (UDP, compact thrift) or an OTLP collector
(HTTP or gRPC).

A span is recorded when its work ends, as plain values (spans.py; the
handlers that record them are tracers.py's), and queued for a thread of its
own that encodes and sends them in batches: the IO path only records times.
Nothing here runs unless an endpoint is given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from crucible.common.address import host_port
from crucible.observe.batcher import Batcher, Send
from crucible.observe.jaeger import JaegerAgentExporter
from crucible.observe.spans import SpanRecord, expand, sampled, to_readable

log = logging.getLogger("crucible.tracing")

EXPORT_TIMEOUT = 2.0  # seconds an export may take before it counts as failed


class TraceError(Exception):
    """A --trace-endpoint that cannot be used (one line for the command to print)."""


def parse_endpoint(endpoint: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path): jaeger (also bare HOST:PORT), http or grpc."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        scheme, rest = "jaeger", endpoint
    scheme = scheme.lower()
    if scheme not in ("jaeger", "http", "https", "grpc"):
        raise TraceError(
            f"--trace-endpoint {endpoint!r}: use HOST:PORT or jaeger://HOST:PORT (a Jaeger "
            "agent), http://HOST:PORT (OTLP/HTTP) or grpc://HOST:PORT (OTLP/gRPC)"
        )
    hostport, _, path = rest.partition("/")
    try:
        host, port = host_port(hostport)
    except ValueError as e:
        raise TraceError(f"--trace-endpoint {endpoint!r}: {e}") from None
    return scheme, host, port, path


def exporter_for(endpoint: str) -> SpanExporter:
    scheme, host, port, path = parse_endpoint(endpoint)
    if scheme == "jaeger":
        return JaegerAgentExporter(host, port)
    if scheme == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter(endpoint=f"{host}:{port}", insecure=True, timeout=EXPORT_TIMEOUT)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    url = f"{scheme}://{endpoint.partition('://')[2].partition('/')[0]}/{path or 'v1/traces'}"
    return OTLPSpanExporter(endpoint=url, timeout=EXPORT_TIMEOUT)


def sender_for(endpoint: str, resource: Resource) -> tuple[Send, Callable[[], None]]:
    """(send a batch of records, close): the Jaeger exporter takes our records
    as they are; the OTLP ones take the SDK's spans."""
    exporter = exporter_for(endpoint)
    if isinstance(exporter, JaegerAgentExporter):
        jaeger = exporter
        return (lambda records: jaeger.export_records(records, resource)), jaeger.shutdown

    def send(records: list[SpanRecord]) -> bool:
        spans = [to_readable(one, resource) for r in records for one in expand(r)]
        return exporter.export(spans) is SpanExportResult.SUCCESS

    return send, exporter.shutdown


class Tracing:
    """Where spans go, and which are kept."""

    def __init__(self, endpoint: str, sample: float, service: str, **attrs: str) -> None:
        self.endpoint = endpoint
        # The SDK's own loggers would repeat every failure with a traceback.
        for name in ("opentelemetry.sdk", "opentelemetry.exporter"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        self.resource = Resource.create({"service.name": service, **attrs})
        send, self._close = sender_for(endpoint, self.resource)
        self.batcher = Batcher(send, endpoint)
        self.bound = int(min(max(sample, 0.0), 1.0) * (1 << 64))  # keep low 64 bits below it

    def sampled(self, trace_id: int) -> bool:
        return sampled(trace_id, self.bound)

    def shutdown(self) -> None:
        """Send what is queued (within the export timeout) and stop."""
        self.batcher.close(EXPORT_TIMEOUT * 2)
        self._close()
