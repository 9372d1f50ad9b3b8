"""Encoders and decoders of the wire's composite field types: block contexts,
Results, a region definition and CrucibleError, built on the bincode
primitives of wire.py.

FIELD_CODECS maps each annotation name used in messages.py to its pair, so
the schema codec (codec.py) can encode and decode any message field by field.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any, Final

from crucible.common.definition import RegionDefinition
from crucible.common.errors import (
    NEGOTIATION_PAYLOAD,
    WITH_STRING,
    CrucibleError,
    ErrorKind,
    NegotiationKind,
)
from crucible.protocol import wire
from crucible.protocol.integrity import plain_contexts
from crucible.protocol.messages import (
    BlockContext,
    EncryptionContext,
    ReadBlockContext,
)
from crucible.protocol.wire import U32, U64, DecodeError, Reader, struct_run

Put = Callable[[bytearray, Any], None]
Get = Callable[[Reader], Any]

QB: Final = struct.Struct("<QB")  # a plain block context: hash, no encryption
PLAIN_CONTEXT: Final = "Qx"  # the same for struct_run: the None tag is a zero pad byte
_IQ: Final = struct.Struct("<IQ")


# ---- CrucibleError ----------------------------------------------------------------

_PAYLOAD_CODECS: Final[dict[str, tuple[Put, Get]]] = {
    "u64": (wire.put_u64, Reader.u64),
    "u32": (wire.put_u32, Reader.u32),
    "bool": (wire.put_bool, Reader.boolean),
    "uuid": (wire.put_uuid, Reader.uuid),
}


def encode_error(out: bytearray, e: CrucibleError) -> None:
    wire.put_u32(out, e.kind)
    if e.kind in WITH_STRING:
        wire.put_string(out, e.detail)
    elif e.kind == ErrorKind.MissingContextSlot:
        block, extent = e.values
        wire.put_u64(out, block)
        wire.put_u32(out, extent)
    elif e.kind == ErrorKind.NegotiationError:
        nkind = NegotiationKind(e.values[0])
        wire.put_u32(out, nkind)
        payload = NEGOTIATION_PAYLOAD[nkind]
        if payload is not None:
            if len(e.values) != 3:
                raise ValueError(f"NegotiationError {nkind.name} needs two values: {e.values}")
            put = _PAYLOAD_CODECS[payload][0]
            put(out, e.values[1])
            put(out, e.values[2])


def decode_error(r: Reader) -> CrucibleError:
    tag = r.u32()
    try:
        kind = ErrorKind(tag)
    except ValueError:
        raise DecodeError(f"unknown CrucibleError variant {tag}") from None
    if kind in WITH_STRING:
        return CrucibleError(kind, r.string())
    if kind == ErrorKind.MissingContextSlot:
        return CrucibleError(kind, values=(r.u64(), r.u32()))
    if kind == ErrorKind.NegotiationError:
        ntag = r.u32()
        try:
            nkind = NegotiationKind(ntag)
        except ValueError:
            raise DecodeError(f"unknown NegotiationError variant {ntag}") from None
        payload = NEGOTIATION_PAYLOAD[nkind]
        if payload is None:
            return CrucibleError(kind, values=(int(nkind),))
        get = _PAYLOAD_CODECS[payload][1]
        expected = get(r)
        return CrucibleError(kind, values=(int(nkind), expected, get(r)))
    return CrucibleError(kind)


# ---- block contexts -----------------------------------------------------------------


def put_contexts(out: bytearray, ctxs: Sequence[BlockContext]) -> None:
    out += U64.pack(len(ctxs))
    for h, enc in ctxs:
        if enc is None:
            out += QB.pack(h, 0)
        else:
            out += QB.pack(h, 1)
            _put_enc(out, enc)


def get_contexts(r: Reader) -> Sequence[BlockContext]:
    n = r.length(9)
    start = r.pos
    raw = bytes(r.buf[start : start + 9 * n])
    if len(raw) == 9 * n and raw[8::9].count(0) == n:
        # No encryption contexts: a fixed 9 bytes each.
        r.pos = start + 9 * n
        return plain_contexts(struct_run(PLAIN_CONTEXT, n).unpack(raw))
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


# ---- Results --------------------------------------------------------------------------


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


# ---- region definition ----------------------------------------------------------------


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


# Annotation name in messages.py -> (encoder, decoder). "Data", the bulk bytes
# that end a message, is the codec's own (it is never copied on the way out).
FIELD_CODECS: Final[dict[str, tuple[Put, Get]]] = {
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
