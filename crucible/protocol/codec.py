"""Encoding and decoding of whole frames: u32 LE length (counting itself) + bincode.

The schema is messages.py itself: each field's annotation names its codec
(fields.py), so adding a message there is enough to make it encodable. The
hot messages in their common shape go through hand-packed layouts first
(fastpath.py); whatever those decline takes the schema path. Bulk messages
(Write, WriteUnwritten, ReadResponse) end with their data, which
`encode_parts` hands back as a separate buffer so that it is never copied on
the way out.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Final

from crucible.protocol import fastpath
from crucible.protocol.fastpath import TAG_OF, Parts, with_bulk
from crucible.protocol.fields import FIELD_CODECS, Get, Put
from crucible.protocol.messages import MAX_FRAME_LEN, MESSAGE_TYPES, Message
from crucible.protocol.wire import U32, DecodeError, ProtocolError, Reader

__all__ = ["Parts", "decode_body", "encode", "encode_parts"]

# Per message type: the codecs of its fields in order; "Data" (bulk bytes) is
# handled apart because it is always the last field.
_SCHEMA: Final[list[tuple[type, list[tuple[str, Put, Get]], bool]]] = []
for _cls in MESSAGE_TYPES:
    _specs: list[tuple[str, Put, Get]] = []
    _bulk = False
    for _f in fields(_cls):
        if _f.type == "Data":
            _bulk = True
            continue
        _put, _get = FIELD_CODECS[str(_f.type)]
        _specs.append((_f.name, _put, _get))
    _SCHEMA.append((_cls, _specs, _bulk))


def encode_parts(msg: Message) -> Parts:
    """The frame as buffers to write in order: the header, then any bulk data."""
    cls = type(msg)
    tag = TAG_OF[cls]
    packed = fastpath.ENCODERS.get(cls)
    if packed is not None:
        parts = packed(msg, tag)
        if parts is not None:
            return parts
    return encode_schema(msg)


def encode_schema(msg: Message) -> Parts:
    """Field by field from the schema: every message can take this path."""
    tag = TAG_OF[type(msg)]
    cls, specs, bulk = _SCHEMA[tag]
    out = bytearray(4)
    out += U32.pack(tag)
    for name, put, _ in specs:
        put(out, getattr(msg, name))
    if not bulk:
        if len(out) > MAX_FRAME_LEN:
            raise ProtocolError(f"{cls.__name__} frame of {len(out)} bytes is too large")
        U32.pack_into(out, 0, len(out))
        return [out]
    return with_bulk(out, msg.data, cls.__name__)  # type: ignore[union-attr]


def encode(msg: Message) -> bytes:
    return b"".join(encode_parts(msg))


def decode_body(body: memoryview) -> Message:
    """Decode one frame without its length prefix. Raises ProtocolError."""
    if len(body) >= 4:
        fast = fastpath.DECODERS.get(U32.unpack_from(body)[0])
        if fast is not None:
            msg = fast(body)
            if msg is not None:
                return msg
    return decode_schema(body)


def decode_schema(body: memoryview) -> Message:
    """Field by field from the schema: every frame can take this path."""
    r = Reader(body)
    try:
        tag = r.u32()
        if tag >= len(_SCHEMA):
            raise DecodeError(f"unknown message variant {tag}")
        cls, specs, bulk = _SCHEMA[tag]
        values = [get(r) for _, _, get in specs]
        if bulk:
            values.append(r.byte_string())
        if r.remaining():
            raise DecodeError(f"{r.remaining()} trailing bytes after {cls.__name__}")
        out: Message = cls(*values)
        return out
    except (DecodeError, ValueError) as e:
        raise ProtocolError(f"malformed frame: {e}") from None
