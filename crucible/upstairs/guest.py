"""The asyncio driver of the upstairs and the API a disk's user calls.

One loop owns the UpstairsCore; each downstairs connection is a thin
protocol object (transport.py) that turns bytes into messages for it and
writes what it sends.

Every request that queues jobs goes through one path: `submit_*` takes a
callback, splits the request into jobs of at most MAX_IO_BYTES and hands
them to the core as soon as there is room (backpressure), strictly in the
order they were submitted; until then they wait in a backlog. The
coroutines (`read`, `write`, `flush`, ...) are thin wrappers over the same
path, for callers that await.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any, Final, cast

import crucible.protocol.messages as m
from crucible.common.buffer import Buffer
from crucible.common.definition import RegionDefinition
from crucible.common.errors import CrucibleError, ErrorKind
from crucible.observe.probes import UP
from crucible.protocol.codec import encode_parts
from crucible.protocol.wire import SocketAddr
from crucible.tls import connect_error
from crucible.upstairs import report
from crucible.upstairs.actions import (
    Action,
    Complete,
    Connect,
    Drop,
    FetchAllocation,
    Log,
    Probe,
    Send,
)
from crucible.upstairs.blockio import (
    BlockIO,
    ReadDone,
    WriteDone,
    errors_only,
    joined,
    once,
    settle,
)
from crucible.upstairs.core import UpstairsCore
from crucible.upstairs.options import Options
from crucible.upstairs.repair_http import fetch_allocation, fetch_capabilities
from crucible.upstairs.status import UpstairsStatus, VerifyStatus
from crucible.upstairs.transport import Connection

log = logging.getLogger("crucible.upstairs")

# What a read completes with: the data, and each block's context (None: never written).
_Callback = Callable[[Any], None]  # built once: a cast to it costs nothing per call

MAX_IO_BYTES: Final = 1 << 20  # guest IO is split into jobs of at most this size
CONNECT_TIMEOUT = 10.0
TICK = 0.05
STATUS_INTERVAL = 1.0  # the up__status probe, as Crucible's
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class Upstairs(BlockIO):
    """A volume replicated on three downstairs."""

    def __init__(
        self,
        targets: list[SocketAddr],
        options: Options | None = None,
        upstairs_id: uuid.UUID | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """`tls`: a client context (crucible.tls) for every downstairs and
        repair server; None: plain TCP."""
        self._tls = tls
        # Per-job log lines cost a string format each: only when they are shown.
        options = dataclasses.replace(
            options or Options(), log_jobs=log.isEnabledFor(logging.DEBUG), tls=tls is not None
        )
        self.core = UpstairsCore(targets, options, upstairs_id)
        self._conns: dict[int, Connection] = {}
        self._connecting: dict[int, asyncio.Task[None]] = {}
        self._probes: dict[int, asyncio.Task[None]] = {}
        self._fetches: set[asyncio.Task[None]] = set()  # of the allocation map
        # Requests waiting for room, in order: (bytes the job carries, what queues it).
        self._backlog: deque[tuple[int, Callable[[], None]]] = deque()
        self._ticker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle -----------------------------------------------------------------

    def _now(self) -> float:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._ticker = self._loop.create_task(self._tick_loop())
        return self._loop.time()

    async def _tick_loop(self) -> None:
        next_status = 0.0
        while True:
            await asyncio.sleep(TICK)
            now = self._now()
            self._apply(self.core.tick(now))
            self._drain_backlog()
            if UP.on and now >= next_status and UP.attached("up__status"):
                next_status = now + STATUS_INTERVAL
                s = self.info()
                record = report.dtrace_info(s, report.io_count(list(self.core.ds.table)))
                UP.fire("up__status", "stats", record, s.as_dict())

    async def close(self) -> None:
        """Drop every connection and stop the timers (no flush: see deactivate)."""
        if self._ticker is not None:
            self._ticker.cancel()
        for t in [*self._connecting.values(), *self._probes.values(), *self._fetches]:
            t.cancel()
        for conn in list(self._conns.values()):
            conn.close()
        self._conns.clear()
        await asyncio.sleep(0)

    async def __aenter__(self) -> Upstairs:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- what the volume is ----------------------------------------------------------

    @property
    def region(self) -> RegionDefinition:
        """The volume's geometry, known once a downstairs has described it."""
        r = self.core.region
        if r is None:
            raise CrucibleError(ErrorKind.UpstairsInactive, "not activated yet")
        return r

    @property
    def block_size(self) -> int:
        return self.region.block_size

    @property
    def total_blocks(self) -> int:
        return self.region.total_blocks

    def info(self) -> UpstairsStatus:
        return self.core.info()

    def work(self) -> dict[str, Any]:
        """Jobs in flight and the last few retired (the control API's /work)."""
        table = self.core.ds.table
        jobs = sorted(table, key=lambda j: j.id)
        return {
            "jobs": [report.work_summary(j) for j in jobs],
            "completed": list(table.recent),
        }

    def session_ids(self) -> tuple[uuid.UUID, uuid.UUID]:
        """(upstairs id, session id): a new session id at each activation."""
        s = self.core.ds.session
        return s.upstairs_id, s.session_id

    # ---- the one path: callbacks ------------------------------------------------------

    def submit_read(self, block: int, count: int, done: ReadDone) -> None:
        """Read blocks; `done` gets the data and each block's context once the
        first good reply of every piece is in, or the error."""
        region = self.core.region
        if (
            region is not None
            and 0 < count * region.block_size <= MAX_IO_BYTES
            and not self._backlog
            and self.core.has_room(0)
        ):  # one job, queued now (the core checks the request): the common case
            self._apply(self.core.read(done, block, count, self._now()))
            return
        err = self.core.check_io(block, count, write=False)
        if err:
            done(err)
            return
        if count == 0:
            done((b"", []))
            return
        pieces = self._pieces(block, count)
        if len(pieces) == 1:
            self._when_room(0, lambda: self._apply(self.core.read(done, block, count, self._now())))
            return
        callbacks = joined(len(pieces), done)

        for (b, n), cb in zip(pieces, callbacks, strict=True):

            def queue(b: int = b, n: int = n, cb: ReadDone = cb) -> None:
                self._apply(self.core.read(cb, b, n, self._now()))

            self._when_room(0, queue)

    def submit_write(self, block: int, data: Buffer, done: WriteDone) -> None:
        """Write whole blocks; `done` is called once every piece is queued (a
        write is acked when queued: the next flush makes it durable). The
        volume keeps `data`, which the caller must not change."""
        self._submit_write(block, data, done, unwritten=False)

    def submit_write_unwritten(self, block: int, data: Buffer, done: WriteDone) -> None:
        """As submit_write, but only blocks never written are written."""
        self._submit_write(block, data, done, unwritten=True)

    def _submit_write(self, block: int, data: Buffer, done: WriteDone, unwritten: bool) -> None:
        if 0 < len(data) <= MAX_IO_BYTES and not self._backlog and self.core.has_room(len(data)):
            # One job, queued now (the core checks the request): the common case.
            self._apply(self.core.write(done, block, data, self._now(), unwritten))
            return
        err = self.core.check_write(block, len(data))  # before any piece is queued
        if err or not data:
            done(err)
            return
        self._write_pieces(block, data, done, unwritten)

    def _write_pieces(self, block: int, data: Buffer, done: WriteDone, unwritten: bool) -> None:
        bs = self.core.region.block_size if self.core.region else 1
        view = memoryview(data).cast("B") if len(data) > MAX_IO_BYTES else None
        offsets = range(0, len(data), MAX_IO_BYTES)
        last = offsets[-1]
        done = once(done)
        for off in offsets:
            piece = data if view is None else view[off : off + MAX_IO_BYTES]
            b = block + off // bs
            cb = done if off == last else errors_only(done)

            def queue(b: int = b, piece: Any = piece, cb: WriteDone = cb) -> None:
                self._apply(self.core.write(cb, b, piece, self._now(), unwritten))

            self._when_room(len(piece), queue)

    def submit_trim(self, block: int, count: int, done: WriteDone) -> None:
        """Discard blocks: they read back as zeros and their space is freed
        (where a downstairs cannot, zeros are written). Acked when queued."""
        err = self.core.check_io(block, count, write=True)
        if err or count == 0:
            done(err)
            return
        pieces = self._pieces(block, count)
        done = once(done)
        for i, (b, n) in enumerate(pieces):
            cb = done if i == len(pieces) - 1 else errors_only(done)
            nbytes = 0 if self.core.ds.trims() else n * self.block_size

            def queue(b: int = b, n: int = n, cb: WriteDone = cb) -> None:
                self._apply(self.core.trim(cb, b, n, self._now()))

            self._when_room(nbytes, queue)

    def submit_flush(self, done: WriteDone, snapshot: str | None = None) -> None:
        """Make every write queued before it durable; `done` once it is."""
        self._when_room(0, lambda: self._apply(self.core.flush(done, self._now(), snapshot)))

    def _pieces(self, block: int, count: int) -> list[tuple[int, int]]:
        step = max(1, MAX_IO_BYTES // self.block_size)
        return [(b, min(step, block + count - b)) for b in range(block, block + count, step)]

    def _when_room(self, nbytes: int, queue: Callable[[], None]) -> None:
        """Queue now if there is room and nothing is waiting, else in order later."""
        if not self._backlog and self.core.has_room(nbytes):
            queue()
        else:
            self._backlog.append((nbytes, queue))

    def _drain_backlog(self) -> None:
        backlog = self._backlog
        while backlog and self.core.has_room(backlog[0][0]):
            backlog.popleft()[1]()

    # ---- the coroutines -------------------------------------------------------------

    async def activate(self, gen: int) -> None:
        await self._call(lambda tok, now: self.core.activate(tok, gen, now))

    async def deactivate(self) -> None:
        await self._call(self.core.deactivate)

    async def replace(self, old: SocketAddr, new: SocketAddr) -> None:
        """Swap the downstairs at `old` for an empty region at `new`. Returns once
        the swap has begun; live repair then fills the new one (see `info()`)."""
        await self._call(lambda tok, now: self.core.replace(tok, old, new, now))

    async def verify_replicas(self, rate: float = 0.0) -> VerifyStatus:
        """Compare the three replicas over the whole volume at `rate` bytes/s
        (0: no limit); a replica that differs from the two others is
        rewritten. Returns when the pass is done; `info().verify` shows its
        progress meanwhile."""
        status: VerifyStatus = await self._call(
            lambda tok, now: self.core.verify_replicas(tok, rate, now)
        )
        return status

    async def _call(self, fn: Callable[[object, float], list[Action]]) -> Any:
        """Hand a request to the core now; the result of the request."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._apply(fn(settle(fut), self._now()))
        return await fut

    # ---- events ------------------------------------------------------------------

    # The Sink of every Connection:

    def received(self, conn: Connection, msg: m.Message) -> bool:
        cid = conn.cid
        if self._conns.get(cid) is not conn:
            return False
        self._apply(self.core.received(cid, msg, self._now()))
        if self._backlog:
            self._drain_backlog()
        return True

    def bad_frame(self, conn: Connection, why: str, first: bytes | None) -> None:
        cid = conn.cid
        if self._conns.get(cid) is conn:
            self._apply(self.core.bad_frame(cid, why, first))

    def lost(self, conn: Connection) -> None:
        cid = conn.cid
        if self._conns.get(cid) is conn:
            del self._conns[cid]
            self._apply(self.core.disconnected(cid, self._now()))
            self._drain_backlog()

    def _apply(self, actions: list[Action]) -> None:
        last: m.Message | None = None
        parts: list[Buffer] = []
        for a in actions:
            match a:
                case Send():
                    conn = self._conns.get(a.client)
                    if conn is not None and conn.out is not None:
                        if a.msg is not last:  # the same job to three downstairs: encode once
                            last, parts = a.msg, encode_parts(a.msg)
                        conn.out.write(*parts)
                case Complete():
                    cast(_Callback, a.token)(a.result)
                case Log():
                    log.log(_LEVELS.get(a.level, logging.INFO), "%s", a.text)
                case Connect():
                    self._start_connect(a.client, a.target)
                case Probe():
                    self._start_probe(a)
                case FetchAllocation():
                    self._start_fetch_allocation(a)
                case Drop():
                    self._drop(a.client)

    def _drop(self, cid: int) -> None:
        conn = self._conns.pop(cid, None)
        if conn is not None:
            conn.close()
        task = self._connecting.pop(cid, None)
        if task is not None:
            task.cancel()
        probe = self._probes.pop(cid, None)
        if probe is not None:
            probe.cancel()
        if conn is not None or task is not None:
            self._apply(self.core.disconnected(cid, self._now()))

    # Compiled with mypyc, a coroutine cancelled while it awaits a compiled
    # coroutine that is inside aiohttp fails in asyncio's task step ("invalid
    # exception object") and crashes the process: so the HTTP fetches below
    # run as tasks of their own, which cancellation reaches through a future.

    def _start_probe(self, p: Probe) -> None:
        async def probe() -> None:
            caps = await asyncio.ensure_future(fetch_capabilities(p.repair_addr, self._tls))
            if self._probes.get(p.client) is task:
                del self._probes[p.client]
                self._apply(self.core.probed(p.client, p.attempt, caps, self._now()))

        old = self._probes.pop(p.client, None)
        if old is not None:
            old.cancel()
        task = asyncio.get_running_loop().create_task(probe())
        self._probes[p.client] = task

    def _start_fetch_allocation(self, f: FetchAllocation) -> None:
        async def fetch() -> None:
            total = self.core.region.total_blocks if self.core.region else 0
            runs = await asyncio.ensure_future(fetch_allocation(f.repair_addr, total, self._tls))
            self._apply(self.core.allocation_fetched(f.epoch, runs))

        task = asyncio.get_running_loop().create_task(fetch())
        self._fetches.add(task)
        task.add_done_callback(self._fetches.discard)

    async def allocation_settled(self) -> None:
        """Return once no map of the blocks holding data is being fetched
        (each fetch ends within ALLOCATION_TIMEOUT)."""
        while self._fetches:
            await asyncio.wait(set(self._fetches))

    def allocation(self, block: int, count: int) -> list[tuple[int, int, bool]] | None:
        """Which blocks of [block, block+count) hold data, as runs of (start,
        count, allocated), known without reading them; None when it is not
        known (then reading them tells: `read_with_status`)."""
        return self.core.allocation(block, count)

    def _start_connect(self, cid: int, target: SocketAddr) -> None:
        old = self._conns.pop(cid, None)
        if old is not None:
            old.close()
        loop = asyncio.get_running_loop()

        async def connect() -> None:
            conn = Connection(cid, self)
            try:
                await asyncio.wait_for(
                    loop.create_connection(
                        lambda: conn,
                        target[0],
                        target[1],
                        ssl=self._tls,
                        server_hostname=target[0] if self._tls else None,
                    ),
                    CONNECT_TIMEOUT,
                )
            except (TimeoutError, OSError) as e:
                reason = connect_error(e, self._tls is not None)
                if self._connecting.get(cid) is task:
                    del self._connecting[cid]
                    self._apply(self.core.connect_failed(cid, reason, self._now()))
                return
            if self._connecting.get(cid) is not task:
                conn.close()
                return
            del self._connecting[cid]
            self._conns[cid] = conn
            self._apply(self.core.connected(cid, self._now()))
            conn.attach()

        task = loop.create_task(connect())
        self._connecting[cid] = task
