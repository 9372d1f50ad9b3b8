"""Encryption at rest: AES-256-GCM-SIV per block, done in the upstairs only.

Each write seals every block with a fresh random 12-byte nonce. The nonce and
the 16-byte tag go in the block's context, and its integrity hash is
xxh64(nonce ‖ tag ‖ ciphertext): Crucible's layout, so a downstairs checks
and stores a write without the key, and repairs copy blocks as they are.

Beyond Crucible, the associated data binds a block to where it belongs: the
volume's id (the upstairs id it is opened with, nil unless given) and the
block's index. A block a downstairs swaps with another, moves to another
offset, or copies from a volume opened with another id then fails to open,
as a block whose bytes were changed does. What a downstairs can still do
unnoticed by this check alone is serve an older sealed copy of the same
block, or say a block was never written (README, "What a downstairs can do").
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
import uuid

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

from crucible.common.buffer import Buffer
from crucible.protocol import messages as m
from crucible.protocol.integrity import sealed_hash

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_AD = struct.Struct("<16sQ")  # volume id, block index
NIL_VOLUME = uuid.UUID(int=0)


class BadKey(ValueError):
    """A key that is not base64 of exactly 32 bytes (the message says which)."""


def parse_key(text: str) -> bytes:
    """The key from its base64 form, as --key and a key file give it."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise BadKey("the key is not valid base64") from None
    if len(key) != KEY_BYTES:
        raise BadKey(f"the key is {len(key)} bytes; it must be {KEY_BYTES} (base64 of 32 bytes)")
    return key


class BlockCipher:
    """Seals and opens a volume's blocks. Holds the key: it is never printed."""

    def __init__(self, key: bytes, volume_id: uuid.UUID = NIL_VOLUME) -> None:
        if len(key) != KEY_BYTES:
            raise BadKey(f"the key is {len(key)} bytes; it must be {KEY_BYTES}")
        self._aead = AESGCMSIV(key)
        self._volume = volume_id.bytes

    def __repr__(self) -> str:
        return "BlockCipher(<key>)"

    def _ad(self, index: int) -> bytes:
        return _AD.pack(self._volume, index)

    def seal(self, start: int, data: Buffer, block_size: int) -> tuple[bytes, list[m.BlockContext]]:
        """Blocks [start, ...) of `data` sealed: the ciphertext and each block's context."""
        bs = block_size
        count = len(data) // bs
        view = memoryview(data)
        nonces = os.urandom(NONCE_BYTES * count)  # one syscall for the whole write
        out = bytearray(count * bs)
        contexts = []
        seal, ad = self._aead.encrypt, self._ad
        for i in range(count):
            nonce = nonces[i * NONCE_BYTES : (i + 1) * NONCE_BYTES]
            sealed = seal(nonce, view[i * bs : (i + 1) * bs], ad(start + i))
            ct, tag = memoryview(sealed)[:bs], sealed[bs:]
            out[i * bs : (i + 1) * bs] = ct
            ctx = m.EncryptionContext(nonce, tag)
            contexts.append(m.BlockContext(sealed_hash(nonce, tag, ct), ctx))
        return bytes(out), contexts

    def open(self, index: int, ctx: m.EncryptionContext, ciphertext: bytes | memoryview) -> bytes:
        """Block `index`'s plaintext; raises InvalidBlock if it does not verify."""
        if len(ctx.nonce) != NONCE_BYTES or len(ctx.tag) != TAG_BYTES:
            raise InvalidBlock
        try:
            return self._aead.decrypt(ctx.nonce, bytes(ciphertext) + ctx.tag, self._ad(index))
        except InvalidTag:
            raise InvalidBlock from None


class InvalidBlock(Exception):
    """A sealed block that does not open: altered, moved, or another key."""
