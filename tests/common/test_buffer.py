from __future__ import annotations

import pytest

from crucible.common.buffer import ZERO_PIECE, Buffer, is_zeros, zeros


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_is_zeros_sees_one_set_byte_anywhere(kind: type[Buffer]) -> None:
    assert is_zeros(kind(bytes(4096)))
    assert is_zeros(kind(b""))
    for at in (0, 2047, 4095):
        data = bytearray(4096)
        data[at] = 1
        assert not is_zeros(kind(bytes(data)))


def test_is_zeros_of_a_slice_of_a_view() -> None:
    data = bytearray(3 * 4096)
    data[4096 * 2] = 7
    view = memoryview(data)
    assert is_zeros(view[4096 : 2 * 4096])
    assert not is_zeros(view[2 * 4096 :])


def test_zeros_are_shared_per_size() -> None:
    assert zeros(512) == bytes(512)
    assert zeros(512) is zeros(512)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_is_zeros_of_more_than_one_piece(kind: type[Buffer]) -> None:
    size = 3 * ZERO_PIECE + 4096  # whole pieces and a short one
    assert is_zeros(kind(bytes(size)))
    for at in (0, ZERO_PIECE - 1, ZERO_PIECE, 2 * ZERO_PIECE + 17, size - 1):
        data = bytearray(size)
        data[at] = 0x80
        assert not is_zeros(kind(bytes(data))), at
