"""Jaeger's Span and Process structs (jaeger-idl's jaeger.thrift) in the
compact thrift protocol, written by hand.

The `thrift` library's own writer costs about 70 us per span in Python; this
costs a few, and compiled with the IO path (scripts/compile) under two,
which matters because every guest IO makes several spans. Each span is
written into one growing buffer (librt's BytesWriter: compiled, appending a
byte is a C call and makes no object), so a span costs one bytes object
however many fields it has. The structs are self-contained (field ids are
deltas within their own struct), so jaeger.py copies these bytes into its
`emitBatch` datagrams as they are.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from typing import Any, Final

from librt.strings import BytesWriter
from opentelemetry.trace import SpanKind

from crucible.observe.spans import SpanRecord

# jaeger.thrift enums TagType and SpanRefType.
_STRING: Final = 0
_DOUBLE: Final = 1
_BOOL: Final = 2
_LONG: Final = 3
_BINARY: Final = 4
_FOLLOWS_FROM: Final = 1

_I64_MIN: Final = -(1 << 63)
_I64_MAX: Final = (1 << 63) - 1

# Field headers hold the field id's delta from the previous field and the
# field's type; integers are zigzag varints; a struct ends with a 0 byte.
_C_TRUE: Final = 1
_C_FALSE: Final = 2
_C_I32: Final = 5
_C_I64: Final = 6
_C_DOUBLE: Final = 7
_C_BINARY: Final = 8
_C_LIST: Final = 9
_C_STRUCT: Final = 12

# The next field, of each type (field ids that follow on from the last).
_I64_FIELD: Final = (1 << 4) | _C_I64
_NEXT_BINARY: Final = (1 << 4) | _C_BINARY
_NEXT_LIST: Final = (1 << 4) | _C_LIST


def _varint(w: BytesWriter, n: int) -> None:
    """0 <= n < 2**64 as a varint. (Past 62 bits the low 56 go first, so
    that compiled, the rest is done in machine ints.)"""
    if n >= 1 << 62:
        _continued(w, n & 0xFFFFFFFFFFFFFF)
        n >>= 56
    while n > 0x7F:
        w.append((n & 0x7F) | 0x80)
        n >>= 7
    w.append(n)


def _continued(w: BytesWriter, low: int) -> None:
    """0 <= low < 2**56 as eight varint bytes, each marked to go on."""
    for _ in range(8):
        w.append((low & 0x7F) | 0x80)
        low >>= 7


def _zigzag(w: BytesWriter, n: int) -> None:
    """A signed 64-bit (or 32-bit) integer as the compact protocol writes it."""
    if 0 <= n < 1 << 61:  # (all in machine ints)
        _varint(w, n << 1)
    else:
        _varint(w, ((n << 1) ^ (n >> 63)) & 0xFFFFFFFFFFFFFFFF)


def _id(w: BytesWriter, u: int) -> None:
    """An unsigned 64-bit id as the zigzag varint of thrift's (signed) i64
    holding the same bits, worked out in 32-bit halves: compiled code does
    those in machine ints, where a 64-bit value would be a Python object."""
    _id_halves(w, u >> 32, u & 0xFFFFFFFF)


def _id_halves(w: BytesWriter, hi: int, lo: int) -> None:
    # The zigzag of a signed s is (s << 1) ^ (s >> 63) in 64 bits: the bits
    # shifted left, all flipped when the top bit (the sign) was set.
    z_hi = ((hi << 1) | (lo >> 31)) & 0xFFFFFFFF
    z_lo = (lo << 1) & 0xFFFFFFFF
    if hi >> 31:
        z_hi ^= 0xFFFFFFFF
        z_lo ^= 0xFFFFFFFF
    top = z_hi >> 24  # above the low 56 bits
    low56 = z_lo | (z_hi & 0xFFFFFF) << 32
    if top:
        _continued(w, low56)
        _varint(w, top)
    else:
        _varint(w, low56)


def _list_head(w: BytesWriter, n: int) -> None:
    """The header of a list of n structs."""
    if n < 15:
        w.append((n << 4) | _C_STRUCT)
    else:
        w.append(0xF0 | _C_STRUCT)
        _varint(w, n)


def _bin(w: BytesWriter, data: bytes) -> None:
    _varint(w, len(data))
    w.write(data)


def _utf8(text: str) -> bytes:
    # Not strict: a lone surrogate in an attribute must not fail the whole batch.
    return text.encode("utf-8", "replace")


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):  # attribute sequences: JSON reads back unambiguously
        return json.dumps(list(value), default=str)
    return str(value)


def _made(put: Callable[[BytesWriter], None]) -> bytes:
    """What `put` writes, as bytes of their own (to keep and copy in)."""
    w = BytesWriter()
    put(w)
    return w.getvalue()


# Made once and kept, up to _KEPT each: most repeat from span to span (keys,
# names, string values).
_KEPT: Final = 10_000
_long_heads: Final[dict[str, bytes]] = {}  # an i64 Tag up to its value, by key
_strings: Final[dict[tuple[str, str], bytes]] = {}  # a string Tag, by key and value
_texts: Final[dict[str, bytes]] = {}  # a binary field's length and bytes, by text
_events: Final[dict[str, bytes]] = {}  # a Log's fields, by the event's name (see _event_fields)


def _keep(cache: dict[Any, bytes], key: Any, encoded: bytes) -> bytes:
    """Keep `encoded` in `cache` under `key` (emptying a full one first)."""
    if len(cache) >= _KEPT:
        cache.clear()
    cache[key] = encoded
    return encoded


def _head(w: BytesWriter, key: str) -> None:
    """A Tag's key field (1) and the header of its vType (2)."""
    w.append(_NEXT_BINARY)
    _bin(w, _utf8(key))
    w.append((1 << 4) | _C_I32)


def _text_field(text: str) -> bytes:
    out = _texts.get(text)
    if out is None:
        out = _keep(_texts, text, _made(lambda w: _bin(w, _utf8(text))))
    return out


def _tag(w: BytesWriter, key: str, value: Any) -> None:
    """A Tag: key (1), vType (2), then the one value field its type names."""
    if isinstance(value, int) and not isinstance(value, bool) and _is_i64(value):
        _long_tag(w, key, value)
    elif isinstance(value, str):
        tag = _strings.get((key, value))
        if tag is None:
            tag = _keep(_strings, (key, value), _made(lambda t: _string_tag(t, key, value)))
        w.write(tag)
    else:
        _head(w, key)
        if isinstance(value, bool):
            _zigzag(w, _BOOL)
            w.append((3 << 4) | (_C_TRUE if value else _C_FALSE))
        elif isinstance(value, float):
            _zigzag(w, _DOUBLE)
            w.append((2 << 4) | _C_DOUBLE)
            w.write(struct.pack("<d", value))
        elif isinstance(value, bytes):
            _zigzag(w, _BINARY)
            w.append((5 << 4) | _C_BINARY)
            _bin(w, value)
        else:  # sequences, and ints beyond i64
            _zigzag(w, _STRING)
            w.append(_NEXT_BINARY)
            _bin(w, _utf8(_text(value)))
        w.append(0)


def _is_i64(n: int) -> bool:
    # (the first test in machine ints, compiled: most values pass it)
    return -(1 << 61) <= n < 1 << 61 or _I64_MIN <= n <= _I64_MAX


def _string_tag(w: BytesWriter, key: str, value: str) -> None:
    _head(w, key)
    _zigzag(w, _STRING)
    w.append(_NEXT_BINARY)
    w.write(_text_field(value))
    w.append(0)


def _long_tag(w: BytesWriter, key: str, value: int) -> None:
    head = _long_heads.get(key)
    if head is None:
        head = _keep(_long_heads, key, _made(lambda t: _long_head(t, key)))
    w.write(head)
    _zigzag(w, value)
    w.append(0)


def _long_head(w: BytesWriter, key: str) -> None:
    _head(w, key)
    _zigzag(w, _LONG)
    w.append((4 << 4) | _C_I64)


def _tags(w: BytesWriter, tags: Iterable[tuple[str, Any]]) -> None:
    for key, value in tags:
        _tag(w, key, value)


_SERVER: Final = SpanKind.SERVER
_CLIENT: Final = SpanKind.CLIENT
_SERVER_TAG: Final = _made(lambda w: _tag(w, "span.kind", "server"))
_CLIENT_TAG: Final = _made(lambda w: _tag(w, "span.kind", "client"))
_OTHER_KINDS: Final = [
    (SpanKind.PRODUCER, _made(lambda w: _tag(w, "span.kind", "producer"))),
    (SpanKind.CONSUMER, _made(lambda w: _tag(w, "span.kind", "consumer"))),
]
_ERROR_TAG: Final = _made(lambda w: _tag(w, "error", True))  # how the Jaeger UI marks a failure


def _status(kind: SpanKind, error: str | None) -> list[bytes]:
    """The tags that say a span's kind and whether it failed. (Kinds are
    told apart by identity: an enum's hash runs in Python.)"""
    if kind is _SERVER:
        out = [_SERVER_TAG]
    elif kind is _CLIENT:
        out = [_CLIENT_TAG]
    else:
        out = [tag for k, tag in _OTHER_KINDS if kind is k]
    if error is not None:
        out.append(_ERROR_TAG)
        if error:
            out.append(_made(lambda w: _tag(w, "otel.status_description", error)))
    return out


def encode_record(r: SpanRecord, w: BytesWriter | None = None) -> list[bytes]:
    """A span and its children (they share its trace, its id as their parent
    and its attributes: those are encoded once and copied). `w`: an empty
    buffer to work in, left empty."""
    if w is None:
        w = BytesWriter()
    trace_end = _span_ids(w, r)
    status = _status(r.kind, r.error)
    shared_at, shared_end = _span_rest(w, r, len(r.attrs) + len(status), status)
    own = w.getvalue()
    w.truncate(0)
    out = [own]
    if r.children:
        trace = own[:trace_end]
        shared = own[shared_at:shared_end]
        n_shared = len(r.attrs)
        for c in r.children:
            w.write(trace)
            w.append(_I64_FIELD)
            _id(w, c.span_id)
            w.append(_I64_FIELD)
            _id(w, r.span_id)
            w.append(_NEXT_BINARY)
            w.write(_text_field(c.name))
            _times(w, 2, c.start_ns, c.end_ns)
            cstatus = _status(c.kind, c.error)
            count = n_shared + len(c.attrs) + len(cstatus)
            if count:
                w.append(_NEXT_LIST)
                _list_head(w, count)
                w.write(shared)
                _tags(w, c.attrs.items())
                for tag in cstatus:
                    w.write(tag)
            w.append(0)
            out.append(w.getvalue())
            w.truncate(0)
    return out


def _span_ids(w: BytesWriter, r: SpanRecord) -> int:
    """A Span struct's traceIdLow (1), traceIdHigh (2), spanId (3) and
    parentSpanId (4); where its trace's fields end."""
    _trace_fields(w, r.trace_id)
    trace_end = len(w)
    w.append(_I64_FIELD)
    _id(w, r.span_id)
    w.append(_I64_FIELD)
    if r.parent_id is not None:
        _id(w, r.parent_id)
    else:
        w.append(0)
    return trace_end


def _span_rest(
    w: BytesWriter, r: SpanRecord, tag_count: int, extra: list[bytes]
) -> tuple[int, int]:
    """A Span struct's fields from operationName (5) on, its own attributes
    then `extra` as its tags; where its attributes' tags begin and end."""
    w.append(_NEXT_BINARY)
    w.write(_text_field(r.name))
    delta = 2  # to flags (7) from operationName (5), or from references (6)
    if r.links:
        w.append((1 << 4) | _C_LIST)
        _list_head(w, len(r.links))
        for trace_id, link_id in r.links:
            w.append((1 << 4) | _C_I32)
            _zigzag(w, _FOLLOWS_FROM)
            _trace_fields(w, trace_id)
            w.append(_I64_FIELD)
            _id(w, link_id)
            w.append(0)
        delta = 1
    _times(w, delta, r.start_ns, r.end_ns)
    at = end = len(w)
    if tag_count:
        w.append(_NEXT_LIST)
        _list_head(w, tag_count)
        at = len(w)
        _tags(w, r.attrs.items())
        end = len(w)
        for tag in extra:
            w.write(tag)
    if r.events:
        w.append(((1 if tag_count else 2) << 4) | _C_LIST)
        _list_head(w, len(r.events))
        for ename, ts, attrs in r.events:
            w.append(_I64_FIELD)
            _varint(w, (ts // 1000) << 1)
            if attrs:
                w.append(_NEXT_LIST)
                _list_head(w, len(attrs) + 1)
                _tag(w, "event", ename)
                _tags(w, attrs.items())
                w.append(0)
            else:
                w.write(_event_fields(ename))
    w.append(0)
    return at, end


def _times(w: BytesWriter, delta: int, start_ns: int, end_ns: int) -> None:
    """flags (sampled) `delta` fields on, startTime and duration (us)."""
    w.append((delta << 4) | _C_I32)
    w.append(2)  # zigzag 1
    w.append(_I64_FIELD)
    _varint(w, (start_ns // 1000) << 1)
    w.append(_I64_FIELD)
    _varint(w, ((end_ns - start_ns) // 1000) << 1)


def encode_records(records: list[SpanRecord]) -> list[bytes]:
    """Records and their children, as Span structs."""
    out: list[bytes] = []
    w = BytesWriter()
    for r in records:
        out += encode_record(r, w)
    return out


def pack(spans: list[bytes], budget: int) -> tuple[list[list[bytes]], int]:
    """Encoded spans in order, grouped so that no group's bytes exceed
    `budget` (a datagram's room for spans); and how many were left out for
    being larger than that alone."""
    groups: list[list[bytes]] = []
    group: list[bytes] = []
    size = 0
    too_large = 0
    for span in spans:
        n = len(span)
        if n > budget:
            too_large += 1
            continue
        if size + n > budget:
            groups.append(group)
            group, size = [], 0
        group.append(span)
        size += n
    if group:
        groups.append(group)
    return groups, too_large


def encode_span(r: SpanRecord, scope: str | None = None, version: str | None = None) -> bytes:
    """A Span struct (its children, if any, are encode_record's)."""
    extra = _status(r.kind, r.error)
    if scope is not None:
        extra.append(_made(lambda w: _tag(w, "otel.scope.name", scope)))
        if version:
            extra.append(_made(lambda w: _tag(w, "otel.scope.version", version)))
    w = BytesWriter()
    _span_ids(w, r)
    _span_rest(w, r, len(r.attrs) + len(extra), extra)
    return w.getvalue()


def _trace_fields(w: BytesWriter, trace_id: int) -> None:
    """traceIdLow (1), traceIdHigh (2)."""
    w.append(_I64_FIELD)
    _id_halves(w, (trace_id >> 32) & 0xFFFFFFFF, trace_id & 0xFFFFFFFF)
    w.append(_I64_FIELD)
    _id_halves(w, trace_id >> 96, (trace_id >> 64) & 0xFFFFFFFF)


def _event_fields(name: str) -> bytes:
    """A Log's fields (2) when they are the event's name alone, and its end."""
    out = _events.get(name)
    if out is None:
        out = _keep(_events, name, _made(lambda w: _lone_event(w, name)))
    return out


def _lone_event(w: BytesWriter, name: str) -> None:
    w.append(_NEXT_LIST)
    _list_head(w, 1)
    _tag(w, "event", name)
    w.append(0)


def encode_process(service: str, attributes: dict[str, Any]) -> bytes:
    """A Process struct: serviceName (1), tags (2)."""
    w = BytesWriter()
    w.append(_NEXT_BINARY)
    _bin(w, _utf8(service))
    if attributes:
        w.append(_NEXT_LIST)
        _list_head(w, len(attributes))
        _tags(w, attributes.items())
    w.append(0)
    return w.getvalue()
