"""Reads from one replica, with real processes: a bad block on the replica a
read went to is served from another and rewritten; a replica that silently
diverged (other data under a valid hash) is found and rewritten by the
verify of the replicas."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from crucible.region.layout import extent_path
from crucible.region.region import Region
from tests.nbd.conftest import Nbd
from tests.support import cluster, contexts_for, run_cli, run_tool, until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _dump_block(regions: list[Path], block: int) -> str:
    r = run_cli("dump", *[a for d in regions for a in ("-d", str(d))], "-b", str(block))
    return r.stdout


def test_bad_block_on_the_replica_read_is_served_good_and_rewritten(tmp_path: Path) -> None:
    n = Nbd(tmp_path, nbd_args=("--verify-rate", "0"))  # only reads find it here
    try:
        offset = 1 << 20
        block = offset // 512
        subprocess.run(
            ["qemu-io", "-f", "raw", "-c", f"write -P 0x5a {offset} 4k", "-c", "flush", n.uri],
            check=True,
            capture_output=True,
        )
        with open(extent_path(n.cluster.regions[0], block // 4096), "r+b") as f:
            f.seek((block % 4096) * 512 + 17)
            f.write(b"\xff\xee")
        assert "copies differ" in _dump_block(n.cluster.regions, block)
        for _ in range(3):  # three downstairs of one host: a small read's home is the first
            r = subprocess.run(
                ["qemu-io", "-f", "raw", "-c", f"read -P 0x5a {offset} 512", n.uri],
                capture_output=True,
                text=True,
            )
            assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout
        rewritten = lambda: "rewrote 1 bad blocks" in n.output()  # noqa: E731
        asyncio.run(until(rewritten, "the bad copy to be rewritten"))
        assert "does not match its hash" in n.output()
    finally:
        assert n.stop() == 0, n.output()
    assert "all copies match" in _dump_block(n.cluster.regions, block)


def _diverge(region: Path, block: int, data: bytes) -> None:
    """Write other data with a valid context straight into a stopped
    downstairs' region, keeping the extent's flush number and generation:
    nothing but a comparison of the replicas can tell."""
    r = Region.open(region)
    try:
        eid = block // r.definition.extent_size
        gens, flushes, _ = r.extent_versions()
        r.write(block, contexts_for(data), data)
        r.flush_extent(eid, flushes[eid], gens[eid])
    finally:
        r.close()


def test_verify_replicas_rewrites_a_silently_diverged_replica(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        assert run_tool("crutest", "fill", *c.target_args(), "-q").returncode == 0
        c.stop()
        _diverge(c.regions[2], 250, bytes([7]) * 512)
        assert "copies differ" in _dump_block(c.regions, 250)
        assert "all match" in c.dump().stdout  # extent versions agree: activation sees nothing
        c.start()
        r = run_tool("crutest", "verify-replicas", *c.target_args(), "-q")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "1 differing, 1 rewritten, 0 on which no two replicas agree" in r.stdout
        c.stop()
        assert "all copies match" in _dump_block(c.regions, 250)

        # Three different copies: nothing to go by; reported, left, and the exit says so.
        _diverge(c.regions[1], 300, bytes([8]) * 512)
        _diverge(c.regions[2], 300, bytes([9]) * 512)
        c.start()
        r = run_tool("crutest", "verify-replicas", *c.target_args(), "-q")
        assert r.returncode == 1
        assert "1 blocks differ on every replica" in r.stderr
        assert "copies differ" in _dump_block(c.regions, 300)
