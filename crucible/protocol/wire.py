"""Bincode 1.x primitives (legacy defaults) used by the Crucible wire format.

Little-endian fixed-width integers, u64 lengths for sequences/strings/bytes,
u8 for bool and the Option tag, u32 enum variant tags. The Reader never reads
past its buffer: any shortfall raises DecodeError, which callers turn into a
closed connection.
"""

from __future__ import annotations

import ipaddress
import struct
import uuid
from typing import Final

from crucible.common.buffer import Buffer

U8: Final = struct.Struct("<B")
U16: Final = struct.Struct("<H")
U32: Final = struct.Struct("<I")
U64: Final = struct.Struct("<Q")

SocketAddr = tuple[str, int]


_UUIDS: Final[dict[bytes, uuid.UUID]] = {}


def cached_uuid(raw: bytes) -> uuid.UUID:
    """Every message carries the same two or three ids: build each once."""
    found = _UUIDS.get(raw)
    if found is None:
        if len(_UUIDS) > 1024:
            _UUIDS.clear()
        found = _UUIDS[raw] = uuid.UUID(bytes=raw)
    return found


CACHED_RUN: Final = 2048  # longer runs are built each time: a peer picks the lengths


CACHED_RUNS: Final = 128  # kept at most; past that all are dropped and built anew
_RUNS: Final[dict[tuple[str, int], struct.Struct]] = {}


def struct_run(item: str, count: int) -> struct.Struct:
    """`count` little-endian repetitions of a struct format (the per-count
    layouts of lists on the wire and on disk). Short ones, the usual sizes,
    are built once each; a cached Struct costs memory in proportion to its
    count, so long ones are not kept. (A dict, not functools.lru_cache: it is
    looked up several times per message, and the cache's call costs more.)"""
    key = (item, count)
    run = _RUNS.get(key)
    if run is None:
        run = struct.Struct(f"<{item * count}")
        if count <= CACHED_RUN:
            if len(_RUNS) >= CACHED_RUNS:
                _RUNS.clear()
            _RUNS[key] = run
    return run


class DecodeError(ValueError):
    """Bytes that are not a valid encoding of the expected value."""


class ProtocolError(Exception):
    """A frame that cannot be accepted; the connection it came on must close."""


class Reader:
    """A cursor over a buffer; every getter checks bounds first."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: memoryview, pos: int = 0, end: int | None = None) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end

    def take(self, n: int) -> memoryview:
        start = self.pos
        stop = start + n
        if n < 0 or stop > self.end:
            raise DecodeError(f"need {n} bytes at offset {start}, only {self.end - start} left")
        self.pos = stop
        return self.buf[start:stop]

    def remaining(self) -> int:
        return self.end - self.pos

    def u8(self) -> int:
        return int(self.take(1)[0])

    def u16(self) -> int:
        v: int = U16.unpack(self.take(2))[0]
        return v

    def u32(self) -> int:
        v: int = U32.unpack(self.take(4))[0]
        return v

    def u64(self) -> int:
        v: int = U64.unpack(self.take(8))[0]
        return v

    def boolean(self) -> bool:
        b = self.u8()
        if b > 1:
            raise DecodeError(f"invalid bool byte {b}")
        return b == 1

    def option_tag(self) -> bool:
        t = self.u8()
        if t > 1:
            raise DecodeError(f"invalid Option tag {t}")
        return t == 1

    def length(self, item_size: int = 1) -> int:
        """A u64 sequence length, refused when the items cannot fit in the buffer."""
        n = self.u64()
        if n * item_size > self.remaining():
            raise DecodeError(f"sequence of {n} items does not fit in {self.remaining()} bytes")
        return n

    def byte_string(self) -> memoryview:
        return self.take(self.length())

    def string(self) -> str:
        try:
            return bytes(self.byte_string()).decode("utf-8")
        except UnicodeDecodeError as e:
            raise DecodeError(f"invalid UTF-8 string: {e}") from None

    def uuid(self) -> uuid.UUID:
        n = self.u64()
        if n != 16:
            raise DecodeError(f"UUID length {n}, expected 16")
        return cached_uuid(bytes(self.take(16)))

    def u64_vec(self) -> list[int]:
        n = self.length(8)
        return list(struct_run("Q", n).unpack(self.take(8 * n)))

    def u32_vec(self) -> list[int]:
        n = self.length(4)
        return list(struct_run("I", n).unpack(self.take(4 * n)))

    def u8_vec(self) -> list[int]:
        return list(self.take(self.length()))

    def bool_vec(self) -> list[bool]:
        raw = self.take(self.length())
        if any(b > 1 for b in raw):
            raise DecodeError("invalid bool byte in sequence")
        return [b == 1 for b in raw]

    def socket_addr(self) -> SocketAddr:
        tag = self.u32()
        if tag == 0:
            ip = str(ipaddress.IPv4Address(bytes(self.take(4))))
        elif tag == 1:
            ip = str(ipaddress.IPv6Address(bytes(self.take(16))))
        else:
            raise DecodeError(f"invalid SocketAddr variant {tag}")
        return ip, self.u16()


def put_u8(out: bytearray, v: int) -> None:
    out += U8.pack(v)


def put_u16(out: bytearray, v: int) -> None:
    out += U16.pack(v)


def put_u32(out: bytearray, v: int) -> None:
    out += U32.pack(v)


def put_u64(out: bytearray, v: int) -> None:
    out += U64.pack(v)


def put_bool(out: bytearray, v: bool) -> None:
    out.append(1 if v else 0)


def put_bytes(out: bytearray, v: Buffer) -> None:
    out += U64.pack(len(v))
    out += v


def put_string(out: bytearray, v: str) -> None:
    put_bytes(out, v.encode("utf-8"))


# The last two UUIDs encoded, with their bytes: a connection's messages all
# carry the same pair. (Whole tuples replaced: safe for any thread to read.)
_UUID_BYTES: Final[list[tuple[uuid.UUID | None, bytes]]] = [(None, b""), (None, b"")]


def uuid_bytes(v: uuid.UUID) -> bytes:
    """What `v.bytes` gives, without its Python-level property call."""
    last = _UUID_BYTES
    a = last[0]
    if a[0] is v:
        return a[1]
    b = last[1]
    if b[0] is v:
        return b[1]
    raw = v.int.to_bytes(16, "big")
    last[1] = a
    last[0] = (v, raw)
    return raw


def put_uuid(out: bytearray, v: uuid.UUID) -> None:
    put_bytes(out, uuid_bytes(v))


def put_u64_vec(out: bytearray, v: list[int]) -> None:
    out += U64.pack(len(v))
    out += struct_run("Q", len(v)).pack(*v)


def put_u32_vec(out: bytearray, v: list[int]) -> None:
    out += U64.pack(len(v))
    out += struct_run("I", len(v)).pack(*v)


def put_u8_vec(out: bytearray, v: list[int]) -> None:
    put_bytes(out, bytes(v))


def put_bool_vec(out: bytearray, v: list[bool]) -> None:
    put_bytes(out, bytes(1 if b else 0 for b in v))


def put_socket_addr(out: bytearray, v: SocketAddr) -> None:
    ip = ipaddress.ip_address(v[0])
    put_u32(out, 0 if ip.version == 4 else 1)
    out += ip.packed
    put_u16(out, v[1])
