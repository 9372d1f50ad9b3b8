"""The agent's records and rules, without IO: regions and running snapshots
as Crucible's agent API shapes them (lowercase states, the same JSON), the
transitions each state allows, port allocation and space reservation.

    requested --create done--> created --DELETE--> tombstoned --stopped,
        |                                                removed--> destroyed
        +--create failed--> failed --DELETE--> tombstoned

`destroyed` is final and its record is kept, so a retried request finds it.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from crucible.common.address import host_port
from crucible.common.definition import RegionError, validate_block_size

# A region is promised its whole size plus headroom for metadata and
# snapshots (the factor Crucible's agent reserves with).
RESERVATION_FACTOR = 1.25
MAX_EXTENT_BYTES = 1 << 31  # one extent file; larger ones only slow repair
MAX_REGION_BYTES = 1 << 44  # 16 TiB: a typing error, not a disk
_PEM_MAX = 8192


class State(enum.Enum):
    REQUESTED = "requested"
    CREATED = "created"
    TOMBSTONED = "tombstoned"
    DESTROYED = "destroyed"
    FAILED = "failed"


# What each state may become; anything else is a bug or a race lost.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.REQUESTED: frozenset({State.CREATED, State.FAILED, State.TOMBSTONED}),
    State.CREATED: frozenset({State.TOMBSTONED}),
    State.FAILED: frozenset({State.TOMBSTONED}),
    State.TOMBSTONED: frozenset({State.DESTROYED, State.FAILED}),
    State.DESTROYED: frozenset(),
}
# States whose record still holds its port (and its space).
HOLDS_PORT = frozenset({State.REQUESTED, State.CREATED, State.TOMBSTONED, State.FAILED})


class AgentError(Exception):
    """A request refused, with the HTTP status and dropshot's error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def bad_request(message: str) -> AgentError:
    return AgentError(400, "BadRequest", message)


def not_found(message: str) -> AgentError:
    return AgentError(404, "NotFound", message)


@dataclass(frozen=True)
class CreateRegion:
    id: str
    block_size: int
    extent_size: int  # blocks per extent
    extent_count: int
    encrypted: bool
    cert_pem: str | None = field(default=None, repr=False)
    key_pem: str | None = field(default=None, repr=False)
    root_pem: str | None = field(default=None, repr=False)
    source: str | None = None  # a read-only downstairs' repair server to clone

    @property
    def size(self) -> int:
        return self.block_size * self.extent_size * self.extent_count

    @property
    def reservation(self) -> int:
        return round(self.size * RESERVATION_FACTOR)


@dataclass(frozen=True)
class Region:
    request: CreateRegion
    state: State
    port_number: int
    error: str | None = None  # why it failed

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def read_only(self) -> bool:
        return self.request.source is not None

    def to(self, state: State, error: str | None = None) -> Region:
        if state not in TRANSITIONS[self.state]:
            raise ValueError(f"region {self.id}: {self.state.value} cannot become {state.value}")
        return replace(self, state=state, error=error)

    def to_json(self) -> dict[str, Any]:
        """Crucible's `Region` (plus `error`, set when it failed)."""
        out = asdict(self.request)
        out.update(state=self.state.value, port_number=self.port_number, read_only=self.read_only)
        out["error"] = self.error
        return out

    @staticmethod
    def from_json(obj: dict[str, Any]) -> Region:
        req = parse_create(obj)
        return Region(req, State(obj["state"]), int(obj["port_number"]), obj.get("error"))


@dataclass(frozen=True)
class RunningSnapshot:
    id: str  # the region's
    name: str
    port_number: int
    state: State
    error: str | None = None

    def to(self, state: State, error: str | None = None) -> RunningSnapshot:
        if state not in TRANSITIONS[self.state]:
            raise ValueError(
                f"snapshot {self.name}: {self.state.value} cannot become {state.value}"
            )
        return replace(self, state=state, error=error)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "port_number": self.port_number,
                "state": self.state.value, "error": self.error}  # fmt: skip

    @staticmethod
    def from_json(obj: dict[str, Any]) -> RunningSnapshot:
        return RunningSnapshot(
            str(obj["id"]), str(obj["name"]), int(obj["port_number"]), State(obj["state"]),
            obj.get("error"),
        )  # fmt: skip


# ---- requests ---------------------------------------------------------------------------


def check_id(text: str) -> str:
    """A region id: a UUID (the region's own, as `crucible-downstairs create
    --uuid` takes it), in its usual lowercase form."""
    try:
        canonical = str(uuid.UUID(text))
    except ValueError:
        canonical = ""
    if canonical != text.lower():
        raise bad_request(f"region id {text!r} is not a UUID")
    return canonical


def _uint(obj: dict[str, Any], name: str, lo: int, hi: int) -> int:
    v = obj.get(name)
    if not isinstance(v, int) or isinstance(v, bool):
        raise bad_request(f"{name} must be an integer")
    if not lo <= v <= hi:
        raise bad_request(f"{name} {v} is out of range {lo}..{hi}")
    return v


def _pem(obj: dict[str, Any], name: str) -> str | None:
    v = obj.get(name)
    if v is None:
        return None
    if not isinstance(v, str) or "-----BEGIN" not in v or len(v) > _PEM_MAX:
        raise bad_request(f"{name} must be one PEM document (up to {_PEM_MAX} bytes)")
    return v


def parse_create(obj: Any) -> CreateRegion:
    """A `CreateRegion` body, checked: every error names its field."""
    if not isinstance(obj, dict):
        raise bad_request("the body must be a JSON object")
    missing = [f for f in ("id", "block_size", "extent_size", "extent_count", "encrypted")
               if f not in obj]  # fmt: skip
    if missing:
        raise bad_request(f"missing {', '.join(missing)}")
    if not isinstance(obj["id"], str):
        raise bad_request("id must be a string")
    bs = _uint(obj, "block_size", 1, 1 << 20)
    try:
        validate_block_size(bs)
    except RegionError as e:
        raise bad_request(str(e)) from None
    es = _uint(obj, "extent_size", 1, MAX_EXTENT_BYTES // bs)
    ec = _uint(obj, "extent_count", 1, (1 << 32) - 1)
    if bs * es * ec > MAX_REGION_BYTES:
        raise bad_request(f"a region of {bs * es * ec} bytes is over {MAX_REGION_BYTES}")
    if not isinstance(obj["encrypted"], bool):
        raise bad_request("encrypted must be true or false")
    pems = [_pem(obj, n) for n in ("cert_pem", "key_pem", "root_pem")]
    if any(p is not None for p in pems) and not all(p is not None for p in pems):
        raise bad_request("cert_pem, key_pem and root_pem go together: give all three or none")
    source = obj.get("source")
    if source is not None:
        try:
            host_port(source if isinstance(source, str) else "", "source IP:PORT")
        except ValueError as e:
            raise bad_request(str(e)) from None
    return CreateRegion(
        check_id(obj["id"]), bs, es, ec, obj["encrypted"], pems[0], pems[1], pems[2], source
    )


# ---- ports and space --------------------------------------------------------------------


def held_ports(regions: list[Region], snapshots: list[RunningSnapshot]) -> set[int]:
    held = {r.port_number for r in regions if r.state in HOLDS_PORT}
    return held | {s.port_number for s in snapshots if s.state in HOLDS_PORT}


def pick_port(low: int, high: int, held: set[int], usable: Any = None) -> int:
    """The lowest port of [low, high] no record holds (and `usable(port)`
    accepts: nothing else on the host listens there)."""
    for port in range(low, high + 1):
        if port not in held and (usable is None or usable(port)):
            return port
    raise AgentError(503, "ServiceUnavailable", f"no free downstairs port in {low}-{high}")


def outstanding(regions: list[Region], used: dict[str, int]) -> int:
    """Bytes promised to live regions and not yet written: what the free
    space must keep for them."""
    return sum(
        max(0, r.request.reservation - used.get(r.id, 0))
        for r in regions
        if r.state in (State.REQUESTED, State.CREATED)
    )
