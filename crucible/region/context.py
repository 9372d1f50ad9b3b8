"""The 48-byte on-disk context slot: bincode of
Option<{ block_context: {hash u64, Option<{nonce[12], tag[16]}>}, on_disk_hash u64, flush_id u16 }>.
All zeros is None: a block never written."""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from crucible.protocol.messages import BlockContext, EncryptionContext
from crucible.protocol.wire import struct_run
from crucible.region.layout import SLOT_SIZE

_PLAIN: Final = struct.Struct("<BQBQH")  # Some, hash, None, on_disk_hash, flush_id
_ENC_HEAD: Final = struct.Struct("<BQB")  # Some, hash, Some
_ENC_TAIL: Final = struct.Struct("<QH")
_Q: Final = struct.Struct("<Q")
EMPTY_SLOT = bytes(SLOT_SIZE)
_PLAIN_SLOT: Final = f"BQBQH{SLOT_SIZE - _PLAIN.size}x"  # one whole plain slot


class SlotContext(NamedTuple):
    context: BlockContext
    on_disk_hash: int


class BadSlot(ValueError):
    pass


def encode_plain_slots(hashes: list[int], flush_id: int) -> bytes:
    """encode_slot of a run of plain contexts (the on-disk hash is the
    context's own), as one buffer: one struct call instead of one per block."""
    n = len(hashes)
    args = [1, 0, 0, 0, flush_id & 0xFFFF] * n  # each slot's (Some, hash, None, hash, flush id)
    args[1::5] = hashes
    args[3::5] = hashes
    return struct_run(_PLAIN_SLOT, n).pack(*args)


def encode_slot(ctx: BlockContext, on_disk_hash: int, flush_id: int) -> bytes:
    if ctx.encryption is None:
        return _PLAIN.pack(1, ctx.hash, 0, on_disk_hash, flush_id & 0xFFFF).ljust(SLOT_SIZE, b"\0")
    enc = ctx.encryption
    return (
        _ENC_HEAD.pack(1, ctx.hash, 1)
        + enc.nonce
        + enc.tag
        + _ENC_TAIL.pack(on_disk_hash, flush_id & 0xFFFF)
    )


def decode_slot(raw: bytes | memoryview, off: int = 0) -> SlotContext | None:
    tag = raw[off]
    if tag == 0:
        return None
    if tag != 1:
        raise BadSlot(f"invalid slot tag {tag}")
    (h,) = _Q.unpack_from(raw, off + 1)
    etag = raw[off + 9]
    if etag == 0:
        (odh,) = _Q.unpack_from(raw, off + 10)
        return SlotContext(BlockContext(h), odh)
    if etag != 1:
        raise BadSlot(f"invalid encryption tag {etag}")
    enc = EncryptionContext(bytes(raw[off + 10 : off + 22]), bytes(raw[off + 22 : off + 38]))
    (odh,) = _Q.unpack_from(raw, off + 38)
    return SlotContext(BlockContext(h, enc), odh)
