"""An NBD server over a volume: the transport, flow control and dispatch.

Several clients share one volume; requests of one connection are handled
concurrently and answered as they finish (NBD replies may come in any
order). Every connection shares the same upstairs, whose flush covers
writes from all of them, so CAN_MULTI_CONN is advertised. The handshake is
handshake.py's, what each command means is disk.py's.

The receive buffer, its goals and costs: bytes land in a fixed 256 KiB
buffer per connection (asyncio.BufferedProtocol), with no bytes object per
receive. Handshake options and request headers are parsed from a moving
offset; the unparsed tail moves to the front only when the buffer's end is
reached. A write's payload that is not all in the buffer yet is received
straight into a buffer of its own (up to 32 MiB, the largest payload
accepted; anything larger ends the connection, as it cannot be skipped
safely); a payload already in the buffer is copied out once. Reading pauses
while 512 requests or 128 MiB of this client are in flight, or while 8 MiB
of its replies wait to be sent, so one client's memory is bounded and it
cannot starve the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Final, cast

import crucible.nbd.protocol as p
from crucible.common.errors import CrucibleError, ErrorKind
from crucible.libc import raw_bytearray
from crucible.nbd.disk import Disk
from crucible.nbd.handshake import ExportInfo, Handshake, HandshakeError, Negotiated
from crucible.netio import OutputBatcher, ReceiveMark
from crucible.observe.probes import NBD
from crucible.upstairs.blockio import BlockIO

# Commands as plain ints for the per-request checks: compiled, comparing an
# int with an IntEnum member is a generic Python comparison, several of them
# per request.
READ: Final = int(p.Cmd.READ)
WRITE: Final = int(p.Cmd.WRITE)
DISC: Final = int(p.Cmd.DISC)
FLUSH: Final = int(p.Cmd.FLUSH)
TRIM: Final = int(p.Cmd.TRIM)
WRITE_ZEROES: Final = int(p.Cmd.WRITE_ZEROES)
BLOCK_STATUS: Final = int(p.Cmd.BLOCK_STATUS)

log = logging.getLogger("crucible.nbd")

MAX_PAYLOAD: Final = 32 << 20
REPLY_BACKLOG: Final = 8 << 20  # unsent reply bytes before the client's requests wait
RX_BUFFER: Final = 256 << 10  # request headers and small write payloads land here
# After a write payload this large, the next receive takes one request header
# only: the next payload (likely as large) then lands in its own buffer whole
# instead of partly here and copied.
LARGE_PAYLOAD: Final = 128 << 10
REQ_SIZE: Final = p.REQUEST.size
MAX_INFLIGHT: Final = 512  # requests of one client in flight before reading pauses
MAX_INFLIGHT_BYTES: Final = 128 << 20
MAX_SERVER_INFLIGHT_BYTES: Final = 256 << 20  # the same, over every client together
HANDSHAKE_TIMEOUT = 30.0  # a client must be through the handshake by then
MAX_CONNECTIONS = 128
FAILURE_LOG_INTERVAL: Final = 5.0  # seconds between log lines of one client's same failure


@dataclass
class Export:
    upstairs: BlockIO
    name: str = ""
    read_only: bool = False
    description: str = "crucible volume (three-way replicated)"

    @property
    def size(self) -> int:
        return self.upstairs.total_blocks * self.upstairs.block_size

    @property
    def flags(self) -> int:
        f = (
            p.FLAG_HAS_FLAGS
            | p.FLAG_SEND_FLUSH
            | p.FLAG_SEND_FUA
            | p.FLAG_CAN_MULTI_CONN
            | p.FLAG_SEND_TRIM
            | p.FLAG_SEND_WRITE_ZEROES
            | p.FLAG_SEND_FAST_ZERO
        )
        return f | p.FLAG_READ_ONLY if self.read_only else f

    def info(self) -> ExportInfo:
        bs = max(self.upstairs.block_size, 4096)
        return ExportInfo(self.name, self.size, self.flags, self.description, bs, MAX_PAYLOAD)


class NbdServer:
    def __init__(
        self,
        export: Export,
        host: str = "127.0.0.1",
        port: int = 10809,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.export = export
        self.host = host
        self.port = port
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.disk = Disk(export.upstairs, self.spawn)
        self._server: asyncio.Server | None = None
        self.connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_id = 1
        self.inflight_bytes = 0  # over every connection
        self.waiting: set[_Connection] = set()  # held back by that total alone

    def add_inflight(self, nbytes: int) -> None:
        self.inflight_bytes += nbytes
        if nbytes < 0 and self.waiting and self.inflight_bytes < MAX_SERVER_INFLIGHT_BYTES:
            waiting, self.waiting = self.waiting, set()
            for c in waiting:
                c.resume()

    async def bind(self) -> None:
        """Take the port without accepting anyone yet: a port in use is found
        before the volume is taken over (activated)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._new_connection, self.host, self.port, start_serving=False
        )
        # Untyped: uvloop's `sockets` is a list where typeshed says a tuple,
        # and compiled code checks such types.
        server: Any = self._server
        self.port = server.sockets[0].getsockname()[1]

    async def serve(self) -> None:
        """Accept clients (after bind, once the volume is active)."""
        assert self._server is not None
        await self._server.start_serving()

    def _new_connection(self) -> _Connection:
        conn = _Connection(self, self._next_id)
        self._next_id += 1
        return conn

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in list(self.connections):
            c.close()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, server: NbdServer, cid: int) -> None:
        self.server = server
        self.export = server.export
        self.disk = server.disk
        self.cid = cid
        self.peer = ""
        self.settings = Negotiated(structured=False, allocation=False)
        self.transport: asyncio.Transport | None = None
        self.out: OutputBatcher | None = None
        self.mark = ReceiveMark()
        self._handshake: Handshake | None = None  # None once transmission begins
        self._size = 0  # the export's size as the handshake told the client
        self._rx = bytearray(RX_BUFFER)
        self._rxv = memoryview(self._rx)
        self._start = self._end = 0  # unparsed bytes are _rx[_start:_end]
        self._payload: bytearray | None = None  # a write's payload being received
        self._got = 0
        self._write_req: tuple[int, int, int, int] = (0, 0, 0, 0)
        self._header_next = False  # the next receive takes a request header only
        self._disconnecting = False
        self._closed = False
        self._pending = 0  # requests whose reply is not sent yet
        self._pending_bytes = 0
        self._said = ("", 0.0)  # the last failure logged, and when
        self._reading = True
        self._writing_paused = False
        self._parsing = False
        self._deadline: asyncio.TimerHandle | None = None

    # ---- transport events -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=REPLY_BACKLOG)
        self.out = OutputBatcher(self.transport)
        self.mark.attach(transport)
        peer = transport.get_extra_info("peername")
        if len(self.server.connections) >= self.server.max_connections:
            n = len(self.server.connections)
            log.warning("nbd client %d from %s refused: %d clients already", self.cid, peer, n)
            self._closed = True
            self.transport.close()
            return
        self.server.connections.add(self)
        self.peer = str(peer)
        if NBD.on:
            NBD.fire("nbd__connection__open", self.peer)
        log.info("nbd client %d connected from %s", self.cid, peer)
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self.server.handshake_timeout, self._too_slow)
        info = self.export.info()
        self._size = info.size
        self._handshake = Handshake(info)
        self.out.write(self._handshake.data_to_send())

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._payload is not None:
            self.mark.expect(len(self._payload) - self._got)
            return memoryview(self._payload)[self._got :]
        self.mark.expect(1)
        if self._end == len(self._rx):  # move the unparsed tail to the front
            n = self._end - self._start
            self._rxv[:n] = self._rxv[self._start : self._end]
            self._start, self._end = 0, n
        if self._header_next:  # (the buffer is empty: the payload emptied it)
            return self._rxv[self._end : self._end + REQ_SIZE]
        return self._rxv[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._closed:
            return
        if self._payload is not None:
            self._got += nbytes
            rest = len(self._payload) - self._got
            # Again after every receive, which may bring less than the mark
            # or end the payload (then 1: a request header may be all that comes).
            self.mark.expect(rest)
            if rest:
                return
            payload, self._payload = self._payload, None
            self._header_next = len(payload) >= LARGE_PAYLOAD
            flags, cookie, offset, length = self._write_req
            self._dispatch(flags, WRITE, cookie, offset, length, payload)
            return
        self._end += nbytes
        self._header_next = False
        if self._handshake is not None:
            self._negotiate(self._handshake)
        else:
            self._parse()

    def eof_received(self) -> bool | None:
        if self._handshake is not None:
            self._went_away()
        return None

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._flow()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self.resume()

    def resume(self) -> None:
        """Room again: requests already received go on, then reading."""
        if self._handshake is None and self._payload is None:
            self._parse()
        self._flow()

    def _too_slow(self) -> None:
        if self._handshake is not None:
            self.close(f"no handshake in {self.server.handshake_timeout:g} s")

    def connection_lost(self, exc: Exception | None) -> None:
        self.mark.close()
        if self._deadline is not None:
            self._deadline.cancel()
        if self in self.server.connections:
            self.server.connections.discard(self)
            if NBD.on:
                NBD.fire("nbd__connection__close", self.peer)
        self._went_away()
        log.info("nbd client %d closed", self.cid)

    def _went_away(self) -> None:
        if not self._closed:
            self._closed = True
            log.info("nbd client %d went away", self.cid)
            if self.transport is not None:
                self.transport.close()

    def close(self, reason: str = "") -> None:
        if self._closed:
            return
        self._closed = True
        if reason:
            log.warning("nbd client %d: %s; closing", self.cid, reason)
        if self.out is not None:
            self.out.flush()  # what was said before closing still goes out
        if self.transport is not None:
            self.transport.close()

    def _room(self) -> bool:
        """May another request start? Only while replies drain and what is in
        flight, of this client and of all, is bounded."""
        if self._writing_paused or self._pending >= MAX_INFLIGHT:
            return False
        if self._pending_bytes >= MAX_INFLIGHT_BYTES:
            return False
        if self.server.inflight_bytes >= MAX_SERVER_INFLIGHT_BYTES:
            self.server.waiting.add(self)
            return False
        return True

    def _flow(self) -> None:
        """Read requests only while there is room for them."""
        want = (
            not self._disconnecting
            and self._room()
            and self._end - self._start < len(self._rx)  # else nothing parsed yet: no room
        )
        if want != self._reading and self.transport is not None and not self._closed:
            self._reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    # ---- handshake ------------------------------------------------------------------

    def _negotiate(self, hs: Handshake) -> None:
        try:
            used = hs.receive(self._rxv[self._start : self._end])
        except HandshakeError as e:
            self.close(str(e))
            return
        self._start += used
        reply = hs.data_to_send()
        if reply and self.out is not None:
            self.out.write(reply)
        if hs.result is None:
            self._flow()
            return
        if hs.result is False:
            self.close()
            return
        self.settings = cast(Negotiated, hs.result)
        self._handshake = None
        if self._deadline is not None:
            self._deadline.cancel()
        log.info(
            "nbd client %d entered transmission (structured replies: %s)",
            self.cid,
            self.settings.structured,
        )
        self._parse()

    # ---- transmission ---------------------------------------------------------------

    def _parse(self) -> None:
        """Handle the complete requests in the receive buffer while there is
        room for them (the rest wait there: `resume`)."""
        if self._parsing:
            return  # a request finished inside the loop below: it goes on by itself
        self._parsing = True
        try:
            self._parse_requests()
        finally:
            self._parsing = False
        self._flow()

    def _parse_requests(self) -> None:
        rx = self._rx
        while not self._closed and not self._disconnecting and self._payload is None:
            if not self._room():
                break
            start = self._start
            avail = self._end - start
            if avail < REQ_SIZE:
                break
            magic, flags, cmd, cookie, offset, length = p.REQUEST.unpack_from(rx, start)
            if magic != p.REQUEST_MAGIC:
                self.close(f"bad request magic {magic:#x}")
                return
            if cmd != WRITE:
                self._start = start + REQ_SIZE
                self._dispatch(flags, cmd, cookie, offset, length, b"")
                continue
            if length > MAX_PAYLOAD:
                self.close(f"write of {length} bytes exceeds the {MAX_PAYLOAD} maximum")
                return
            body = start + REQ_SIZE
            if avail >= REQ_SIZE + length:
                self._start = body + length
                data = self._rxv[body : body + length].tobytes()
                self._dispatch(flags, cmd, cookie, offset, length, data)
                continue
            # The rest of the payload goes straight into a buffer of its own.
            payload = raw_bytearray(length)  # filled whole before it is read
            have = self._end - body
            # Through a view: a bytearray's slice takes a memoryview by way of a copy.
            memoryview(payload)[:have] = self._rxv[body : self._end]
            self._start = self._end = 0
            self._payload, self._got = payload, have
            self._write_req = (flags, cookie, offset, length)
        if self._start == self._end:
            self._start = self._end = 0

    def _dispatch(
        self, flags: int, cmd: int, cookie: int, offset: int, length: int, data: bytes | bytearray
    ) -> None:
        if cmd == DISC:
            log.info("nbd client %d disconnects", self.cid)
            self._disconnecting = True
            self._flow()
            self._maybe_finish()
            return
        if _REQUEST.handlers:
            _REQUEST.fire2(_COMMANDS.get(cmd, "unknown"), length)
        error = self.check(flags, cmd, offset, length)
        if error:
            self.send_error(cookie, error, "request refused")
            return
        self._started(length)
        if cmd == READ:
            self.disk.read(offset, length, lambda r: self._read_done(cookie, offset, length, r))
        elif cmd == WRITE:
            fua = bool(flags & p.CMD_FLAG_FUA)
            self.disk.write(offset, data, fua, lambda e: self._done(cookie, length, e))
        else:
            self.server.spawn(self._command(flags, cmd, cookie, offset, length))

    def check(self, flags: int, cmd: int, offset: int, length: int) -> int:
        """The errno a request is refused with, or 0."""
        allowed = p.ALLOWED_FLAGS.get(cmd)
        if allowed is None:
            return p.EINVAL
        if flags & ~allowed:
            return p.EINVAL
        if cmd == BLOCK_STATUS and not self.settings.allocation:
            return p.EINVAL
        writes = cmd in (WRITE, TRIM, WRITE_ZEROES)
        if writes and self.export.read_only:
            return p.EPERM
        if cmd != FLUSH and (offset + length > self._size or (length == 0 and cmd != WRITE)):
            return p.ENOSPC if cmd in (WRITE, WRITE_ZEROES) else p.EINVAL
        if cmd == READ and length > MAX_PAYLOAD:
            return p.EINVAL
        return 0

    async def _command(self, flags: int, cmd: int, cookie: int, offset: int, length: int) -> None:
        """FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS: each in a task of its own."""
        disk = self.disk
        try:
            if cmd == FLUSH:
                await disk.flush()
            elif cmd == TRIM:
                await disk.trim(offset, length)
            elif cmd == WRITE_ZEROES:
                no_hole = bool(flags & p.CMD_FLAG_NO_HOLE)
                if flags & p.CMD_FLAG_FAST_ZERO and no_hole:
                    self._ended(length)
                    self.send_error(cookie, p.ENOTSUP, "allocated zeroes are written as data")
                    return
                await disk.write_zeroes(offset, length, no_hole)
            else:  # BLOCK_STATUS
                req_one = bool(flags & p.CMD_FLAG_REQ_ONE)
                extents = await disk.block_status(offset, length, req_one)
                self._ended(length)
                self.send(p.block_status_chunk(cookie, p.ALLOCATION_CONTEXT_ID, extents))
                return
            if flags & p.CMD_FLAG_FUA and cmd != FLUSH:
                await disk.flush()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # one bad request must not take the server down
            self._done(cookie, length, e)
            return
        self._done(cookie, length, None)

    def _started(self, nbytes: int) -> None:
        self._pending += 1
        self._pending_bytes += nbytes
        self.server.add_inflight(nbytes)

    def _ended(self, nbytes: int) -> None:
        self._pending -= 1
        self._pending_bytes -= nbytes
        self.server.add_inflight(-nbytes)
        if self._disconnecting:
            self._flow()
            self._maybe_finish()
        elif not self._reading or self._start != self._end:
            self.resume()

    def _maybe_finish(self) -> None:
        """After DISC, close once every request in flight has been answered."""
        if self._disconnecting and not self._pending:
            self.close()

    def _read_done(
        self, cookie: int, offset: int, length: int, result: memoryview | BaseException
    ) -> None:
        self._ended(length)
        if isinstance(result, BaseException):
            self.send_failure(cookie, result)
        else:
            self.send_data(cookie, offset, result)

    def _done(self, cookie: int, nbytes: int, err: BaseException | None) -> None:
        self._ended(nbytes)
        if err is None:
            self.send_ok(cookie)
        else:
            self.send_failure(cookie, err)

    # ---- replies ----------------------------------------------------------------------

    def send(self, *parts: bytes | memoryview) -> None:
        """Queue one whole reply (its parts go out together, never interleaved
        with another reply). A client that reads replies too slowly is not read
        from meanwhile (see _flow)."""
        if self.out is not None and not self._closed:
            self.out.write(*parts)

    def send_data(self, cookie: int, offset: int, data: memoryview) -> None:
        if self.settings.structured:
            self.send(p.data_chunk_head(cookie, offset, len(data)), data)
        else:
            self.send(p.simple_reply(cookie), data)

    def send_ok(self, cookie: int) -> None:
        if self.settings.structured:
            self.send(p.chunk(cookie, p.Reply.NONE, 0, True))
        else:
            self.send(p.simple_reply(cookie))

    def send_failure(self, cookie: int, err: BaseException) -> None:
        if not isinstance(err, CrucibleError):
            log.error("nbd client %d: request failed: %r", self.cid, err)
        else:  # the reason the guest sees EIO; the same one once per interval
            now = time.monotonic()
            if str(err) != self._said[0] or now - self._said[1] >= FAILURE_LOG_INTERVAL:
                log.warning("nbd client %d: request failed: %s", self.cid, err)
                self._said = (str(err), now)
        self.send_error(cookie, _errno(err), str(err))

    def send_error(self, cookie: int, error: int, message: str) -> None:
        if self.settings.structured:
            self.send(p.error_chunk(cookie, error, message))
        else:
            self.send(p.simple_reply(cookie, error))


# (a command number no client should send is "unknown": a label per number
# would let one client make the metrics grow by thousands of series)
_COMMANDS: Final = {int(c): c.name.lower() for c in p.Cmd}
_REQUEST: Final = NBD.probe("nbd__request")


def _errno(e: BaseException) -> int:
    if not isinstance(e, CrucibleError):
        return p.EIO
    if e.kind == ErrorKind.ModifyingReadOnlyRegion:
        return p.EPERM
    if e.kind in (ErrorKind.OffsetInvalid, ErrorKind.DataLenUnaligned):
        return p.EINVAL
    if e.kind in (ErrorKind.NoLongerActive, ErrorKind.UpstairsInactive):
        return p.ESHUTDOWN
    return p.EIO
