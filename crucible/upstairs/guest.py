"""The asyncio driver of the upstairs and the API a disk's user calls.

One loop owns the UpstairsCore; each downstairs connection is a thin protocol
object that turns bytes into messages for it and writes what it sends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import uuid
from collections.abc import Callable
from typing import Any, cast

from crucible.common.definition import RegionDefinition
from crucible.common.errors import CrucibleError, ErrorKind
from crucible.netio import OutputBatcher
from crucible.protocol import messages as m
from crucible.protocol.codec import encode_parts
from crucible.protocol.framing import FrameDecoder
from crucible.protocol.wire import ProtocolError, SocketAddr
from crucible.upstairs.actions import Action, Complete, Connect, Drop, Log, Send
from crucible.upstairs.core import Options, UpstairsCore

log = logging.getLogger("crucible.upstairs")

# What a read completes with: the data, and each block's context.
ReadResult = tuple[m.Data, list[m.ReadBlockContext]]
_Callback = Callable[[Any], None]

MAX_IO_BYTES = 1 << 20  # guest IO is split into jobs of at most this size
CONNECT_TIMEOUT = 10.0
TICK = 0.05
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, up: Upstairs, cid: int) -> None:
        self.up = up
        self.cid = cid
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.out: OutputBatcher | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.out = OutputBatcher(self.transport)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer()  # frames are received in place

    def buffer_updated(self, nbytes: int) -> None:
        self.decoder.advance(nbytes)
        try:
            while (msg := self.decoder.next_message()) is not None:
                if self.up._conns.get(self.cid) is not self:
                    return
                self.up._received(self.cid, msg)
        except ProtocolError as e:
            self.up._apply(
                [
                    Log(f"[{self.cid}] bad frame from downstairs: {e}", "error"),
                    Drop(self.cid, str(e)),
                ]
            )

    def connection_lost(self, exc: Exception | None) -> None:
        self.up._lost(self)


class Upstairs:
    """A volume replicated on three downstairs. All IO methods are coroutines."""

    def __init__(
        self,
        targets: list[SocketAddr],
        options: Options | None = None,
        upstairs_id: uuid.UUID | None = None,
    ) -> None:
        # Per-job log lines cost a string format each: only when they are shown.
        options = dataclasses.replace(
            options or Options(), log_jobs=log.isEnabledFor(logging.DEBUG)
        )
        self.core = UpstairsCore(targets, options, upstairs_id)
        self._conns: dict[int, _Connection] = {}
        self._connecting: dict[int, asyncio.Task[None]] = {}
        self._progress = asyncio.Event()
        self._ticker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle -----------------------------------------------------------------

    def _now(self) -> float:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._ticker = self._loop.create_task(self._tick_loop())
        return self._loop.time()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self._apply(self.core.tick(self._now()))

    async def close(self) -> None:
        """Drop every connection and stop the timers (no flush: see deactivate)."""
        if self._ticker is not None:
            self._ticker.cancel()
        for t in list(self._connecting.values()):
            t.cancel()
        for conn in list(self._conns.values()):
            if conn.transport is not None:
                conn.transport.close()
        self._conns.clear()
        await asyncio.sleep(0)

    async def __aenter__(self) -> Upstairs:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- guest API -------------------------------------------------------------------

    async def activate(self, gen: int) -> None:
        await self._call(lambda tok, now: self.core.activate(tok, gen, now))

    async def deactivate(self) -> None:
        await self._call(self.core.deactivate)

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

    def info(self) -> dict[str, Any]:
        return self.core.info()

    async def read(self, block: int, count: int) -> bytes:
        data, _ = await self.read_with_status(block, count)
        return data

    async def read_with_status(self, block: int, count: int) -> tuple[bytes, list[bool]]:
        """The blocks, and for each whether it was ever written (False: a hole
        that reads as zeros)."""
        if count < 0 or block < 0:
            raise CrucibleError(ErrorKind.OffsetInvalid, "negative block or count")
        err = self.core.check_io(block, count, write=False)
        if err:
            raise err
        step = max(1, MAX_IO_BYTES // self.block_size)
        # Queue every piece before waiting on any: IO is ordered as it is called.
        futs = []
        for b in range(block, block + count, step):
            n = min(step, block + count - b)
            await self._wait_room(0)
            futs.append(self._submit(lambda tok, now, b=b, n=n: self.core.read(tok, b, n, now)))
        parts = [await f for f in futs]
        data = b"".join(p[0] for p in parts)
        written = [c is not None for p in parts for c in p[1]]
        return data, written

    async def write(self, block: int, data: bytes | bytearray | memoryview) -> None:
        await self._write(block, data, unwritten=False)

    async def write_unwritten(self, block: int, data: bytes | bytearray | memoryview) -> None:
        await self._write(block, data, unwritten=True)

    async def _write(
        self, block: int, data: bytes | bytearray | memoryview, unwritten: bool
    ) -> None:
        bs = self.block_size
        if len(data) % bs:
            raise CrucibleError(
                ErrorKind.DataLenUnaligned,
                f"{len(data)} bytes is not a multiple of the {bs}-byte block",
            )
        err = self.core.check_io(block, len(data) // bs, write=True)
        if err:
            raise err
        view = memoryview(data).cast("B")
        for off in range(0, len(view), MAX_IO_BYTES):
            if isinstance(data, bytes) and len(data) <= MAX_IO_BYTES:
                piece = data  # immutable already: the job can keep it
            else:
                piece = bytes(view[off : off + MAX_IO_BYTES])  # the job owns its copy
            await self._wait_room(len(piece))
            b = block + off // bs
            await self._call(
                lambda tok, now, b=b, piece=piece: self.core.write(tok, b, piece, now, unwritten)
            )

    # Callers that answer from callbacks (the NBD server) queue one job without
    # a coroutine per IO; when it would have to wait for room they get False
    # and use the coroutines above instead.

    def read_nowait(
        self, block: int, count: int, done: Callable[[ReadResult | BaseException], None]
    ) -> bool:
        """Queue a read of at most MAX_IO_BYTES now; `done` is called with the
        data and the blocks' contexts (None: never written) once the first
        good reply is in, or with the error (at once if the read is refused)."""
        if count * self.block_size > MAX_IO_BYTES or not self.core.has_room(0):
            return False
        self._apply(self.core.read(done, block, count, self._now()))
        return True

    def write_nowait(self, block: int, data: bytes | bytearray) -> bool:
        """Queue a write of at most MAX_IO_BYTES now (acked when queued, like
        write()); the volume keeps `data`, which the caller must not change."""
        if len(data) > MAX_IO_BYTES or not self.core.has_room(len(data)):
            return False
        result: list[BaseException | None] = []
        self._apply(self.core.write(result.append, block, data, self._now()))
        if result[0] is not None:  # a write completes as it is queued
            raise result[0]
        return True

    async def trim(self, block: int, count: int) -> None:
        """Discard blocks: they read back as zeros and their space is freed."""
        await self._wait_room(0)
        await self._call(lambda tok, now: self.core.trim(tok, block, count, now))

    async def flush(self, snapshot: str | None = None) -> None:
        await self._call(lambda tok, now: self.core.flush(tok, now, snapshot))

    async def replace(self, old: SocketAddr, new: SocketAddr) -> None:
        """Swap the downstairs at `old` for an empty region at `new`. Returns once
        the swap has begun; live repair then fills the new one (see `info()`)."""
        await self._call(lambda tok, now: self.core.replace(tok, old, new, now))

    # ---- plumbing --------------------------------------------------------------------

    async def _wait_room(self, nbytes: int) -> None:
        while not self.core.has_room(nbytes):
            self._progress.clear()
            await self._progress.wait()

    def _submit(self, fn: Any) -> asyncio.Future[Any]:
        """Hand a request to the core now; the future completes with its result."""
        now = self._now()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._apply(fn(fut, now))
        return fut

    async def _call(self, fn: Any) -> Any:
        return await self._submit(fn)

    def _received(self, cid: int, msg: m.Message) -> None:
        self._apply(self.core.received(cid, msg, self._now()))
        self._progress.set()

    def _lost(self, conn: _Connection) -> None:
        if self._conns.get(conn.cid) is conn:
            del self._conns[conn.cid]
            self._apply(self.core.disconnected(conn.cid, self._now()))
            self._progress.set()

    def _apply(self, actions: list[Action]) -> None:
        last: m.Message | None = None
        parts: list[bytes | bytearray | memoryview] = []
        for a in actions:
            if isinstance(a, Send):
                conn = self._conns.get(a.client)
                if conn is not None and conn.out is not None:
                    if a.msg is not last:  # the same job to three downstairs: encode once
                        last, parts = a.msg, encode_parts(a.msg)
                    conn.out.write(*parts)
            elif isinstance(a, Complete):
                fut = a.token
                if not isinstance(fut, asyncio.Future):  # a callback of read/write_nowait
                    cast(_Callback, fut)(a.result)
                elif not fut.done():
                    if isinstance(a.result, BaseException):
                        fut.set_exception(a.result)
                    else:
                        fut.set_result(a.result)
            elif isinstance(a, Log):
                log.log(_LEVELS.get(a.level, logging.INFO), "%s", a.text)
            elif isinstance(a, Connect):
                self._start_connect(a.client, a.target)
            elif isinstance(a, Drop):
                conn = self._conns.pop(a.client, None)
                if conn is not None and conn.transport is not None:
                    conn.transport.close()
                task = self._connecting.pop(a.client, None)
                if task is not None:
                    task.cancel()
                if conn is not None or task is not None:
                    self._apply(self.core.disconnected(a.client, self._now()))

    def _start_connect(self, cid: int, target: SocketAddr) -> None:
        old = self._conns.pop(cid, None)
        if old is not None and old.transport is not None:
            old.transport.close()
        loop = asyncio.get_running_loop()

        async def connect() -> None:
            conn = _Connection(self, cid)
            try:
                await asyncio.wait_for(
                    loop.create_connection(lambda: conn, target[0], target[1]), CONNECT_TIMEOUT
                )
            except (TimeoutError, OSError) as e:
                reason = (
                    "timed out" if isinstance(e, asyncio.TimeoutError) else (e.strerror or str(e))
                )
                if self._connecting.get(cid) is task:
                    del self._connecting[cid]
                    self._apply(self.core.connect_failed(cid, reason, self._now()))
                return
            if self._connecting.get(cid) is not task:
                if conn.transport is not None:
                    conn.transport.close()
                return
            del self._connecting[cid]
            self._conns[cid] = conn
            self._apply(self.core.connected(cid, self._now()))

        task = loop.create_task(connect())
        self._connecting[cid] = task
