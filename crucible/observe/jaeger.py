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

import json
import logging
import socket
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, StatusCode
from thrift.protocol.TCompactProtocol import TCompactProtocol
from thrift.Thrift import TMessageType, TType
from thrift.transport.TTransport import TMemoryBuffer

try:
    from thrift.protocol.fastbinary import encode_compact as _encode_compact
except ImportError:  # the library installed without its C extension
    _encode_compact = None

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

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._closed:
            return SpanExportResult.FAILURE
        try:
            sock = self._connect()
            ok = self._export(sock, spans)
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
        ok = True
        processes: dict[int, bytes] = {}  # id(resource) -> encoded Process
        # Encoded Process -> the encoded spans waiting for its next datagram and their size:
        # keyed by the encoding so equal resources share datagrams.
        pending: dict[bytes, tuple[list[bytes], int]] = {}
        budgets: dict[bytes, int] = {}  # encoded Process -> room for spans in a datagram
        for span in spans:
            if (process := processes.get(id(span.resource))) is None:
                process = processes[id(span.resource)] = _encode_process(span.resource)
                if process not in budgets:
                    empty = len(_datagram(process, [], 0))
                    budgets[process] = self.max_packet - empty - _HEAD_GROWTH
            encoded = _encode_span(span)
            if encoded is None:
                continue
            if len(encoded) > budgets[process]:
                self.dropped += 1
                continue
            group, size = pending.get(process, ([], 0))
            if size + len(encoded) > budgets[process]:
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
        except OSError as e:
            # Typically ECONNREFUSED left by an earlier datagram: this one is lost, but the
            # error is cleared by being reported, so the next datagrams still get their chance.
            self._report(e)
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


class _Struct:
    """A thrift struct as the library's encoders take it: attributes named as in
    the IDL (None: absent) and `thrift_spec`, what generated code would hold."""

    __slots__: tuple[str, ...] = ()
    thrift_spec: tuple[Any, ...] = ()

    def __init__(self, **values: Any) -> None:
        get = values.get
        for name in self.__slots__:
            setattr(self, name, get(name))


def _spec(*fields: tuple[int, int, str, Any]) -> tuple[Any, ...]:
    """thrift_spec: indexed by field id (fields given in id order from 1)."""
    return (None, *((fid, ttype, name, args, None) for fid, ttype, name, args in fields))


class _Tag(_Struct):
    __slots__ = ("key", "vBinary", "vBool", "vDouble", "vLong", "vStr", "vType")
    thrift_spec = _spec(
        (1, TType.STRING, "key", "BINARY"),
        (2, TType.I32, "vType", None),
        (3, TType.STRING, "vStr", "BINARY"),
        (4, TType.DOUBLE, "vDouble", None),
        (5, TType.BOOL, "vBool", None),
        (6, TType.I64, "vLong", None),
        (7, TType.STRING, "vBinary", "BINARY"),
    )


def _list_of(cls: type[_Struct]) -> tuple[int, list[Any], bool]:
    return (TType.STRUCT, [cls, cls.thrift_spec], False)


class _Log(_Struct):
    __slots__ = ("fields", "timestamp")
    thrift_spec = _spec(
        (1, TType.I64, "timestamp", None), (2, TType.LIST, "fields", _list_of(_Tag))
    )


class _SpanRef(_Struct):
    __slots__ = ("refType", "spanId", "traceIdHigh", "traceIdLow")
    thrift_spec = _spec(
        (1, TType.I32, "refType", None),
        (2, TType.I64, "traceIdLow", None),
        (3, TType.I64, "traceIdHigh", None),
        (4, TType.I64, "spanId", None),
    )


class _Span(_Struct):
    __slots__ = (
        "duration",
        "flags",
        "logs",
        "operationName",
        "parentSpanId",
        "references",
        "spanId",
        "startTime",
        "tags",
        "traceIdHigh",
        "traceIdLow",
    )  # fmt: skip
    thrift_spec = _spec(
        (1, TType.I64, "traceIdLow", None),
        (2, TType.I64, "traceIdHigh", None),
        (3, TType.I64, "spanId", None),
        (4, TType.I64, "parentSpanId", None),
        (5, TType.STRING, "operationName", "BINARY"),
        (6, TType.LIST, "references", _list_of(_SpanRef)),
        (7, TType.I32, "flags", None),
        (8, TType.I64, "startTime", None),
        (9, TType.I64, "duration", None),
        (10, TType.LIST, "tags", _list_of(_Tag)),
        (11, TType.LIST, "logs", _list_of(_Log)),
    )


class _Process(_Struct):
    __slots__ = ("serviceName", "tags")
    thrift_spec = _spec(
        (1, TType.STRING, "serviceName", "BINARY"), (2, TType.LIST, "tags", _list_of(_Tag))
    )


def _encode(obj: _Struct) -> bytes:
    """Compact-protocol bytes of a struct: by the library's C encoder where it
    was built (a tenth of the time), else by its pure-Python protocol."""
    if _encode_compact is not None:
        data: bytes = _encode_compact(obj, [type(obj), obj.thrift_spec])
        return data
    buf, prot = _memory()
    prot.writeStruct(obj, obj.thrift_spec)
    data = buf.getvalue()
    return data


def _encode_process(resource: Resource) -> bytes:
    attributes = dict(resource.attributes)
    service = attributes.pop("service.name", "crucible")
    tags = _tags(list(attributes.items())) or None
    return _encode(_Process(serviceName=_utf8(str(service)), tags=tags))


def _encode_span(span: ReadableSpan) -> bytes | None:
    ctx = span.get_span_context()
    if ctx is None:  # only a span that was never started has none
        return None
    high, low = _split(ctx.trace_id)
    refs = None
    if span.links:
        refs = []
        for link in span.links:
            lhigh, llow = _split(link.context.trace_id)
            span_id = _signed(link.context.span_id)
            refs.append(
                _SpanRef(refType=_FOLLOWS_FROM, traceIdLow=llow, traceIdHigh=lhigh, spanId=span_id)
            )
    logs = None
    if span.events:
        logs = [
            _Log(
                timestamp=e.timestamp // 1000,
                fields=_tags([("event", e.name), *(e.attributes or {}).items()]),
            )
            for e in span.events
        ]
    start = span.start_time or 0
    end = span.end_time or start
    return _encode(
        _Span(
            traceIdLow=low,
            traceIdHigh=high,
            spanId=_signed(ctx.span_id),
            parentSpanId=_signed(span.parent.span_id) if span.parent else 0,
            operationName=_utf8(span.name),
            references=refs,
            flags=1 if ctx.trace_flags.sampled else 0,
            startTime=start // 1000,
            duration=(end - start) // 1000,
            tags=_tags(_span_tags(span)) or None,
            logs=logs,
        )
    )


def _span_tags(span: ReadableSpan) -> Tags:
    tags: Tags = list((span.attributes or {}).items())
    if span.kind is not SpanKind.INTERNAL:
        tags.append(("span.kind", span.kind.name.lower()))
    if span.status.status_code is StatusCode.ERROR:
        tags.append(("error", True))  # what the Jaeger UI marks a failed span by
        if span.status.description:
            tags.append(("otel.status_description", span.status.description))
    scope = span.instrumentation_scope
    if scope is not None:
        tags.append(("otel.scope.name", scope.name))
        if scope.version:
            tags.append(("otel.scope.version", scope.version))
    return tags


def _tags(tags: Tags) -> list[_Tag]:
    """Tags, each built once: most repeat from span to span (ids, extents, sizes)."""
    cache = _TAG_CACHE
    if len(cache) > _TAG_CACHE_SIZE:
        cache.clear()
    out = []
    for key, value in tags:
        ident = (key, type(value), value)
        try:
            tag = cache.get(ident)
        except TypeError:  # an unhashable value (a sequence): not kept
            out.append(_tag(key, value))
            continue
        if tag is None:
            tag = cache[ident] = _tag(key, value)
        out.append(tag)
    return out


_TAG_CACHE: dict[tuple[str, type, object], _Tag] = {}
_TAG_CACHE_SIZE = 10_000


def _tag(key: str, value: object) -> _Tag:
    k = _utf8(key)
    if isinstance(value, bool):  # before int: a bool is an int
        return _Tag(key=k, vType=_BOOL, vBool=value)
    if isinstance(value, int) and _I64_MIN <= value <= _I64_MAX:
        return _Tag(key=k, vType=_LONG, vLong=value)
    if isinstance(value, float):
        return _Tag(key=k, vType=_DOUBLE, vDouble=value)
    if isinstance(value, bytes):
        return _Tag(key=k, vType=_BINARY, vBinary=value)
    return _Tag(key=k, vType=_STRING, vStr=_utf8(_text(value)))


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
