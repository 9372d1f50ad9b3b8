"""Jaeger's Span and Process structs (jaeger-idl's jaeger.thrift) in the
compact thrift protocol, written by hand.

The `thrift` library's own writer costs about 70 us per span in Python; this
costs a few, and compiled with the IO path (scripts/compile) under one,
which matters because every guest IO makes several spans. The structs are
self-contained (field ids are deltas within their own struct), so jaeger.py
copies these bytes into its `emitBatch` datagrams as they are.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from typing import Any, Final

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


def _varint(n: int) -> bytes:
    """0 <= n < 2**65 as a varint.

    Built as one little-endian int turned into bytes at the end: compiled,
    that is a few machine instructions per group where a list of bytes costs
    an object each. Past 62 bits the low 56 go first, so that what is left
    fits a machine int too.
    """
    if n < 0x80:
        return _SMALL[n]
    if n >= 1 << 62:
        return _continued(n & 0xFFFFFFFFFFFFFF) + _varint(n >> 56)
    acc = 0
    shift = 0
    while n > 0x7F:
        acc |= ((n & 0x7F) | 0x80) << shift
        shift += 8
        n >>= 7
        if shift == 56:  # seven bytes: as many as fit a machine int
            return acc.to_bytes(7, "little") + _varint(n)
    return (acc | n << shift).to_bytes(shift // 8 + 1, "little")


def _continued(low: int) -> bytes:
    """0 <= low < 2**56 as eight varint bytes, each marked to go on."""
    acc = 0
    for shift in range(0, 56, 8):
        acc |= ((low & 0x7F) | 0x80) << shift
        low >>= 7
    return acc.to_bytes(7, "little") + _GOING_ON[low]


_SMALL: Final = [bytes([i]) for i in range(0x80)]
_GOING_ON: Final = [bytes([i | 0x80]) for i in range(0x80)]


def _zigzag(n: int) -> bytes:
    """A signed 64-bit (or 32-bit) integer as the compact protocol writes it."""
    if 0 <= n < 1 << 61:  # (all in machine ints)
        return _varint(n << 1)
    return _varint(((n << 1) ^ (n >> 63)) & 0xFFFFFFFFFFFFFFFF)


def _id(u: int) -> bytes:
    """An unsigned 64-bit id as the zigzag varint of thrift's (signed) i64
    holding the same bits, worked out in 32-bit halves: compiled code does
    those in machine ints, where a 64-bit value would be a Python object."""
    return _id_halves(u >> 32, u & 0xFFFFFFFF)


def _id_halves(hi: int, lo: int) -> bytes:
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
        return _continued(low56) + _varint(top)
    return _varint(low56)


def _field(delta: int, ctype: int) -> bytes:
    return bytes([(delta << 4) | ctype])


def _bin(data: bytes) -> bytes:
    return _varint(len(data)) + data


def _list_head(n: int) -> bytes:
    """The header of a list of n structs."""
    if n < 15:
        return bytes([(n << 4) | _C_STRUCT])
    return bytes([0xF0 | _C_STRUCT]) + _varint(n)


def _utf8(text: str) -> bytes:
    # Not strict: a lone surrogate in an attribute must not fail the whole batch.
    return text.encode("utf-8", "replace")


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):  # attribute sequences: JSON reads back unambiguously
        return json.dumps(list(value), default=str)
    return str(value)


# The next field, of each type (field ids that follow on from the last).
_I64_FIELD: Final = _field(1, _C_I64)
_NEXT_BINARY: Final = _field(1, _C_BINARY)
_NEXT_LIST: Final = _field(1, _C_LIST)
_ONE: Final = _zigzag(1)

# A Tag's fields after its key: vType, then the value's field header.
_LONG_VALUE: Final = _zigzag(_LONG) + _field(4, _C_I64)
_STRING_VALUE: Final = _zigzag(_STRING) + _field(1, _C_BINARY)

# Made once and kept, up to _KEPT each: most repeat from span to span (keys,
# ids, names). Large ints are not kept: a job id is new in every span.
_KEPT: Final = 10_000
_heads: Final[dict[str, bytes]] = {}  # a Tag's key field and vType's header, by key
_long_heads: Final[dict[str, bytes]] = {}  # and an i64 Tag's vType and value field header
_strings: Final[dict[tuple[str, str], bytes]] = {}  # a string Tag, by key and value
_texts: Final[dict[str, bytes]] = {}  # a binary field's length and bytes, by text
_events: Final[dict[str, bytes]] = {}  # a Log's fields, by the event's name (see _event_fields)
_SMALL_INTS: Final = 1 << 10
_small_ints: Final[dict[tuple[str, int], bytes]] = {}  # an i64 Tag below _SMALL_INTS


def _keep(cache: dict[Any, bytes], key: Any, encoded: bytes) -> bytes:
    """Keep `encoded` in `cache` under `key` (emptying a full one first)."""
    if len(cache) >= _KEPT:
        cache.clear()
    cache[key] = encoded
    return encoded


def _head(key: str) -> bytes:
    head = _heads.get(key)
    if head is None:
        head = _keep(_heads, key, _field(1, _C_BINARY) + _bin(_utf8(key)) + _field(1, _C_I32))
    return head


def _text_field(text: str) -> bytes:
    out = _texts.get(text)
    if out is None:
        out = _keep(_texts, text, _bin(_utf8(text)))
    return out


def _tag(key: str, value: Any) -> bytes:
    """A Tag: key (1), vType (2), then the one value field its type names."""
    if isinstance(value, int) and not isinstance(value, bool) and _I64_MIN <= value <= _I64_MAX:
        if 0 <= value < _SMALL_INTS:  # client ids, the first extents: kept
            tag = _small_ints.get((key, value))
            if tag is None:
                tag = _keep(_small_ints, (key, value), _long_tag(key, value))
            return tag
        return _long_tag(key, value)
    if isinstance(value, str):
        tag = _strings.get((key, value))
        if tag is None:
            tag = _keep(
                _strings, (key, value), _head(key) + _STRING_VALUE + _text_field(value) + b"\0"
            )
        return tag
    if isinstance(value, bool):
        body = _zigzag(_BOOL) + _field(3, _C_TRUE if value else _C_FALSE)
    elif isinstance(value, float):
        body = _zigzag(_DOUBLE) + _field(2, _C_DOUBLE) + struct.pack("<d", value)
    elif isinstance(value, bytes):
        body = _zigzag(_BINARY) + _field(5, _C_BINARY) + _bin(value)
    else:  # sequences, and ints beyond i64
        body = _STRING_VALUE + _bin(_utf8(_text(value)))
    return _head(key) + body + b"\0"


def _long_tag(key: str, value: int) -> bytes:
    head = _long_heads.get(key)
    if head is None:
        head = _keep(_long_heads, key, _head(key) + _LONG_VALUE)
    return head + _zigzag(value) + b"\0"


def _tags(tags: Iterable[tuple[str, Any]]) -> list[bytes]:
    return [_tag(key, value) for key, value in tags]


_SERVER: Final = SpanKind.SERVER
_CLIENT: Final = SpanKind.CLIENT
_SERVER_TAG: Final = _tag("span.kind", "server")
_CLIENT_TAG: Final = _tag("span.kind", "client")
_OTHER_KINDS: Final = [
    (SpanKind.PRODUCER, _tag("span.kind", "producer")),
    (SpanKind.CONSUMER, _tag("span.kind", "consumer")),
]
_ERROR_TAG: Final = _tag("error", True)  # what the Jaeger UI marks a failed span by


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
            out.append(_tag("otel.status_description", error))
    return out


def encode_record(r: SpanRecord) -> list[bytes]:
    """A span and its children (they share its trace, its id as their parent
    and its attributes: those are encoded once)."""
    trace = _trace_fields(r.trace_id)
    own_id = _id(r.span_id)
    shared = _tags(r.attrs.items())
    joined = b"".join(shared)
    status = _status(r.kind, r.error)
    out = [
        _span_bytes(
            trace, own_id, _parent_id(r), r.name, r.start_ns, r.end_ns,
            len(shared) + len(status), joined + b"".join(status), r.links, r.events,
        )
    ]  # fmt: skip
    for c in r.children:
        own = _tags(c.attrs.items())
        own += _status(c.kind, c.error)
        n, tags = len(shared) + len(own), joined + b"".join(own)
        span_id = _id(c.span_id)
        out.append(_span_bytes(trace, span_id, own_id, c.name, c.start_ns, c.end_ns, n, tags))
    return out


def encode_records(records: list[SpanRecord]) -> list[bytes]:
    """Records and their children, as Span structs."""
    out: list[bytes] = []
    for r in records:
        out += encode_record(r)
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
    tags = _tags(r.attrs.items())
    tags += _status(r.kind, r.error)
    if scope is not None:
        tags.append(_tag("otel.scope.name", scope))
        if version:
            tags.append(_tag("otel.scope.version", version))
    return _span_bytes(
        _trace_fields(r.trace_id), _id(r.span_id), _parent_id(r), r.name,
        r.start_ns, r.end_ns, len(tags), b"".join(tags), r.links, r.events,
    )  # fmt: skip


def _trace_fields(trace_id: int) -> bytes:
    """traceIdLow (1), traceIdHigh (2)."""
    low = _id_halves((trace_id >> 32) & 0xFFFFFFFF, trace_id & 0xFFFFFFFF)
    high = _id_halves(trace_id >> 96, (trace_id >> 64) & 0xFFFFFFFF)
    return _I64_FIELD + low + _I64_FIELD + high


def _parent_id(r: SpanRecord) -> bytes:
    return _id(r.parent_id) if r.parent_id is not None else _SMALL[0]


def _span_bytes(
    trace: bytes,
    span_id: bytes,
    parent: bytes,
    name: str,
    start_ns: int,
    end_ns: int,
    tag_count: int,
    tags: bytes,
    links: tuple[tuple[int, int], ...] = (),
    events: tuple[tuple[str, int, dict[str, Any] | None], ...] = (),
) -> bytes:
    """A Span struct, its fields 1-11 in order, from pieces already encoded
    (the trace id's fields, the span's and its parent's ids, its tags)."""
    i64 = _I64_FIELD
    parts = [trace, i64, span_id, i64, parent, _NEXT_BINARY, _text_field(name)]
    add = parts.append
    delta = 2  # to flags (7) from operationName (5), or from references (6)
    if links:
        add(_field(1, _C_LIST))
        add(_list_head(len(links)))
        for trace_id, link_id in links:
            parts += [_field(1, _C_I32), _zigzag(_FOLLOWS_FROM), _trace_fields(trace_id),
                      i64, _id(link_id), b"\0"]  # fmt: skip
        delta = 1
    add(_FLAGS_AFTER[delta])  # flags: sampled
    add(i64)
    add(_varint((start_ns // 1000) << 1))
    add(i64)
    add(_varint(((end_ns - start_ns) // 1000) << 1))
    if tag_count:
        add(_NEXT_LIST)
        add(_list_head(tag_count))
        add(tags)
    if events:
        add(_field(1 if tag_count else 2, _C_LIST))
        add(_list_head(len(events)))
        for ename, ts, attrs in events:
            add(i64)
            add(_varint((ts // 1000) << 1))
            if attrs:
                fields = [_tag("event", ename), *_tags(attrs.items())]
                add(_NEXT_LIST)
                add(_list_head(len(fields)))
                parts += fields
                add(b"\0")
            else:
                add(_event_fields(ename))
    add(b"\0")
    return b"".join(parts)


def _event_fields(name: str) -> bytes:
    """A Log's fields (2) when they are the event's name alone, and its end."""
    out = _events.get(name)
    if out is None:
        out = _keep(_events, name, _NEXT_LIST + _ONE_STRUCT + _tag("event", name) + b"\0")
    return out


# The flags field (sampled) after operationName (delta 2) or references (1).
_FLAGS_AFTER: Final = [b"", _field(1, _C_I32) + _ONE, _field(2, _C_I32) + _ONE]
_ONE_STRUCT: Final = _list_head(1)


def encode_process(service: str, attributes: dict[str, Any]) -> bytes:
    """A Process struct: serviceName (1), tags (2)."""
    parts = [_field(1, _C_BINARY), _bin(_utf8(service))]
    tags = _tags(attributes.items())
    if tags:
        parts += [_field(1, _C_LIST), _list_head(len(tags)), *tags]
    return b"".join(parts) + b"\0"
