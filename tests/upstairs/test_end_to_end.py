"""The upstairs against three real downstairs processes: the seed client,
crutest with its verify log across restarts, and the IO rules a guest sees."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from crucible.common.errors import CrucibleError, ErrorKind
from crucible.region.layout import extent_path
from crucible.upstairs.guest import Upstairs
from crucible.upstairs.options import Options
from tests.support import Cluster, cluster, free_port, run_cli, run_tool, until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_seed_client_twice(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        for _ in range(2):  # the second run must pick a higher generation itself
            r = run_tool("crucible", *c.target_args())
            assert r.returncode == 0, r.stdout + r.stderr
            out = r.stdout
            assert "all Tests done" in out
            for text in (
                "connecting to",
                "ok, connected to",
                "bs:512 es:100 ec:15",
                "CONNECTED ######## 3/3",
                "gw_id:",
                "ds_id:",
                "retired",
                "writing 1024 bytes at offset 50688",
            ):
                assert text in out, text
        assert c.dump().returncode == 0


def test_crutest_verify_across_restart(tmp_path: Path) -> None:
    log = tmp_path / "verify.json"
    with cluster(tmp_path) as c:
        r = run_tool(
            "crutest",
            "generic",
            *c.target_args(),
            "-q",
            "--count",
            "400",
            "--seed",
            "7",
            "--verify-out",
            str(log),
        )
        assert r.returncode == 0, r.stdout + r.stderr
        c.stop()
        c.start()
        r = run_tool("crutest", "verify", *c.target_args(), "-q", "--verify-in", str(log))
        assert r.returncode == 0, r.stdout + r.stderr
        # Other workloads keep the log valid.
        for workload in ("fill", "span", "burst", "dep", "rand", "big", "one", "deactivate"):
            r = run_tool(
                "crutest",
                workload,
                *c.target_args(),
                "-q",
                "--verify-in",
                str(log),
                "--verify-out",
                str(log),
                "--count",
                "5",
            )
            assert r.returncode == 0, f"{workload}: {r.stdout}{r.stderr}"
        dump = c.dump()
        assert dump.returncode == 0, dump.stdout


def test_crutest_catches_a_wrong_log(tmp_path: Path) -> None:
    log = tmp_path / "verify.json"
    with cluster(tmp_path) as c:
        assert (
            run_tool("crutest", "fill", *c.target_args(), "-q", "--verify-out", str(log)).returncode
            == 0
        )
        text = log.read_text().replace('"current": [1,', '"current": [2,', 1)
        text = text.replace('"committed": [1,', '"committed": [2,', 1)
        log.write_text(text)
        r = run_tool("crutest", "verify", *c.target_args(), "-q", "--verify-in", str(log))
        assert r.returncode == 1 and "block 0: holds 1, expected 2" in r.stderr


def test_perf_reports(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        r = run_tool("crutest", "perf", *c.target_args(), "-q", "--time", "0.5", "--io-depth", "4")
        assert r.returncode == 0, r.stderr
        assert "perf write:" in r.stdout and "IOPS" in r.stdout and "guest flushes" in r.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["-t", "127.0.0.1:1", "-t", "127.0.0.1:2"], "exactly three"),
        (["-t", "nonsense", "-t", "a:1", "-t", "b:2"], "HOST:PORT"),
    ],
)
def test_client_argument_errors(args: list[str], needle: str) -> None:
    r = run_tool("crucible", *args)
    assert r.returncode == 2 and needle in r.stderr


def test_client_unreachable_targets(tmp_path: Path) -> None:
    ports = [free_port() for _ in range(3)]
    r = run_tool(
        "crucible", *[a for p in ports for a in ("-t", f"127.0.0.1:{p}")], "--activate-timeout", "2"
    )
    assert r.returncode == 1
    assert "not active after 2 s" in r.stderr and "Connection refused" in r.stderr
    assert "Traceback" not in r.stderr


def test_client_mismatched_geometry(tmp_path: Path) -> None:
    c = Cluster(tmp_path / "a")
    try:
        c.stop(2)
        c.regions[2] = tmp_path / "odd"
        from tests.support import create_region

        create_region(c.regions[2], "--extent-size", "50")
        c.start(2)
        r = run_tool("crucible", *c.target_args(), "--activate-timeout", "20")
        assert r.returncode == 1 and "es:50" in r.stderr and "es:100" in r.stderr
    finally:
        c.stop()


async def _with_upstairs(
    c: Cluster, body: object, gen: int = 1, opts: Options | None = None
) -> None:
    async with Upstairs(c.targets, opts) as up:
        await up.activate(gen)
        await body(up)  # type: ignore[operator]
        await up.deactivate()


def test_guest_io_rules(tmp_path: Path, rng: random.Random) -> None:
    async def body(up: Upstairs) -> None:
        bs = up.block_size
        assert await up.read(0, 4) == bytes(4 * bs)  # never written: zeros
        # Every size from one block to several MiB, across extent boundaries.
        for n in (1, 2, 3, 99, 100, 101, 250, 2048, 2049, 5000):
            start = 97 if n < 1300 else 0
            data = rng.randbytes(n * bs)
            await up.write(start, data)
            assert await up.read(start, n) == data, n
        await up.flush()
        with pytest.raises(CrucibleError) as e:
            await up.read(up.total_blocks - 1, 2)
        assert e.value.kind == ErrorKind.OffsetInvalid
        with pytest.raises(CrucibleError) as e:
            await up.write(0, b"x" * (bs + 1))
        assert e.value.kind == ErrorKind.DataLenUnaligned
        old = await up.read(10, 1)
        await up.write_unwritten(10, rng.randbytes(bs))
        assert await up.read(10, 1) == old  # already written: untouched
        fresh = rng.randbytes(bs)
        await up.write_unwritten(6000, fresh)
        assert await up.read(6000, 1) == fresh
        info = up.info()
        assert info.state == "active" and info.block_size == bs
        assert [d.state for d in info.downstairs] == ["active"] * 3

    with cluster(tmp_path, "--extent-count", "80") as c:
        asyncio.run(_with_upstairs(c, body))
        assert c.dump().returncode == 0


def test_io_before_activation_fails(tmp_path: Path) -> None:
    async def go() -> None:
        async with Upstairs([("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3)]) as up:
            with pytest.raises(CrucibleError) as e:
                await up.read(0, 1)
            assert e.value.kind == ErrorKind.UpstairsInactive
            with pytest.raises(CrucibleError):
                await up.activate(0)

    asyncio.run(go())


def _corrupt(region: Path, block: int) -> None:
    with open(extent_path(region, block // 100), "r+b") as f:
        f.seek((block % 100) * 512 + 17)
        f.write(b"\xff\xee")


def _verify(c: Cluster) -> list[int]:
    """Stop the downstairs and check every region's blocks against their
    contexts: the exit status of each."""
    c.stop()
    codes = [run_cli("verify", "-d", str(r)).returncode for r in c.regions]
    c.start()
    return codes


def test_corrupt_replica_detected_never_returned_and_rewritten(tmp_path: Path) -> None:
    data = bytes(range(256)) * 2

    async def write_it(up: Upstairs) -> None:
        await up.write(205, data)
        await up.flush()

    async def read_it(up: Upstairs) -> None:
        for _ in range(5):
            assert await up.read(205, 1) == data
        # The read went to the bad copy (its home): it was served from
        # another, and the bad copy rewritten from a good one.
        await until(lambda: up.info().blocks_rewritten >= 1, "the bad copy to be rewritten")
        assert up.info().integrity_errors >= 1

    async def read_fails(up: Upstairs) -> None:
        with pytest.raises(CrucibleError) as e:
            await up.read(205, 1)
        assert "match its hash" in str(e.value)

    home = 0  # the replica block 205 (in the first MiB, of one host) is read from
    with cluster(tmp_path) as c:
        asyncio.run(_with_upstairs(c, write_it))
        _corrupt(c.regions[home], 205)
        assert _verify(c) == [int(i == home) for i in range(3)]
        asyncio.run(_with_upstairs(c, read_it, gen=2))
        assert _verify(c) == [0, 0, 0]  # the rewrite was flushed on deactivation
        for region in c.regions:
            _corrupt(region, 205)
        asyncio.run(_with_upstairs(c, read_fails, gen=3))


@pytest.mark.parametrize("read_all", [False, True], ids=["one-replica", "all-replicas"])
def test_each_block_from_a_replica_whose_copy_verifies(tmp_path: Path, read_all: bool) -> None:
    """Every replica has a different bad block inside one read: the guest
    still gets every block (each has two good copies), and each bad one
    seen is counted and rewritten (all three when every read goes to all
    three; the replicas a read went to otherwise); only a block bad
    everywhere fails the read."""
    data = bytes(range(256)) * 2 * 8  # blocks 300..307
    seen = 0

    async def write_it(up: Upstairs) -> None:
        await up.write(300, data)
        await up.flush()

    async def read_it(up: Upstairs) -> None:
        nonlocal seen
        assert await up.read(300, 8) == data
        least = 3 if read_all else 2  # one replica's bad block, then another's
        await until(lambda: up.info().blocks_rewritten >= least, "the bad blocks rewritten")
        seen = up.info().integrity_errors
        assert seen >= least
        await until(lambda: up.info().blocks_rewritten == seen, "every bad block rewritten")

    async def read_fails(up: Upstairs) -> None:
        with pytest.raises(CrucibleError) as e:
            await up.read(300, 8)
        assert "block 304" in str(e.value) and "match its hash" in str(e.value)

    with cluster(tmp_path) as c:
        asyncio.run(_with_upstairs(c, write_it))
        for region, block in zip(c.regions, (302, 305, 306), strict=True):
            _corrupt(region, block)
        asyncio.run(_with_upstairs(c, read_it, 2, Options(read_all_replicas=read_all)))
        assert sum(_verify(c)) == 3 - seen  # the replicas read from hold good copies now
        for region in c.regions:
            _corrupt(region, 304)
        asyncio.run(_with_upstairs(c, read_fails, gen=3))
