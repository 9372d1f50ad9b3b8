"""One downstairs as the upstairs sees it: its connection, its negotiation,
its keepalive and reconnect timers, and the counts of what it holds.

Sans-IO like the rest of the core: methods take a message or the time and
return actions. What a finished negotiation means for the volume (wait for
the others, replay, live repair) is the caller's decision; the client says
where it got to (Negotiated) or why it cannot go on (NegotiationFailed).
The client's state changes only through `set_state`, which checks every
move against the table in state.py.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import Enum

import crucible.protocol.messages as m
from crucible.common.address import format_host_port
from crucible.common.definition import RegionDefinition
from crucible.protocol.capabilities import Capabilities
from crucible.protocol.wire import SocketAddr
from crucible.upstairs.actions import Action, Connect, Drop, Log, Probe, Send
from crucible.upstairs.mend import ExtentVersions
from crucible.upstairs.options import Options
from crucible.upstairs.state import (
    ACTIVE,
    CONNECTED,
    IDLE,
    TAKES_IO,
    DsState,
    Mode,
    Stage,
    check_transition,
)
from crucible.upstairs.status import DownstairsStatus


@dataclass(frozen=True)
class Session:
    """Who this upstairs is to its downstairs, for one activation."""

    upstairs_id: uuid.UUID
    session_id: uuid.UUID
    gen: int
    read_only: bool
    encrypted: bool = False


class NegotiationFailed(Exception):
    """A downstairs the volume cannot go on with: activation fails (or, if
    the volume is active, it stops)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Negotiated(Enum):
    CONTINUE = "continue"  # the next question has been asked
    RESUME = "resume"  # back from offline: now ACTIVE, its held jobs are to be replayed
    VERSIONS = "versions"  # its extent versions are in: the volume decides what follows


@dataclass
class Client:
    id: int
    target: SocketAddr
    state: DsState = IDLE
    repair_addr: SocketAddr | None = None
    region: RegionDefinition | None = None
    region_uuid: uuid.UUID | None = None  # the region this client must keep talking to
    versions: ExtentVersions | None = None
    capabilities: Capabilities | None = None  # None: never negotiated
    last_rx: float = 0.0
    last_ping: float = 0.0
    reconnect_at: float | None = None
    offline_since: float | None = None
    last_flush_done: int | None = None
    inflight_jobs: int = 0
    last_progress: float = 0.0  # a job finished, or the first was sent after none
    last_finished: float = 0.0  # a job finished
    inflight_bytes: int = 0
    skipped: set[int] = field(default_factory=set)
    # Jobs below this id were never sent on the current session (live repair
    # starts one): dependencies on them are dropped.
    first_job: int = 0
    last_error: str = ""
    error_connect: int = -1  # the connection attempt last_error is about (`connects`)
    connects: int = 0
    # Live repairs of it that failed in a row, and when the next may start.
    repair_failures: int = 0
    repair_after: float = 0.0
    # Live repairs of it, as Crucible's per-client counters count them.
    live_repairs: int = 0
    live_repairs_aborted: int = 0
    extents_repaired: int = 0
    extents_confirmed: int = 0

    # host:port of the target, kept (it goes with every reply's checks): see retarget.
    name: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.retarget(self.target)

    def retarget(self, target: SocketAddr) -> None:
        """Talk to another downstairs (a replacement) from now on."""
        self.target = target
        self.name = format_host_port(target)

    # ---- state -----------------------------------------------------------------------

    def set_state(self, new: DsState) -> None:
        """The one place a client's state changes; an illegal move raises."""
        check_transition(self.state, new)
        self.state = new

    @property
    def stage(self) -> Stage:
        return self.state.stage

    @property
    def mode(self) -> Mode:
        """How it rejoins; NEW once it has."""
        return self.state.mode or Mode.NEW

    @property
    def holds_jobs(self) -> bool:
        """Offline (or reconnecting to resume): jobs wait here for its return."""
        return self.state.mode is Mode.OFFLINE

    @property
    def takes_io(self) -> bool:
        return self.state.stage in TAKES_IO

    @property
    def accepts_io(self) -> bool:
        return self.takes_io or self.holds_jobs

    @property
    def is_faulted(self) -> bool:
        """Faulted (or replaced) and not yet reconnected."""
        return self.state.stage is Stage.CONNECT and self.state.mode in (
            Mode.FAULTED,
            Mode.REPLACED,
        )

    @property
    def trims(self) -> bool:
        """Known to take the Trim message."""
        return self.capabilities is not None and self.capabilities.trim

    def status(self) -> DownstairsStatus:
        return DownstairsStatus(
            target=self.name,
            state=self.state.name,
            mode=self.mode.value,
            jobs_in_flight=self.inflight_jobs,
            bytes_in_flight=self.inflight_bytes,
            last_error=self.last_error,
            connections=self.connects,
            trim=None if self.capabilities is None else self.capabilities.trim,
            live_repairs=self.live_repairs,
            live_repairs_aborted=self.live_repairs_aborted,
            extents_repaired=self.extents_repaired,
            extents_confirmed=self.extents_confirmed,
        )

    # ---- connection --------------------------------------------------------------------

    def note_error(self, err: str) -> bool:
        """Remember why it is not working; True when that was said already
        (said once: a downstairs may stay down for long)."""
        repeat = err == self.last_error
        self.last_error = err
        self.error_connect = self.connects
        return repeat

    @property
    def _retry_level(self) -> str:
        """Retries after a failure are logged quietly; the failure was said."""
        return "debug" if self.last_error else "info"

    def connect(self, mode: Mode | None = None) -> list[Action]:
        """Connect now, rejoining in `mode` (default: the mode it has)."""
        self.set_state(DsState(Stage.CONNECT, mode or self.mode))
        self.reconnect_at = None
        line = f"[{self.id}] connecting to {self.name}"
        return [Log(line, self._retry_level), Connect(self.id, self.target)]

    def connect_failed(self, reason: str, now: float, opts: Options) -> list[Action]:
        repeat = self.note_error(f"cannot connect to {self.name}: {reason}")
        if self.stage is not Stage.CONNECT:
            return []
        self.reconnect_at = now + opts.reconnect_delay
        # Info, not a warning: while it is away, the volume's state says so.
        return [Log(f"[{self.id}] {self.last_error}; retrying", "debug" if repeat else "info")]

    def connected(self, session: Session, now: float) -> list[Action]:
        if self.stage is not Stage.CONNECT:
            return [Drop(self.id, "connection no longer wanted")]
        self.set_state(DsState(Stage.HELLO, self.mode))
        self.last_rx = self.last_ping = now
        self.connects += 1
        hello = m.HereIAm(
            m.CRUCIBLE_MESSAGE_VERSION,
            session.upstairs_id,
            session.session_id,
            session.gen,
            session.read_only,
            session.encrypted,
            [],
        )
        line = f"[{self.id}] ok, connected to {self.name}"
        return [Log(line, self._retry_level), Send(self.id, hello)]

    def fall_back(self, now: float, opts: Options, mode: Mode | None = None) -> None:
        """Lost (or dropped): connect again after the reconnect delay."""
        self.set_state(DsState(Stage.CONNECT, mode or self.mode))
        self.reconnect_at = now + opts.reconnect_delay

    def tick(self, now: float, opts: Options) -> list[Action]:
        """Reconnect when due; ping a quiet connection; drop a silent one."""
        if self.stage is Stage.CONNECT:
            if self.reconnect_at is not None and now >= self.reconnect_at:
                return self.connect()
            return []
        if self.stage not in CONNECTED:
            return []
        if self.stage is Stage.HELLO and now - self.last_rx > opts.hello_timeout:
            err = f"{self.name} answered nothing to the Crucible hello in {opts.hello_timeout:g} s"
            repeat = self.note_error(err + " (is it a downstairs?)")
            return [
                Log(f"[{self.id}] {self.last_error}", "debug" if repeat else "error"),
                Drop(self.id, err),
            ]
        if now - self.last_rx > opts.timeout:
            self.last_error = f"no message for {opts.timeout:g} s"
            return [Drop(self.id, self.last_error)]
        if now - self.last_ping >= opts.ping_interval:
            self.last_ping = now
            return [Send(self.id, m.Ruok())]
        return []

    # ---- negotiation -------------------------------------------------------------------

    def negotiate(
        self,
        msg: m.Message,
        session: Session,
        volume_region: RegionDefinition | None,
        serving: bool,
    ) -> tuple[Negotiated, list[Action]]:
        """The next negotiation message. `volume_region`: the geometry the
        others have; `serving`: the volume is active (a region that does not
        fit then refuses this downstairs, which is tried again, not the
        volume). Raises NegotiationFailed."""
        stage = self.stage
        match msg:
            case m.VersionMismatch() | m.ReadOnlyMismatch() | m.EncryptedMismatch():
                raise NegotiationFailed(f"downstairs {self.name} {_mismatch(msg)}")
            case m.YesItsMe() if stage is Stage.HELLO:
                if msg.version != m.CRUCIBLE_MESSAGE_VERSION:
                    why = f"downstairs {self.name} speaks version {msg.version}"
                    raise NegotiationFailed(why)
                host, port = msg.repair_addr
                if host in ("0.0.0.0", "::"):
                    host = self.target[0]  # it listens everywhere: reach it where we reached it
                self.repair_addr = (host, port)
                self.set_state(DsState(Stage.PROBE, self.mode))
                return Negotiated.CONTINUE, [Probe(self.id, self.repair_addr, self.connects)]
            case m.YouAreNowActive() if stage is Stage.PROMOTE:
                ours = (session.upstairs_id, session.session_id, session.gen)
                if (msg.upstairs_id, msg.session_id, msg.gen) != ours:
                    why = f"downstairs {self.name} promoted another session"
                    raise NegotiationFailed(why)
                self.set_state(DsState(Stage.REGION, self.mode))
                return Negotiated.CONTINUE, [Send(self.id, m.RegionInfoPlease())]
            case m.RegionInfo() if stage is Stage.REGION:
                return self._region_info(msg.region_def, session, volume_region, serving)
            case m.ExtentVersions() if stage is Stage.VERSIONS:
                self.versions = ExtentVersions(msg.gen_numbers, msg.flush_numbers, msg.dirty_bits)
                return Negotiated.VERSIONS, []
        why = f"unexpected {type(msg).__name__} while negotiating ({stage.value})"
        return Negotiated.CONTINUE, [Drop(self.id, why)]

    def probed(self, caps: Capabilities, session: Session) -> list[Action]:
        """Its repair server said what it supports: promote it."""
        self.capabilities = caps
        self.set_state(DsState(Stage.PROMOTE, self.mode))
        promote = m.PromoteToActive(session.upstairs_id, session.session_id, session.gen)
        return [Send(self.id, promote)]

    def _region_info(
        self,
        d: RegionDefinition,
        session: Session,
        ref: RegionDefinition | None,
        serving: bool,
    ) -> tuple[Negotiated, list[Action]]:
        acts: list[Action] = [
            Log(
                f"[{self.id}] {self.name} bs:{d.block_size} es:{d.extent_size} "
                f"ec:{d.extent_count} uuid:{d.uuid}"
            )
        ]
        problem = None
        if d.encrypted != session.encrypted:
            problem = f"downstairs {self.name} {_encryption_mismatch(d.encrypted)}"
        elif ref is not None and _shape(ref) != _shape(d):
            problem = (
                f"downstairs {self.name} has bs:{d.block_size} es:{d.extent_size} "
                f"ec:{d.extent_count}, others have bs:{ref.block_size} es:{ref.extent_size} "
                f"ec:{ref.extent_count}"
            )
        elif self.mode is not Mode.REPLACED and self.region_uuid not in (None, d.uuid):
            # Another region answers at this address: only replace() may do that.
            problem = f"{self.name} now holds region {d.uuid}, not {self.region_uuid}"
        if problem and not serving:
            raise NegotiationFailed(problem)
        if problem:
            # The volume is serving: refuse this one downstairs (it is retried), not the volume.
            self.last_error = problem
            return Negotiated.CONTINUE, [
                *acts,
                Log(f"[{self.id}] {problem}", "error"),
                Drop(self.id, problem),
            ]
        self.region = d
        self.region_uuid = d.uuid
        if self.mode is Mode.OFFLINE:
            return Negotiated.RESUME, acts + self._resume()
        self.set_state(DsState(Stage.VERSIONS, self.mode))
        return Negotiated.CONTINUE, [*acts, Send(self.id, m.ExtentVersionsPlease())]

    def _resume(self) -> list[Action]:
        """Back from offline: it continues after the last flush it finished
        (the caller replays every job since)."""
        self.set_state(ACTIVE)
        self.offline_since = None
        self.inflight_jobs = self.inflight_bytes = 0
        return [
            Send(self.id, m.LastFlush(self.last_flush_done)),
            Log(
                f"[{self.id}] {self.name} is back: replaying jobs after flush "
                f"{self.last_flush_done}"
            ),
        ]


def _shape(d: RegionDefinition) -> tuple[int, int, int]:
    return d.block_size, d.extent_size, d.extent_count


def _mismatch(msg: m.VersionMismatch | m.ReadOnlyMismatch | m.EncryptedMismatch) -> str:
    match msg:
        case m.VersionMismatch():
            return f"speaks protocol version {msg.version}"
        case m.ReadOnlyMismatch():
            return "has a different read-only mode"
        case m.EncryptedMismatch():
            return _encryption_mismatch(msg.expected)


def _encryption_mismatch(region_encrypted: bool) -> str:
    if region_encrypted:
        return "holds an encrypted region: give its key with --key or --key-file"
    return "holds a region that is not encrypted: open it without a key"
