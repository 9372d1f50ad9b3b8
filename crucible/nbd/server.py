"""An NBD server over an upstairs: several clients at once share one volume.

Requests of one connection are handled concurrently and answered as they
finish (NBD replies may come in any order). Every connection shares the same
upstairs, whose flush covers writes from all of them, so CAN_MULTI_CONN is
advertised. Writes that do not cover whole blocks are read-modify-write; their
block range is locked meanwhile so that no other write to it interleaves.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from crucible.nbd import protocol as p
from crucible.netio import OutputBatcher
from crucible.protocol.errors import CrucibleError, ErrorKind
from crucible.upstairs.guest import Upstairs

log = logging.getLogger("crucible.nbd")

MAX_OPTION = 64 * 1024  # option payloads are small; more is abuse
MAX_PAYLOAD = 32 << 20
MAX_STATUS_BYTES = 64 << 20  # one BLOCK_STATUS answers at most this much
REPLY_BACKLOG = 8 << 20  # unsent reply bytes before a handler waits for the client


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
        self._clients: set[asyncio.Task[None]] = set()
        self._next_id = 1

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, limit=MAX_PAYLOAD + 64
        )
        sock = self._server.sockets[0].getsockname()
        self.port = sock[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._clients):
            t.cancel()
        for t in list(self._clients):
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        cid = self._next_id
        self._next_id += 1
        peer = writer.get_extra_info("peername")
        log.info("nbd client %d connected from %s", cid, peer)
        try:
            conn = _Connection(self, reader, writer, cid)
            await conn.run()
        except _Closed as e:
            log.warning("nbd client %d: %s; closing", cid, e)
        except (asyncio.IncompleteReadError, ConnectionError):
            log.info("nbd client %d went away", cid)
        finally:
            self._clients.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, asyncio.CancelledError):
                pass
            log.info("nbd client %d closed", cid)


class _Connection:
    def __init__(
        self,
        server: NbdServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        cid: int,
    ) -> None:
        self.server = server
        self.export = server.export
        self.up = server.export.upstairs
        self.reader = reader
        self.writer = writer
        self.cid = cid
        self.structured = False
        self.allocation_context = False
        self.no_zeroes = False
        self.inflight: set[asyncio.Task[None]] = set()
        self.out = OutputBatcher(writer.transport)

    # ---- handshake ------------------------------------------------------------------

    async def run(self) -> None:
        if await self.handshake():
            await self.transmission()

    async def handshake(self) -> bool:
        """Option haggling; True when the client enters transmission."""
        self.writer.write(p.server_greeting())
        (flags,) = struct.unpack(">I", await self.reader.readexactly(4))
        if not flags & p.FLAG_FIXED_NEWSTYLE:
            raise _Closed("client does not speak fixed newstyle")
        if flags & ~(p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES):
            raise _Closed(f"unknown client flags {flags:#x}")
        self.no_zeroes = bool(flags & p.FLAG_NO_ZEROES)
        while True:
            magic, opt, length = p.OPTION_HEADER.unpack(await self.reader.readexactly(16))
            if magic != p.IHAVEOPT:
                raise _Closed(f"bad option magic {magic:#x}")
            if length > MAX_OPTION:
                raise _Closed(f"option {opt} of {length} bytes is too long")
            data = await self.reader.readexactly(length)
            try:
                done = await self.option(opt, data)
            except p.OptionError as e:
                self.reply(opt, p.Rep.ERR_INVALID, str(e).encode())
                continue
            await self.writer.drain()
            if done is not None:
                return done

    def reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        self.writer.write(p.option_reply(opt, rep, data))

    async def option(self, opt: int, data: bytes) -> bool | None:
        """Answer one option; True/False ends the handshake (go / stop)."""
        ex = self.export
        if opt == p.Opt.EXPORT_NAME:
            name = data.decode("utf-8", "replace")
            if not ex.matches(name):
                raise _Closed(f"unknown export {name!r}")
            self.writer.write(p.export_name_reply(ex.size, ex.flags, self.no_zeroes))
            return True
        if opt == p.Opt.ABORT:
            self.reply(opt, p.Rep.ACK)
            await self.writer.drain()
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

    async def transmission(self) -> None:
        log.info(
            "nbd client %d entered transmission (structured replies: %s)", self.cid, self.structured
        )
        while True:
            raw = await self.reader.readexactly(p.REQUEST.size)
            magic, flags, cmd, cookie, offset, length = p.REQUEST.unpack(raw)
            if magic != p.REQUEST_MAGIC:
                raise _Closed(f"bad request magic {magic:#x}")
            data = b""
            if cmd == p.Cmd.WRITE:
                if length > MAX_PAYLOAD:
                    raise _Closed(f"write of {length} bytes exceeds the {MAX_PAYLOAD} maximum")
                data = await self.reader.readexactly(length)
            if cmd == p.Cmd.DISC:
                if self.inflight:
                    await asyncio.gather(*self.inflight, return_exceptions=True)
                log.info("nbd client %d disconnects", self.cid)
                self.out.flush()
                return
            bs = self.up.block_size
            if (
                cmd == p.Cmd.WRITE
                and not flags
                and offset % bs == 0
                and length % bs == 0
                and self.up.core.has_room(length)
            ):
                # Acked as soon as queued: no need for a task of its own.
                await self.handle(flags, cmd, cookie, offset, length, data)
                continue
            task = asyncio.ensure_future(self.handle(flags, cmd, cookie, offset, length, data))
            self.inflight.add(task)
            task.add_done_callback(self.inflight.discard)

    async def handle(
        self, flags: int, cmd: int, cookie: int, offset: int, length: int, data: bytes
    ) -> None:
        try:
            error = self.check(flags, cmd, offset, length)
            if error:
                await self.send_error(cookie, error, "request refused")
                return
            handler = self.HANDLERS[cmd]
            await handler(self, flags, cookie, offset, length, data)
        except CrucibleError as e:
            await self.send_error(cookie, _errno(e), str(e))
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as e:  # one bad request must not take the server down
            log.exception("nbd client %d: request failed", self.cid)
            await self.send_error(cookie, p.EIO, str(e))

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
        bs = self.up.block_size
        first = offset // bs
        last = -(-(offset + length) // bs)
        data = await self.up.read(first, last - first)
        skip = offset - first * bs
        view = memoryview(data)[skip : skip + length]
        if self.structured:
            head = p.chunk(cookie, p.Reply.OFFSET_DATA, 8 + length, True)
            await self.send(head + struct.pack(">Q", offset), view)
        else:
            await self.send(p.simple_reply(cookie), view)

    async def cmd_write(
        self, flags: int, cookie: int, offset: int, length: int, data: bytes
    ) -> None:
        if length:
            await self.write_bytes(offset, data)
        await self.finish_write(flags, cookie)

    async def cmd_flush(self, flags: int, cookie: int, offset: int, length: int, _: bytes) -> None:
        await self.up.flush()
        await self.send_ok(cookie)

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
            await self.send_error(cookie, p.ENOTSUP, "allocated zeroes are written as data")
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
        first = offset // bs
        last = -(-(offset + length) // bs)
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
        await self.send(p.block_status_chunk(cookie, p.ALLOCATION_CONTEXT_ID, extents))

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
        first = offset // bs
        last = -(-end // bs)
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
        await self.send_ok(cookie)

    async def send(self, *parts: bytes | memoryview) -> None:
        """Queue one whole reply (its parts go out together, never interleaved
        with another reply); wait only when the client reads too slowly."""
        self.out.write(*parts)
        if self.out.backlog() > REPLY_BACKLOG:
            await self.writer.drain()

    async def send_ok(self, cookie: int) -> None:
        if self.structured:
            await self.send(p.chunk(cookie, p.Reply.NONE, 0, True))
        else:
            await self.send(p.simple_reply(cookie))

    async def send_error(self, cookie: int, error: int, message: str) -> None:
        if self.structured:
            await self.send(p.error_chunk(cookie, error, message))
        else:
            await self.send(p.simple_reply(cookie, error))


def _errno(e: CrucibleError) -> int:
    if e.kind == ErrorKind.ModifyingReadOnlyRegion:
        return p.EPERM
    if e.kind in (ErrorKind.OffsetInvalid, ErrorKind.DataLenUnaligned):
        return p.EINVAL
    if e.kind in (ErrorKind.NoLongerActive, ErrorKind.UpstairsInactive):
        return p.ESHUTDOWN
    return p.EIO
