"""The integrity hash a block's context carries, which a downstairs checks on
every write: xxh64 of the data, or of nonce ‖ tag ‖ ciphertext for a sealed
block (so it is checked without the key)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from operator import itemgetter
from typing import Final

import xxhash

from crucible.common.buffer import Buffer
from crucible.protocol.messages import BlockContext, PlainContexts

try:  # the compiled build's: a MiB's blocks in one call, vectorised (blockhash.c)
    from crucible.protocol._blockhash import block_hashes as _native_block_hashes

    NATIVE: Callable[[Buffer, int], list[int]] | None = _native_block_hashes
except ImportError:
    NATIVE = None


def sealed_hash(nonce: bytes, tag: bytes, ciphertext: Buffer) -> int:
    h = xxhash.xxh64(nonce)
    h.update(tag)
    h.update(ciphertext)
    return h.intdigest()


_HASH: Final = itemgetter(0)  # a BlockContext's hash
_ENCRYPTION: Final = itemgetter(1)  # a BlockContext's encryption


def plain_contexts(hashes: Sequence[int]) -> PlainContexts:
    """BlockContext(h) for each hash, kept as the hashes."""
    return PlainContexts(list(hashes))


def all_plain(contexts: Sequence[BlockContext]) -> bool:
    """No context carries encryption: the whole run takes the one-pass paths."""
    if type(contexts) is PlainContexts:
        return True
    return list(map(_ENCRYPTION, contexts)).count(None) == len(contexts)


def plain_hashes(contexts: Sequence[BlockContext]) -> list[int] | None:
    """Each context's hash when none carries encryption (the one-pass paths
    take them), else None. Not to be changed: it may be the contexts' own."""
    if type(contexts) is PlainContexts:
        return contexts.hashes
    if not all_plain(contexts):
        return None
    return list(map(_HASH, contexts))


# IO sizes whose block slices are kept: at most SLICES_KEPT sizes of at most
# SLICES_KEPT_BLOCKS blocks each (about 1 MB), whatever sizes peers send.
SLICES_KEPT: Final = 16
SLICES_KEPT_BLOCKS: Final = 1024


@lru_cache(maxsize=SLICES_KEPT)
def block_slices(size: int, block_size: int) -> tuple[slice, ...]:
    """The slice of each block of a buffer of `size` bytes: made once per
    IO size, not 256 times per MiB hashed."""
    return tuple(slice(i, i + block_size) for i in range(0, size, block_size))


def block_hashes(data: Buffer, block_size: int) -> list[int]:
    """xxh64 of each block of `data` (whole blocks), in one pass of C calls."""
    if len(data) == block_size:
        return [xxhash.xxh64_intdigest(data)]
    if NATIVE is not None:
        return NATIVE(data, block_size)
    return sliced_hashes(data, block_size)


def sliced_hashes(data: Buffer, block_size: int) -> list[int]:
    """block_hashes through the xxhash package, a block per call."""
    view = memoryview(data)
    size = len(view)
    if size // block_size <= SLICES_KEPT_BLOCKS:
        slices: Iterable[slice] = block_slices(size, block_size)
    else:  # a size past those kept: its slices made for this call only
        slices = map(slice, range(0, size, block_size), range(block_size, size + 1, block_size))
    return list(map(xxhash.xxh64_intdigest, map(view.__getitem__, slices)))


def block_hash(ctx: BlockContext, block: Buffer) -> int:
    """The hash `ctx` must carry for `block` as stored."""
    enc = ctx.encryption
    if enc is None:
        return xxhash.xxh64_intdigest(block)
    return sealed_hash(enc.nonce, enc.tag, block)
