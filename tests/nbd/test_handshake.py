"""The NBD handshake as a pure state machine: bytes in, replies out, no sockets."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crucible.nbd import protocol as p
from crucible.nbd.handshake import ExportInfo, Handshake, HandshakeError, Negotiated

EXPORT = ExportInfo("vol", 1 << 30, p.FLAG_HAS_FLAGS | p.FLAG_SEND_FLUSH, "a volume", 4096, 1 << 25)
FLAGS = struct.pack(">I", p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES)


def option(opt: int, data: bytes = b"") -> bytes:
    return p.OPTION_HEADER.pack(p.IHAVEOPT, opt, len(data)) + data


def go_payload(name: str = "", infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_payload(name: str, *queries: str) -> bytes:
    out = struct.pack(">I", len(name)) + name.encode() + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Option replies as (option, reply type, payload)."""
    out = []
    pos = 0
    while pos < len(data):
        magic, opt, rep, length = struct.unpack_from(">QIII", data, pos)
        assert magic == p.REPLY_MAGIC
        out.append((opt, rep, data[pos + 20 : pos + 20 + length]))
        pos += 20 + length
    return out


def start() -> Handshake:
    hs = Handshake(EXPORT)
    assert hs.data_to_send() == p.server_greeting()
    return hs


def feed(hs: Handshake, data: bytes) -> int:
    return hs.receive(memoryview(data))


def test_go_with_structured_replies_and_allocation() -> None:
    hs = start()
    stream = (
        FLAGS
        + option(p.Opt.STRUCTURED_REPLY)
        + option(p.Opt.SET_META_CONTEXT, meta_payload("", "base:allocation"))
        + option(p.Opt.GO, go_payload("vol", (p.Info.BLOCK_SIZE, p.Info.NAME)))
    )
    assert feed(hs, stream + b"request bytes") == len(stream)  # transmission is not ours
    assert hs.result == Negotiated(structured=True, allocation=True)
    got = replies(hs.data_to_send())
    assert [(o, r) for o, r, _ in got] == [
        (p.Opt.STRUCTURED_REPLY, p.Rep.ACK),
        (p.Opt.SET_META_CONTEXT, p.Rep.META_CONTEXT),
        (p.Opt.SET_META_CONTEXT, p.Rep.ACK),
        (p.Opt.GO, p.Rep.INFO),
        (p.Opt.GO, p.Rep.INFO),
        (p.Opt.GO, p.Rep.INFO),
        (p.Opt.GO, p.Rep.ACK),
    ]
    assert got[1][2] == struct.pack(">I", p.ALLOCATION_CONTEXT_ID) + b"base:allocation"
    assert got[3][2] == p.info_export(EXPORT.size, EXPORT.flags)
    assert got[4][2] == p.info_name("vol")
    assert got[5][2] == p.info_block_size(1, 4096, 1 << 25)


def test_export_name_and_zero_padding() -> None:
    for flags, pad in ((p.FLAG_FIXED_NEWSTYLE, 124), (p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES, 0)):
        hs = start()
        feed(hs, struct.pack(">I", flags) + option(p.Opt.EXPORT_NAME, b"vol"))
        assert hs.result == Negotiated(structured=False, allocation=False)
        assert hs.data_to_send() == struct.pack(">QH", EXPORT.size, EXPORT.flags) + bytes(pad)


def test_option_answers_and_errors_keep_the_handshake_going() -> None:
    hs = start()
    feed(hs, FLAGS)
    cases = [
        (option(99), p.Rep.ERR_UNSUP),
        (option(p.Opt.STARTTLS), p.Rep.ERR_POLICY),
        (option(p.Opt.LIST, b"junk"), p.Rep.ERR_INVALID),
        (option(p.Opt.GO, b"\x00\x00\x00\xff"), p.Rep.ERR_INVALID),
        (option(p.Opt.INFO, go_payload("nope")), p.Rep.ERR_UNKNOWN),
        (option(p.Opt.SET_META_CONTEXT, meta_payload("", "base:allocation")), p.Rep.ERR_INVALID),
        (option(p.Opt.STRUCTURED_REPLY, b"x"), p.Rep.ERR_INVALID),
    ]
    for data, expected in cases:
        feed(hs, data)
        (reply,) = replies(hs.data_to_send())
        assert reply[1] == expected, data
        assert hs.result is None
    feed(hs, option(p.Opt.LIST))
    got = replies(hs.data_to_send())
    assert [r for _, r, _ in got] == [p.Rep.SERVER, p.Rep.ACK]
    assert got[0][2] == struct.pack(">I", 3) + b"vol"
    feed(hs, option(p.Opt.INFO, go_payload()))  # INFO answers, then more options
    assert replies(hs.data_to_send())[-1][1] == p.Rep.ACK and hs.result is None
    feed(hs, option(p.Opt.ABORT))
    assert replies(hs.data_to_send()) == [(p.Opt.ABORT, p.Rep.ACK, b"")]
    assert hs.result is False


def test_list_meta_context_does_not_select() -> None:
    hs = start()
    feed(
        hs,
        FLAGS + option(p.Opt.STRUCTURED_REPLY) + option(p.Opt.LIST_META_CONTEXT, meta_payload("")),
    )
    got = replies(hs.data_to_send())
    assert got[1] == (p.Opt.LIST_META_CONTEXT, p.Rep.META_CONTEXT, bytes(4) + b"base:allocation")
    feed(hs, option(p.Opt.GO, go_payload()))
    assert hs.result == Negotiated(structured=True, allocation=False)


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xff\xff\xff",  # unknown client flags
        struct.pack(">I", 0),  # not fixed newstyle
        FLAGS + b"NOTMAGIC" + bytes(8),
        FLAGS + p.OPTION_HEADER.pack(p.IHAVEOPT, 99, 1 << 30),  # absurd length: at once
        FLAGS + option(p.Opt.EXPORT_NAME, b"other"),
    ],
)
def test_protocol_breaks_end_the_connection(data: bytes) -> None:
    hs = start()
    with pytest.raises(HandshakeError):
        feed(hs, data)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 40), max_size=30))
def test_any_split_of_the_stream_gives_the_same_answers(cuts: list[int]) -> None:
    stream = (
        FLAGS
        + option(99, b"x" * 50)
        + option(p.Opt.STRUCTURED_REPLY)
        + option(p.Opt.SET_META_CONTEXT, meta_payload("vol", "base:allocation"))
        + option(p.Opt.GO, go_payload("", (p.Info.DESCRIPTION,)))
    )
    whole = start()
    feed(whole, stream)
    expected = whole.data_to_send()
    hs = start()
    pending = b""
    pos = 0
    for n in [*cuts, len(stream)]:
        pending += stream[pos : pos + n]
        pos += n
        pending = pending[feed(hs, pending) :]
    assert pending == b""
    assert hs.data_to_send() == expected
    assert hs.result == whole.result == Negotiated(structured=True, allocation=True)
