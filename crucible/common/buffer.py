"""The bytes-like objects data moves in: a frame's slice, a read's aligned
view, a received message's own copy; and zeros, which they are compared to."""

from __future__ import annotations

import functools

Buffer = bytes | bytearray | memoryview


@functools.lru_cache(maxsize=8)
def zeros(n: int) -> bytes:
    """n zero bytes, one shared object per size."""
    return bytes(n)


def is_zeros(data: Buffer) -> bool:
    """Does `data` hold only zeros? A memoryview is copied first: comparing
    one to bytes unpacks it item by item, about 40 times the copy and memcmp
    (7 us against 0.2 for 4 KiB)."""
    if isinstance(data, memoryview):
        data = data.tobytes()
    return data == zeros(len(data))
