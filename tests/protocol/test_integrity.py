"""Block hashes and plain contexts: the one-block shortcuts give what the
general path gives."""

from __future__ import annotations

import random

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from crucible.protocol import integrity
from crucible.protocol.integrity import all_plain, block_hashes, plain_contexts, plain_hashes
from crucible.protocol.messages import BlockContext, EncryptionContext, PlainContexts


def slice_hashes(data: bytes, bs: int) -> list[int]:
    return [xxhash.xxh64_intdigest(data[i : i + bs]) for i in range(0, len(data), bs)]


@given(st.integers(1, 20), st.sampled_from([512, 4096]), st.integers(0, 2**32))
def test_block_hashes_hash_each_block(blocks: int, bs: int, seed: int) -> None:
    """Through the C module when the build has it, and through the xxhash
    package (sliced_hashes, its fallback)."""
    data = random.Random(seed).randbytes(blocks * bs)
    want = slice_hashes(data, bs)
    for form in (data, bytearray(data), memoryview(data)):
        assert block_hashes(form, bs) == want
        assert integrity.sliced_hashes(form, bs) == want


@given(
    st.integers(0, 40 * 33),
    st.sampled_from([1, 7, 8, 31, 32, 33, 64, 100, 512, 4096]),
    st.integers(0, 31),
    st.booleans(),
    st.integers(0, 2**32),
)
def test_native_block_hashes_are_xxh64_of_each_slice(
    size: int, bs: int, offset: int, vector: bool, seed: int
) -> None:
    """Any block size (a stripe of 32 bytes or not, a tail of 8, 4 and single
    bytes), any length (a short last block, groups of eight and the rest),
    any alignment, vectorised or not: the xxh64 of each slice."""
    native = pytest.importorskip("crucible.protocol._blockhash")
    raw = random.Random(seed).randbytes(offset + size)
    data = memoryview(bytearray(raw))[offset:]
    assert native.block_hashes(data, bs, vector) == slice_hashes(raw[offset:], bs)


def test_the_vector_path_runs_where_the_cpu_has_it() -> None:
    """So a machine with AVX-512 tests it above, and one without it is known
    to test the scalar path only."""
    native = pytest.importorskip("crucible.protocol._blockhash")
    try:
        with open("/proc/cpuinfo") as f:
            line = next((x for x in f if x.startswith("flags")), "flags:")
    except OSError:
        pytest.skip("no /proc/cpuinfo to tell")
    has_it = {"avx512f", "avx512dq", "avx512vl"} <= set(line.split(":", 1)[1].split())
    assert bool(native.VECTOR) is has_it


def test_native_block_hashes_refuse_what_is_not_blocks() -> None:
    native = pytest.importorskip("crucible.protocol._blockhash")
    with pytest.raises(ValueError, match="block size 0"):
        native.block_hashes(b"abc", 0)
    with pytest.raises(BufferError):
        native.block_hashes(memoryview(bytearray(64))[::2], 8)  # not contiguous
    with pytest.raises(TypeError):
        native.block_hashes("text", 8)


def test_block_slices_kept_are_bounded_whatever_sizes_come() -> None:
    """A peer picks the sizes hashed: the slices kept stay within
    SLICES_KEPT sizes of SLICES_KEPT_BLOCKS blocks, and a larger size is
    hashed as right as a kept one."""
    integrity.block_slices.cache_clear()
    bs = 512
    big = random.Random(3).randbytes((integrity.SLICES_KEPT_BLOCKS + 1) * bs)
    want = slice_hashes(big, bs)
    assert integrity.sliced_hashes(big, bs) == want
    assert integrity.block_slices.cache_info().currsize == 0
    for blocks in range(2, 2 + 3 * integrity.SLICES_KEPT):
        assert integrity.sliced_hashes(big[: blocks * bs], bs) == want[:blocks]
    info = integrity.block_slices.cache_info()
    assert info.currsize == integrity.SLICES_KEPT == info.maxsize


@given(st.lists(st.integers(0, 2**64 - 1), max_size=300))
def test_plain_contexts_are_block_contexts(hashes: list[int]) -> None:
    for form in (hashes, tuple(hashes)):
        ctxs = plain_contexts(form)
        assert ctxs == [BlockContext(h) for h in hashes]
        assert all(type(c) is BlockContext and c.encryption is None for c in ctxs)
        assert all_plain(ctxs)


def test_all_plain_sees_one_sealed_context() -> None:
    sealed = BlockContext(1, EncryptionContext(bytes(12), bytes(16)))
    assert not all_plain([BlockContext(2), sealed])
    assert not all_plain([sealed])
    assert all_plain([])
    assert plain_hashes([BlockContext(2), sealed]) is None


@given(st.lists(st.integers(0, 2**64 - 1), max_size=300))
def test_plain_hashes_are_the_contexts_hashes(hashes: list[int]) -> None:
    assert plain_hashes(plain_contexts(hashes)) == hashes
    assert plain_hashes([BlockContext(h) for h in hashes]) == hashes


@given(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=20), st.data())
def test_plain_contexts_read_as_the_block_contexts_they_keep(
    hashes: list[int], data: st.DataObject
) -> None:
    ctxs = plain_contexts(hashes)
    full = [BlockContext(h) for h in hashes]
    assert list(ctxs) == full and len(ctxs) == len(full)
    assert ctxs == full and full == ctxs and ctxs == tuple(full)
    i = data.draw(st.integers(-len(hashes), len(hashes) - 1))
    assert ctxs[i] == full[i] and type(ctxs[i]) is BlockContext
    a, b = data.draw(st.integers(0, len(hashes))), data.draw(st.integers(0, len(hashes)))
    assert type(ctxs[a:b]) is PlainContexts and ctxs[a:b] == full[a:b]
    other = [*hashes[:-1], hashes[-1] ^ 1]
    assert ctxs != plain_contexts(other) and ctxs != [BlockContext(h) for h in other]
    sealed = BlockContext(hashes[0], EncryptionContext(bytes(12), bytes(16)))
    assert ctxs != [sealed, *full[1:]]
