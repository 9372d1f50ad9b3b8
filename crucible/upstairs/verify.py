"""Checking what a downstairs returns for a read, before anything reaches the guest.

Every block is verified on its own: a plain block against its xxh64 hash, a
never-written (Empty) block must be all zeros, a sealed block must open with
the volume's key at its own index (encryption.py). In an encrypted volume a
plain block is accepted only if it is zeros (a trim's zero-fill): a downstairs
without the key must not be able to put anything else in front of the guest.
A block that fails is an integrity error: it is taken from another replica
whose copy verifies.
"""

from __future__ import annotations

import xxhash

import crucible.protocol.messages as m
from crucible.common.buffer import is_zeros
from crucible.common.errors import CrucibleError, ErrorKind
from crucible.protocol.integrity import block_hashes
from crucible.upstairs.encryption import BlockCipher, InvalidBlock

# A reply's blocks that failed, each as (its index in the reply, why).
Bad = list[tuple[int, CrucibleError]]


def check_read_reply(
    start: int,
    count: int,
    block_size: int,
    source: str,
    blocks: list[m.ReadBlockContext],
    data: m.Data,
    cipher: BlockCipher | None = None,
) -> tuple[CrucibleError | None, bytearray | None]:
    """Why this reply for blocks [start, start+count) cannot be used, or None;
    and with a cipher, the blocks' plaintext."""
    bs = block_size
    if (
        cipher is None
        and count == 1
        and len(blocks) == 1
        and type(blocks[0]) is int
        and len(data) == bs
        and xxhash.xxh64_intdigest(data) == blocks[0]
    ):
        return None, None  # one plain block that matches: the commonest reply
    if len(blocks) != count or len(data) != count * bs:
        return CrucibleError(
            ErrorKind.InvalidNumberOfBlocks,
            f"read reply has {len(blocks)} blocks, {len(data)} bytes",
        ), None
    bad, plain = check_blocks(start, block_size, source, blocks, data, cipher, first_only=True)
    return (bad[0][1] if bad else None), plain


def bad_blocks(
    start: int,
    block_size: int,
    source: str,
    blocks: list[m.ReadBlockContext],
    data: m.Data,
    cipher: BlockCipher | None = None,
) -> Bad:
    """Each block of a well-formed reply that does not verify."""
    return check_blocks(start, block_size, source, blocks, data, cipher)[0]


def check_blocks(
    start: int,
    block_size: int,
    source: str,
    blocks: list[m.ReadBlockContext],
    data: m.Data,
    cipher: BlockCipher | None,
    first_only: bool = False,
) -> tuple[Bad, bytearray | None]:
    """The blocks of a well-formed reply that do not verify; and with a
    cipher, the plaintext of those that do."""
    bs = block_size
    if cipher is None:
        if blocks and blocks[0] is None and blocks.count(None) == len(blocks):
            if is_zeros(data):
                return [], None  # never written, all of it: one compare, no hashing
        elif block_hashes(data, bs) == blocks:
            return [], None  # every block plain and matching: the usual reply, in one pass
    view = memoryview(data)
    plain = bytearray(len(data)) if cipher is not None else None
    out: Bad = []
    for i, ctx in enumerate(blocks):
        block = view[i * bs : (i + 1) * bs]
        if ctx is None:
            if is_zeros(block):
                continue
            kind, why = ErrorKind.MissingBlockContext, "has data but no context"
        elif isinstance(ctx, int):
            if xxhash.xxh64_intdigest(block) != ctx:
                kind, why = ErrorKind.HashMismatch, "does not match its hash: corrupt replica"
            elif cipher is not None and not is_zeros(block):
                kind, why = ErrorKind.DecryptionError, "is not encrypted, in an encrypted volume"
            else:
                continue  # (a plain zero block's plaintext is the zeros already there)
        elif cipher is None:
            kind, why = ErrorKind.DecryptionError, "is encrypted, and this upstairs has no key"
        else:
            try:
                assert plain is not None
                plain[i * bs : (i + 1) * bs] = cipher.open(start + i, ctx, block)
                continue
            except InvalidBlock:
                kind, why = (
                    ErrorKind.DecryptionError,
                    (
                        "fails authentication: changed, moved from another block "
                        "or volume, or sealed with another key"
                    ),
                )
        err = CrucibleError(kind, f"block {start + i} from {source} {why}")
        out.append((i, err))
        if first_only:
            break
    return out, plain


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
