"""crutest and crucible on a volume of two region sub-volumes (--vcr), with
real downstairs: the workloads' IO crosses the boundary between the regions,
every read is checked, and each region ends up holding exactly its part of
what was written. A workload that drives one region's upstairs refuses such
a volume in one line."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import pytest

from crucible.tools.verify_log import VerifyLog, block_pattern
from crucible.volume import vcr as v
from tests.support import Cluster, run_tool

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BS = 4096
ES = 64
GEOMETRY = ("--block-size", str(BS), "--extent-size", str(ES), "--extent-count", "4")
REGION_BLOCKS = 4 * ES  # 1 MiB a region: the volume's boundary is at block 256


def vcr_create(out: Path, *args: str) -> Path:
    r = run_tool("crucible-vcr", "create", *args, "-o", str(out), timeout=60)
    assert r.returncode == 0, r.stderr
    return out


def crutest(rng: random.Random, *args: str) -> str:
    r = run_tool("crutest", *args, "--seed", str(rng.randrange(1 << 32)), timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "integrity errors: 0" in r.stdout, r.stdout
    return r.stdout


def test_crutest_drives_a_volume_of_two_regions(tmp_path: Path, rng: random.Random) -> None:
    a, b = Cluster(tmp_path / "a", *GEOMETRY), Cluster(tmp_path / "b", *GEOMETRY)
    try:
        vol = vcr_create(tmp_path / "vol.json", *a.target_args(), *b.target_args())
        vlog = tmp_path / "verify.json"
        out = crutest(rng, "span", "--vcr", str(vol), "-q", "--verify-out", str(vlog))
        assert f"{2 * REGION_BLOCKS} blocks of {BS} bytes in 2 sub-volumes" in out, out
        assert "(4 extents of 64; 4 extents of 64)" in out, out
        # Random IO, overlapping reads and writes in flight, and every region
        # deactivated and activated again, all checked against the same log.
        for workload in ("generic", "dep", "deactivate", "verify"):
            crutest(rng, workload, "--vcr", str(vol), "-q", "-c", "40",
                    "--verify-in", str(vlog), "--verify-out", str(vlog))  # fmt: skip
        a.stop()
        b.stop()
        log = VerifyLog.load(vlog)
        assert (log.block_size, log.total_blocks) == (BS, 2 * REGION_BLOCKS)
        # span wrote across the boundary: the last block of one region and
        # the first of the other were written, each in its own region.
        assert log.current[REGION_BLOCKS - 1] and log.current[REGION_BLOCKS]
        want = [block_pattern(i, log.current[i], BS) for i in range(2 * REGION_BLOCKS)]
        assert a.replica_blocks(0, REGION_BLOCKS) == [b"".join(want[:REGION_BLOCKS])] * 3
        assert b.replica_blocks(0, REGION_BLOCKS) == [b"".join(want[REGION_BLOCKS:])] * 3
    finally:
        a.stop()
        b.stop()


def test_the_seed_client_across_the_regions_boundary(tmp_path: Path) -> None:
    a, b = Cluster(tmp_path / "a", *GEOMETRY), Cluster(tmp_path / "b", *GEOMETRY)
    try:
        vol = vcr_create(tmp_path / "vol.json", *a.target_args(), *b.target_args())
        r = run_tool("crucible", "--vcr", str(vol), "-q", timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        boundary = (REGION_BLOCKS - 1) * BS
        assert f"read back {2 * BS} bytes at offset {(ES - 1) * BS}: verified" in r.stdout
        assert f"at offset {boundary} (sub-volumes 0 and 1): verified" in r.stdout, r.stdout
        assert "all Tests done" in r.stdout
        a.stop()
        b.stop()
        data = bytes((j * 7 + 2) & 0xFF for j in range(2 * BS))  # the second write's pattern
        assert a.replica_blocks(REGION_BLOCKS - 1, 1) == [data[:BS]] * 3
        assert b.replica_blocks(0, 1) == [data[BS:]] * 3
    finally:
        a.stop()
        b.stop()


def test_one_region_workloads_refuse_a_volume_of_two(tmp_path: Path) -> None:
    """Said before anything connects: the VCR's targets need not answer."""
    subs = tuple(
        v.RegionVcr(BS, ES, 4, 1, v.RegionOpts(uuid.uuid4(), tuple(("127.0.0.1", p + i)
                                                                  for i in range(3))))
        for p in (1, 4)
    )  # fmt: skip
    vol = tmp_path / "vol.json"
    v.save(vol, v.VolumeVcr(uuid.uuid4(), BS, subs))
    for workload, extra in (
        ("replay", ("--dsc", "127.0.0.1:1")),
        ("repair", ("--dsc", "127.0.0.1:1")),
        ("replace", ("--replacement", "127.0.0.1:9")),
        ("verify-replicas", ()),
    ):
        r = run_tool("crutest", workload, "--vcr", str(vol), *extra, timeout=60)
        assert r.returncode == 1 and r.stdout == "", r.stdout + r.stderr
        assert r.stderr.splitlines() == [
            f"crutest: error: {workload} drives one region's upstairs, and {vol} describes "
            "2 sub-volumes: give it -t, or a VCR of one region"
        ], r.stderr
