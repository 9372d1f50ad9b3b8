"""Blocks sealed with AES-256-GCM-SIV: Crucible's context layout, and bound to
their volume and index so a downstairs cannot swap, move or alter one."""

from __future__ import annotations

import base64
import uuid

import pytest
import xxhash

from crucible.common.errors import ErrorKind
from crucible.protocol import messages as m
from crucible.protocol.integrity import block_hash
from crucible.region.context import decode_slot, encode_slot
from crucible.upstairs.encryption import BadKey, BlockCipher, InvalidBlock, parse_key
from crucible.upstairs.verify import bad_blocks, check_read_reply

BS = 512
KEY = bytes(range(32))
VOLUME = uuid.UUID(int=7)


def sealed(start: int, data: bytes) -> tuple[bytes, list[m.BlockContext]]:
    return BlockCipher(KEY, VOLUME).seal(start, data, BS)


def read_contexts(ctxs: list[m.BlockContext]) -> list[m.ReadBlockContext]:
    return [c.encryption for c in ctxs]


def test_a_sealed_block_has_crucibles_context_and_opens_at_its_index() -> None:
    plain = b"a" * BS + b"b" * BS
    ct, ctxs = sealed(10, plain)
    assert len(ct) == len(plain) and plain[:BS] not in ct
    cipher = BlockCipher(KEY, VOLUME)
    for i, c in enumerate(ctxs):
        assert c.encryption is not None
        assert len(c.encryption.nonce) == 12 and len(c.encryption.tag) == 16
        # The downstairs checks the hash without the key.
        assert c.hash == block_hash(c, ct[i * BS : (i + 1) * BS])
        # And stores the context in its 48-byte slot as Crucible does.
        back = decode_slot(encode_slot(c, 0, 1))
        assert back is not None and back.context == c
        assert (
            cipher.open(10 + i, c.encryption, ct[i * BS : (i + 1) * BS])
            == plain[i * BS : (i + 1) * BS]
        )


def test_every_seal_takes_a_new_nonce() -> None:
    nonces: set[bytes] = set()
    for _ in range(50):
        _, ctxs = sealed(0, bytes(BS * 4))
        nonces.update(c.encryption.nonce for c in ctxs if c.encryption)
    assert len(nonces) == 200


def test_a_block_opens_nowhere_else() -> None:
    ct, ctxs = sealed(5, b"x" * BS)
    enc = ctxs[0].encryption
    assert enc is not None
    with pytest.raises(InvalidBlock):
        BlockCipher(KEY, VOLUME).open(6, enc, ct)  # moved to another index
    with pytest.raises(InvalidBlock):
        BlockCipher(KEY, uuid.UUID(int=8)).open(5, enc, ct)  # copied from another volume
    with pytest.raises(InvalidBlock):
        BlockCipher(bytes(32), VOLUME).open(5, enc, ct)  # another key
    for field in ("nonce", "tag"):
        raw = bytearray(getattr(enc, field))
        raw[3] ^= 1
        with pytest.raises(InvalidBlock):
            BlockCipher(KEY, VOLUME).open(5, enc._replace(**{field: bytes(raw)}), ct)
    flipped = bytearray(ct)
    flipped[100] ^= 0x80
    with pytest.raises(InvalidBlock):
        BlockCipher(KEY, VOLUME).open(5, enc, bytes(flipped))


def test_a_read_reply_is_opened_and_bad_blocks_named() -> None:
    cipher = BlockCipher(KEY, VOLUME)
    plain = b"p" * BS + b"q" * BS
    ct, ctxs = sealed(20, plain)
    blocks = read_contexts(ctxs)
    err, out = check_read_reply(20, 2, BS, "ds1", blocks, ct, cipher)
    assert err is None and out is not None and bytes(out) == plain
    # Two blocks swapped, data and contexts both: each opens only at its own index.
    swapped = ct[BS:] + ct[:BS]
    bad = bad_blocks(20, BS, "ds1", [blocks[1], blocks[0]], swapped, cipher)
    assert [i for i, _ in bad] == [0, 1]
    assert all(e.kind is ErrorKind.DecryptionError for _, e in bad)
    assert "block 20 from ds1 fails authentication" in str(bad[0][1])


def test_an_encrypted_volume_takes_plain_blocks_only_as_zeros() -> None:
    cipher = BlockCipher(KEY, VOLUME)
    zero_hash = xxhash.xxh64_intdigest(bytes(BS))
    err, out = check_read_reply(0, 2, BS, "ds", [None, zero_hash], bytes(2 * BS), cipher)
    assert err is None and out is not None and bytes(out) == bytes(2 * BS)
    forged = b"f" * BS  # what a downstairs without the key could make up
    err, _ = check_read_reply(0, 1, BS, "ds", [xxhash.xxh64_intdigest(forged)], forged, cipher)
    assert err is not None and err.kind is ErrorKind.DecryptionError
    assert "not encrypted" in str(err)


def test_keys_are_checked_and_never_shown() -> None:
    good = base64.b64encode(KEY).decode()
    assert parse_key(good + "\n") == KEY
    for text, why in [
        ("not base64!", "not valid base64"),
        (base64.b64encode(b"k" * 16).decode(), "16 bytes"),
    ]:
        with pytest.raises(BadKey, match=why):
            parse_key(text)
    assert good not in repr(BlockCipher(KEY)) and str(KEY) not in repr(BlockCipher(KEY))
