"""Encoding and decoding of whole frames: u32 LE length (counting itself) + bincode.

The per-field codecs are chosen from the annotation names in messages.py, so
adding a message there is enough to make it encodable. Bulk messages (Write,
WriteUnwritten, ReadResponse) end with their data, which `encode_parts` hands
back as a separate buffer so that it is never copied on the way out.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from crucible.protocol import wire
from crucible.protocol.errors import CrucibleError, decode_error, encode_error
from crucible.protocol.messages import (
    MAX_FRAME_LEN,
    MESSAGE_TYPES,
    BarrierAck,
    BlockContext,
    EncryptionContext,
    FlushAck,
    Message,
    ReadBlockContext,
    ReadRequest,
    ReadResponse,
    TrimAck,
    Write,
    WriteAck,
    WriteUnwritten,
    WriteUnwrittenAck,
)
from crucible.protocol.wire import U32, U64, DecodeError, Reader, struct_run
from crucible.region.definition import RegionDefinition

Put = Callable[[bytearray, Any], None]
Get = Callable[[Reader], Any]


class ProtocolError(Exception):
    """A frame that cannot be accepted; the connection it came on must close."""


# ---- composite field codecs -------------------------------------------------

_QB = struct.Struct("<QB")
_IQ = struct.Struct("<IQ")
_QQ = struct.Struct("<QQ")
# Frame length, tag, upstairs_id, session_id, job_id, dependency count: how
# ReadRequest, Write and WriteUnwritten begin.
_ID_HEAD = struct.Struct("<IIQ16sQ16sQQ")


def put_contexts(out: bytearray, ctxs: list[BlockContext]) -> None:
    out += U64.pack(len(ctxs))
    for h, enc in ctxs:
        if enc is None:
            out += _QB.pack(h, 0)
        else:
            out += _QB.pack(h, 1)
            out += enc.nonce
            out += enc.tag


def get_contexts(r: Reader) -> list[BlockContext]:
    n = r.length(9)
    start = r.pos
    raw = bytes(r.buf[start : start + 9 * n])
    if len(raw) == 9 * n and raw[8::9].count(0) == n:
        # Fast path: no encryption contexts, a fixed 9 bytes each.
        r.pos = start + 9 * n
        return [BlockContext(h) for h, _ in _QB.iter_unpack(raw)]
    out = []
    for _ in range(n):
        h = r.u64()
        enc = _get_enc(r) if r.option_tag() else None
        out.append(BlockContext(h, enc))
    return out


def _get_enc(r: Reader) -> EncryptionContext:
    return EncryptionContext(bytes(r.take(12)), bytes(r.take(16)))


def _put_enc(out: bytearray, enc: EncryptionContext) -> None:
    if len(enc.nonce) != 12 or len(enc.tag) != 16:
        raise ValueError("encryption context needs a 12-byte nonce and a 16-byte tag")
    out += enc.nonce
    out += enc.tag


def put_read_block_context(out: bytearray, c: ReadBlockContext) -> None:
    if c is None:
        out += U32.pack(0)
    elif isinstance(c, EncryptionContext):
        out += U32.pack(1)
        _put_enc(out, c)
    else:
        out += U32.pack(2)
        out += U64.pack(c)


def get_read_block_context(r: Reader) -> ReadBlockContext:
    tag = r.u32()
    if tag == 0:
        return None
    if tag == 1:
        return _get_enc(r)
    if tag == 2:
        return r.u64()
    raise DecodeError(f"invalid ReadBlockContext variant {tag}")


def put_read_blocks(out: bytearray, v: list[ReadBlockContext] | CrucibleError) -> None:
    if isinstance(v, CrucibleError):
        out += U32.pack(1)
        encode_error(out, v)
        return
    out += U32.pack(0)
    out += U64.pack(len(v))
    if all(type(c) is int for c in v):  # plain hashes: all one shape
        out += b"".join([_IQ.pack(2, c) for c in v])
        return
    for c in v:
        put_read_block_context(out, c)


def get_read_blocks(r: Reader) -> list[ReadBlockContext] | CrucibleError:
    tag = r.u32()
    if tag == 1:
        return decode_error(r)
    if tag != 0:
        raise DecodeError(f"invalid Result variant {tag}")
    n = r.length(4)
    return [get_read_block_context(r) for _ in range(n)]


def put_unit_result(out: bytearray, v: CrucibleError | None) -> None:
    if v is None:
        out += U32.pack(0)
    else:
        out += U32.pack(1)
        encode_error(out, v)


def get_unit_result(r: Reader) -> CrucibleError | None:
    tag = r.u32()
    if tag == 0:
        return None
    if tag == 1:
        return decode_error(r)
    raise DecodeError(f"invalid Result variant {tag}")


def put_close_result(out: bytearray, v: tuple[int, int, bool] | CrucibleError) -> None:
    if isinstance(v, CrucibleError):
        out += U32.pack(1)
        encode_error(out, v)
    else:
        out += U32.pack(0)
        out += U64.pack(v[0])
        out += U64.pack(v[1])
        wire.put_bool(out, v[2])


def get_close_result(r: Reader) -> tuple[int, int, bool] | CrucibleError:
    tag = r.u32()
    if tag == 0:
        return (r.u64(), r.u64(), r.boolean())
    if tag == 1:
        return decode_error(r)
    raise DecodeError(f"invalid Result variant {tag}")


def put_region_def(out: bytearray, d: RegionDefinition) -> None:
    wire.put_u64(out, d.block_size)
    wire.put_u64(out, d.extent_size)
    wire.put_u32(out, d.shift)
    wire.put_u32(out, d.extent_count)
    wire.put_uuid(out, d.uuid)
    wire.put_bool(out, d.encrypted)
    wire.put_u64(out, d.database_read_version)
    wire.put_u64(out, d.database_write_version)


def get_region_def(r: Reader) -> RegionDefinition:
    block_size = r.u64()
    extent_size = r.u64()
    r.u32()  # shift: derived from block_size
    return RegionDefinition(
        block_size=block_size,
        extent_size=extent_size,
        extent_count=r.u32(),
        uuid=r.uuid(),
        encrypted=r.boolean(),
        database_read_version=r.u64(),
        database_write_version=r.u64(),
    )


def _put_option(put: Put) -> Put:
    def put_opt(out: bytearray, v: Any) -> None:
        if v is None:
            out.append(0)
        else:
            out.append(1)
            put(out, v)

    return put_opt


def _get_option(get: Get) -> Get:
    def get_opt(r: Reader) -> Any:
        return get(r) if r.option_tag() else None

    return get_opt


# Annotation name in messages.py -> (encoder, decoder).
FIELD_CODECS: dict[str, tuple[Put, Get]] = {
    "u8": (wire.put_u8, Reader.u8),
    "ClientId": (wire.put_u8, Reader.u8),
    "u32": (wire.put_u32, Reader.u32),
    "ExtentId": (wire.put_u32, Reader.u32),
    "u64": (wire.put_u64, Reader.u64),
    "JobId": (wire.put_u64, Reader.u64),
    "RepairId": (wire.put_u64, Reader.u64),
    "bool": (wire.put_bool, Reader.boolean),
    "Uuid": (wire.put_uuid, Reader.uuid),
    "SocketAddr": (wire.put_socket_addr, Reader.socket_addr),
    "Deps": (wire.put_u64_vec, Reader.u64_vec),
    "U64Vec": (wire.put_u64_vec, Reader.u64_vec),
    "U32Vec": (wire.put_u32_vec, Reader.u32_vec),
    "U8Vec": (wire.put_u8_vec, Reader.u8_vec),
    "BoolVec": (wire.put_bool_vec, Reader.bool_vec),
    "OptJobId": (_put_option(wire.put_u64), _get_option(Reader.u64)),
    "OptU32": (_put_option(wire.put_u32), _get_option(Reader.u32)),
    "OptSnapshot": (_put_option(wire.put_string), _get_option(Reader.string)),
    "CrucibleError": (encode_error, decode_error),
    "UnitResult": (put_unit_result, get_unit_result),
    "CloseResult": (put_close_result, get_close_result),
    "RegionDefinition": (put_region_def, get_region_def),
    "Contexts": (put_contexts, get_contexts),
    "ReadBlocks": (put_read_blocks, get_read_blocks),
}

_TAG_OF: dict[type, int] = {cls: i for i, cls in enumerate(MESSAGE_TYPES)}
# Per message type: the codecs of its fields in order; "Data" (bulk bytes) is
# handled apart because it is always the last field.
_SCHEMA: list[tuple[type, list[tuple[str, Put, Get]], bool]] = []
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


Parts = list[bytes | bytearray | memoryview]


def encode_parts(msg: Message) -> Parts:
    """The frame as buffers to write in order: the header, then any bulk data."""
    cls = type(msg)
    tag = _TAG_OF[cls]
    packed = _PACKED.get(cls)
    if packed is not None:
        parts = packed(msg, tag)
        if parts is not None:
            return parts
    return _encode_generic(msg, tag)


# The hot messages in their common shape are packed by hand, a few struct calls
# each; None sends a message to the field-by-field encoder. Tests check that
# both give the same bytes.


def _pack_ack(msg: Any, tag: int) -> Parts | None:
    if msg.result is not None:
        return None
    up, sess = msg.upstairs_id.bytes, msg.session_id.bytes
    return [_ACK_FRAME.pack(4 + _ACK.size, tag, 16, up, 16, sess, msg.job_id, 0)]


def _pack_read_response(msg: Any, tag: int) -> Parts | None:
    blocks, data = msg.blocks, msg.data
    if not isinstance(blocks, list):
        return None
    n = len(blocks)
    try:  # every context a plain hash (an int): anything else does not pack
        ctxs = struct_run("IQ", n).pack(*[v for c in blocks for v in (2, c)])
    except struct.error:
        return None
    total = 4 + _READ_HEAD.size + 12 * n + 8 + len(data)
    if total > MAX_FRAME_LEN:
        raise ProtocolError(f"ReadResponse frame of {total} bytes is too large")
    head = _READ_FRAME.pack(
        total, tag, 16, msg.upstairs_id.bytes, 16, msg.session_id.bytes, msg.job_id, 0, n
    )
    return [head + ctxs + U64.pack(len(data)), data]


def _pack_read_request(msg: Any, tag: int) -> Parts | None:
    deps = msg.dependencies
    head = _ID_HEAD.pack(
        _ID_HEAD.size + 8 * len(deps) + 16,
        tag,
        16,
        msg.upstairs_id.bytes,
        16,
        msg.session_id.bytes,
        msg.job_id,
        len(deps),
    )
    return [head + struct_run("Q", len(deps)).pack(*deps) + _QQ.pack(msg.start, msg.count)]


def _pack_write(msg: Any, tag: int) -> Parts | None:
    """Write / WriteUnwritten with plain contexts: header, contexts and data
    length in a few packs, and the data as its own buffer."""
    deps, ctxs, data = msg.dependencies, msg.contexts, msg.data
    if any(c.encryption is not None for c in ctxs):
        return None
    n = len(ctxs)
    head = bytearray(
        _ID_HEAD.pack(
            0, tag, 16, msg.upstairs_id.bytes, 16, msg.session_id.bytes, msg.job_id, len(deps)
        )
    )
    head += struct_run("Q", len(deps)).pack(*deps)
    head += _QQ.pack(msg.start, n)
    head += struct_run("QB", n).pack(*[v for c in ctxs for v in (c.hash, 0)])
    return _with_bulk(head, data, type(msg).__name__)


def _with_bulk(head: bytearray, data: bytes | bytearray | memoryview, name: str) -> Parts:
    """A frame whose bulk data follows the header: the data's length, then the
    frame length in front, and the data as its own buffer."""
    head += U64.pack(len(data))
    total = len(head) + len(data)
    if total > MAX_FRAME_LEN:
        raise ProtocolError(f"{name} frame of {total} bytes is too large")
    U32.pack_into(head, 0, total)
    return [head, data]


def _encode_generic(msg: Message, tag: int) -> Parts:
    """Field by field from the schema: every message can take this path."""
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
    return _with_bulk(out, msg.data, cls.__name__)  # type: ignore[union-attr]


def encode(msg: Message) -> bytes:
    return b"".join(encode_parts(msg))


# The commonest replies, acks with an Ok result, have one fixed layout:
# tag, upstairs_id, session_id, job_id, Ok. Decoded in one unpack.
_ACK = struct.Struct("<IQ16sQ16sQI")
_ACK_FRAME = struct.Struct("<IIQ16sQ16sQI")  # the same, behind the frame length
_ACK_CLASSES = (WriteAck, WriteUnwrittenAck, FlushAck, BarrierAck, TrimAck)
_ACK_TYPES = {_TAG_OF[c]: c for c in _ACK_CLASSES}
_PACKED: dict[type, Callable[[Any, int], Parts | None]] = {
    **dict.fromkeys(_ACK_CLASSES, _pack_ack),
    ReadResponse: _pack_read_response,
    ReadRequest: _pack_read_request,
    Write: _pack_write,
    WriteUnwritten: _pack_write,
}


_READ_HEAD = struct.Struct("<IQ16sQ16sQIQ")  # tag, ids, job, Ok, context count
_READ_FRAME = struct.Struct("<IIQ16sQ16sQIQ")  # the same, behind the frame length
_READ_TAG = _TAG_OF[ReadResponse]


def _fast_read_response(body: memoryview) -> Message | None:
    """A ReadResponse whose blocks all carry plain hashes (the common case),
    decoded without walking it field by field; None when it is anything else."""
    if len(body) < _READ_HEAD.size + 8:
        return None
    tag, n1, up, n2, sess, job, ok, count = _READ_HEAD.unpack_from(body)
    if tag != _READ_TAG or n1 != 16 or n2 != 16 or ok != 0:
        return None
    ctx_end = _READ_HEAD.size + 12 * count
    if ctx_end + 8 > len(body):
        return None
    pairs = struct_run("IQ", count).unpack_from(body, _READ_HEAD.size)
    if pairs[0::2].count(2) != count:  # every context Unencrypted{hash}
        return None
    (data_len,) = U64.unpack_from(body, ctx_end)
    if ctx_end + 8 + data_len != len(body):
        return None
    hashes: list[ReadBlockContext] = list(pairs[1::2])
    return ReadResponse(
        wire.cached_uuid(up), wire.cached_uuid(sess), job, hashes, body[ctx_end + 8 :]
    )


_WRITE_HEAD = struct.Struct("<IQ16sQ16sQQ")  # tag, ids, job, dependency count
_WRITE_TYPES: dict[int, type[Write] | type[WriteUnwritten]] = {
    _TAG_OF[Write]: Write,
    _TAG_OF[WriteUnwritten]: WriteUnwritten,
}


def _fast_write(body: memoryview) -> Message | None:
    """Write / WriteUnwritten with plain contexts, the bulk of all traffic,
    decoded with a few unpacks; None for anything else (the general path
    then decodes it, or says what is wrong with it)."""
    if len(body) < _WRITE_HEAD.size:
        return None
    tag, n1, up, n2, sess, job, ndeps = _WRITE_HEAD.unpack_from(body)
    cls = _WRITE_TYPES.get(tag)
    if cls is None or n1 != 16 or n2 != 16:
        return None
    pos = _WRITE_HEAD.size
    if pos + 8 * ndeps + 16 > len(body):
        return None
    deps = list(struct_run("Q", ndeps).unpack_from(body, pos))
    pos += 8 * ndeps
    start, nctx = struct.unpack_from("<QQ", body, pos)
    pos += 16
    end_ctx = pos + 9 * nctx
    if end_ctx + 8 > len(body):
        return None
    raw = bytes(body[pos:end_ctx])
    if raw[8::9].count(0) != nctx:
        return None
    (data_len,) = U64.unpack_from(body, end_ctx)
    if end_ctx + 8 + data_len != len(body):
        return None
    contexts = [BlockContext(h) for h, _ in _QB.iter_unpack(raw)]
    msg: Message = cls(
        wire.cached_uuid(up),
        wire.cached_uuid(sess),
        job,
        deps,
        start,
        contexts,
        body[end_ctx + 8 :],
    )
    return msg


_READ_REQ_TAG = _TAG_OF[ReadRequest]


def _fast_read_request(body: memoryview) -> Message | None:
    if len(body) < _WRITE_HEAD.size:
        return None
    tag, n1, up, n2, sess, job, ndeps = _WRITE_HEAD.unpack_from(body)
    if tag != _READ_REQ_TAG or n1 != 16 or n2 != 16:
        return None
    pos = _WRITE_HEAD.size
    if pos + 8 * ndeps + 16 != len(body):
        return None
    deps = list(struct_run("Q", ndeps).unpack_from(body, pos))
    start, count = struct.unpack_from("<QQ", body, pos + 8 * ndeps)
    return ReadRequest(wire.cached_uuid(up), wire.cached_uuid(sess), job, deps, start, count)


_FAST_DECODERS = {
    _TAG_OF[Write]: _fast_write,
    _TAG_OF[WriteUnwritten]: _fast_write,
    _TAG_OF[ReadResponse]: _fast_read_response,
    _READ_REQ_TAG: _fast_read_request,
}


def decode_body(body: memoryview) -> Message:
    """Decode one frame without its length prefix. Raises ProtocolError."""
    fast_decoder = _FAST_DECODERS.get(U32.unpack_from(body)[0]) if len(body) >= 4 else None
    fast = fast_decoder(body) if fast_decoder is not None else None
    if fast is not None:
        return fast
    if len(body) == _ACK.size:
        tag, n1, up, n2, sess, job, ok = _ACK.unpack(body)
        ack_cls = _ACK_TYPES.get(tag)
        if ack_cls is not None and n1 == 16 and n2 == 16 and ok == 0:
            msg: Message = ack_cls(wire.cached_uuid(up), wire.cached_uuid(sess), job, None)
            return msg
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


class FrameDecoder:
    """Sans-IO receive side: bytes in, whole messages out.

    Bytes land in one buffer, copied in (`feed`) or received straight into it
    (`get_buffer`, then `advance`: an asyncio.BufferedProtocol). Frames are
    taken from a moving offset; the unparsed tail moves to the front only when
    free space runs short, and the buffer grows to hold a whole large frame.
    Each frame is copied out once, and bulk data in the message is a view
    into that copy.
    """

    SIZE = 256 << 10
    MIN_FREE = 64 << 10  # offered to each receive

    def __init__(self, max_frame: int = MAX_FRAME_LEN) -> None:
        self._buf = bytearray(self.SIZE)
        self._start = self._end = 0  # unparsed bytes are _buf[_start:_end]
        self._max = max_frame

    def get_buffer(self) -> memoryview:
        """Free space to receive into; say how much arrived with `advance`."""
        self._make_room(self.MIN_FREE)
        return memoryview(self._buf)[self._end :]

    def advance(self, n: int) -> None:
        self._end += n

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        self._make_room(n)
        self._buf[self._end : self._end + n] = data
        self._end += n

    def _make_room(self, want: int) -> None:
        """At least `want` free bytes after the end, and room for the rest of
        a frame whose length is already known."""
        buf, start, end = self._buf, self._start, self._end
        avail = end - start
        if avail >= 4:
            (n,) = U32.unpack_from(buf, start)
            if n <= self._max:  # a bad length is refused by next_message
                want = max(want, n - avail)
        if len(buf) - end >= want:
            return
        if start:
            buf[:avail] = buf[start:end]
            self._start, self._end = 0, avail
        if len(buf) - avail < want:
            grown = bytearray(max(2 * len(buf), avail + want))
            grown[:avail] = buf[:avail]
            self._buf = grown

    def next_message(self) -> Message | None:
        start = self._start
        avail = self._end - start
        if avail < 4:
            if not avail and len(self._buf) > 4 * self.SIZE:
                self._buf, self._start, self._end = bytearray(self.SIZE), 0, 0  # after a huge frame
            return None
        (n,) = U32.unpack_from(self._buf, start)
        if n < 8:
            raise ProtocolError(f"frame length {n} is shorter than a header")
        if n > self._max:
            raise ProtocolError(f"frame length {n} exceeds the {self._max}-byte limit")
        if avail < n:
            return None
        frame = self._buf[start + 4 : start + n]  # one copy, owned by this message
        self._start = start + n
        if self._start == self._end:
            self._start = self._end = 0
        return decode_body(memoryview(frame))
