"""Every message of Crucible's wire protocol, version 13.

Each dataclass lists its fields in wire order; the annotation names (u8, u32,
u64, JobId, Deps, ...) tell the codec how each one is encoded, so this file is
the single description of the format. The tag of each message is its position
in MESSAGE_TYPES (bincode numbers enum variants in declaration order).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, overload

from crucible.common.buffer import Buffer
from crucible.common.definition import RegionDefinition
from crucible.common.errors import CrucibleError
from crucible.protocol.wire import SocketAddr

CRUCIBLE_MESSAGE_VERSION = 13
MAX_FRAME_LEN = 100 * 1024 * 1024

# Wire-type names used in annotations below; all are plain Python types.
u8 = int
u32 = int
u64 = int
JobId = int
ExtentId = int
ClientId = int
RepairId = int
Uuid = uuid.UUID
Deps = list[int]
U32Vec = list[int]
U64Vec = list[int]
U8Vec = list[int]
BoolVec = list[bool]
OptJobId = int | None
OptU32 = int | None
OptSnapshot = str | None
Data = Buffer  # bulk bytes: the codec finds these fields by this name
UnitResult = CrucibleError | None  # Result<(), CrucibleError>: None is Ok
CloseResult = tuple[int, int, bool] | CrucibleError  # Ok((gen, flush, dirty))


class EncryptionContext(NamedTuple):
    nonce: bytes  # 12 bytes
    tag: bytes  # 16 bytes


class BlockContext(NamedTuple):
    hash: int
    encryption: EncryptionContext | None = None


class PlainContexts(Sequence[BlockContext]):
    """Block contexts none of which carries encryption, kept as their hashes.
    A MiB written carries 256 contexts through every hop, and what handles
    them there (hashing, the check, packing, the slots on disk) wants only
    the hashes: this spares a tuple per block. Reads as BlockContexts."""

    __slots__ = ("hashes",)

    def __init__(self, hashes: list[int]) -> None:
        self.hashes = hashes

    def __len__(self) -> int:
        return len(self.hashes)

    @overload
    def __getitem__(self, i: int) -> BlockContext: ...
    @overload
    def __getitem__(self, i: slice) -> PlainContexts: ...
    def __getitem__(self, i: int | slice) -> BlockContext | PlainContexts:
        if isinstance(i, slice):
            return PlainContexts(self.hashes[i])
        return BlockContext(self.hashes[i])

    def __iter__(self) -> Iterator[BlockContext]:
        return map(BlockContext, self.hashes)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PlainContexts):
            return self.hashes == other.hashes
        if isinstance(other, (list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"PlainContexts({self.hashes!r})"


# A read block's context: None = Empty (never written), int = Unencrypted{hash},
# EncryptionContext = Encrypted.
ReadBlockContext = EncryptionContext | int | None
Contexts = Sequence[BlockContext]  # a list, or PlainContexts
ReadBlocks = list[ReadBlockContext] | CrucibleError


@dataclass(slots=True)
class HereIAm:
    version: u32
    upstairs_id: Uuid
    session_id: Uuid
    gen: u64
    read_only: bool
    encrypted: bool
    alternate_versions: U32Vec


@dataclass(slots=True)
class YesItsMe:
    version: u32
    repair_addr: SocketAddr


@dataclass(slots=True)
class VersionMismatch:
    version: u32


@dataclass(slots=True)
class ReadOnlyMismatch:
    expected: bool


@dataclass(slots=True)
class EncryptedMismatch:
    expected: bool


@dataclass(slots=True)
class PromoteToActive:
    upstairs_id: Uuid
    session_id: Uuid
    gen: u64


@dataclass(slots=True)
class YouAreNowActive:
    upstairs_id: Uuid
    session_id: Uuid
    gen: u64


@dataclass(slots=True)
class YouAreNoLongerActive:
    new_upstairs_id: Uuid
    new_session_id: Uuid
    new_gen: u64


@dataclass(slots=True)
class UuidMismatch:
    expected_id: Uuid


@dataclass(slots=True)
class Ruok:
    pass


@dataclass(slots=True)
class Imok:
    pass


@dataclass(slots=True)
class ExtentClose:
    repair_id: RepairId
    extent_id: ExtentId


@dataclass(slots=True)
class ExtentReopen:
    repair_id: RepairId
    extent_id: ExtentId


@dataclass(slots=True)
class ExtentFlush:
    repair_id: RepairId
    extent_id: ExtentId
    client_id: ClientId
    flush_number: u64
    gen_number: u64


@dataclass(slots=True)
class ExtentRepair:
    repair_id: RepairId
    extent_id: ExtentId
    source_client_id: ClientId
    source_repair_address: SocketAddr
    dest_clients: U8Vec


@dataclass(slots=True)
class RepairAckId:
    repair_id: RepairId


@dataclass(slots=True)
class ExtentError:
    repair_id: RepairId
    extent_id: ExtentId
    error: CrucibleError


@dataclass(slots=True)
class ExtentLiveClose:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    dependencies: Deps
    extent_id: ExtentId


@dataclass(slots=True)
class ExtentLiveFlushClose:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    dependencies: Deps
    extent_id: ExtentId
    flush_number: u64
    gen_number: u64


@dataclass(slots=True)
class ExtentLiveRepair:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    dependencies: Deps
    extent_id: ExtentId
    source_client_id: ClientId
    source_repair_address: SocketAddr


@dataclass(slots=True)
class ExtentLiveReopen:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    dependencies: Deps
    extent_id: ExtentId


@dataclass(slots=True)
class ExtentLiveNoOp:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    dependencies: Deps


@dataclass(slots=True)
class ExtentLiveCloseAck:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    result: CloseResult


@dataclass(slots=True)
class ExtentLiveRepairAckId:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    result: UnitResult


@dataclass(slots=True)
class ExtentLiveAckId:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    result: UnitResult


@dataclass(slots=True)
class RegionInfoPlease:
    pass


@dataclass(slots=True)
class RegionInfo:
    region_def: RegionDefinition


@dataclass(slots=True)
class ExtentVersionsPlease:
    pass


@dataclass(slots=True)
class ExtentVersions:
    gen_numbers: U64Vec
    flush_numbers: U64Vec
    dirty_bits: BoolVec


@dataclass(slots=True)
class LastFlush:
    last_flush_number: OptJobId


@dataclass(slots=True)
class Write:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    dependencies: Deps
    start: u64  # absolute block index
    contexts: Contexts
    data: Data


@dataclass(slots=True)
class WriteAck:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    result: UnitResult


@dataclass(slots=True)
class Flush:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    dependencies: Deps
    flush_number: u64
    gen_number: u64
    snapshot_name: OptSnapshot
    extent_limit: OptU32


@dataclass(slots=True)
class FlushAck:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    result: UnitResult


@dataclass(slots=True)
class Barrier:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    dependencies: Deps


@dataclass(slots=True)
class BarrierAck:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    result: UnitResult


@dataclass(slots=True)
class ReadRequest:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    dependencies: Deps
    start: u64
    count: u64


@dataclass(slots=True)
class ReadResponse:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    blocks: ReadBlocks
    data: Data


@dataclass(slots=True)
class WriteUnwritten:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    dependencies: Deps
    start: u64
    contexts: Contexts
    data: Data


@dataclass(slots=True)
class WriteUnwrittenAck:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    result: UnitResult


@dataclass(slots=True)
class ErrorReport:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    error: CrucibleError


@dataclass(slots=True)
class Unknown:
    """Variant 41: Crucible reserves it and never sends it."""

    value: u32
    data: Data


@dataclass(slots=True)
class Trim:
    """Variant 42, an extension (Crucible has no discard): the blocks become
    never-written, reading as zeros, and their space goes back to the
    filesystem. Ordered by dependencies like a write."""

    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    dependencies: Deps
    start: u64
    count: u64


@dataclass(slots=True)
class TrimAck:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    result: UnitResult


Message = (
    HereIAm
    | YesItsMe
    | VersionMismatch
    | ReadOnlyMismatch
    | EncryptedMismatch
    | PromoteToActive
    | YouAreNowActive
    | YouAreNoLongerActive
    | UuidMismatch
    | Ruok
    | Imok
    | ExtentClose
    | ExtentReopen
    | ExtentFlush
    | ExtentRepair
    | RepairAckId
    | ExtentError
    | ExtentLiveClose
    | ExtentLiveFlushClose
    | ExtentLiveRepair
    | ExtentLiveReopen
    | ExtentLiveNoOp
    | ExtentLiveCloseAck
    | ExtentLiveRepairAckId
    | ExtentLiveAckId
    | RegionInfoPlease
    | RegionInfo
    | ExtentVersionsPlease
    | ExtentVersions
    | LastFlush
    | Write
    | WriteAck
    | Flush
    | FlushAck
    | Barrier
    | BarrierAck
    | ReadRequest
    | ReadResponse
    | WriteUnwritten
    | WriteUnwrittenAck
    | ErrorReport
    | Unknown
    | Trim
    | TrimAck
)

# Declaration order == bincode variant tag. Never reorder.
MESSAGE_TYPES: tuple[type, ...] = (
    HereIAm,
    YesItsMe,
    VersionMismatch,
    ReadOnlyMismatch,
    EncryptedMismatch,
    PromoteToActive,
    YouAreNowActive,
    YouAreNoLongerActive,
    UuidMismatch,
    Ruok,
    Imok,
    ExtentClose,
    ExtentReopen,
    ExtentFlush,
    ExtentRepair,
    RepairAckId,
    ExtentError,
    ExtentLiveClose,
    ExtentLiveFlushClose,
    ExtentLiveRepair,
    ExtentLiveReopen,
    ExtentLiveNoOp,
    ExtentLiveCloseAck,
    ExtentLiveRepairAckId,
    ExtentLiveAckId,
    RegionInfoPlease,
    RegionInfo,
    ExtentVersionsPlease,
    ExtentVersions,
    LastFlush,
    Write,
    WriteAck,
    Flush,
    FlushAck,
    Barrier,
    BarrierAck,
    ReadRequest,
    ReadResponse,
    WriteUnwritten,
    WriteUnwrittenAck,
    ErrorReport,
    Unknown,
    Trim,
    TrimAck,
)
