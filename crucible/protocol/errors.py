"""CrucibleError: the error enum carried on the wire (and raised locally).

Variant numbers are the bincode tags of Crucible's `CrucibleError`; they must
never be reordered.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from crucible.protocol.wire import (
    DecodeError,
    Reader,
    put_bool,
    put_string,
    put_u32,
    put_u64,
    put_uuid,
)


class ErrorKind(IntEnum):
    GenericError = 0
    IoError = 1
    Unsupported = 2
    Disconnect = 3
    DataLockError = 4
    RwLockError = 5
    RecvDisconnected = 6
    SendError = 7
    OffsetUnaligned = 8
    DataLenUnaligned = 9
    BlockSizeMismatch = 10
    InvalidNumberOfBlocks = 11
    OffsetInvalid = 12
    UpstairsActivateInProgress = 13
    UpstairsDeactivating = 14
    UpstairsInactive = 15
    UuidMismatch = 16
    EncryptionError = 17
    DecryptionError = 18
    HashMismatch = 19
    LBARangeOverlap = 20
    SubvolumeSizeMismatch = 21
    SubvolumeTypeMismatch = 22
    CannotServeBlocks = 23
    CannotReceiveBlocks = 24
    SnapshotFailed = 25
    ModifyingReadOnlyRegion = 26
    InvalidExtent = 27
    RepairRequestError = 28
    RepairFilesInvalid = 29
    RepairStreamError = 30
    GenerationNumberInvalid = 31
    NoLongerActive = 32
    RegionAssembleError = 33
    PropertyNotAvailable = 34
    ReplaceRequestInvalid = 35
    MissingContextSlot = 36
    BadMetadata = 37
    BadContextSlot = 38
    MissingBlockContext = 39
    RegionIncompatible = 40
    NegotiationError = 41


# Variants that carry one String.
_WITH_STRING = frozenset(
    {
        ErrorKind.GenericError,
        ErrorKind.IoError,
        ErrorKind.Unsupported,
        ErrorKind.RwLockError,
        ErrorKind.SendError,
        ErrorKind.InvalidNumberOfBlocks,
        ErrorKind.EncryptionError,
        ErrorKind.CannotServeBlocks,
        ErrorKind.CannotReceiveBlocks,
        ErrorKind.SnapshotFailed,
        ErrorKind.RepairRequestError,
        ErrorKind.RepairFilesInvalid,
        ErrorKind.RepairStreamError,
        ErrorKind.PropertyNotAvailable,
        ErrorKind.ReplaceRequestInvalid,
        ErrorKind.BadMetadata,
        ErrorKind.BadContextSlot,
        ErrorKind.RegionIncompatible,
    }
)


class NegotiationKind(IntEnum):
    OutOfOrder = 0
    GenerationZeroIsIllegal = 1
    GenerationNumberTooLow = 2  # requested u64, actual u64
    IncompatibleVersion = 3  # expected u32, actual u32
    EncryptionMismatch = 4  # expected bool, actual bool
    ReadOnlyMismatch = 5
    UpstairsIdMismatch = 6  # expected Uuid, actual Uuid
    SessionIdMismatch = 7


class CrucibleError(Exception):
    """One CrucibleError value. `detail` holds the String payload, if any;
    `values` the fields of MissingContextSlot (block, extent) or of a
    NegotiationError (its kind first)."""

    def __init__(self, kind: ErrorKind, detail: str = "", values: tuple[Any, ...] = ()) -> None:
        super().__init__(kind, detail, values)
        self.kind = kind
        self.detail = detail
        self.values = values

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CrucibleError) and (self.kind, self.detail, self.values) == (
            other.kind,
            other.detail,
            other.values,
        )

    def __hash__(self) -> int:
        return hash((self.kind, self.detail, self.values))

    def __str__(self) -> str:
        if self.detail:
            return f"{self.kind.name}: {self.detail}"
        if self.values:
            return f"{self.kind.name}{self.values}"
        return self.kind.name

    def __repr__(self) -> str:
        return f"CrucibleError({self})"


def encode_error(out: bytearray, e: CrucibleError) -> None:
    put_u32(out, e.kind)
    if e.kind in _WITH_STRING:
        put_string(out, e.detail)
    elif e.kind == ErrorKind.MissingContextSlot:
        block, extent = e.values
        put_u64(out, block)
        put_u32(out, extent)
    elif e.kind == ErrorKind.NegotiationError:
        nkind = NegotiationKind(e.values[0])
        put_u32(out, nkind)
        a, b = (*e.values[1:], None, None)[:2]
        if nkind == NegotiationKind.GenerationNumberTooLow:
            put_u64(out, a)
            put_u64(out, b)
        elif nkind == NegotiationKind.IncompatibleVersion:
            put_u32(out, a)
            put_u32(out, b)
        elif nkind == NegotiationKind.EncryptionMismatch:
            put_bool(out, a)
            put_bool(out, b)
        elif nkind == NegotiationKind.UpstairsIdMismatch:
            put_uuid(out, a)
            put_uuid(out, b)


def decode_error(r: Reader) -> CrucibleError:
    tag = r.u32()
    try:
        kind = ErrorKind(tag)
    except ValueError:
        raise DecodeError(f"unknown CrucibleError variant {tag}") from None
    if kind in _WITH_STRING:
        return CrucibleError(kind, r.string())
    if kind == ErrorKind.MissingContextSlot:
        return CrucibleError(kind, values=(r.u64(), r.u32()))
    if kind == ErrorKind.NegotiationError:
        ntag = r.u32()
        try:
            nkind = NegotiationKind(ntag)
        except ValueError:
            raise DecodeError(f"unknown NegotiationError variant {ntag}") from None
        vals: tuple[Any, ...]
        if nkind == NegotiationKind.GenerationNumberTooLow:
            vals = (r.u64(), r.u64())
        elif nkind == NegotiationKind.IncompatibleVersion:
            vals = (r.u32(), r.u32())
        elif nkind == NegotiationKind.EncryptionMismatch:
            vals = (r.boolean(), r.boolean())
        elif nkind == NegotiationKind.UpstairsIdMismatch:
            vals = (r.uuid(), r.uuid())
        else:
            vals = ()
        return CrucibleError(kind, values=(int(nkind), *vals))
    return CrucibleError(kind)
