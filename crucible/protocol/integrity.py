"""The integrity hash a block's context carries, which a downstairs checks on
every write: xxh64 of the data, or of nonce ‖ tag ‖ ciphertext for a sealed
block (so it is checked without the key)."""

from __future__ import annotations

import xxhash

from crucible.protocol.messages import BlockContext


def sealed_hash(nonce: bytes, tag: bytes, ciphertext: bytes | memoryview) -> int:
    h = xxhash.xxh64(nonce)
    h.update(tag)
    h.update(ciphertext)
    return h.intdigest()


def block_hashes(data: bytes | bytearray | memoryview, block_size: int) -> list[int]:
    """xxh64 of each block of `data` (whole blocks), in one pass of C calls."""
    view = memoryview(data)
    blocks = [view[i : i + block_size] for i in range(0, len(view), block_size)]
    return list(map(xxhash.xxh64_intdigest, blocks))


def block_hash(ctx: BlockContext, block: bytes | memoryview) -> int:
    """The hash `ctx` must carry for `block` as stored."""
    enc = ctx.encryption
    if enc is None:
        return xxhash.xxh64_intdigest(block)
    return sealed_hash(enc.nonce, enc.tag, block)
