"""The agent: what its API asks (model.py's rules over store.py's records),
and the worker that makes the host match the records.

A request only changes records and rings the bell; the worker does the slow
work in the background, one item at a time, in Crucible's order: regions to
destroy, regions to create, running snapshots to stop, ones to start. After
each item, and when it starts, it reconciles the processes with the records:
a downstairs for every `created` region and every `requested` or `created`
running snapshot, and none for anything else.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from crucible.agent import model
from crucible.agent.disk import Disk, DiskError
from crucible.agent.model import AgentError, CreateRegion, Region, RunningSnapshot, State
from crucible.agent.store import Store
from crucible.agent.supervisor import Supervisor
from crucible.common.errors import CrucibleError
from crucible.downstairs.repair import REPAIR_PORT_OFFSET
from crucible.region.snapshot import check_name

log = logging.getLogger("crucible.agent")


@dataclass(frozen=True)
class Settings:
    address: str  # where every downstairs listens (and what clients dial)
    port_low: int
    port_high: int


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _snapshot_key(rid: str, name: str) -> str:
    return f"{rid}@{name}"


class Agent:
    def __init__(self, settings: Settings, store: Store, disk: Disk) -> None:
        self.settings = settings
        self.store = store
        self.disk = disk
        self.bell = asyncio.Event()
        self.supervisor = Supervisor(store)
        self.creating: str | None = None  # the region the worker is making now
        self.worker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bring back every downstairs the records want, stop any they do not,
        and start the worker."""
        await self.supervisor.stop_strays(set(self._expected()))
        with self.supervisor.adopting_unrecorded():
            await self._reconcile()
        self.worker = asyncio.create_task(self._work())

    async def close(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            try:
                await self.worker
            except asyncio.CancelledError:
                pass
        await self.supervisor.close()
        self.store.close()

    def _changed(self) -> None:
        self.bell.set()

    # ---- the API's operations ---------------------------------------------------------

    def region_json(self, r: Region) -> dict[str, Any]:
        out = r.to_json()
        out["address"] = self.settings.address
        return out

    def list_regions(self) -> list[Region]:
        return [self.store.regions[k] for k in sorted(self.store.regions)]

    def get_region(self, rid: str) -> Region:
        r = self.store.regions.get(rid)
        if r is None:
            raise model.not_found(f"no region {rid}")
        return r

    def create_region(self, req: CreateRegion) -> Region:
        """Idempotent on the id: the same request again gets the record as it
        is now (even destroyed); a different one under that id is refused."""
        known = self.store.regions.get(req.id)
        if known is not None:
            if known.request != req:
                raise AgentError(409, "Conflict",
                                 f"region {req.id} exists with other parameters")  # fmt: skip
            return known
        regions = list(self.store.regions.values())
        used = {r.id: self.disk.used(r.id) for r in regions if r.state is State.CREATED}
        room = self.disk.free() - model.outstanding(regions, used)
        if req.reservation > room:
            raise AgentError(
                507, "InsufficientStorage",
                f"a region of {req.size} bytes needs {req.reservation} with headroom; "
                f"{max(0, room)} bytes are free in {self.disk.datadir} after the other "
                "regions' reservations",
            )  # fmt: skip
        port = self._pick_port()
        r = Region(req, State.REQUESTED, port)
        self.store.put_region(r)
        log.info("region %s requested: %d bytes, port %d", req.id, req.size, port)
        self._changed()
        return r

    def delete_region(self, rid: str) -> None:
        r = self.get_region(rid)
        if rid == self.creating:
            raise AgentError(503, "ServiceUnavailable", f"region {rid} is being created; retry")
        if r.state in (State.TOMBSTONED, State.DESTROYED):
            return
        if self.disk.snapshots(rid) or self._running_snapshots(rid, live=True):
            raise model.bad_request("must delete snapshots first!")
        self.store.put_region(r.to(State.TOMBSTONED))
        log.info("region %s tombstoned", rid)
        self._changed()

    def snapshots(self, rid: str) -> dict[str, Any]:
        r = self.get_region(rid)
        found = self.disk.snapshots(rid) if r.state is State.CREATED else []
        return {
            "snapshots": [{"name": s.name, "created": _rfc3339(s.created)} for s in found],
            "running_snapshots": {
                s.name: s.to_json() for s in self._running_snapshots(rid, live=False)
            },
        }

    def snapshot(self, rid: str, name: str) -> dict[str, Any]:
        for s in self.snapshots(rid)["snapshots"]:
            if s["name"] == name:
                return s  # type: ignore[no-any-return]
        raise model.not_found(f"region {rid} has no snapshot {name}")

    def delete_snapshot(self, rid: str, name: str) -> None:
        r = self.get_region(rid)
        running = self.store.snapshots.get((rid, name))
        if running is not None and running.state in (State.REQUESTED, State.CREATED):
            stop = f"DELETE /crucible/0/regions/{rid}/snapshots/{name}/run"
            raise AgentError(409, "Conflict", f"snapshot {name} is running: stop it first ({stop})")
        if r.state is not State.CREATED or not any(
            s.name == name for s in self.disk.snapshots(rid)
        ):
            return  # gone already (or never made): deleting it again is fine
        try:
            self.disk.delete_snapshot(rid, name)
        except (CrucibleError, OSError) as e:
            raise AgentError(500, "Internal", f"deleting snapshot {name}: {e}") from None
        log.info("region %s: snapshot %s deleted", rid, name)

    def run_snapshot(self, rid: str, name: str) -> RunningSnapshot:
        """Serve a snapshot read-only; idempotent while that one is not destroyed."""
        self.get_region(rid)
        try:
            check_name(name)
        except CrucibleError as e:
            raise model.bad_request(str(e)) from None
        known = self.store.snapshots.get((rid, name))
        if known is not None and known.state is not State.DESTROYED:
            return known
        self.snapshot(rid, name)  # 404 if it is not there
        s = RunningSnapshot(rid, name, self._pick_port(), State.REQUESTED)
        self.store.put_snapshot(s)
        log.info("region %s: running snapshot %s requested on port %d", rid, name, s.port_number)
        self._changed()
        return s

    def stop_snapshot(self, rid: str, name: str) -> None:
        self.get_region(rid)
        s = self.store.snapshots.get((rid, name))
        if s is None or s.state in (State.TOMBSTONED, State.DESTROYED):
            return
        self.store.put_snapshot(s.to(State.TOMBSTONED))
        self._changed()

    def _running_snapshots(self, rid: str, live: bool) -> list[RunningSnapshot]:
        return [
            s for (r, _), s in sorted(self.store.snapshots.items())
            if r == rid and (not live or s.state in (State.REQUESTED, State.CREATED))
        ]  # fmt: skip

    def _pick_port(self) -> int:
        held = model.held_ports(
            list(self.store.regions.values()), list(self.store.snapshots.values())
        )
        return model.pick_port(
            self.settings.port_low, self.settings.port_high, held, self._port_free
        )

    def _port_free(self, port: int) -> bool:
        """Nothing else on this host listens on the port or its repair port."""
        for p in (port, port + REPAIR_PORT_OFFSET):
            family = socket.AF_INET6 if ":" in self.settings.address else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((self.settings.address, p))
                except OSError:
                    return False
        return True

    # ---- the worker -------------------------------------------------------------------

    def _next(self) -> Region | RunningSnapshot | None:
        regions = self.list_regions()
        snaps = [self.store.snapshots[k] for k in sorted(self.store.snapshots)]
        for want, items in (
            (State.TOMBSTONED, regions), (State.REQUESTED, regions),
            (State.TOMBSTONED, snaps), (State.REQUESTED, snaps),
        ):  # fmt: skip
            for item in items:
                if item.state is want:
                    return item
        return None

    async def _work(self) -> None:
        while True:
            self.bell.clear()
            item = self._next()
            if item is None:
                await self.bell.wait()
                continue
            try:
                if isinstance(item, Region):
                    await self._do_region(item)
                else:
                    await self._do_snapshot(item)
                await self._reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the agent's worker failed on %s; retrying in 1 s", item)
                await asyncio.sleep(1.0)

    async def _do_region(self, r: Region) -> None:
        if r.state is State.REQUESTED:
            self.creating = r.id
            began = time.monotonic()
            try:
                await self.disk.create(r.request)
            except (DiskError, OSError) as e:
                self.store.put_region(r.to(State.FAILED, str(e)))
                log.error("region %s failed: %s", r.id, e)
                return
            finally:
                self.creating = None
            self.store.put_region(self.store.regions[r.id].to(State.CREATED))
            log.info("region %s created in %.1f s", r.id, time.monotonic() - began)
        else:  # tombstoned
            await self.supervisor.stop(r.id)
            try:
                await self.disk.destroy(r.id)
            except OSError as e:
                self.store.put_region(r.to(State.FAILED, f"removing its files: {e}"))
                log.error("region %s: removing its files failed: %s", r.id, e)
                return
            self.store.put_region(r.to(State.DESTROYED))
            log.info("region %s destroyed", r.id)

    async def _do_snapshot(self, s: RunningSnapshot) -> None:
        if s.state is State.REQUESTED:
            self.store.put_snapshot(s.to(State.CREATED))
        else:  # tombstoned
            await self.supervisor.stop(_snapshot_key(s.id, s.name))
            self.store.put_snapshot(s.to(State.DESTROYED))
            log.info("region %s: running snapshot %s stopped", s.id, s.name)

    def _expected(self) -> dict[str, list[str]]:
        """The downstairs the records want: key -> command."""
        out = {}
        for r in self.store.regions.values():
            if r.state is State.CREATED:
                out[r.id] = self._argv(r.id, r.port_number, r.read_only, None)
        for s in self.store.snapshots.values():
            if s.state in (State.REQUESTED, State.CREATED):
                out[_snapshot_key(s.id, s.name)] = self._argv(s.id, s.port_number, True, s.name)
        return out

    def _argv(self, rid: str, port: int, read_only: bool, snapshot: str | None) -> list[str]:
        argv = [*self.disk.downstairs, "run", "--data", str(self.disk.region_dir(rid)),
                "--address", self.settings.address, "--port", str(port),
                "--mode", "ro" if read_only else "rw", "--quiet"]  # fmt: skip
        if snapshot is not None:
            argv += ["--snapshot", snapshot]
        pems = self.disk.pems(rid)
        if pems is not None:
            argv += ["--cert-pem", str(pems[0]), "--key-pem", str(pems[1]),
                     "--root-cert-pem", str(pems[2])]  # fmt: skip
        return argv

    async def _reconcile(self) -> None:
        expected = self._expected()
        for key in [k for k in self.supervisor.managed if k not in expected]:
            await self.supervisor.stop(key)
        for key, argv in expected.items():
            await self.supervisor.ensure(key, argv, self.disk.log_path(key))
