"""The bytes-like objects data moves in: a frame's slice, a read's aligned
view, a received message's own copy."""

from __future__ import annotations

Buffer = bytes | bytearray | memoryview
