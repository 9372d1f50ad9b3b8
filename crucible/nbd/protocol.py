"""NBD wire constants and encoders (fixed newstyle handshake, simple and
structured replies), per the NBD protocol document (doc/proto.md). All
integers are big-endian."""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Final

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9  # option replies
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

# Transmission flags.
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_FAST_ZERO = 1 << 11


class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10


class Rep(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_UNKNOWN = (1 << 31) + 6


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


CMD_FLAG_FUA: Final = 1 << 0
CMD_FLAG_NO_HOLE: Final = 1 << 1
CMD_FLAG_DF: Final = 1 << 2
CMD_FLAG_REQ_ONE: Final = 1 << 3
CMD_FLAG_FAST_ZERO: Final = 1 << 4

# Flags each served command accepts; anything else (and CACHE, which is not
# advertised) is EINVAL. DISC is handled before any of this.
ALLOWED_FLAGS: Final[dict[int, int]] = {
    Cmd.READ: CMD_FLAG_FUA,
    Cmd.WRITE: CMD_FLAG_FUA,
    Cmd.FLUSH: CMD_FLAG_FUA,
    Cmd.TRIM: CMD_FLAG_FUA,
    Cmd.WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    Cmd.BLOCK_STATUS: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
}


class Reply(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1


REPLY_FLAG_DONE: Final = 1

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

EPERM: Final = 1
EIO: Final = 5
EINVAL: Final = 22
ENOSPC: Final = 28
EOVERFLOW: Final = 75
ENOTSUP: Final = 95
ESHUTDOWN: Final = 108

BASE_ALLOCATION = "base:allocation"
ALLOCATION_CONTEXT_ID = 1

OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
REQUEST: Final = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_OPT_REPLY = struct.Struct(">QIII")
_SIMPLE: Final = struct.Struct(">IIQ")
_CHUNK: Final = struct.Struct(">IHHQI")


def server_greeting() -> bytes:
    return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return _OPT_REPLY.pack(REPLY_MAGIC, option, reply, len(data)) + data


def info_export(size: int, flags: int) -> bytes:
    return struct.pack(">HQH", Info.EXPORT, size, flags)


def info_name(name: str) -> bytes:
    return struct.pack(">H", Info.NAME) + name.encode()


def info_description(text: str) -> bytes:
    return struct.pack(">H", Info.DESCRIPTION) + text.encode()


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return struct.pack(">HIII", Info.BLOCK_SIZE, minimum, preferred, maximum)


def export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    return struct.pack(">QH", size, flags) + (b"" if no_zeroes else bytes(124))


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk(cookie: int, kind: int, payload_len: int, done: bool) -> bytes:
    """A structured reply chunk header; the payload follows it."""
    flags = REPLY_FLAG_DONE if done else 0
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, payload_len)


_DATA_CHUNK: Final = struct.Struct(_CHUNK.format + "Q")  # a chunk header, then the data's offset
_OFFSET_DATA: Final = int(Reply.OFFSET_DATA)  # (an Enum's .value is a Python-level property)


def data_chunk_head(cookie: int, offset: int, nbytes: int) -> bytes:
    """What goes before the data of the one, final OFFSET_DATA chunk of a read."""
    magic, kind = STRUCTURED_REPLY_MAGIC, _OFFSET_DATA
    return _DATA_CHUNK.pack(magic, REPLY_FLAG_DONE, kind, cookie, 8 + nbytes, offset)


def error_chunk(cookie: int, error: int, message: str = "") -> bytes:
    text = message.encode()[:4096]
    payload = struct.pack(">IH", error, len(text)) + text
    return chunk(cookie, Reply.ERROR, len(payload), True) + payload


def block_status_chunk(cookie: int, context_id: int, extents: list[tuple[int, int]]) -> bytes:
    payload = struct.pack(">I", context_id) + b"".join(
        struct.pack(">II", length, flags) for length, flags in extents
    )
    return chunk(cookie, Reply.BLOCK_STATUS, len(payload), True) + payload


class OptionError(Exception):
    """A malformed option payload: answered with NBD_REP_ERR_INVALID."""


def parse_export_request(data: bytes) -> tuple[str, list[int]]:
    """NBD_OPT_INFO / NBD_OPT_GO payload: export name and information requests."""
    if len(data) < 6:
        raise OptionError("option too short")
    (n,) = struct.unpack_from(">I", data)
    if n > len(data) - 6:
        raise OptionError("export name longer than the option")
    name = _text(data[4 : 4 + n])
    (count,) = struct.unpack_from(">H", data, 4 + n)
    if len(data) != 6 + n + 2 * count:
        raise OptionError("information request list does not match the option length")
    infos = list(struct.unpack_from(f">{count}H", data, 6 + n))
    return name, infos


def parse_meta_request(data: bytes) -> tuple[str, list[str]]:
    """NBD_OPT_LIST/SET_META_CONTEXT payload: export name and queries."""
    try:
        (n,) = struct.unpack_from(">I", data)
        name = _text(data[4 : 4 + n])
        if 4 + n > len(data):
            raise OptionError("export name longer than the option")
        (count,) = struct.unpack_from(">I", data, 4 + n)
        pos = 8 + n
        queries = []
        for _ in range(count):
            (q,) = struct.unpack_from(">I", data, pos)
            if pos + 4 + q > len(data):
                raise OptionError("query longer than the option")
            queries.append(_text(data[pos + 4 : pos + 4 + q]))
            pos += 4 + q
    except struct.error:
        raise OptionError("option too short") from None
    if pos != len(data):
        raise OptionError("trailing bytes in the option")
    return name, queries


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise OptionError("string is not UTF-8") from None
