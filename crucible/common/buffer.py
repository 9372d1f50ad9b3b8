"""The bytes-like objects data moves in: a frame's slice, a read's aligned
view, a received message's own copy; and zeros, which they are compared to."""

from __future__ import annotations

import functools
from typing import Final

Buffer = bytes | bytearray | memoryview

# What is_zeros compares at once: it bounds the copy of a view and the zeros
# kept to compare with, whatever the length asked about.
ZERO_PIECE: Final = 64 << 10


@functools.lru_cache(maxsize=8)
def zeros(n: int) -> bytes:
    """n zero bytes, one shared object per size."""
    return bytes(n)


def is_zeros(data: Buffer) -> bool:
    """Does `data` hold only zeros? A memoryview is compared as copies of its
    pieces: comparing one to bytes unpacks it item by item, about 40 times
    the copy and memcmp (7 us against 0.2 for 4 KiB)."""
    n = len(data)
    if n <= ZERO_PIECE:
        if isinstance(data, memoryview):
            return data.tobytes() == zeros(n)
        return data == zeros(n)
    view = memoryview(data)
    for at in range(0, n, ZERO_PIECE):
        piece = view[at : at + ZERO_PIECE].tobytes()
        if piece != zeros(len(piece)):
            return False
    return True
