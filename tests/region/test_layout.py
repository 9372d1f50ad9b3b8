from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from crucible.protocol.messages import BlockContext, EncryptionContext
from crucible.region.context import decode_slot, encode_slot
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


def test_extent_file_size_matches_reference_formula() -> None:
    lay = ExtentLayout(blocks=100, block_size=512)
    assert lay.file_size == 100 * 512 + 96 * 100 + 13 + 32
    assert lay.slot_offset(1, 0) == 100 * 512 + 48 * 100
