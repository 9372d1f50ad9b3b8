"""The NBD handshake (fixed newstyle), sans-IO: bytes in, replies and the
negotiated settings out.

The server sends its greeting, the client its flags, then options one at a
time until one of them starts transmission (GO, EXPORT_NAME) or ends the
connection (ABORT). `receive` takes whatever bytes have arrived and consumes
every complete unit (the 4-byte client flags, then each option: a 16-byte
header and its payload), leaving a partial one for the next call; what to
send back accumulates for `data_to_send`. Once `result` is set, whatever
follows in the stream belongs to transmission and is not consumed. A client
that breaks the protocol raises HandshakeError: close the connection.

Options answered: EXPORT_NAME, ABORT, LIST, INFO, GO (with INFO_EXPORT, NAME,
DESCRIPTION, BLOCK_SIZE), STRUCTURED_REPLY, LIST_META_CONTEXT and
SET_META_CONTEXT (base:allocation), STARTTLS (refused by policy); anything
else gets ERR_UNSUP. A malformed option payload gets ERR_INVALID and the
handshake goes on. An option payload over 64 KiB ends the connection.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from crucible.nbd import protocol as p

MAX_OPTION = 64 * 1024  # option payloads are small; more is abuse


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake tells a client about the export."""

    name: str
    size: int
    flags: int  # transmission flags
    description: str
    block_size: int  # preferred IO size (the volume's block, at least 4 KiB)
    max_payload: int

    def matches(self, name: str) -> bool:
        return name in ("", self.name)


@dataclass(frozen=True, slots=True)
class Negotiated:
    structured: bool  # structured replies
    allocation: bool  # the base:allocation context: BLOCK_STATUS allowed


class HandshakeError(Exception):
    """The client broke the protocol; the connection must close."""


class Handshake:
    def __init__(self, export: ExportInfo) -> None:
        self.export = export
        self._out = [p.server_greeting()]
        self._flags_read = False
        self.no_zeroes = False
        self.structured = False
        self.allocation = False
        # None while negotiating; the settings once transmission starts;
        # False when the client aborted.
        self.result: Negotiated | bool | None = None

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out = []
        return out

    def receive(self, data: memoryview) -> int:
        """Consume complete units from `data`; return how many bytes were used."""
        pos = 0
        while self.result is None:
            if not self._flags_read:
                if len(data) - pos < 4:
                    break
                (flags,) = struct.unpack_from(">I", data, pos)
                pos += 4
                self._client_flags(flags)
                continue
            if len(data) - pos < p.OPTION_HEADER.size:
                break
            magic, opt, length = p.OPTION_HEADER.unpack_from(data, pos)
            if magic != p.IHAVEOPT:
                raise HandshakeError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION:
                raise HandshakeError(f"option {opt} of {length} bytes is too long")
            end = pos + p.OPTION_HEADER.size + length
            if len(data) < end:
                break
            payload = bytes(data[pos + p.OPTION_HEADER.size : end])
            pos = end
            try:
                self._option(opt, payload)
            except p.OptionError as e:
                self._reply(opt, p.Rep.ERR_INVALID, str(e).encode())
        return pos

    def _client_flags(self, flags: int) -> None:
        if not flags & p.FLAG_FIXED_NEWSTYLE:
            raise HandshakeError("client does not speak fixed newstyle")
        if flags & ~(p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES):
            raise HandshakeError(f"unknown client flags {flags:#x}")
        self.no_zeroes = bool(flags & p.FLAG_NO_ZEROES)
        self._flags_read = True

    def _reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        self._out.append(p.option_reply(opt, rep, data))

    def _go(self) -> None:
        self.result = Negotiated(self.structured, self.allocation)

    def _option(self, opt: int, data: bytes) -> None:
        ex = self.export
        if opt == p.Opt.EXPORT_NAME:
            name = data.decode("utf-8", "replace")
            if not ex.matches(name):
                raise HandshakeError(f"unknown export {name!r}")
            self._out.append(p.export_name_reply(ex.size, ex.flags, self.no_zeroes))
            self._go()
        elif opt == p.Opt.ABORT:
            self._reply(opt, p.Rep.ACK)
            self.result = False
        elif opt == p.Opt.LIST:
            if data:
                raise p.OptionError("LIST takes no data")
            raw = ex.name.encode()
            self._reply(opt, p.Rep.SERVER, struct.pack(">I", len(raw)) + raw)
            self._reply(opt, p.Rep.ACK)
        elif opt in (p.Opt.INFO, p.Opt.GO):
            self._info(opt, data)
        elif opt == p.Opt.STRUCTURED_REPLY:
            if data:
                raise p.OptionError("STRUCTURED_REPLY takes no data")
            self.structured = True
            self._reply(opt, p.Rep.ACK)
        elif opt in (p.Opt.LIST_META_CONTEXT, p.Opt.SET_META_CONTEXT):
            self._meta_context(opt, data)
        elif opt == p.Opt.STARTTLS:
            self._reply(opt, p.Rep.ERR_POLICY, b"TLS is not offered")
        else:
            self._reply(opt, p.Rep.ERR_UNSUP, f"option {opt} is not supported".encode())

    def _info(self, opt: int, data: bytes) -> None:
        ex = self.export
        name, infos = p.parse_export_request(data)
        if not ex.matches(name):
            self._reply(opt, p.Rep.ERR_UNKNOWN, f"no export named {name!r}".encode())
            return
        self._reply(opt, p.Rep.INFO, p.info_export(ex.size, ex.flags))
        if p.Info.NAME in infos:
            self._reply(opt, p.Rep.INFO, p.info_name(ex.name))
        if p.Info.DESCRIPTION in infos:
            self._reply(opt, p.Rep.INFO, p.info_description(ex.description))
        if p.Info.BLOCK_SIZE in infos:
            sizes = p.info_block_size(1, ex.block_size, ex.max_payload)
            self._reply(opt, p.Rep.INFO, sizes)
        self._reply(opt, p.Rep.ACK)
        if opt == p.Opt.GO:
            self._go()

    def _meta_context(self, opt: int, data: bytes) -> None:
        if not self.structured:
            raise p.OptionError("negotiate structured replies first")
        name, queries = p.parse_meta_request(data)
        if not self.export.matches(name):
            self._reply(opt, p.Rep.ERR_UNKNOWN, f"no export named {name!r}".encode())
            return
        if opt == p.Opt.LIST_META_CONTEXT:
            wanted = not queries or any(q in ("base:", p.BASE_ALLOCATION) for q in queries)
        else:
            wanted = p.BASE_ALLOCATION in queries
            self.allocation = wanted
        if wanted:
            ctx_id = p.ALLOCATION_CONTEXT_ID if opt == p.Opt.SET_META_CONTEXT else 0
            payload = struct.pack(">I", ctx_id) + p.BASE_ALLOCATION.encode()
            self._reply(opt, p.Rep.META_CONTEXT, payload)
        self._reply(opt, p.Rep.ACK)
