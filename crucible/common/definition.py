"""RegionDefinition: a region's geometry and identity, as the wire carries it
(RegionInfo) and region.json stores it (crucible/region/definition.py)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

DATABASE_READ_VERSION = 1
DATABASE_WRITE_VERSION = 1
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 32 * 1024
MAX_EXTENT_FILE_SIZE = 1 << 29  # 512 MiB of block data per extent


class RegionError(Exception):
    """A region that cannot be created or opened; the message is for people."""


def validate_block_size(block_size: int) -> None:
    if block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE:
        raise RegionError(f"block size {block_size} is outside {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}")
    if block_size & (block_size - 1):
        raise RegionError(f"block size {block_size} is not a power of two")


@dataclass(frozen=True, slots=True)
class RegionDefinition:
    block_size: int
    extent_size: int  # blocks per extent
    extent_count: int
    uuid: uuid.UUID
    encrypted: bool = False
    database_read_version: int = DATABASE_READ_VERSION
    database_write_version: int = DATABASE_WRITE_VERSION

    @property
    def shift(self) -> int:
        return self.block_size.bit_length() - 1

    @property
    def extent_bytes(self) -> int:
        return self.block_size * self.extent_size

    @property
    def total_blocks(self) -> int:
        return self.extent_size * self.extent_count

    @property
    def total_bytes(self) -> int:
        return self.total_blocks * self.block_size

    def validate(self) -> None:
        validate_block_size(self.block_size)
        if self.extent_size < 1:
            raise RegionError(f"extent size {self.extent_size} must be at least one block")
        if self.extent_bytes > MAX_EXTENT_FILE_SIZE:
            raise RegionError(
                f"extent of {self.extent_size} blocks of {self.block_size} bytes "
                f"exceeds {MAX_EXTENT_FILE_SIZE} bytes"
            )
        if not 0 <= self.extent_count <= 0xFFFFFFFF:
            raise RegionError(f"extent count {self.extent_count} out of range")
        if (self.database_read_version, self.database_write_version) != (
            DATABASE_READ_VERSION,
            DATABASE_WRITE_VERSION,
        ):
            raise RegionError(
                f"region database version {self.database_read_version}/"
                f"{self.database_write_version} is not supported "
                f"(expected {DATABASE_READ_VERSION}/{DATABASE_WRITE_VERSION})"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "block_size": self.block_size,
            "extent_size": {"value": self.extent_size, "shift": self.shift},
            "extent_count": self.extent_count,
            "uuid": str(self.uuid),
            "encrypted": self.encrypted,
            "database_read_version": self.database_read_version,
            "database_write_version": self.database_write_version,
        }

    @classmethod
    def from_json(cls, obj: Any) -> RegionDefinition:
        """Every field checked; an error names the field and what is wrong."""
        top = _object(obj, "the definition")
        es = _object(_field(top, "extent_size"), "extent_size")
        d = cls(
            block_size=_int(top, "block_size"),
            extent_size=_int(es, "value", "extent_size."),
            extent_count=_int(top, "extent_count"),
            uuid=_uuid(top),
            encrypted=_bool(top, "encrypted"),
            database_read_version=_int(top, "database_read_version"),
            database_write_version=_int(top, "database_write_version"),
        )
        d.validate()
        if _int(es, "shift", "extent_size.") != d.shift:
            raise RegionError(
                f"extent_size.shift {es['shift']} does not match block size {d.block_size}"
            )
        return d


def _object(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise RegionError(f"{what} must be a JSON object, not {type(v).__name__}")
    return v


def _field(obj: dict[str, Any], name: str, prefix: str = "") -> Any:
    if name not in obj:
        raise RegionError(f"field {prefix}{name} is missing")
    return obj[name]


def _int(obj: dict[str, Any], name: str, prefix: str = "") -> int:
    v = _field(obj, name, prefix)
    if isinstance(v, bool) or not isinstance(v, int):
        raise RegionError(f"field {prefix}{name} must be an integer, not {v!r:.40}")
    return v


def _bool(obj: dict[str, Any], name: str) -> bool:
    v = _field(obj, name)
    if not isinstance(v, bool):
        raise RegionError(f"field {name} must be true or false, not {v!r:.40}")
    return v


def _uuid(obj: dict[str, Any]) -> uuid.UUID:
    v = _field(obj, "uuid")
    if isinstance(v, str):
        try:
            return uuid.UUID(v)
        except ValueError:
            pass
    raise RegionError(f"field uuid must be a UUID string, not {v!r:.40}")
