"""CrucibleError: the error enum carried on the wire (and raised locally).

Variant numbers are the bincode tags of Crucible's `CrucibleError`; they must
never be reordered. How each variant is encoded lives with the other field
codecs (crucible/protocol/fields.py).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any


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
WITH_STRING = frozenset(
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
    """Crucible's `NegotiationError`; the comment says what each variant carries
    (its `values` after the kind, in wire order)."""

    OutOfOrder = 0
    GenerationZeroIsIllegal = 1
    GenerationNumberTooLow = 2  # requested u64, actual u64
    IncompatibleVersion = 3  # expected u32, actual u32
    EncryptionMismatch = 4  # expected bool, actual bool
    ReadOnlyMismatch = 5  # expected bool, actual bool
    UpstairsIdMismatch = 6  # expected Uuid, actual Uuid
    SessionIdMismatch = 7  # expected Uuid, actual Uuid


# What each NegotiationKind carries: "u64", "u32", "bool" or "uuid", twice; or nothing.
NEGOTIATION_PAYLOAD: dict[NegotiationKind, str | None] = {
    NegotiationKind.OutOfOrder: None,
    NegotiationKind.GenerationZeroIsIllegal: None,
    NegotiationKind.GenerationNumberTooLow: "u64",
    NegotiationKind.IncompatibleVersion: "u32",
    NegotiationKind.EncryptionMismatch: "bool",
    NegotiationKind.ReadOnlyMismatch: "bool",
    NegotiationKind.UpstairsIdMismatch: "uuid",
    NegotiationKind.SessionIdMismatch: "uuid",
}


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
