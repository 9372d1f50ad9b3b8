"""Send OpenTelemetry spans to a Jaeger agent over UDP.

Why this exists: the official opentelemetry-exporter-jaeger-thrift is no longer maintained and
does not work with the current SDK, while Jaeger agents (and anything speaking their protocol,
such as the OpenTelemetry collector's jaeger receiver) still listen on UDP port 6831 for
`Agent.emitBatch`: one oneway thrift message in the compact protocol per datagram. This module
writes that message with the `thrift` library, its structs described here as generated code
would describe them (`thrift_spec`), so it needs nothing besides `thrift`.

Wire form (jaeger-idl thrift/agent.thrift and jaeger.thrift): a message named `emitBatch` of
type ONEWAY whose argument struct holds, as field 1, a `Batch{1: Process, 2: list<Span>,
3: seqNo}`. A datagram never exceeds `max_packet` bytes: spans are grouped into as few
datagrams as fit, and a span too large to fit alone is dropped and counted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind
from thrift.protocol.TCompactProtocol import TCompactProtocol
from thrift.Thrift import TMessageType, TType
from thrift.transport.TTransport import TMemoryBuffer

from crucible.observe.spans import SpanRecord, from_readable

log = logging.getLogger(__name__)

# jaeger.thrift enums TagType and SpanRefType.
_STRING, _DOUBLE, _BOOL, _LONG, _BINARY = range(5)
_FOLLOWS_FROM = 1

_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1

# A datagram with spans is longer than the same one without by the spans themselves, plus at
# most 5 bytes for the list's count (a varint of up to 32 bits where an empty list needs none)
# and at most 9 for a seqNo bigger than the 0 it is measured with (a 10-byte varint at most).
_HEAD_GROWTH = 5 + 9

# After a failed name lookup or connect, exports fail at once for this long instead of
# asking the resolver (which may take seconds) again on every export.
_RETRY_AFTER_S = 30.0
_WARN_EVERY_S = 60.0

Tags = list[tuple[str, object]]


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
        items = []
        for span in spans:
            process = self._process(span.resource)
            record = from_readable(span)
            if record is not None:
                scope = span.instrumentation_scope
                items.append((process, encode_span(record, scope.name if scope else None,
                                                   scope.version if scope else None)))  # fmt: skip
        return self._send_all(sock, items)

    def export_records(self, records: Sequence[SpanRecord], resource: Resource) -> bool:
        """Send spans recorded by this package (tracing.py), all of one resource.
        A failure raises OSError with its reason: the caller says it (once)."""
        if self._closed:
            return False
        sock = self._connect()
        process = self._process(resource)
        items = [(process, span) for r in records for span in encode_record(r)]
        if not self._send_all(sock, items) and self._error is not None:
            raise self._error
        return True

    def _process(self, resource: Resource) -> bytes:
        if self._last_resource is not resource:
            self._last_resource, self._last_process = resource, _encode_process(resource)
        return self._last_process

    def _send_all(self, sock: socket.socket, items: list[tuple[bytes, bytes]]) -> bool:
        """Send encoded spans, each with its encoded Process, in as few datagrams
        as fit: spans of equal Processes share them."""
        ok = True
        # Encoded Process -> the encoded spans waiting for its next datagram and their size.
        pending: dict[bytes, tuple[list[bytes], int]] = {}
        budgets: dict[bytes, int] = {}  # encoded Process -> room for spans in a datagram
        for process, encoded in items:
            budget = budgets.get(process)
            if budget is None:
                empty = len(_datagram(process, [], 0))
                budget = budgets[process] = self.max_packet - empty - _HEAD_GROWTH
            if len(encoded) > budget:
                self.dropped += 1
                continue
            group, size = pending.get(process, ([], 0))
            if size + len(encoded) > budget:
                # Send as soon as a datagram is full rather than after encoding everything:
                # a burst of back-to-back datagrams overflows a receiver's socket buffer.
                ok &= self._send(sock, process, group)
                group, size = [], 0
            group.append(encoded)
            pending[process] = (group, size + len(encoded))
        for process, (group, _) in pending.items():
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
    for span in spans:
        buf.write(span)
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


# The compact protocol, written here for the few structs of a span: the
# library's own writer costs about 70 us per span in Python, this about 5,
# and every guest IO makes several spans. (Field headers hold the field id's
# delta from the previous field and the field's type; integers are zigzag
# varints; a struct ends with a 0 byte.)
_C_TRUE, _C_FALSE, _C_I32, _C_I64, _C_DOUBLE, _C_BINARY, _C_LIST, _C_STRUCT = (
    1, 2, 5, 6, 7, 8, 9, 12,
)  # fmt: skip


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n]
    out: list[int] = []
    add = out.append
    while n > 0x7F:
        add((n & 0x7F) | 0x80)
        n >>= 7
    add(n)
    return bytes(out)


_SMALL = [bytes([i]) for i in range(0x80)]


def _zigzag(n: int) -> bytes:
    """A signed 64-bit (or 32-bit) integer as the compact protocol writes it."""
    return _varint(((n << 1) ^ (n >> 63)) & 0xFFFFFFFFFFFFFFFF)


def _field(delta: int, ctype: int) -> bytes:
    return bytes([(delta << 4) | ctype])


def _bin(data: bytes) -> bytes:
    return _varint(len(data)) + data


def _list_head(n: int) -> bytes:
    """The header of a list of n structs."""
    if n < 15:
        return bytes([(n << 4) | _C_STRUCT])
    return bytes([0xF0 | _C_STRUCT]) + _varint(n)


# The next field, of each type (field ids that follow on from the last).
_I64_FIELD = _field(1, _C_I64)
_NEXT_BINARY = _field(1, _C_BINARY)
_NEXT_LIST = _field(1, _C_LIST)
_ONE = _zigzag(1)


def _encode_tag(key: str, value: object) -> bytes:
    """A Tag: key (1), vType (2), then the one value field its type names."""
    head = _field(1, _C_BINARY) + _bin(_utf8(key)) + _field(1, _C_I32)
    if isinstance(value, bool):  # before int: a bool is an int
        body = _zigzag(_BOOL) + _field(3, _C_TRUE if value else _C_FALSE)
    elif isinstance(value, int) and _I64_MIN <= value <= _I64_MAX:
        body = _zigzag(_LONG) + _field(4, _C_I64) + _zigzag(value)
    elif isinstance(value, float):
        body = _zigzag(_DOUBLE) + _field(2, _C_DOUBLE) + struct.pack("<d", value)
    elif isinstance(value, bytes):
        body = _zigzag(_BINARY) + _field(5, _C_BINARY) + _bin(value)
    else:
        body = _zigzag(_STRING) + _field(1, _C_BINARY) + _bin(_utf8(_text(value)))
    return head + body + b"\0"


def _tags(tags: Iterable[tuple[str, object]]) -> list[bytes]:
    """Encoded tags, each made once: most repeat from span to span (ids,
    extents, sizes)."""
    cache = _TAG_CACHE
    if len(cache) > _TAG_CACHE_SIZE:
        cache.clear()
    out = []
    for key, value in tags:
        ident = (key, type(value), value)
        try:
            tag = cache.get(ident)
        except TypeError:  # an unhashable value (a sequence): not kept
            out.append(_encode_tag(key, value))
            continue
        if tag is None:
            tag = cache[ident] = _encode_tag(key, value)
        out.append(tag)
    return out


_TAG_CACHE: dict[tuple[str, type, object], bytes] = {}
_TAG_CACHE_SIZE = 10_000
_KINDS = {SpanKind.SERVER: "server", SpanKind.CLIENT: "client",
          SpanKind.PRODUCER: "producer", SpanKind.CONSUMER: "consumer"}  # fmt: skip


def encode_record(r: SpanRecord) -> list[bytes]:
    """A span and its children (they share its trace, its id as their parent
    and its attributes: those are encoded once)."""
    trace = _trace_fields(r.trace_id)
    own_id = _zigzag(_signed(r.span_id))
    shared = _tags(r.attrs.items())
    out = [
        _span_bytes(
            trace, own_id, _parent_id(r), r.name, r.start_ns, r.end_ns,
            shared + _tags(_status_tags(r.kind, r.error)), r.links, r.events,
        )
    ]  # fmt: skip
    for c in r.children:
        tags = shared + _tags([*c.attrs.items(), *_status_tags(c.kind, c.error)])
        span_id = _zigzag(_signed(c.span_id))
        out.append(_span_bytes(trace, span_id, own_id, c.name, c.start_ns, c.end_ns, tags))
    return out


def encode_span(r: SpanRecord, scope: str | None = None, version: str | None = None) -> bytes:
    """A Span struct (its children, if any, are encode_record's)."""
    extra = _status_tags(r.kind, r.error)
    if scope is not None:
        extra.append(("otel.scope.name", scope))
        if version:
            extra.append(("otel.scope.version", version))
    return _span_bytes(
        _trace_fields(r.trace_id), _zigzag(_signed(r.span_id)), _parent_id(r), r.name,
        r.start_ns, r.end_ns, _tags([*r.attrs.items(), *extra]), r.links, r.events,
    )  # fmt: skip


def _trace_fields(trace_id: int) -> list[bytes]:
    high, low = _split(trace_id)
    return [_I64_FIELD, _zigzag(low), _I64_FIELD, _zigzag(high)]


def _parent_id(r: SpanRecord) -> bytes:
    return _zigzag(_signed(r.parent_id) if r.parent_id is not None else 0)


def _status_tags(kind: SpanKind, error: str | None) -> list[tuple[str, object]]:
    tags: list[tuple[str, object]] = []
    if kind in _KINDS:
        tags.append(("span.kind", _KINDS[kind]))
    if error is not None:
        tags.append(("error", True))  # what the Jaeger UI marks a failed span by
        if error:
            tags.append(("otel.status_description", error))
    return tags


def _span_bytes(
    trace: list[bytes],
    span_id: bytes,
    parent: bytes,
    name: str,
    start_ns: int,
    end_ns: int,
    tags: list[bytes],
    links: tuple[tuple[int, int], ...] = (),
    events: tuple[tuple[str, int, dict[str, Any] | None], ...] = (),
) -> bytes:
    """A Span struct, its fields 1-11 in order, from pieces already encoded
    (the trace id's fields, the span's and its parent's ids, the tags)."""
    i64 = _I64_FIELD
    parts = [*trace, i64, span_id, i64, parent, _NEXT_BINARY, _bin(_utf8(name))]
    delta = 2  # to flags (7) from operationName (5), or from references (6)
    if links:
        parts += [_field(1, _C_LIST), _list_head(len(links))]
        for trace_id, link_id in links:
            lhigh, llow = _split(trace_id)
            parts += [
                _field(1, _C_I32), _zigzag(_FOLLOWS_FROM), i64, _zigzag(llow),
                i64, _zigzag(lhigh), i64, _zigzag(_signed(link_id)), b"\0",
            ]  # fmt: skip
        delta = 1
    start, duration = start_ns // 1000, (end_ns - start_ns) // 1000
    parts += [_field(delta, _C_I32), _ONE,  # flags: sampled
              i64, _varint(start << 1), i64, _varint(duration << 1)]  # fmt: skip
    delta = 1
    if tags:
        parts += [_NEXT_LIST, _list_head(len(tags)), *tags]
    else:
        delta = 2
    if events:
        parts += [_field(delta, _C_LIST), _list_head(len(events))]
        for ename, ts, attrs in events:
            fields = _tags([("event", ename), *attrs.items()] if attrs else [("event", ename)])
            parts += [i64, _varint((ts // 1000) << 1), _NEXT_LIST,
                      _list_head(len(fields)), *fields, b"\0"]  # fmt: skip
    parts.append(b"\0")
    return b"".join(parts)


def _encode_process(resource: Resource) -> bytes:
    """A Process struct: serviceName (1), tags (2)."""
    attributes = dict(resource.attributes)
    service = attributes.pop("service.name", "crucible")
    parts = [_field(1, _C_BINARY), _bin(_utf8(str(service)))]
    tags = _tags(attributes.items())
    if tags:
        parts += [_field(1, _C_LIST), _list_head(len(tags)), *tags]
    return b"".join(parts) + b"\0"


def _utf8(text: str) -> bytes:
    # Not strict: a lone surrogate in an attribute must not fail the whole batch.
    return text.encode("utf-8", "replace")


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):  # attribute sequences: JSON reads back unambiguously
        return json.dumps(list(value), default=str)
    return str(value)


def _i64(prot: Any, name: str, fid: int, value: int) -> None:
    prot.writeFieldBegin(name, TType.I64, fid)
    prot.writeI64(value)
    prot.writeFieldEnd()


def _signed(value: int) -> int:
    """An unsigned 64-bit id as thrift's (signed) i64."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _split(trace_id: int) -> tuple[int, int]:
    """A 128-bit trace id as signed (high, low) halves."""
    return _signed(trace_id >> 64), _signed(trace_id & ((1 << 64) - 1))
