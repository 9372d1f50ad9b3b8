from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from crucible.protocol.integrity import plain_contexts
from crucible.protocol.messages import BlockContext, EncryptionContext
from crucible.region.context import decode_slot, encode_plain_slots, encode_slot
from crucible.region.layout import SLOT_SIZE, ExtentLayout, pack_bitmap, unpack_bitmap


@given(st.lists(st.integers(0, 1), max_size=300))
def test_bitmap_round_trip_and_bit_order(bits: list[int]) -> None:
    active = bytearray(bits)
    packed = pack_bitmap(active)
    assert len(packed) == (len(bits) + 7) // 8
    for i, b in enumerate(bits):
        assert (packed[i // 8] >> (i % 8)) & 1 == b
    assert unpack_bitmap(packed, len(bits)) == active


@given(
    st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**16 - 1), st.booleans()
)
def test_slot_round_trip(h: int, odh: int, flush_id: int, encrypted: bool) -> None:
    enc = EncryptionContext(bytes(range(12)), bytes(range(16))) if encrypted else None
    raw = encode_slot(BlockContext(h, enc), odh, flush_id)
    assert len(raw) == SLOT_SIZE
    sc = decode_slot(raw)
    assert sc is not None and sc.context == BlockContext(h, enc) and sc.on_disk_hash == odh
    assert decode_slot(bytes(SLOT_SIZE)) is None


@given(st.lists(st.integers(0, 2**64 - 1), max_size=40), st.integers(0, 2**20))
def test_plain_runs_encode_as_each_block_would(hashes: list[int], flush_id: int) -> None:
    """The one-pass forms of plain contexts and slots give exactly what the
    per-block ones give (flush ids beyond 16 bits wrap the same way)."""
    ctxs = plain_contexts(hashes)
    assert ctxs == [BlockContext(h) for h in hashes]
    assert all(type(c) is BlockContext and c.encryption is None for c in ctxs)
    each = b"".join(encode_slot(BlockContext(h), h, flush_id) for h in hashes)
    assert encode_plain_slots(hashes, flush_id) == each


def test_extent_file_size_matches_reference_formula() -> None:
    lay = ExtentLayout(blocks=100, block_size=512)
    assert lay.file_size == 100 * 512 + 96 * 100 + 13 + 32
    assert lay.slot_offset(1, 0) == 100 * 512 + 48 * 100
