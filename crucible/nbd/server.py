"""An NBD server over an upstairs: several clients at once share one volume.

Requests of one connection are handled concurrently and answered as they
finish (NBD replies may come in any order). Every connection shares the same
upstairs, whose flush covers writes from all of them, so CAN_MULTI_CONN is
advertised. Writes that do not cover whole blocks are read-modify-write; their
block range is locked meanwhile so that no other write to it interleaves.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

from crucible.common.errors import CrucibleError, ErrorKind
from crucible.nbd import protocol as p
from crucible.netio import OutputBatcher
from crucible.upstairs.guest import ReadResult, Upstairs

log = logging.getLogger("crucible.nbd")

MAX_OPTION = 64 * 1024  # option payloads are small; more is abuse
MAX_PAYLOAD = 32 << 20
MAX_STATUS_BYTES = 64 << 20  # one BLOCK_STATUS answers at most this much
REPLY_BACKLOG = 8 << 20  # unsent reply bytes before the client's requests wait
RX_BUFFER = 256 << 10  # request headers and small write payloads land here
REQ_SIZE = p.REQUEST.size
MAX_INFLIGHT = 512  # requests of one client in flight before reading pauses
MAX_INFLIGHT_BYTES = 128 << 20


class _Closed(Exception):
    """The client broke the protocol; the connection ends."""


@dataclass
class Export:
    upstairs: Upstairs
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

    def matches(self, name: str) -> bool:
        return name in ("", self.name)


class _RangeLocks:
    """Block ranges under read-modify-write. A write waits until no held range
    overlaps its own; a read-modify-write holds its whole range, taken in one
    step, so two of them can never wait on each other."""

    def __init__(self) -> None:
        self.held: dict[int, tuple[int, int]] = {}
        self.changed = asyncio.Event()
        self._next = 0

    def _overlaps(self, first: int, last: int) -> bool:
        return any(a < last and first < b for a, b in self.held.values())

    async def wait_clear(self, first: int, last: int) -> None:
        while self._overlaps(first, last):
            await self.changed.wait()

    async def acquire(self, first: int, last: int) -> int:
        await self.wait_clear(first, last)
        self._next += 1
        self.held[self._next] = (first, last)
        return self._next

    def release(self, token: int) -> None:
        del self.held[token]
        self.changed.set()
        self.changed = asyncio.Event()


class NbdServer:
    def __init__(self, export: Export, host: str = "127.0.0.1", port: int = 10809) -> None:
        self.export = export
        self.host = host
        self.port = port
        self.locks = _RangeLocks()
        self._server: asyncio.Server | None = None
        self._conns: set[_Connection] = set()
        self._next_id = 1

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_connection, self.host, self.port)
        sock = self._server.sockets[0].getsockname()
        self.port = sock[1]

    def _new_connection(self) -> _Connection:
        conn = _Connection(self, self._next_id)
        self._next_id += 1
        return conn

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for c in list(self._conns) for t in c.abort()]
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass


class _Connection(asyncio.BufferedProtocol):
    """One client. Bytes land in a fixed receive buffer (a large write payload
    straight into a buffer of its own); the handshake is a coroutine reading
    from it, and in transmission each request is handled as it is parsed:
    reads and plain aligned writes by callbacks, everything else by a task."""

    def __init__(self, server: NbdServer, cid: int) -> None:
        self.server = server
        self.export = server.export
        self.up = server.export.upstairs
        self.cid = cid
        self.structured = False
        self.allocation_context = False
        self.no_zeroes = False
        self.transport: asyncio.Transport | None = None
        self.out: OutputBatcher | None = None
        self._rx = bytearray(RX_BUFFER)
        self._rxv = memoryview(self._rx)
        self._start = self._end = 0  # unparsed bytes are _rx[_start:_end]
        self._payload: bytearray | None = None  # a write's payload being received
        self._got = 0
        self._write_req: tuple[int, int, int, int] = (0, 0, 0, 0)
        self._waiter: asyncio.Future[None] | None = None  # the handshake waits for bytes
        self._eof = False
        self._handshake: asyncio.Task[None] | None = None
        self._transmitting = False
        self._disconnecting = False
        self._closed = False
        self.inflight: set[asyncio.Task[None]] = set()
        self._pending = 0  # requests whose reply is not sent yet
        self._pending_bytes = 0
        self._reading = True
        self._writing_paused = False

    # ---- transport events -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=REPLY_BACKLOG)
        self.out = OutputBatcher(self.transport)
        self.server._conns.add(self)
        log.info("nbd client %d connected from %s", self.cid, transport.get_extra_info("peername"))
        self._handshake = asyncio.get_running_loop().create_task(self._run_handshake())

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._payload is not None:
            return memoryview(self._payload)[self._got :]
        if self._end == len(self._rx):  # move the unparsed tail to the front
            n = self._end - self._start
            self._rxv[:n] = self._rxv[self._start : self._end]
            self._start, self._end = 0, n
        return self._rxv[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._closed:
            return
        if self._payload is not None:
            self._got += nbytes
            if self._got < len(self._payload):
                return
            payload, self._payload = self._payload, None
            flags, cookie, offset, length = self._write_req
            self._dispatch(flags, p.Cmd.WRITE, cookie, offset, length, payload)
            return
        self._end += nbytes
        if self._transmitting:
            self._parse()
        else:
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)
            self._flow()  # the handshake reads options one at a time: pause when full

    def eof_received(self) -> bool | None:
        self._eof = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        return None

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._flow()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._flow()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._conns.discard(self)
        self._eof = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if not self._closed:
            self._closed = True
            log.info("nbd client %d went away", self.cid)
        log.info("nbd client %d closed", self.cid)

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

    def abort(self) -> list[asyncio.Task[None]]:
        """Server shutdown: stop handling this client; the tasks to wait for."""
        tasks = list(self.inflight)
        if self._handshake is not None:
            tasks.append(self._handshake)
        for t in tasks:
            t.cancel()
        self.close()
        return tasks

    def _flow(self) -> None:
        """Read requests only while replies drain and what is in flight is bounded."""
        want = not (
            self._writing_paused
            or self._disconnecting
            or self._pending >= MAX_INFLIGHT
            or self._pending_bytes >= MAX_INFLIGHT_BYTES
            or self._end - self._start >= len(self._rx)  # nothing parsed yet: no room
        )
        if want != self._reading and self.transport is not None and not self._closed:
            self._reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    # ---- handshake ------------------------------------------------------------------

    async def _read(self, n: int) -> bytes:
        while self._end - self._start < n:
            if self._eof:
                raise asyncio.IncompleteReadError(bytes(self._rx[self._start : self._end]), n)
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        data = bytes(self._rxv[self._start : self._start + n])
        self._start += n
        if not self._reading:
            self._flow()
        return data

    def _send_raw(self, data: bytes) -> None:
        assert self.out is not None
        self.out.write(data)

    async def _run_handshake(self) -> None:
        try:
            go = await self.handshake()
        except _Closed as e:
            self.close(str(e))
            return
        except (asyncio.IncompleteReadError, ConnectionError):
            if not self._closed:
                self._closed = True
                log.info("nbd client %d went away", self.cid)
                if self.transport is not None:
                    self.transport.close()
            return
        if not go:
            self.close()
            return
        log.info(
            "nbd client %d entered transmission (structured replies: %s)", self.cid, self.structured
        )
        self._transmitting = True
        self._parse()

    async def handshake(self) -> bool:
        """Option haggling; True when the client enters transmission."""
        self._send_raw(p.server_greeting())
        (flags,) = struct.unpack(">I", await self._read(4))
        if not flags & p.FLAG_FIXED_NEWSTYLE:
            raise _Closed("client does not speak fixed newstyle")
        if flags & ~(p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES):
            raise _Closed(f"unknown client flags {flags:#x}")
        self.no_zeroes = bool(flags & p.FLAG_NO_ZEROES)
        while True:
            magic, opt, length = p.OPTION_HEADER.unpack(await self._read(16))
            if magic != p.IHAVEOPT:
                raise _Closed(f"bad option magic {magic:#x}")
            if length > MAX_OPTION:
                raise _Closed(f"option {opt} of {length} bytes is too long")
            data = await self._read(length)
            try:
                done = self.option(opt, data)
            except p.OptionError as e:
                self.reply(opt, p.Rep.ERR_INVALID, str(e).encode())
                continue
            if done is not None:
                return done

    def reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        self._send_raw(p.option_reply(opt, rep, data))

    def option(self, opt: int, data: bytes) -> bool | None:
        """Answer one option; True/False ends the handshake (go / stop)."""
        ex = self.export
        if opt == p.Opt.EXPORT_NAME:
            name = data.decode("utf-8", "replace")
            if not ex.matches(name):
                raise _Closed(f"unknown export {name!r}")
            self._send_raw(p.export_name_reply(ex.size, ex.flags, self.no_zeroes))
            return True
        if opt == p.Opt.ABORT:
            self.reply(opt, p.Rep.ACK)
            return False
        if opt == p.Opt.LIST:
            if data:
                raise p.OptionError("LIST takes no data")
            raw = ex.name.encode()
            self.reply(opt, p.Rep.SERVER, struct.pack(">I", len(raw)) + raw)
            self.reply(opt, p.Rep.ACK)
            return None
        if opt in (p.Opt.INFO, p.Opt.GO):
            name, infos = p.parse_export_request(data)
            if not ex.matches(name):
                self.reply(opt, p.Rep.ERR_UNKNOWN, f"no export named {name!r}".encode())
                return None
            self.reply(opt, p.Rep.INFO, p.info_export(ex.size, ex.flags))
            if p.Info.NAME in infos:
                self.reply(opt, p.Rep.INFO, p.info_name(ex.name))
            if p.Info.DESCRIPTION in infos:
                self.reply(opt, p.Rep.INFO, p.info_description(ex.description))
            if p.Info.BLOCK_SIZE in infos:
                bs = self.up.block_size
                self.reply(opt, p.Rep.INFO, p.info_block_size(1, max(bs, 4096), MAX_PAYLOAD))
            self.reply(opt, p.Rep.ACK)
            return True if opt == p.Opt.GO else None
        if opt == p.Opt.STRUCTURED_REPLY:
            if data:
                raise p.OptionError("STRUCTURED_REPLY takes no data")
            self.structured = True
            self.reply(opt, p.Rep.ACK)
            return None
        if opt in (p.Opt.LIST_META_CONTEXT, p.Opt.SET_META_CONTEXT):
            if not self.structured:
                raise p.OptionError("negotiate structured replies first")
            name, queries = p.parse_meta_request(data)
            if not ex.matches(name):
                self.reply(opt, p.Rep.ERR_UNKNOWN, f"no export named {name!r}".encode())
                return None
            if opt == p.Opt.LIST_META_CONTEXT:
                wanted = not queries or any(q in ("base:", p.BASE_ALLOCATION) for q in queries)
            else:
                wanted = p.BASE_ALLOCATION in queries
                self.allocation_context = wanted
            if wanted:
                ctx_id = p.ALLOCATION_CONTEXT_ID if opt == p.Opt.SET_META_CONTEXT else 0
                self.reply(
                    opt, p.Rep.META_CONTEXT, struct.pack(">I", ctx_id) + p.BASE_ALLOCATION.encode()
                )
            self.reply(opt, p.Rep.ACK)
            return None
        if opt == p.Opt.STARTTLS:
            self.reply(opt, p.Rep.ERR_POLICY, b"TLS is not offered")
            return None
        self.reply(opt, p.Rep.ERR_UNSUP, f"option {opt} is not supported".encode())
        return None

    # ---- transmission ---------------------------------------------------------------

    def _parse(self) -> None:
        """Handle every complete request in the receive buffer."""
        rx = self._rx
        while not self._closed and not self._disconnecting and self._payload is None:
            start = self._start
            avail = self._end - start
            if avail < REQ_SIZE:
                break
            magic, flags, cmd, cookie, offset, length = p.REQUEST.unpack_from(rx, start)
            if magic != p.REQUEST_MAGIC:
                self.close(f"bad request magic {magic:#x}")
                return
            if cmd != p.Cmd.WRITE:
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
            payload = bytearray(length)
            have = self._end - body
            payload[:have] = self._rxv[body : self._end]
            self._start = self._end = 0
            self._payload, self._got = payload, have
            self._write_req = (flags, cookie, offset, length)
        if self._start == self._end:
            self._start = self._end = 0

    def _dispatch(
        self, flags: int, cmd: int, cookie: int, offset: int, length: int, data: bytes | bytearray
    ) -> None:
        if cmd == p.Cmd.DISC:
            log.info("nbd client %d disconnects", self.cid)
            self._disconnecting = True
            self._flow()
            self._maybe_finish()
            return
        if not flags and cmd in (p.Cmd.READ, p.Cmd.WRITE):
            error = self.check(flags, cmd, offset, length)
            if error:
                self.send_error(cookie, error, "request refused")
                return
            try:
                if cmd == p.Cmd.READ and self._read_now(cookie, offset, length):
                    return
                if cmd == p.Cmd.WRITE and self._write_now(cookie, offset, data):
                    return
            except CrucibleError as e:
                self.send_error(cookie, _errno(e), str(e))
                return
        task = asyncio.ensure_future(self.handle(flags, cmd, cookie, offset, length, data))
        self.inflight.add(task)
        self._started(length)
        task.add_done_callback(functools.partial(self._task_done, length))

    def _started(self, nbytes: int) -> None:
        self._pending += 1
        self._pending_bytes += nbytes
        if self._pending >= MAX_INFLIGHT or self._pending_bytes >= MAX_INFLIGHT_BYTES:
            self._flow()

    def _ended(self, nbytes: int) -> None:
        self._pending -= 1
        self._pending_bytes -= nbytes
        if not self._reading or self._disconnecting:
            self._flow()
            self._maybe_finish()

    def _task_done(self, nbytes: int, task: asyncio.Task[None]) -> None:
        self.inflight.discard(task)
        self._ended(nbytes)

    def _maybe_finish(self) -> None:
        """After DISC, close once every request in flight has been answered."""
        if self._disconnecting and not self._pending:
            self.close()

    def _read_now(self, cookie: int, offset: int, length: int) -> bool:
        first, last = self.outer_blocks(offset, length)
        skip = offset - first * self.up.block_size

        def done(result: ReadResult | BaseException) -> None:
            self._ended(length)
            if isinstance(result, BaseException):
                self.send_error(cookie, _errno(result), str(result))
            else:
                self.send_data(cookie, offset, memoryview(result[0])[skip : skip + length])

        self._started(length)  # before: an error may complete it at once
        if self.up.read_nowait(first, last - first, done):
            return True
        self._ended(length)
        return False

    def _write_now(self, cookie: int, offset: int, data: bytes | bytearray) -> bool:
        """A plain whole-block write, acked as soon as it is queued."""
        bs = self.up.block_size
        if offset % bs or len(data) % bs or not data or self.server.locks.held:
            return False
        if not self.up.write_nowait(offset // bs, data):
            return False
        self.send_ok(cookie)
        return True

    async def handle(
        self, flags: int, cmd: int, cookie: int, offset: int, length: int, data: bytes | bytearray
    ) -> None:
        try:
            error = self.check(flags, cmd, offset, length)
            if error:
                self.send_error(cookie, error, "request refused")
                return
            handler = self.HANDLERS[cmd]
            await handler(self, flags, cookie, offset, length, data)
        except CrucibleError as e:
            self.send_error(cookie, _errno(e), str(e))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # one bad request must not take the server down
            log.exception("nbd client %d: request failed", self.cid)
            self.send_error(cookie, p.EIO, str(e))

    def check(self, flags: int, cmd: int, offset: int, length: int) -> int:
        allowed = p.ALLOWED_FLAGS.get(cmd)
        if allowed is None:
            return p.EINVAL
        if flags & ~allowed:
            return p.EINVAL
        if cmd == p.Cmd.BLOCK_STATUS and not self.allocation_context:
            return p.EINVAL
        writes = cmd in (p.Cmd.WRITE, p.Cmd.TRIM, p.Cmd.WRITE_ZEROES)
        if writes and self.export.read_only:
            return p.EPERM
        if cmd != p.Cmd.FLUSH and (
            offset + length > self.export.size or (length == 0 and cmd != p.Cmd.WRITE)
        ):
            return p.ENOSPC if cmd in (p.Cmd.WRITE, p.Cmd.WRITE_ZEROES) else p.EINVAL
        if cmd == p.Cmd.READ and length > MAX_PAYLOAD:
            return p.EINVAL
        return 0

    # ---- commands -----------------------------------------------------------------

    async def cmd_read(self, flags: int, cookie: int, offset: int, length: int, _: bytes) -> None:
        first, last = self.outer_blocks(offset, length)
        data = await self.up.read(first, last - first)
        skip = offset - first * self.up.block_size
        self.send_data(cookie, offset, memoryview(data)[skip : skip + length])

    async def cmd_write(
        self, flags: int, cookie: int, offset: int, length: int, data: bytes
    ) -> None:
        if length:
            await self.write_bytes(offset, data)
        await self.finish_write(flags, cookie)

    async def cmd_flush(self, flags: int, cookie: int, offset: int, length: int, _: bytes) -> None:
        await self.up.flush()
        self.send_ok(cookie)

    async def cmd_trim(self, flags: int, cookie: int, offset: int, length: int, _: bytes) -> None:
        """Whole blocks in the range are discarded (zeros, space freed); partial
        edge blocks are left alone (TRIM is advisory)."""
        first, last = self.inner_blocks(offset, length)
        if last > first:
            await self.discard_blocks(first, last)
        await self.finish_write(flags, cookie)

    async def cmd_write_zeroes(
        self, flags: int, cookie: int, offset: int, length: int, _: bytes
    ) -> None:
        """Whole blocks are discarded (fast, and they read as zeros) unless the
        client asks for no holes; partial edge blocks are written with zeros."""
        no_hole = bool(flags & p.CMD_FLAG_NO_HOLE)
        if flags & p.CMD_FLAG_FAST_ZERO and no_hole:
            self.send_error(cookie, p.ENOTSUP, "allocated zeroes are written as data")
            return
        bs = self.up.block_size
        first, last = self.inner_blocks(offset, length)
        if last > first:
            if no_hole:
                await self.zero_blocks(first, last)
            else:
                await self.discard_blocks(first, last)
            if offset < first * bs:
                await self.write_bytes(offset, bytes(first * bs - offset))
            if offset + length > last * bs:
                await self.write_bytes(last * bs, bytes(offset + length - last * bs))
        else:
            await self.write_bytes(offset, bytes(length))
        await self.finish_write(flags, cookie)

    async def cmd_block_status(
        self, flags: int, cookie: int, offset: int, length: int, _: bytes
    ) -> None:
        bs = self.up.block_size
        length = min(length, MAX_STATUS_BYTES)
        first, last = self.outer_blocks(offset, length)
        _, written = await self.up.read_with_status(first, last - first)
        extents: list[tuple[int, int]] = []
        pos = offset
        end = offset + length
        i = 0
        while pos < end:
            state = 0 if written[i] else p.STATE_HOLE | p.STATE_ZERO
            j = i
            while j < len(written) and (0 if written[j] else p.STATE_HOLE | p.STATE_ZERO) == state:
                j += 1
            stop = min(end, (first + j) * bs)
            extents.append((stop - pos, state))
            pos = stop
            i = j
            if flags & p.CMD_FLAG_REQ_ONE:
                break
        self.send(p.block_status_chunk(cookie, p.ALLOCATION_CONTEXT_ID, extents))

    HANDLERS: dict[int, Callable[..., Awaitable[None]]] = {
        p.Cmd.READ: cmd_read,
        p.Cmd.WRITE: cmd_write,
        p.Cmd.FLUSH: cmd_flush,
        p.Cmd.TRIM: cmd_trim,
        p.Cmd.WRITE_ZEROES: cmd_write_zeroes,
        p.Cmd.BLOCK_STATUS: cmd_block_status,
    }

    # ---- helpers --------------------------------------------------------------------

    async def write_bytes(self, offset: int, data: bytes) -> None:
        """Write any byte range: whole blocks directly, anything else by
        read-modify-write of the blocks it touches, under a range lock."""
        bs = self.up.block_size
        end = offset + len(data)
        first, last = self.outer_blocks(offset, len(data))
        locks = self.server.locks
        if offset % bs == 0 and end % bs == 0:
            await locks.wait_clear(first, last)
            await self.up.write(first, data)
            return
        token = await locks.acquire(first, last)
        try:
            head = offset - first * bs
            buf = bytearray((last - first) * bs)
            buf[head : head + len(data)] = data
            old_first = await self.up.read(first, 1)
            buf[:head] = old_first[:head]
            tail_start = end - first * bs
            if tail_start < len(buf):
                old_last = await self.up.read(last - 1, 1)
                keep = len(buf) - tail_start
                buf[tail_start:] = old_last[bs - keep :]
            await self.up.write(first, bytes(buf))
        finally:
            locks.release(token)

    def outer_blocks(self, offset: int, length: int) -> tuple[int, int]:
        """The blocks [first, last) a byte range touches, partly or wholly."""
        bs = self.up.block_size
        return offset // bs, -(-(offset + length) // bs)

    def inner_blocks(self, offset: int, length: int) -> tuple[int, int]:
        """The whole blocks [first, last) inside a byte range (first >= last: none)."""
        bs = self.up.block_size
        return -(-offset // bs), (offset + length) // bs

    async def discard_blocks(self, first: int, last: int) -> None:
        await self.server.locks.wait_clear(first, last)
        await self.up.trim(first, last - first)

    async def zero_blocks(self, first: int, last: int) -> None:
        bs = self.up.block_size
        step = max(1, (1 << 20) // bs)
        zero = bytes(step * bs)
        await self.server.locks.wait_clear(first, last)
        for b in range(first, last, step):
            n = min(step, last - b)
            await self.up.write(b, zero[: n * bs])

    async def finish_write(self, flags: int, cookie: int) -> None:
        if flags & p.CMD_FLAG_FUA:
            await self.up.flush()
        self.send_ok(cookie)

    def send(self, *parts: bytes | memoryview) -> None:
        """Queue one whole reply (its parts go out together, never interleaved
        with another reply). A client that reads replies too slowly is not read
        from meanwhile (see _flow)."""
        if self.out is not None and not self._closed:
            self.out.write(*parts)

    def send_data(self, cookie: int, offset: int, data: memoryview) -> None:
        if self.structured:
            head = p.chunk(cookie, p.Reply.OFFSET_DATA, 8 + len(data), True)
            self.send(head + struct.pack(">Q", offset), data)
        else:
            self.send(p.simple_reply(cookie), data)

    def send_ok(self, cookie: int) -> None:
        if self.structured:
            self.send(p.chunk(cookie, p.Reply.NONE, 0, True))
        else:
            self.send(p.simple_reply(cookie))

    def send_error(self, cookie: int, error: int, message: str) -> None:
        if self.structured:
            self.send(p.error_chunk(cookie, error, message))
        else:
            self.send(p.simple_reply(cookie, error))


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
