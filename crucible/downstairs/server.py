"""The asyncio driver of the downstairs: sockets, timers and a disk worker
around the sans-IO DownstairsCore.

All disk work runs one item at a time in arrival order: small items right
away on the loop (their replies leave in the same iteration), large ones on
a single disk thread, driven by a worker task, so the event loop keeps
answering keepalives and other connections meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final, cast

from aiohttp import web

import crucible.protocol.messages as m
from crucible.downstairs import ops
from crucible.downstairs.core import (
    Action,
    Disconnect,
    DownstairsCore,
    Execute,
    JobLog,
    Log,
    Send,
    Work,
)
from crucible.downstairs.disk_thread import DiskThread
from crucible.downstairs.http_guard import GuardedFactory
from crucible.downstairs.probing import JOB_PROBES
from crucible.downstairs.repair import REPAIR_PORT_OFFSET, fetch_extent, make_app
from crucible.libc import trim_heap
from crucible.netio import OutputBatcher, ReceiveMark, no_delay
from crucible.observe.probes import DS, clock
from crucible.protocol.capabilities import NONE, OURS
from crucible.protocol.codec import encode_parts
from crucible.protocol.framing import FrameDecoder
from crucible.protocol.wire import ProtocolError
from crucible.region.extent import WouldBlock
from crucible.region.region import Region
from crucible.tls import TlsAccept, TlsFiles

log = logging.getLogger("crucible.downstairs")
joblog = logging.getLogger("crucible.downstairs.jobs")

INLINE_BYTES: Final = 64 * 1024  # smaller reads run on the loop: a thread hop costs more
# Writes up to this run on the loop too. The hop to the disk thread cost more
# than the loop waiting out the write: the thread's wakeups and their GIL
# handoffs, and the check of the block hashes on another core than the one
# that received the data. 10 alternating rounds of 1 MiB writes: each
# downstairs 770 to 620 us of CPU per MiB, as many IOPS. Larger writes (a
# guest's single write over an extent of many MiB) still go to the thread.
INLINE_WRITE_BYTES: Final = 4 << 20
# Bytes written on the loop in one go before replies go out and other
# connections are heard: a queue that waited behind a flush on the disk
# thread can hold up to PAUSE_BYTES of writes.
DRAIN_BUDGET: Final = 8 << 20
PAUSE_BYTES: Final = 256 << 20  # stop reading sockets while this much data waits for disk
RESUME_BYTES: Final = 64 << 20
# One connection stops being read while its unanswered jobs and unsent replies
# hold this much (its jobs keep running), and is read again below half of it.
CONN_LOAD_LIMIT: Final = 64 << 20
REPLY_BACKLOG: Final = 4 << 20  # the transport's high-water mark: resume_writing below a quarter
IDLE_TIMEOUT = 45.0
HELLO_TIMEOUT: Final = 5.0  # an upstairs says HereIAm as soon as it connects


class ListenError(Exception):
    """A port that cannot be listened on; says which and why."""

    def __init__(self, what: str, address: str, port: int, err: OSError) -> None:
        in_use = err.errno == errno.EADDRINUSE
        why = "is already in use" if in_use else f"cannot be listened on: {err.strerror}"
        super().__init__(f"{what} port {port} on {address} {why}")


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, server: DownstairsServer, conn_id: int) -> None:
        self.server = server
        self.id = conn_id
        self.decoder = FrameDecoder(hello_limit=True)  # until it is the promoted upstairs
        self.transport: asyncio.Transport | None = None
        self.out: OutputBatcher | None = None
        self.mark = ReceiveMark()
        self.last_rx = self.since = time.monotonic()
        self.closing = False
        self.held = False  # not read: its load is over CONN_LOAD_LIMIT
        self.ever_held = False
        self.held_low = 0  # the least load seen while held: less means progress

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.set_write_buffer_limits(high=REPLY_BACKLOG)
        self.out = OutputBatcher(self.transport)
        self.mark.attach(transport)
        no_delay(transport)
        peer = transport.get_extra_info("peername")
        name = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.server.connection_made(self, name)

    def get_buffer(self, sizehint: int) -> memoryview:
        buf = self.decoder.get_buffer()  # frames are received in place
        self.mark.expect(self.decoder.owed())
        return buf

    def buffer_updated(self, nbytes: int) -> None:
        if self.closing:
            return
        self.last_rx = time.monotonic()
        self.decoder.advance(nbytes)
        self.mark.expect(self.decoder.owed())  # (the receive may have brought less)
        self.parse()

    def parse(self) -> None:
        """Take the whole messages received, until the connection is held."""
        decoder = self.decoder
        server = self.server
        try:
            while not self.held and (msg := decoder.next_message()) is not None:
                server.apply(server.core.received(self.id, msg))
                if self.closing:
                    return
                if decoder.limited and server.core.promoted(self.id):
                    decoder.unlimit()
                if self.load() > CONN_LOAD_LIMIT:
                    server.hold(self)
        except ProtocolError as e:
            if decoder.greeted:
                self.close(str(e))
            else:
                self.close(f"not a Crucible upstairs (it sent {decoder.first_bytes()!r})")

    def load(self) -> int:
        backlog = self.out.backlog() if self.out is not None else 0
        return self.server.core.load(self.id) + backlog

    def resume_writing(self) -> None:
        if self.held:
            self.server.release_held()

    def reading_wanted(self) -> bool:
        return not (self.held or self.closing or self.server.paused)

    def connection_lost(self, exc: Exception | None) -> None:
        self.mark.close()
        self.server.connection_lost(self)

    def send(self, msg: m.Message) -> None:
        if self.out is not None and not self.closing:
            self.out.write(*encode_parts(msg))

    def close(self, reason: str) -> None:
        if self.closing:
            return
        self.closing = True
        log.warning("closing connection %d: %s", self.id, reason)
        if self.out is not None:
            self.out.flush()  # what was said before closing still goes out
        if self.transport is not None:
            if self.transport.get_write_buffer_size() > REPLY_BACKLOG:
                self.transport.abort()  # a peer that does not read: hold nothing for it
            else:
                self.transport.close()


class DownstairsServer:
    def __init__(
        self,
        region: Region,
        address: str,
        port: int,
        idle_timeout: float = IDLE_TIMEOUT,
        repair_port: int | None = None,
        extensions: bool = True,
        tls: TlsFiles | None = None,
    ) -> None:
        """`tls`: serve both ports with mutual TLS, and fetch from other
        downstairs' repair servers with it (raises TlsError if its files
        cannot be loaded)."""
        self.region = region
        self.tls_server = tls.server_context() if tls else None
        self._fetch = functools.partial(fetch_extent, tls=tls.client_context() if tls else None)
        self.address = address
        self.port = port
        self.repair_port = port + REPAIR_PORT_OFFSET if repair_port is None else repair_port
        self.idle_timeout = idle_timeout
        self.capabilities = OURS if extensions else NONE
        self.core = DownstairsCore(
            region.definition, region.read_only, (address, self.repair_port), self.capabilities
        )
        self.core.log_jobs = joblog.isEnabledFor(logging.INFO)
        self.conns: dict[int, _Connection] = {}
        self._next_id = 1
        self._queue: deque[tuple[int, Work, int]] = deque()  # connection, work, its bytes
        self._queued_bytes = 0
        self._wake = asyncio.Event()  # the worker: work for the disk thread is queued
        self._busy = False  # the disk thread runs an item: nothing else may start
        self._draining = False
        self._uncached: Work | None = None  # a large read found not all in the page cache
        self._block_size = region.definition.block_size
        self.paused = False  # no connection is read: too much write data waits for disk
        self._held: set[_Connection] = set()
        self._disk = DiskThread()
        self._tasks: list[asyncio.Task[None]] = []
        self._server: asyncio.Server | None = None
        self._runner: web.AppRunner | None = None
        self._repair: asyncio.Server | None = None
        self._died: asyncio.Future[None] | None = None
        self.death = ""  # why, once `died` is done

    @property
    def died(self) -> asyncio.Future[None]:
        """Done if the server stopped working on its own (`death` says why)."""
        if self._died is None:
            self._died = asyncio.get_running_loop().create_future()
        return self._died

    def _tls_wrap(self, factory: Callable[[], Any], what: str) -> Callable[[], Any]:
        """`factory`, behind a TLS handshake when this server has TLS."""
        if self.tls_server is None:
            return factory
        return TlsAccept(factory, self.tls_server, what, log)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # The repair server first: an upstairs may fetch from it as soon as it
        # has been told its address, right after connecting.
        self._runner = web.AppRunner(make_app(self.region, self.capabilities), access_log=None)
        await self._runner.setup()
        what, port = "repair", self.repair_port
        try:
            handler = self._runner.server
            assert handler is not None  # set up above
            guard = self._tls_wrap(GuardedFactory(handler), "repair server")
            self._repair = await loop.create_server(guard, self.address, port)
            what, port = "downstairs", self.port
            self._server = await loop.create_server(
                self._tls_wrap(self._new_connection, "downstairs"),
                self.address,
                port,
                reuse_address=True,
            )
        except OSError as e:
            await self.stop()
            raise ListenError(what, self.address, port, e) from None
        self._tasks = [
            asyncio.create_task(self._disk_worker(), name="the disk worker"),
            asyncio.create_task(self._idle_checker(), name="the idle checker"),
        ]
        for t in self._tasks:
            t.add_done_callback(self._task_done)
        log.info("listening on %s:%d", self.address, self.port)
        log.info("repair server listening on %s:%d", self.address, self.repair_port)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for server in (self._server, self._repair):
            if server is not None:
                server.close()
        for c in list(self.conns.values()):
            c.close("server shutting down")
        if self._runner is not None:
            await self._runner.cleanup()
        self._disk.close()

    def _new_connection(self) -> _Connection:
        conn = _Connection(self, self._next_id)
        self._next_id += 1
        return conn

    # ---- connection events -------------------------------------------------------

    def connection_made(self, conn: _Connection, peer: str) -> None:
        self.conns[conn.id] = conn
        if self.paused and conn.transport is not None:
            conn.transport.pause_reading()
        self.apply(self.core.connected(conn.id, peer))

    def connection_lost(self, conn: _Connection) -> None:
        self._held.discard(conn)
        if conn.ever_held:  # it held tens of MiB: give them back once they are freed
            asyncio.get_running_loop().call_soon(trim_heap)
        if self.conns.pop(conn.id, None) is not None:
            self.apply(self.core.disconnected(conn.id))
        # Its queued work will never run: let its data go now.
        kept = deque(item for item in self._queue if item[0] != conn.id)
        if len(kept) != len(self._queue):
            self._queue = kept
            self._queued_bytes = sum(item[2] for item in kept)
            self._flow_control()

    def hold(self, conn: _Connection) -> None:
        """Stop reading a connection whose jobs and replies hold too much; its
        jobs go on, and it is read again once they are mostly answered."""
        if not conn.ever_held:
            conn.ever_held = True
            mib = conn.load() >> 20
            log.info(
                "connection %d not read for now: %d MiB of its work is unanswered", conn.id, mib
            )
        conn.held = True
        conn.held_low = conn.load()
        self._held.add(conn)
        if conn.transport is not None:
            conn.transport.pause_reading()

    def release_held(self) -> None:
        for c in list(self._held):
            if c.load() < CONN_LOAD_LIMIT // 2:
                self._held.discard(c)
                c.held = False
                c.parse()  # whole messages already received first
                if c.reading_wanted() and c.transport is not None:
                    c.transport.resume_reading()

    def apply(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Send):
                c = self.conns.get(a.conn)
                if c is not None:
                    c.send(a.msg)
            elif isinstance(a, Execute):
                nbytes = _work_bytes(a.work)
                self._queue.append((a.conn, a.work, nbytes))
                self._queued_bytes += nbytes
            elif isinstance(a, Disconnect):
                c = self.conns.get(a.conn)
                if c is not None:
                    c.close(a.reason)
            elif isinstance(a, JobLog):
                joblog.info("%s", self.core.describe(a.job))
            elif isinstance(a, Log):
                log.info("%s", a.text)
        self._flow_control()
        if self._held:
            self.release_held()
        if self._queue and not self._busy:
            self._drain()

    def _drain(self) -> None:
        """Run queued small work, writes, and large reads the page cache can answer
        right here, in order, so its replies leave in this loop iteration;
        stop at work for the disk thread (the worker takes it from the head
        of the queue, so order is kept). Once it has written DRAIN_BUDGET
        bytes, the rest waits for the next loop iteration."""
        if self._draining:
            return  # work finishing below queued more: this loop takes it
        self._draining = True
        ran = 0
        try:
            while self._queue and not self._busy:
                if ran >= DRAIN_BUDGET:
                    asyncio.get_running_loop().call_soon(self._drain)
                    return
                conn_id, work, nbytes = self._queue[0]
                # A large read runs here too if the page cache holds its data:
                # the hop to the disk thread and back costs more than the copy.
                cached_only = not _runs_inline(work, self._block_size)
                if cached_only and (work is self._uncached or not isinstance(work, m.ReadRequest)):
                    self._wake.set()
                    return
                self._queue.popleft()
                self._queued_bytes -= nbytes
                if not self.core.wants(conn_id):  # fenced meanwhile
                    continue
                ran += nbytes
                try:
                    t0 = 0.0
                    if DS.on:
                        t0 = _work_started(work)
                    try:
                        outcome = ops.run(self.region, work, self._fetch, cached_only)
                    except WouldBlock:  # back to the head, for the disk thread
                        self._queue.appendleft((conn_id, work, nbytes))
                        self._queued_bytes += nbytes
                        self._uncached = work
                        self._wake.set()
                        return
                    if DS.on:
                        _work_done(work, t0)
                    self.apply(self.core.finished(conn_id, work, outcome))
                except Exception:
                    self._failed(conn_id, work)
        finally:
            self._draining = False

    def _flow_control(self) -> None:
        if not self.paused and self._queued_bytes > PAUSE_BYTES:
            self.paused = True
            for c in self.conns.values():
                if c.transport is not None:
                    c.transport.pause_reading()
        elif self.paused and self._queued_bytes < RESUME_BYTES:
            self.paused = False
            for c in self.conns.values():
                if c.transport is not None and c.reading_wanted():
                    c.transport.resume_reading()

    # ---- background tasks -----------------------------------------------------------

    async def _disk_worker(self) -> None:
        """Runs what goes to the disk thread, one item at a time; small work
        queued behind it is drained once it is done."""
        while True:
            self._drain()  # what is left at the head is work for the disk thread
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            conn_id, work, nbytes = self._queue.popleft()
            self._queued_bytes -= nbytes
            started = work is self._uncached  # (its try on the loop fired the start probe)
            self._uncached = None
            if not self.core.wants(conn_id):
                continue  # its upstairs was replaced or went away: never touch the disk
            try:
                self._busy = True
                try:
                    t0 = 0.0
                    if DS.on:
                        t0 = clock() if started else _work_started(work)
                    outcome = await self._disk.run(ops.run, self.region, work, self._fetch)
                    if DS.on:
                        _work_done(work, t0)
                finally:
                    self._busy = False
                self.apply(self.core.finished(conn_id, work, outcome))
            except Exception:
                self._failed(conn_id, work)

    def _failed(self, conn_id: int, work: Work) -> None:
        """Work that failed unexpectedly (a bug, not a disk error: those are
        outcomes) is logged and its connection closed, so its upstairs sees it
        fail; the server goes on with everyone else's work."""
        log.exception("%s for connection %d failed", type(work).__name__, conn_id)
        c = self.conns.get(conn_id)
        if c is not None:
            c.close(f"{type(work).__name__} failed in the server (logged above)")

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """A background task must never end on its own: if one does, the
        server is not working, and `died` says so (the process exits)."""
        if task.cancelled() or self.died.done():
            return
        err = task.exception()
        log.critical("%s ended: %r", task.get_name(), err, exc_info=err)
        self.death = f"{task.get_name()} ended: {err!r}"
        self.died.set_result(None)

    async def _idle_checker(self) -> None:
        period = max(0.05, min(1.0, self.idle_timeout / 3))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for c in list(self.conns.values()):
                if c.held:
                    waiting = self.core.stuck(c.id)
                    load = c.load()
                    if waiting:
                        # Nothing runs, so nothing will free it: jobs wait on jobs never sent.
                        why = "never sent, or failed"
                        c.close(f"{waiting} jobs wait on jobs that never completed ({why})")
                    elif load < c.held_low:
                        c.held_low = load
                        c.last_rx = now  # held by us: its silence is ours while work goes on
                    elif now - c.last_rx > self.idle_timeout:
                        c.close(f"its replies were not read for {self.idle_timeout:g} s")
                elif now - c.last_rx > self.idle_timeout:
                    c.close(f"no message for {self.idle_timeout:g} s")
                elif not c.decoder.greeted and now - c.since > HELLO_TIMEOUT:
                    # Another protocol's client waiting for us to speak first (NBD).
                    c.close(f"no Crucible hello in {HELLO_TIMEOUT:g} s: not an upstairs")


_WRITES = (m.Write, m.WriteUnwritten)
_NO_DISK = (m.Barrier, m.ExtentLiveNoOp, m.ExtentVersionsPlease)


def _work_started(work: Work) -> float:
    """Fire a job's start probes; when its region work begins (the clock)."""
    p = JOB_PROBES.get(type(work))
    if p is not None:
        p.began(work)
    return clock()


def _work_done(work: Work, t0: float) -> None:
    """Fire a job's done probes; the region's work began at `t0`."""
    p = JOB_PROBES.get(type(work))
    if p is not None:
        p.ended(work, clock() - t0)


def _work_bytes(work: Work) -> int:
    if isinstance(work, _WRITES):
        return len(work.data)
    return 0


def _runs_inline(work: Work, block_size: int) -> bool:
    if isinstance(work, _WRITES):
        return len(work.data) <= INLINE_WRITE_BYTES
    if isinstance(work, m.ReadRequest):
        return work.count * block_size <= INLINE_BYTES
    return isinstance(work, _NO_DISK)
