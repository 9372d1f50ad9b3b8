"""Where things are: extent file paths and the byte layout inside an extent file.

An extent of N blocks of B bytes is one file:

    offset              size         content
    0                   N*B          block data
    N*B                 48*N         context slot array A
    N*B + 48*N          48*N         context slot array B
    N*B + 96*N          ceil(N/8)    active-slot bitmap (bit set = B), valid when clean
    then                32           metadata: dirty u8, gen u64, flush u64, version u32, ...
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

SLOT_SIZE: Final = 48
META_SIZE: Final = 32
EXTENT_FORMAT_VERSION: Final = 2
# dirty u8, gen u64, flush u64, ext_version u32, bonus_sync_count u32, defrag_count u32
META: Final = struct.Struct("<BQQIII")


def extent_relpath(eid: int) -> Path:
    return Path(f"{(eid >> 24) & 0xFF:02X}") / f"{(eid >> 12) & 0xFFF:03X}" / f"{eid & 0xFFF:03X}"


def extent_path(region_dir: Path, eid: int) -> Path:
    return region_dir / extent_relpath(eid)


def staging_dir(extent_file: Path, stage: str) -> Path:
    """The `.copy`, `.replace` or `.completed` directory beside an extent file."""
    return extent_file.with_name(f"{extent_file.name}.{stage}")


@dataclass(frozen=True, slots=True)
class ExtentLayout:
    blocks: int
    block_size: int

    @property
    def data_bytes(self) -> int:
        return self.blocks * self.block_size

    def slot_offset(self, slot: int, block: int) -> int:
        return self.data_bytes + SLOT_SIZE * (slot * self.blocks + block)

    @property
    def bitmap_offset(self) -> int:
        return self.data_bytes + 2 * SLOT_SIZE * self.blocks

    @property
    def bitmap_bytes(self) -> int:
        return (self.blocks + 7) // 8

    @property
    def meta_offset(self) -> int:
        return self.bitmap_offset + self.bitmap_bytes

    @property
    def file_size(self) -> int:
        return self.meta_offset + META_SIZE


def encode_meta(dirty: bool, gen: int, flush: int) -> bytes:
    return META.pack(1 if dirty else 0, gen, flush, EXTENT_FORMAT_VERSION, 0, 0).ljust(
        META_SIZE, b"\0"
    )


_TO_ASCII = bytes.maketrans(b"\x00\x01", b"01")
_FROM_ASCII = bytes.maketrans(b"01", b"\x00\x01")


def pack_bitmap(active: bytearray) -> bytes:
    """One bit per block, block i at bit i % 8 of byte i // 8 (1 = slot B).
    Done through a little-endian integer so that it runs in C."""
    nbytes = (len(active) + 7) // 8
    if not active:
        return b""
    return int(active.translate(_TO_ASCII)[::-1], 2).to_bytes(nbytes, "little")


def unpack_bitmap(raw: bytes, blocks: int) -> bytearray:
    bits = bin(int.from_bytes(raw, "little"))[2:].rjust(len(raw) * 8, "0")
    return bytearray(bits.encode()[::-1][:blocks].translate(_FROM_ASCII))
