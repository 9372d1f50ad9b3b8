"""The hot messages packed and unpacked by hand: a few struct calls each
instead of the field-by-field schema codec.

Only their common shapes are handled (every block context plain, or every
one sealed; Ok results; 16-byte UUIDs); anything else returns None and takes
the schema path, which is the definition of the format. A property test
checks that both give the same bytes and the same messages for every
message type.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from operator import itemgetter
from typing import Any, Final

import crucible.protocol.messages as m
from crucible.common.buffer import Buffer
from crucible.protocol.fields import PLAIN_CONTEXT
from crucible.protocol.integrity import plain_contexts, plain_hashes
from crucible.protocol.wire import U32, U64, ProtocolError, cached_uuid, struct_run, uuid_bytes

Parts = list[Buffer]
TAG_OF: Final[dict[type, int]] = {cls: i for i, cls in enumerate(m.MESSAGE_TYPES)}


class Layout:
    """A fixed run of fields that begins a message body; `frame` is the same
    behind the u32 frame length, for encoders that write the whole frame."""

    __slots__ = ("body", "frame")

    def __init__(self, fmt: str) -> None:
        self.body = struct.Struct("<" + fmt)
        self.frame = struct.Struct("<I" + fmt)


# A UUID is a u64 length (16) and its bytes.
JOB_HEAD: Final = Layout("IQ16sQ16sQQ")  # tag, upstairs_id, session_id, job_id, dependency count
ACK: Final = Layout("IQ16sQ16sQI")  # tag, upstairs_id, session_id, job_id, Ok
# tag, upstairs_id, session_id, job_id, Ok, context count
READ_REPLY_HEAD: Final = Layout("IQ16sQ16sQIQ")
_START_COUNT: Final = struct.Struct("<QQ")  # start block, and a block count or a context count

# A read with one dependency, the commonest (the last write or barrier before
# it): the whole body in one pack or unpack.
_READ_ONE_DEP: Final = struct.Struct(JOB_HEAD.body.format + "QQQ")
_READ_ONE_DEP_FRAME: Final = struct.Struct(JOB_HEAD.frame.format + "QQQ")
# A reply of one plain block, the commonest: its head, the Unencrypted tag,
# the hash and the data's length in one pack or unpack.
_ONE_PLAIN: Final = struct.Struct(READ_REPLY_HEAD.body.format + "IQQ")
_ONE_PLAIN_FRAME: Final = struct.Struct(READ_REPLY_HEAD.frame.format + "IQQ")


def with_bulk(head: bytearray, data: Buffer, name: str) -> Parts:
    """A frame whose bulk data follows the header (`head` begins with room for
    the frame length): the data's length, the frame length in front, and the
    data as its own buffer, never copied."""
    head += U64.pack(len(data))
    total = len(head) + len(data)
    if total > m.MAX_FRAME_LEN:
        raise ProtocolError(f"{name} frame of {total} bytes is too large")
    U32.pack_into(head, 0, total)
    return [head, data]


# ---- encoders: (message, tag) -> frame parts, or None --------------------------------


def _pack_ack(msg: Any, tag: int) -> Parts | None:
    if msg.result is not None:
        return None
    up, sess = uuid_bytes(msg.upstairs_id), uuid_bytes(msg.session_id)
    return [ACK.frame.pack(4 + ACK.body.size, tag, 16, up, 16, sess, msg.job_id, 0)]


def _pack_read_response(msg: Any, tag: int) -> Parts | None:
    blocks, data = msg.blocks, msg.data
    if not isinstance(blocks, list):
        return None
    n = len(blocks)
    one = _ONE_PLAIN_FRAME  # one plain block, the commonest: one pack
    total = one.size + len(data)
    if n == 1 and type(blocks[0]) is int and total <= m.MAX_FRAME_LEN:
        up, sess = uuid_bytes(msg.upstairs_id), uuid_bytes(msg.session_id)
        try:
            head = one.pack(total, tag, 16, up, 16, sess, msg.job_id, 0, 1, 2, blocks[0], len(data))
        except struct.error:  # a hash out of range: the schema path says so
            return None
        return [head, data]
    try:  # every context a plain hash (an int), every one sealed, or none written
        if blocks.count(None) == n:
            ctxs = bytes(4 * n)  # each the u32 tag of Empty
        elif type(blocks[0]) is m.EncryptionContext:
            # Each (tag, nonce, tag) in a run of triples: filled by slices, not per block.
            sealed: list[Any] = [1] * (3 * n)
            sealed[1::3] = list(map(itemgetter(0), blocks))
            sealed[2::3] = list(map(itemgetter(1), blocks))
            ctxs = struct_run("I12s16s", n).pack(*sealed)
        else:
            plain: list[Any] = [2] * (2 * n)  # (the Unencrypted tag, hash) pairs
            plain[1::2] = blocks
            ctxs = struct_run("IQ", n).pack(*plain)
    except (struct.error, TypeError):
        return None
    total = 4 + READ_REPLY_HEAD.body.size + len(ctxs) + 8 + len(data)
    if total > m.MAX_FRAME_LEN:
        raise ProtocolError(f"ReadResponse frame of {total} bytes is too large")
    up, sess = uuid_bytes(msg.upstairs_id), uuid_bytes(msg.session_id)
    head = READ_REPLY_HEAD.frame.pack(total, tag, 16, up, 16, sess, msg.job_id, 0, n)
    return [head + ctxs + U64.pack(len(data)), data]


def _job_head(msg: Any, tag: int, frame_len: int) -> bytes:
    deps = msg.dependencies
    up, sess = uuid_bytes(msg.upstairs_id), uuid_bytes(msg.session_id)
    head = JOB_HEAD.frame.pack(frame_len, tag, 16, up, 16, sess, msg.job_id, len(deps))
    return head + struct_run("Q", len(deps)).pack(*deps)


def _pack_read_request(msg: Any, tag: int) -> Parts | None:
    deps = msg.dependencies
    if len(deps) == 1:  # the usual read (see _READ_ONE_DEP): one pack
        one = _READ_ONE_DEP_FRAME
        up, sess = uuid_bytes(msg.upstairs_id), uuid_bytes(msg.session_id)
        return [
            one.pack(one.size, tag, 16, up, 16, sess, msg.job_id, 1, deps[0], msg.start, msg.count)
        ]
    size = 4 + JOB_HEAD.body.size + 8 * len(deps) + _START_COUNT.size
    return [_job_head(msg, tag, size) + _START_COUNT.pack(msg.start, msg.count)]


def _pack_write(msg: Any, tag: int) -> Parts | None:
    """Write / WriteUnwritten with every context plain or every one sealed,
    the data as its own buffer."""
    ctxs = msg.contexts
    n = len(ctxs)
    head = bytearray(_job_head(msg, tag, 0))
    head += _START_COUNT.pack(msg.start, n)
    hashes = plain_hashes(ctxs)
    if hashes is not None:
        head += struct_run(PLAIN_CONTEXT, n).pack(*hashes)
    else:
        encs = list(map(itemgetter(1), ctxs))
        if None in encs:  # some sealed, some not
            return None
        try:
            run = struct_run("QB12s16s", n)
            head += run.pack(*[v for c, e in zip(ctxs, encs, strict=True) for v in (c.hash, 1, *e)])
        except struct.error:  # a nonce or tag of another length
            return None
    return with_bulk(head, msg.data, type(msg).__name__)


_ACK_CLASSES = (m.WriteAck, m.WriteUnwrittenAck, m.FlushAck, m.BarrierAck, m.TrimAck)
ENCODERS: Final[dict[type, Callable[[Any, int], Parts | None]]] = {
    **dict.fromkeys(_ACK_CLASSES, _pack_ack),
    m.ReadResponse: _pack_read_response,
    m.ReadRequest: _pack_read_request,
    m.Write: _pack_write,
    m.WriteUnwritten: _pack_write,
}


# ---- decoders: frame body -> message, or None -----------------------------------------


def _fast_ack(body: memoryview) -> m.Message | None:
    if len(body) != ACK.body.size:
        return None
    tag, n1, up, n2, sess, job, ok = ACK.body.unpack(body)
    if n1 != 16 or n2 != 16 or ok != 0:
        return None
    msg: m.Message = m.MESSAGE_TYPES[tag](cached_uuid(up), cached_uuid(sess), job, None)
    return msg


def _fast_read_response(body: memoryview) -> m.Message | None:
    one = _ONE_PLAIN
    if len(body) >= one.size:
        _, n1, up, n2, sess, job, ok, count, tag, ctx, data_len = one.unpack_from(body)
        if count == 1 and tag == 2 and n1 == 16 and n2 == 16 and ok == 0:
            if one.size + data_len != len(body):
                return None
            return m.ReadResponse(cached_uuid(up), cached_uuid(sess), job, [ctx], body[one.size :])
    head = READ_REPLY_HEAD.body
    if len(body) < head.size + 8:
        return None
    _, n1, up, n2, sess, job, ok, count = head.unpack_from(body)
    if n1 != 16 or n2 != 16 or ok != 0:
        return None
    first = U32.unpack_from(body, head.size)[0] if len(body) >= head.size + 4 else None
    sealed = count > 0 and first == 1
    empty = count > 0 and first == 0
    ctx_end = head.size + (32 if sealed else 4 if empty else 12) * count
    if ctx_end + 8 > len(body):
        return None
    blocks: list[m.ReadBlockContext]
    if empty:  # every context Empty (never written)
        if bytes(body[head.size : ctx_end]).count(0) != 4 * count:
            return None
        blocks = [None] * count
    elif sealed:  # every context Encrypted{nonce, tag}
        fields = struct_run("I12s16s", count).unpack_from(body, head.size)
        if fields[0::3].count(1) != count:
            return None
        blocks = list(map(m.EncryptionContext, fields[1::3], fields[2::3]))
    else:  # every context Unencrypted{hash}
        pairs = struct_run("IQ", count).unpack_from(body, head.size)
        if pairs[0::2].count(2) != count:
            return None
        blocks = list(pairs[1::2])
    (data_len,) = U64.unpack_from(body, ctx_end)
    if ctx_end + 8 + data_len != len(body):
        return None
    return m.ReadResponse(cached_uuid(up), cached_uuid(sess), job, blocks, body[ctx_end + 8 :])


def _job_fields(body: memoryview) -> tuple[Any, Any, int, list[int], int] | None:
    """The ids, job id and dependencies that begin a job; the offset after them."""
    if len(body) < JOB_HEAD.body.size:
        return None
    _, n1, up, n2, sess, job, ndeps = JOB_HEAD.body.unpack_from(body)
    pos = JOB_HEAD.body.size
    if n1 != 16 or n2 != 16 or pos + 8 * ndeps + _START_COUNT.size > len(body):
        return None
    deps = list(struct_run("Q", ndeps).unpack_from(body, pos))
    return cached_uuid(up), cached_uuid(sess), job, deps, pos + 8 * ndeps


def _fast_write(body: memoryview) -> m.Message | None:
    """Write / WriteUnwritten with every context plain (the bulk of all
    traffic) or every one sealed."""
    head = _job_fields(body)
    if head is None:
        return None
    up, sess, job, deps, pos = head
    start, nctx = _START_COUNT.unpack_from(body, pos)
    pos += _START_COUNT.size
    sealed = nctx > 0 and pos + 9 <= len(body) and body[pos + 8] == 1
    end_ctx = pos + (37 if sealed else 9) * nctx
    if end_ctx + 8 > len(body):
        return None
    raw = bytes(body[pos:end_ctx])
    contexts: m.Contexts
    if sealed:
        f = struct_run("QB12s16s", nctx).unpack(raw)
        if f[1::4].count(1) != nctx:
            return None
        encs = map(m.EncryptionContext, f[2::4], f[3::4])
        contexts = list(map(m.BlockContext, f[0::4], encs))
    elif raw[8::9].count(0) != nctx:
        return None
    else:
        contexts = plain_contexts(struct_run(PLAIN_CONTEXT, nctx).unpack(raw))
    (data_len,) = U64.unpack_from(body, end_ctx)
    if end_ctx + 8 + data_len != len(body):
        return None
    cls = m.MESSAGE_TYPES[U32.unpack_from(body)[0]]
    msg: m.Message = cls(up, sess, job, deps, start, contexts, body[end_ctx + 8 :])
    return msg


def _fast_read_request(body: memoryview) -> m.Message | None:
    if len(body) == _READ_ONE_DEP.size:
        _, n1, up, n2, sess, job, ndeps, dep, start, count = _READ_ONE_DEP.unpack(body)
        if ndeps == 1 and n1 == 16 and n2 == 16:
            return m.ReadRequest(cached_uuid(up), cached_uuid(sess), job, [dep], start, count)
    head = _job_fields(body)
    if head is None:
        return None
    up, sess, job, deps, pos = head
    if pos + _START_COUNT.size != len(body):
        return None
    start, count = _START_COUNT.unpack_from(body, pos)
    return m.ReadRequest(up, sess, job, deps, start, count)


DECODERS: Final[dict[int, Callable[[memoryview], m.Message | None]]] = {
    **{TAG_OF[c]: _fast_ack for c in _ACK_CLASSES},
    TAG_OF[m.Write]: _fast_write,
    TAG_OF[m.WriteUnwritten]: _fast_write,
    TAG_OF[m.ReadResponse]: _fast_read_response,
    TAG_OF[m.ReadRequest]: _fast_read_request,
}
