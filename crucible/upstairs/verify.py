"""Checking what a downstairs returns for a read, before anything reaches the guest.

Every block is verified on its own: a plain block against its xxh64 hash, a
never-written (Empty) block must be all zeros; encrypted blocks need the key,
which this upstairs does not hold. A block that fails is an integrity error:
it is taken from another replica whose copy verifies.
"""

from __future__ import annotations

import functools

import xxhash

from crucible.common.errors import CrucibleError, ErrorKind
from crucible.protocol import messages as m


def check_read_reply(
    start: int,
    count: int,
    block_size: int,
    source: str,
    blocks: list[m.ReadBlockContext],
    data: m.Data,
) -> CrucibleError | None:
    """Why this reply for blocks [start, start+count) cannot be used, or None."""
    bs = block_size
    if (
        count == 1
        and len(blocks) == 1
        and type(blocks[0]) is int
        and len(data) == bs
        and xxhash.xxh64_intdigest(data) == blocks[0]
    ):
        return None  # one plain block that matches: the commonest reply
    if len(blocks) != count or len(data) != count * bs:
        return CrucibleError(
            ErrorKind.InvalidNumberOfBlocks,
            f"read reply has {len(blocks)} blocks, {len(data)} bytes",
        )
    bad = bad_blocks(start, block_size, source, blocks, data, first_only=True)
    return bad[0][1] if bad else None


def bad_blocks(
    start: int,
    block_size: int,
    source: str,
    blocks: list[m.ReadBlockContext],
    data: m.Data,
    first_only: bool = False,
) -> list[tuple[int, CrucibleError]]:
    """Each block of a well-formed reply that does not verify: (its index in
    the reply, why)."""
    bs = block_size
    view = memoryview(data)
    zero = _zeros(bs)
    out: list[tuple[int, CrucibleError]] = []
    for i, ctx in enumerate(blocks):
        block = view[i * bs : (i + 1) * bs]
        if ctx is None:
            if block == zero:
                continue
            err = CrucibleError(
                ErrorKind.MissingBlockContext,
                f"block {start + i} from {source} has data but no context",
            )
        elif isinstance(ctx, int):
            if xxhash.xxh64_intdigest(block) == ctx:
                continue
            err = CrucibleError(
                ErrorKind.HashMismatch,
                f"block {start + i} from {source} does not match its hash: corrupt replica",
            )
        else:
            err = CrucibleError(
                ErrorKind.DecryptionError,
                f"block {start + i} is encrypted, and this upstairs has no key",
            )
        out.append((i, err))
        if first_only:
            break
    return out


@functools.lru_cache(maxsize=4)
def _zeros(n: int) -> bytes:
    return bytes(n)


def first_difference(
    a: list[m.ReadBlockContext], b: list[m.ReadBlockContext], zero_hash: int
) -> int | None:
    """The first block where two replies' contexts disagree, if any. A
    never-written block and one written with zeros agree (`zero_hash`: the
    hash of a zero block): a downstairs that cannot trim holds zeros where
    the others hold nothing."""
    if a == b:
        return None
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y and not ({x, y} <= {None, zero_hash}):
            return i
    return None
