"""The wire codec: Crucible's test vectors, round trips of every message, framing."""

from __future__ import annotations

import mmap
import random
import uuid
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from crucible.common.errors import CrucibleError, ErrorKind, NegotiationKind
from crucible.libc import address
from crucible.protocol import codec, fastpath, fields, framing
from crucible.protocol import messages as m
from crucible.protocol.framing import FrameDecoder
from crucible.protocol.wire import ProtocolError, Reader, uuid_bytes
from tests.protocol.strategies import message_strategy, messages

UID = uuid.UUID("01020304-0506-0708-090a-0b0c0d0e0f10")
UID2 = uuid.UUID("a0a1a2a3-a4a5-a6a7-a8a9-aaabacadaeaf")


def body(msg: Any) -> bytes:
    frame = codec.encode(msg)
    assert int.from_bytes(frame[:4], "little") == len(frame)  # length counts itself
    return frame[4:]


def assert_same_fields(a: Any, b: Any) -> None:
    """Two messages hold the same values (bulk data compared as bytes)."""
    for name in type(b).__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(y, bytes | bytearray | memoryview):
            assert bytes(x) == bytes(y), name
        else:
            assert x == y, name


def test_here_i_am_vector() -> None:
    msg = m.HereIAm(123, UID, UID, 567, True, False, [8, 9])
    expected = (
        "00000000"
        "7b000000"
        "1000000000000000"
        + UID.bytes.hex()
        + "1000000000000000"
        + UID.bytes.hex()
        + "3702000000000000"
        "01"
        "00"
        "0200000000000000"
        "08000000"
        "09000000"
    )
    assert body(msg).hex() == expected


def test_yes_its_me_vector() -> None:
    assert body(m.YesItsMe(123, ("127.0.0.1", 123))).hex() == "010000007b000000000000007f0000017b00"


def test_version_mismatch_vector() -> None:
    assert body(m.VersionMismatch(0x3456)).hex() == "0200000056340000"


def test_encrypted_read_block_context_is_32_bytes() -> None:
    ctx = m.EncryptionContext(bytes(range(12)), bytes(range(100, 116)))
    out = bytearray()
    fields.put_read_block_context(out, ctx)
    assert len(out) == 32
    assert out.hex() == "01000000" + bytes(range(12)).hex() + bytes(range(100, 116)).hex()


def test_bulk_write_is_header_then_raw_data() -> None:
    data = bytes(range(256)) * 2
    msg = m.Write(UID, UID, 1000, [999], 7, [m.BlockContext(5)], data)
    parts = codec.encode_parts(msg)
    assert len(parts) == 2 and parts[1] is data
    header = bytes(parts[0])
    assert header[-8:] == len(data).to_bytes(8, "little")  # Bytes: u64 length, then raw


@pytest.mark.parametrize("cls", m.MESSAGE_TYPES, ids=lambda c: c.__name__)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_every_message_round_trips(cls: type, data: st.DataObject) -> None:
    msg = data.draw(message_strategy(cls))
    frame = codec.encode(msg)
    dec = FrameDecoder()
    dec.feed(frame)
    out = dec.next_message()
    assert out is not None
    assert type(out) is cls
    assert_same_fields(out, msg)
    assert codec.encode(out) == frame
    assert dec.next_message() is None


@settings(max_examples=50, deadline=None)
@given(st.lists(messages, min_size=1, max_size=5), st.integers(1, 50))
def test_stream_split_anywhere(msgs: list[Any], chunk: int) -> None:
    stream = b"".join(codec.encode(x) for x in msgs)
    dec = FrameDecoder()
    out = []
    for i in range(0, len(stream), chunk):
        dec.feed(stream[i : i + chunk])
        while (x := dec.next_message()) is not None:
            out.append(x)
    assert [codec.encode(x) for x in out] == [codec.encode(x) for x in msgs]


def _decode_all(data: bytes) -> None:
    dec = FrameDecoder()
    dec.feed(data)
    while dec.next_message() is not None:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_decoder(data: bytes) -> None:
    try:
        _decode_all(data)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(messages, st.data())
def test_mutated_frames_never_crash_decoder(msg: Any, data: st.DataObject) -> None:
    frame = bytearray(codec.encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    try:
        _decode_all(bytes(frame[:cut]))
    except ProtocolError:
        pass


def _receive(dec: FrameDecoder, stream: bytes, chunks: list[int]) -> list[Any]:
    """Hand `stream` to the decoder as a BufferedProtocol's socket does: into
    the buffer it offers, at most `chunks[i]` bytes at a time (in turn)."""
    out, i, k = [], 0, 0
    while i < len(stream):
        buf = dec.get_buffer()
        n = min(len(buf), chunks[k % len(chunks)], len(stream) - i)
        buf[:n] = stream[i : i + n]
        dec.advance(n)
        i, k = i + n, k + 1
        while (x := dec.next_message()) is not None:
            out.append(x)
    return out


def _write(job: int, nblocks: int, fill: int) -> m.Write:
    data = bytes([fill]) * (4096 * nblocks)
    ctxs = [m.BlockContext(job + b) for b in range(nblocks)]
    return m.Write(UID, UID2, job, [job - 1], 3, ctxs, data)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(1, 300), min_size=1, max_size=4),
    st.lists(st.integers(1, 1 << 18), min_size=1, max_size=5),
)
@example(sizes=[32], chunks=[131464])  # a whole 128 KiB frame in one receive
def test_large_frames_land_in_their_own_aligned_buffers(
    sizes: list[int], chunks: list[int]
) -> None:
    """Writes of 4 KiB to 1.2 MiB, received in pieces of any size: each comes
    out whole, and the data of every frame of OWN_FRAME_MIN bytes or more
    starts on a page (the downstairs hands it to O_DIRECT as it is)."""
    msgs = [_write(1000 + i, n, i) for i, n in enumerate(sizes)]
    stream = b"".join(codec.encode(x) for x in msgs)
    out = _receive(FrameDecoder(), stream, chunks)
    assert [codec.encode(x) for x in out] == [codec.encode(x) for x in msgs]
    for x in out:
        if len(codec.encode(x)) >= framing.OWN_FRAME_MIN:
            assert address(x.data) % mmap.PAGESIZE == 0


def test_feed_completes_a_large_frame_begun_in_its_own_buffer() -> None:
    """Bytes fed while a large frame is in its own buffer fill that frame first;
    what follows it is the next frame."""
    big, small = codec.encode(_write(7, 64, 1)), codec.encode(m.VersionMismatch(13))
    dec = FrameDecoder()
    dec.feed(big[:1000])
    assert _receive(dec, big[1000:5000], [4000]) == []  # moved to its own buffer here
    dec.feed(big[5000:] + small)
    got = dec.next_message()
    assert isinstance(got, m.Write) and codec.encode(got) == big
    assert dec.next_message() == m.VersionMismatch(13)
    assert dec.next_message() is None


def test_bytes_after_a_large_frame_not_yet_taken_go_to_the_next_frame() -> None:
    """Receiving goes on while a whole large frame waits to be taken (its
    owner not ready yet): never into an empty buffer, and in order."""
    big, small = codec.encode(_write(7, 64, 1)), codec.encode(m.VersionMismatch(13))
    stream, i, dec = big + small + big, 0, FrameDecoder()
    while i < len(stream):  # nothing taken meanwhile
        buf = dec.get_buffer()
        assert len(buf) > 0
        n = min(len(buf), 50_000, len(stream) - i)
        buf[:n] = stream[i : i + n]
        dec.advance(n)
        i += n
    out = []
    while (x := dec.next_message()) is not None:
        out.append(codec.encode(x))
    assert out == [big, small, big]


def test_after_a_large_frame_the_next_receive_takes_a_length_only() -> None:
    """So a large frame that follows lands in its own buffer whole, none of
    it copied from the shared one; a small one after it comes as before."""
    big, small = codec.encode(_write(7, 64, 1)), codec.encode(m.VersionMismatch(13))
    stream, i, dec = big + big + small, 0, FrameDecoder()
    offers, out = [], []
    while i < len(stream):  # a socket that always has what is offered
        buf = dec.get_buffer()
        offers.append(len(buf))
        n = min(len(buf), len(stream) - i)
        buf[:n] = stream[i : i + n]
        dec.advance(n)
        i += n
        while (x := dec.next_message()) is not None:
            out.append(codec.encode(x))
    assert out == [big, big, small]
    assert offers[2:5] == [4, len(big) - 4, 4]
    assert len(offers) == 6


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 1 << 17), min_size=1, max_size=6))
def test_owed_is_the_rest_of_the_frame_being_received(chunks: list[int]) -> None:
    """What a receive may wait for (a server's SO_RCVLOWAT), before and
    after any receive: never more than the rest of the frame coming, which
    its peer has committed to send; all of that rest while a large frame is
    received into its own buffer; else 1."""
    big, small = codec.encode(_write(7, 64, 1)), codec.encode(m.VersionMismatch(13))
    stream, i, k, dec = big + small + big, 0, 0, FrameDecoder()
    ends = [len(big), len(big) + len(small), len(stream)]
    waited = []
    while i < len(stream):
        buf = dec.get_buffer()
        rest = next(e for e in ends if e > i) - i
        assert dec.owed() in (1, rest)
        if dec.owed() > 1:
            assert len(buf) == rest  # its own buffer, offered whole
            waited.append(rest)
        n = min(len(buf), chunks[k % len(chunks)], len(stream) - i)
        buf[:n] = stream[i : i + n]
        dec.advance(n)
        i, k = i + n, k + 1
        if i < len(stream):
            assert dec.owed() in (1, next(e for e in ends if e > i) - i)
        while dec.next_message() is not None:
            pass
    assert dec.owed() == 1
    assert waited  # a large frame was waited for whole at least once


def test_frames_over_own_frame_max_grow_with_the_data() -> None:
    """A claim larger than OWN_FRAME_MAX gets no buffer of its size up front."""
    dec = FrameDecoder()
    claim = (framing.OWN_FRAME_MAX + 1).to_bytes(4, "little") + bytes(100)
    assert _receive(dec, claim, [1 << 20]) == []
    assert len(dec.get_buffer()) < 2 * framing.SIZE


def test_oversized_frame_refused() -> None:
    dec = FrameDecoder()
    dec.feed((m.MAX_FRAME_LEN + 1).to_bytes(4, "little") + b"\0" * 8)
    with pytest.raises(ProtocolError, match="exceeds"):
        dec.next_message()


def test_short_length_refused() -> None:
    dec = FrameDecoder()
    dec.feed((3).to_bytes(4, "little"))
    with pytest.raises(ProtocolError):
        dec.next_message()


def test_truncated_frame_waits_for_more() -> None:
    frame = codec.encode(m.VersionMismatch(13))
    dec = FrameDecoder()
    dec.feed(frame[:-1])
    assert dec.next_message() is None
    dec.feed(frame[-1:])
    assert dec.next_message() == m.VersionMismatch(13)


def test_unknown_variant_and_trailing_bytes_refused() -> None:
    for payload in (b"\x63\0\0\0", b"\x09\0\0\0" + b"x"):  # tag 99; Ruok + junk
        dec = FrameDecoder()
        dec.feed((len(payload) + 4).to_bytes(4, "little") + payload)
        with pytest.raises(ProtocolError):
            dec.next_message()


def test_huge_sequence_length_refused_without_allocating() -> None:
    payload = b"\x22\0\0\0" + UID.bytes.rjust(24, b"\0")  # Barrier with nonsense lengths
    dec = FrameDecoder()
    dec.feed((len(payload) + 4).to_bytes(4, "little") + payload)
    with pytest.raises(ProtocolError):
        dec.next_message()


def test_ack_layout_byte_for_byte() -> None:
    """Acks take a packed shortcut; their bytes must be plain bincode all the same."""
    import struct

    for cls in (m.WriteAck, m.FlushAck, m.BarrierAck, m.WriteUnwrittenAck, m.TrimAck):
        tag = m.MESSAGE_TYPES.index(cls)
        body = (
            struct.pack("<IQ", tag, 16)
            + UID.bytes
            + struct.pack("<Q", 16)
            + UID.bytes
            + struct.pack("<QI", 1234, 0)
        )
        assert codec.encode(cls(UID, UID, 1234, None)) == struct.pack("<I", 4 + len(body)) + body


def test_plain_read_response_layout_byte_for_byte() -> None:
    import struct

    tag = m.MESSAGE_TYPES.index(m.ReadResponse)
    data = b"xy" * 8
    body = (
        struct.pack("<IQ", tag, 16)
        + UID.bytes
        + struct.pack("<Q", 16)
        + UID.bytes
        + struct.pack("<QIQ", 9, 0, 2)  # job, Ok, two contexts
        + struct.pack("<IQ", 2, 77)
        + struct.pack("<IQ", 2, 88)  # Unencrypted{hash}
        + struct.pack("<Q", len(data))
        + data
    )
    frame = struct.pack("<I", 4 + len(body)) + body
    assert codec.encode(m.ReadResponse(UID, UID, 9, [77, 88], data)) == frame
    dec = FrameDecoder()
    dec.feed(frame)
    out = dec.next_message()
    assert isinstance(out, m.ReadResponse) and out.blocks == [77, 88] and bytes(out.data) == data


def test_packed_request_encodings_match_the_schema() -> None:
    """Read requests, and writes and read replies with plain contexts, are packed
    by hand; their frames must be exactly what the field-by-field encoder makes,
    and decode back."""
    msgs: list[m.Message] = [
        m.ReadRequest(UID, UID, 1001, [], 5, 1),
        m.ReadRequest(UID, UID, 1002, [1000, 1001, 999], 1 << 40, 256),
        m.Write(
            UID, UID, 1003, [1002], 7, [m.BlockContext(1), m.BlockContext(2**64 - 1)], b"ab" * 8
        ),
        m.WriteUnwritten(UID, UID, 1004, [], 0, [m.BlockContext(9)], b"z" * 8),
        m.Write(UID, UID, 1005, [], 0, [], b""),
        m.ReadResponse(UID, UID, 1006, [], b""),
        m.ReadResponse(UID, UID, 1007, [1, 2**64 - 1, 3], b"q" * 24),
        m.ReadResponse(UID, UID, 1008, [None, 5], b"r" * 16),  # not packed: the schema path
        m.WriteAck(UID, UID, 1009, CrucibleError(ErrorKind.IoError, "disk")),  # likewise
    ]
    for msg in msgs:
        assert codec.encode(msg) == b"".join(codec.encode_schema(msg)), msg
        dec = FrameDecoder()
        dec.feed(codec.encode(msg))
        out = dec.next_message()
        assert out is not None and codec.encode(out) == codec.encode(msg)


@pytest.mark.parametrize("cls", m.MESSAGE_TYPES, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fast_paths_agree_with_the_schema(cls: type, data: st.DataObject) -> None:
    """Whatever a hand-packed encoder or decoder accepts, it turns into exactly
    the bytes and the message the schema codec does (messages drawn mostly in
    the plain shapes the fast paths take)."""
    msg = data.draw(message_strategy(cls, plain_bias=True))
    frame = codec.encode(msg)
    assert frame == b"".join(codec.encode_schema(msg))
    body_ = memoryview(frame)[4:]
    fast, slow = codec.decode_body(body_), codec.decode_schema(body_)
    assert type(fast) is type(slow) is cls
    assert_same_fields(fast, slow)


@pytest.mark.parametrize(
    "msg",
    [
        m.ReadRequest(UID, UID2, 1001, [1000], 77, 1),
        m.ReadRequest(UID, UID2, 1001, [], 77, 1),
        m.ReadRequest(UID, UID2, 1001, [998, 1000], 77, 2),
        m.ReadResponse(UID, UID2, 1001, [0xFEDCBA9876543210], b"x" * 512),
        m.ReadResponse(UID, UID2, 1001, [None], bytes(512)),
        m.ReadResponse(UID, UID2, 1001, [5, 6], b"y" * 1024),
    ],
    ids=["read-1-dep", "read-0-deps", "read-2-deps", "reply-1-hash", "reply-1-empty", "reply-2"],
)
def test_the_one_unpack_shapes_decode_as_the_schema_does(msg: m.Message) -> None:
    """A read with one dependency and a reply of one plain block are packed
    and unpacked in one go; they, and the shapes beside them, give the
    schema's bytes and message. A frame one byte short or long is not taken
    by the fast path."""
    frame = codec.encode(msg)
    assert frame == b"".join(codec.encode_schema(msg))
    body_ = memoryview(frame)[4:]
    fast, slow = codec.decode_body(body_), codec.decode_schema(body_)
    assert type(fast) is type(slow) is type(msg)
    assert_same_fields(fast, slow)
    assert_same_fields(fast, msg)
    decoder = fastpath.DECODERS[int.from_bytes(body_[:4], "little")]
    assert decoder(memoryview(bytes(body_) + b"\0")) is None
    assert decoder(body_[:-1]) is None


# Crucible's NegotiationError, as bincode lays it out (common/src/lib.rs):
# CrucibleError tag 41, then the NegotiationError tag, then its fields.
NEGOTIATION_VECTORS = [
    ((NegotiationKind.OutOfOrder,), "2900000000000000"),
    (
        (NegotiationKind.GenerationNumberTooLow, 3, 9),
        "290000000200000003000000000000000900000000000000",
    ),
    ((NegotiationKind.IncompatibleVersion, 13, 12), "29000000030000000d0000000c000000"),
    ((NegotiationKind.EncryptionMismatch, True, False), "29000000040000000100"),
    ((NegotiationKind.ReadOnlyMismatch, False, True), "29000000050000000001"),
    (
        (NegotiationKind.UpstairsIdMismatch, UID, UID2),
        "29000000060000001000000000000000" + UID.hex + "1000000000000000" + UID2.hex,
    ),
    (
        (NegotiationKind.SessionIdMismatch, UID2, UID),
        "29000000070000001000000000000000" + UID2.hex + "1000000000000000" + UID.hex,
    ),
]


@pytest.mark.parametrize("values,hexed", NEGOTIATION_VECTORS, ids=lambda v: str(v))
def test_negotiation_error_vectors(values: tuple[Any, ...], hexed: str) -> None:
    err = CrucibleError(ErrorKind.NegotiationError, values=(int(values[0]), *values[1:]))
    out = bytearray()
    fields.encode_error(out, err)
    assert out.hex() == hexed
    assert fields.decode_error(Reader(memoryview(bytes(out)))) == err
    # And inside a message, both ways.
    msg = m.ErrorReport(UID, UID2, 1000, err)
    dec = FrameDecoder()
    dec.feed(codec.encode(msg))
    assert dec.next_message() == msg


def test_negotiation_error_without_its_payload_is_refused() -> None:
    with pytest.raises(ValueError, match="needs two values"):
        fields.encode_error(
            bytearray(),
            CrucibleError(
                ErrorKind.NegotiationError, values=(int(NegotiationKind.ReadOnlyMismatch),)
            ),
        )


def test_sealed_and_unwritten_contexts_take_the_fast_paths() -> None:
    """A write and a read reply whose every block is sealed are packed by
    hand both ways, as plain ones are (an encrypted volume's whole traffic);
    so is a read reply of blocks never written (a new disk's)."""
    enc = m.EncryptionContext(bytes(range(12)), bytes(range(16)))
    write = m.Write(UID, UID2, 1000, [999], 7, [m.BlockContext(5, enc)] * 2, b"x" * 1024)
    reply = m.ReadResponse(UID, UID2, 1000, [enc, enc], b"y" * 1024)
    unwritten = m.ReadResponse(UID, UID2, 1001, [None, None, None], bytes(1536))
    for msg in (write, reply, unwritten):
        parts = fastpath.ENCODERS[type(msg)](msg, fastpath.TAG_OF[type(msg)])
        assert parts is not None, type(msg).__name__
        frame = b"".join(parts)
        assert frame == b"".join(codec.encode_schema(msg))
        decoded = fastpath.DECODERS[fastpath.TAG_OF[type(msg)]](memoryview(frame)[4:])
        assert decoded is not None
        assert_same_fields(decoded, msg)


def test_uuid_bytes_are_right_for_whichever_uuid_comes() -> None:
    """The encoder keeps the bytes of the last two UUIDs it saw: a third,
    or the two in any order, still get their own."""
    rng = random.Random(7)
    ids = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(3)]
    for i in [0, 1, 0, 1, 2, 0, 2, 1, 1, 0] + [rng.randrange(3) for _ in range(200)]:
        assert uuid_bytes(ids[i]) == ids[i].bytes
