"""An encrypted volume on three real downstairs: nothing readable on disk, and
a downstairs that swaps, moves or alters sealed blocks (keeping its own
hashes and flush numbers consistent, as a malicious one would) is caught on
read, named, and the guest served from a good replica."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from crucible.common.errors import CrucibleError
from crucible.protocol import messages as m
from crucible.protocol.integrity import block_hash
from crucible.region.layout import extent_path
from crucible.region.region import Region
from crucible.upstairs.encryption import BlockCipher
from crucible.upstairs.guest import Upstairs
from crucible.upstairs.options import Options
from tests.support import Cluster, cluster, run_cli, run_tool, until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

KEY = os.urandom(32)
VOLUME = uuid.UUID(int=0x5EC)
BS = 512


def opts(key: bytes = KEY, volume: uuid.UUID = VOLUME, **kw: bool) -> Options:
    return Options(cipher=BlockCipher(key, volume), **kw)


def block(i: int) -> bytes:
    return f"plaintext block {i:04d} ".encode().ljust(BS, b".")


async def with_upstairs(
    c: Cluster, body: Callable[[Upstairs], Awaitable[None]], gen: int, o: Options
) -> None:
    async with Upstairs(c.targets, o, VOLUME) as up:
        await up.activate(gen)
        await body(up)
        await up.deactivate()


def write_blocks(c: Cluster, first: int, n: int) -> None:
    async def body(up: Upstairs) -> None:
        await up.write(first, b"".join(block(first + i) for i in range(n)))
        await up.flush()

    asyncio.run(with_upstairs(c, body, 1, opts()))


def tamper(c: Cluster, replica: int, change: Callable[[Region], None]) -> None:
    """Change a stopped replica's blocks as its downstairs could: hashes
    recomputed, flush and generation numbers kept, nothing left dirty."""
    c.stop(replica)
    region = Region.open(c.regions[replica])
    gens, flushes, _ = region.extent_versions()
    change(region)
    region.flush(max(flushes), max(gens))
    region.close()
    c.start(replica)


def sealed(region: Region, i: int) -> tuple[m.EncryptionContext, bytes]:
    ctxs, data = region.read(i, 1)
    assert isinstance(ctxs[0], m.EncryptionContext)
    return ctxs[0], bytes(data)


def put(region: Region, i: int, enc: m.EncryptionContext, data: bytes | bytearray) -> None:
    region.write(i, [m.BlockContext(block_hash(m.BlockContext(0, enc), data), enc)], data)


def swap(a: int, b: int) -> Callable[[Region], None]:
    def change(region: Region) -> None:
        (ea, da), (eb, db) = sealed(region, a), sealed(region, b)
        put(region, a, eb, db)
        put(region, b, ea, da)

    return change


def flip_nonce(*blocks: int) -> Callable[[Region], None]:
    def change(region: Region) -> None:
        for i in blocks:
            enc, data = sealed(region, i)
            nonce = bytearray(enc.nonce)
            nonce[0] ^= 1
            put(region, i, enc._replace(nonce=bytes(nonce)), data)

    return change


def served_and_mended(c: Cluster, first: int, n: int, caplog: pytest.LogCaptureFixture) -> None:
    """Reads give the guest the right blocks while the bad replica is found
    (every read goes to all three) and rewritten from a good copy."""

    async def body(up: Upstairs) -> None:
        for _ in range(3):
            assert await up.read(first, n) == b"".join(block(first + i) for i in range(n))
        await until(lambda: up.info().blocks_rewritten >= 2, "the bad blocks rewritten")
        assert up.info().integrity_errors >= 2

    with caplog.at_level(logging.INFO, logger="crucible"):
        asyncio.run(with_upstairs(c, body, 2, opts(read_all_replicas=True)))


def test_nothing_plain_on_disk_and_the_downstairs_checks_without_the_key(tmp_path: Path) -> None:
    with cluster(tmp_path, "--encrypted") as c:
        write_blocks(c, 95, 10)  # across an extent boundary
        c.stop()
        for region in c.regions:
            for f in region.rglob("*"):
                if f.is_file():
                    assert b"plaintext block" not in f.read_bytes(), f
            assert run_cli("verify", "-d", str(region)).returncode == 0
        assert c.dump().returncode == 0  # the three replicas hold the same
        c.start()

        async def body(up: Upstairs) -> None:
            assert await up.read(95, 10) == b"".join(block(95 + i) for i in range(10))
            assert await up.read(0, 2) == bytes(2 * BS)  # never written

        asyncio.run(with_upstairs(c, body, 2, opts()))


def test_swapped_blocks_are_refused_named_and_mended(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with cluster(tmp_path, "--encrypted") as c:
        write_blocks(c, 205, 2)
        tamper(c, 1, swap(205, 206))
        served_and_mended(c, 205, 2, caplog)
        named = [r.getMessage() for r in caplog.records if "fails authentication" in r.getMessage()]
        assert named and "block 205" in named[0] and c.target_args()[3] in named[0]
        c.stop()
        # The mended copy is the others', nonce for nonce.
        copies = []
        for path in c.regions:
            region = Region.open(path, read_only=True)
            copies.append(region.read(205, 2))
            region.close()
        assert copies[0] == copies[1] == copies[2]
        c.start()


def test_an_altered_nonce_is_refused_and_mended(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with cluster(tmp_path, "--encrypted") as c:
        write_blocks(c, 40, 2)
        tamper(c, 2, flip_nonce(40, 41))
        served_and_mended(c, 40, 2, caplog)


def test_a_wrong_key_or_volume_id_reads_nothing(tmp_path: Path) -> None:
    with cluster(tmp_path, "--encrypted") as c:
        write_blocks(c, 10, 1)

        async def body(up: Upstairs) -> None:
            with pytest.raises(CrucibleError) as e:
                await up.read(10, 1)
            assert "fails authentication" in str(e.value)
            assert await up.read(11, 1) == bytes(BS)  # never written: zeros, as before

        asyncio.run(with_upstairs(c, body, 2, opts(key=os.urandom(32))))
        asyncio.run(with_upstairs(c, body, 3, opts(volume=uuid.uuid4())))


def test_keys_and_regions_must_agree(tmp_path: Path) -> None:
    """An encrypted region refuses an upstairs without a key, and a plain
    one an upstairs with a key: one clear line, both sides."""
    key_file = tmp_path / "key"
    key_file.write_text("QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY=\n")
    for create, flags, said, ds_said in [
        (
            ("--encrypted",),
            (),
            "holds an encrypted region: give its key",
            "the upstairs has no key, and this region is encrypted",
        ),
        (
            (),
            ("--key-file", str(key_file)),
            "holds a region that is not encrypted",
            "the upstairs has a key, and this region is not encrypted",
        ),
    ]:
        with cluster(tmp_path / ("enc" if create else "plain"), *create) as c:
            r = run_tool("crucible", *c.target_args(), *flags, timeout=120)
            assert r.returncode != 0
            lines = [ln for ln in r.stderr.splitlines() if said in ln]
            assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
            d = c.ds[0]
            assert d is not None
            deadline = time.monotonic() + 30
            while ds_said not in d.output():
                assert time.monotonic() < deadline, d.output()
                time.sleep(0.05)


def test_an_extent_file_copied_back_is_repaired_at_activation(tmp_path: Path) -> None:
    """A replica's whole extent file put back from earlier (its own flush
    numbers with it) is older than the others: activation copies theirs."""
    with cluster(tmp_path, "--encrypted") as c:
        write_blocks(c, 305, 1)
        c.stop(1)
        saved = (extent_path(c.regions[1], 3)).read_bytes()
        c.start(1)

        async def newer(up: Upstairs) -> None:
            await up.write(305, b"n" * BS)
            await up.flush()

        asyncio.run(with_upstairs(c, newer, 2, opts()))
        c.stop(1)
        extent_path(c.regions[1], 3).write_bytes(saved)
        c.start(1)

        async def reads(up: Upstairs) -> None:
            assert await up.read(305, 1) == b"n" * BS  # from all three, compared

        asyncio.run(with_upstairs(c, reads, 3, opts(read_all_replicas=True)))


def test_a_block_rolled_back_in_place_is_found_by_the_verify(tmp_path: Path) -> None:
    """A downstairs that serves an older sealed copy of a block, keeping its
    flush numbers current, passes every per-block check; the verify of the
    replicas finds it (its nonce is not the others') and rewrites it."""
    with cluster(tmp_path, "--encrypted") as c:
        write_blocks(c, 77, 1)
        c.stop(0)
        region = Region.open(c.regions[0], read_only=True)
        old = sealed(region, 77)
        region.close()
        c.start(0)

        async def newer(up: Upstairs) -> None:
            await up.write(77, b"n" * BS)
            await up.flush()

        asyncio.run(with_upstairs(c, newer, 2, opts()))
        tamper(c, 0, lambda r: put(r, 77, *old))

        async def verify(up: Upstairs) -> None:
            status = await up.verify_replicas()
            assert status.divergent == 1 and status.unresolved == 0
            await until(lambda: up.info().blocks_rewritten >= 1, "the old copy rewritten")
            for _ in range(3):
                assert await up.read(77, 1) == b"n" * BS

        asyncio.run(with_upstairs(c, verify, 3, opts()))
