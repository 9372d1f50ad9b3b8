"""Negotiation with one downstairs: HereIAm, PromoteToActive, RegionInfo, then
either ExtentVersions (to be compared at activation, or live-repaired while
the volume serves) or LastFlush and the replay of held jobs (back from being
offline). Functions of the upstairs core (core.py), split out for reading."""

from __future__ import annotations

from typing import TYPE_CHECKING

from crucible.common.definition import RegionDefinition
from crucible.protocol import messages as m
from crucible.upstairs.actions import Action, Drop, Log, Send
from crucible.upstairs.jobs import IOState
from crucible.upstairs.mend import ExtentVersions
from crucible.upstairs.state import Client, CState, Mode, UpState

if TYPE_CHECKING:
    from crucible.upstairs.core import UpstairsCore


def negotiate(up: UpstairsCore, c: Client, msg: m.Message, now: float) -> list[Action]:
    """The next negotiation message from a client that is not yet serving IO."""
    cid = c.id
    if isinstance(msg, m.VersionMismatch | m.ReadOnlyMismatch | m.EncryptedMismatch):
        what = {
            m.VersionMismatch: f"speaks protocol version {getattr(msg, 'version', '')}",
            m.ReadOnlyMismatch: "has a different read-only mode",
            m.EncryptedMismatch: "has a different encryption setting",
        }[type(msg)]
        return up._fail_activation(f"downstairs {c.name} {what}", now)
    if c.phase == "hello" and isinstance(msg, m.YesItsMe):
        if msg.version != m.CRUCIBLE_MESSAGE_VERSION:
            return up._fail_activation(f"downstairs {c.name} speaks version {msg.version}", now)
        host, port = msg.repair_addr
        if host in ("0.0.0.0", "::"):
            host = c.target[0]  # it listens everywhere: reach it where we reached it
        c.repair_addr = (host, port)
        c.phase = "promote"
        return [Send(cid, m.PromoteToActive(up.upstairs_id, up.session_id, up.gen))]
    if c.phase == "promote" and isinstance(msg, m.YouAreNowActive):
        if (msg.upstairs_id, msg.session_id, msg.gen) != (
            up.upstairs_id,
            up.session_id,
            up.gen,
        ):
            return up._fail_activation(f"downstairs {c.name} promoted another session", now)
        c.phase = "region"
        return [Send(cid, m.RegionInfoPlease())]
    if c.phase == "region" and isinstance(msg, m.RegionInfo):
        return region_info(up, c, msg.region_def, now)
    if c.phase == "versions" and isinstance(msg, m.ExtentVersions):
        c.versions = ExtentVersions(msg.gen_numbers, msg.flush_numbers, msg.dirty_bits)
        c.state = CState.WAIT_QUORUM
        c.phase = ""
        if up.state is UpState.ACTIVE:
            if up.opts.read_only:
                c.state = CState.ACTIVE  # read-only: nothing to reconcile, it joins at once
            else:
                c.state = CState.REPAIR_READY  # it missed writes: live repair
                return [
                    Log(f"[{cid}] {c.name} is ready for live repair ({c.mode.value})"),
                    *up._maintain(now),
                ]
        n = sum(1 for x in up.clients if x.state is CState.WAIT_QUORUM)
        return [
            Log(
                f"[{cid}] {c.name} extent versions: gen {_preview(msg.gen_numbers)} "
                f"flush {_preview(msg.flush_numbers)} dirty {_preview(msg.dirty_bits)}"
            ),
            Log(f"#### {c.name} #### CONNECTED ######## {n}/3"),
            *up._maintain(now),
        ]
    return [Drop(cid, f"unexpected {type(msg).__name__} while negotiating ({c.phase})")]


def region_info(up: UpstairsCore, c: Client, d: RegionDefinition, now: float) -> list[Action]:
    acts: list[Action] = [
        Log(
            f"[{c.id}] {c.name} bs:{d.block_size} es:{d.extent_size} "
            f"ec:{d.extent_count} uuid:{d.uuid}"
        )
    ]
    problem = None
    ref = up.region
    if d.encrypted:
        problem = f"downstairs {c.name} holds an encrypted region; no key was given"
    elif ref is not None and (ref.block_size, ref.extent_size, ref.extent_count) != (
        d.block_size,
        d.extent_size,
        d.extent_count,
    ):
        problem = (
            f"downstairs {c.name} has bs:{d.block_size} es:{d.extent_size} "
            f"ec:{d.extent_count}, others have bs:{ref.block_size} es:{ref.extent_size} "
            f"ec:{ref.extent_count}"
        )
    elif c.mode is not Mode.REPLACED and c.region_uuid not in (None, d.uuid):
        # Another region answers at this address: only replace() may do that.
        problem = f"{c.name} now holds region {d.uuid}, not {c.region_uuid}"
    if problem and up.state not in (UpState.ACTIVE, UpState.DEACTIVATING):
        return acts + up._fail_activation(problem, now)
    if problem:
        # The volume is serving: refuse this one downstairs (it is retried), not the volume.
        c.last_error = problem
        return [*acts, Log(f"[{c.id}] {problem}", "error"), Drop(c.id, problem)]
    up.region = d
    c.region = d
    c.region_uuid = d.uuid
    if c.mode is Mode.OFFLINE:
        return acts + resume(up, c, now)
    c.phase = "versions"
    return [*acts, Send(c.id, m.ExtentVersionsPlease())]


def resume(up: UpstairsCore, c: Client, now: float) -> list[Action]:
    """Back from offline: continue after the last flush it finished, and
    replay every job since (the downstairs' completed set starts there)."""
    c.state = CState.ACTIVE
    c.phase = ""
    c.mode = Mode.NEW
    c.offline_since = None
    acts: list[Action] = [
        Send(c.id, m.LastFlush(c.last_flush_done)),
        Log(f"[{c.id}] {c.name} is back: replaying jobs after flush {c.last_flush_done}"),
    ]
    c.inflight_jobs = 0
    c.inflight_bytes = 0
    for job in up.jobs.values():
        if c.last_flush_done is not None and job.id <= c.last_flush_done:
            continue
        if job.state[c.id] is IOState.SKIPPED:
            continue
        if job.state[c.id] is IOState.DONE:
            job.state[c.id] = IOState.IN_PROGRESS
            if job.finished:  # it will finish again when the replay is done
                job.finished = False
                up.done_jobs -= 1
                up.done_bytes -= job.nbytes
                if job.is_flush_like:
                    up.flushes_pending += 1
        job.replay = True
        if job.state[c.id] is IOState.IN_PROGRESS:
            c.inflight_jobs += 1
            c.inflight_bytes += job.nbytes
            acts.append(
                Send(c.id, job.message(up.upstairs_id, up.session_id, up._deps_for(c, job)))
            )
    return acts


def _preview(values: list[int] | list[bool], limit: int = 8) -> str:
    vals = [int(v) for v in values]
    shown = ", ".join(str(v) for v in vals[:limit])
    return f"[{shown}{', ...' if len(vals) > limit else ''}]"
