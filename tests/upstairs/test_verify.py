"""Read replies are checked block by block before anything reaches the guest."""

from __future__ import annotations

import xxhash

from crucible.common.errors import ErrorKind
from crucible.protocol import messages as m
from crucible.upstairs.verify import check_read_reply, first_difference

BS = 512


def test_good_replies_pass() -> None:
    data = b"a" * BS + bytes(BS)
    blocks: list[m.ReadBlockContext] = [xxhash.xxh64_intdigest(b"a" * BS), None]
    assert check_read_reply(0, 2, BS, "ds", blocks, data) == (None, None)


def test_every_kind_of_bad_block_is_refused() -> None:
    good = xxhash.xxh64_intdigest(b"a" * BS)
    cases: list[tuple[list[m.ReadBlockContext], bytes, ErrorKind]] = [
        ([good ^ 1], b"a" * BS, ErrorKind.HashMismatch),
        ([None], b"a" * BS, ErrorKind.MissingBlockContext),
        ([m.EncryptionContext(bytes(12), bytes(16))], b"a" * BS, ErrorKind.DecryptionError),
        ([good], b"a" * (BS - 1), ErrorKind.InvalidNumberOfBlocks),
        ([good, good], b"a" * BS, ErrorKind.InvalidNumberOfBlocks),
    ]
    for blocks, data, kind in cases:
        err, _ = check_read_reply(7, 1, BS, "ds", blocks, data)
        assert err is not None and err.kind == kind, (blocks, kind)


def test_a_reply_of_never_written_blocks_must_hold_only_zeros() -> None:
    """All contexts empty: the whole reply is checked at once, yet one stray
    byte in any block is still refused, naming that block."""
    blocks: list[m.ReadBlockContext] = [None] * 8
    data = bytearray(8 * BS)
    assert check_read_reply(0, 8, BS, "ds", blocks, memoryview(data)) == (None, None)
    data[5 * BS + BS - 1] = 1
    err, _ = check_read_reply(100, 8, BS, "ds", blocks, memoryview(data))
    assert err is not None and err.kind == ErrorKind.MissingBlockContext
    assert "block 105 " in str(err)


def test_first_difference() -> None:
    zero = 99
    assert first_difference([1, None, 3], [1, None, 3], zero) is None
    assert first_difference([1, None, 3], [1, 2, 3], zero) == 1
    # A block written with zeros and a never-written one read the same.
    assert first_difference([1, None, 3], [1, zero, 3], zero) is None
    assert first_difference([zero, None], [None, 4], zero) == 1
