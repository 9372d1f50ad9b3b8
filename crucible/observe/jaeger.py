"""Send OpenTelemetry spans to a Jaeger agent over UDP.

Why this exists: the official opentelemetry-exporter-jaeger-thrift is no longer maintained and
does not work with the current SDK, while Jaeger agents (and anything speaking their protocol,
such as the OpenTelemetry collector's jaeger receiver) still listen on UDP port 6831 for
`Agent.emitBatch`: one oneway thrift message in the compact protocol per datagram. This module
writes that message's envelope with the `thrift` library and copies in the Process and Span
structs jaeger_wire.py encodes, so it needs nothing besides `thrift`.

Wire form (jaeger-idl thrift/agent.thrift and jaeger.thrift): a message named `emitBatch` of
type ONEWAY whose argument struct holds, as field 1, a `Batch{1: Process, 2: list<Span>,
3: seqNo}`. A datagram never exceeds `max_packet` bytes: spans are grouped into as few
datagrams as fit, and a span too large to fit alone is dropped and counted.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from thrift.protocol.TCompactProtocol import TCompactProtocol
from thrift.Thrift import TMessageType, TType
from thrift.transport.TTransport import TMemoryBuffer

from crucible.observe.jaeger_wire import encode_process, encode_records, encode_span, pack
from crucible.observe.spans import SpanRecord, from_readable

log = logging.getLogger(__name__)

# A datagram with spans is longer than the same one without by the spans themselves, plus at
# most 5 bytes for the list's count (a varint of up to 32 bits where an empty list needs none)
# and at most 9 for a seqNo bigger than the 0 it is measured with (a 10-byte varint at most).
_HEAD_GROWTH = 5 + 9

# After a failed name lookup or connect, exports fail at once for this long instead of
# asking the resolver (which may take seconds) again on every export.
_RETRY_AFTER_S = 30.0
_WARN_EVERY_S = 60.0


class JaegerAgentExporter(SpanExporter):
    """Export spans as `Agent.emitBatch` datagrams to the agent at `host`:`port`.

    Called by one span processor thread only: it keeps no lock.
    """

    def __init__(self, host: str, port: int, max_packet: int = 65000) -> None:
        self.host = host
        self.port = port
        self.max_packet = max_packet
        self.dropped = 0  # spans that did not fit a datagram even alone
        self._seq_no = 0
        self._sock: socket.socket | None = None
        self._retry_at = 0.0
        self._quiet_until = 0.0  # no warning before then
        self._closed = False
        self._last_resource: Resource | None = None
        self._last_process = b""
        self._error: OSError | None = None  # why the last send failed

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._closed:
            return SpanExportResult.FAILURE
        try:
            sock = self._connect()
            ok = self._export(sock, spans)
            if not ok and self._error is not None:
                self._report(self._error)
        except OSError as e:
            ok = False
            self._report(e)
        except Exception:
            # A bug or an exotic value must not escape into the SDK's worker thread.
            log.exception("jaeger: export failed")
            ok = False
        return SpanExportResult.SUCCESS if ok else SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self._closed = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # every export sends at once: nothing is ever held back

    def _connect(self) -> socket.socket:
        """The socket, resolved and connected on first use.

        Connected, so that the kernel reports an ICMP port unreachable caused by one datagram
        as ECONNREFUSED on a later send: the export fails instead of silently losing spans.
        """
        if self._sock is not None:
            return self._sock
        now = time.monotonic()
        if now < self._retry_at:
            raise OSError(f"{self.host}:{self.port} unreachable at the last attempt")
        try:
            family, kind, proto, _, addr = socket.getaddrinfo(
                self.host, self.port, type=socket.SOCK_DGRAM
            )[0]
            sock = socket.socket(family, kind, proto)
            try:
                sock.connect(addr)
            except OSError:
                sock.close()
                raise
        except OSError:
            self._retry_at = now + _RETRY_AFTER_S
            raise
        self._sock = sock
        return sock

    def _export(self, sock: socket.socket, spans: Sequence[ReadableSpan]) -> bool:
        by_process: dict[bytes, list[bytes]] = {}  # spans of equal Processes share datagrams
        for span in spans:
            record = from_readable(span)
            if record is not None:
                scope = span.instrumentation_scope
                encoded = encode_span(record, scope.name if scope else None,
                                      scope.version if scope else None)  # fmt: skip
                by_process.setdefault(self._process(span.resource), []).append(encoded)
        ok = True
        for process, encoded_spans in by_process.items():
            ok &= self._send_spans(sock, process, encoded_spans)
        return ok

    def export_records(self, records: list[SpanRecord], resource: Resource) -> bool:
        """Send spans recorded by this package (tracers.py), all of one resource.
        A failure raises OSError with its reason: the caller says it (once)."""
        if self._closed:
            return False
        sock = self._connect()
        sent = self._send_spans(sock, self._process(resource), encode_records(records))
        if not sent and self._error is not None:
            raise self._error
        return True

    def _process(self, resource: Resource) -> bytes:
        if self._last_resource is not resource:
            self._last_resource, self._last_process = resource, _encode_process(resource)
        return self._last_process

    def _send_spans(self, sock: socket.socket, process: bytes, spans: list[bytes]) -> bool:
        """Send encoded spans of one Process in as few datagrams as fit."""
        budget = self.max_packet - len(_datagram(process, [], 0)) - _HEAD_GROWTH
        groups, too_large = pack(spans, budget)
        self.dropped += too_large
        ok = True
        for group in groups:
            ok &= self._send(sock, process, group)
        return ok

    def _send(self, sock: socket.socket, process: bytes, spans: list[bytes]) -> bool:
        datagram = _datagram(process, spans, self._seq_no)
        self._seq_no += 1
        try:
            sock.send(datagram)
        except ConnectionRefusedError as e:
            # The refusal is an earlier datagram's: the agent's port was closed when it
            # arrived. This one was not sent: send it anyway, so that while the agent
            # stays away every export meets the refusal (not every other one, which
            # would say "down" and "back" by turns), and once it is back this one counts.
            self._error = e
            with contextlib.suppress(OSError):
                sock.send(datagram)
            return False
        except OSError as e:
            self._error = e
            return False
        return True

    def _report(self, error: OSError) -> None:
        # At most one warning a minute: an absent agent must not flood the log. (Its exports
        # alternate between success and failure, so "once per outage" would not be quieter.)
        now = time.monotonic()
        if now >= self._quiet_until:
            self._quiet_until = now + _WARN_EVERY_S
            log.warning("jaeger: cannot send to %s:%d: %s", self.host, self.port, error)


def _memory() -> tuple[Any, Any]:
    buf = TMemoryBuffer()
    return buf, TCompactProtocol(buf)


def _datagram(process: bytes, spans: list[bytes], seq_no: int) -> bytes:
    """One `Agent.emitBatch` message around an encoded Process and encoded Spans.

    Structs are self-contained in the compact protocol (field ids are deltas within their own
    struct), so the pieces are encoded once and copied in: a span is measured and written by
    the same encoding.
    """
    buf, prot = _memory()
    prot.writeMessageBegin("emitBatch", TMessageType.ONEWAY, 0)
    prot.writeStructBegin("emitBatch_args")
    prot.writeFieldBegin("batch", TType.STRUCT, 1)
    prot.writeStructBegin("Batch")
    prot.writeFieldBegin("process", TType.STRUCT, 1)
    buf.write(process)
    prot.writeFieldEnd()
    prot.writeFieldBegin("spans", TType.LIST, 2)
    prot.writeListBegin(TType.STRUCT, len(spans))
    buf.write(b"".join(spans))  # (one call: the buffer's write runs in Python)
    prot.writeListEnd()
    prot.writeFieldEnd()
    _i64(prot, "seqNo", 3, seq_no)
    prot.writeFieldStop()
    prot.writeStructEnd()
    prot.writeFieldEnd()
    prot.writeFieldStop()
    prot.writeStructEnd()
    prot.writeMessageEnd()
    data: bytes = buf.getvalue()
    return data


def _encode_process(resource: Resource) -> bytes:
    attributes = dict(resource.attributes)
    service = attributes.pop("service.name", "crucible")
    return encode_process(str(service), attributes)


def _i64(prot: Any, name: str, fid: int, value: int) -> None:
    prot.writeFieldBegin(name, TType.I64, fid)
    prot.writeI64(value)
    prot.writeFieldEnd()
