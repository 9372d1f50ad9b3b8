"""Block status (NBD's map of data and holes) is answered from the volume's
map of allocated blocks, without reading any block: checked with nbdinfo
--map against what was written, and by counting the reads the downstairs
logged. Towards downstairs that cannot tell (plain V13), it still answers,
by reading."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.nbd.conftest import Nbd

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
MiB = 1 << 20
SIZE = 64 * MiB  # the fixture's volume

Extent = tuple[int, int, bool]  # offset, length, holds data


def run(*cmd: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{cmd}: {r.stdout}{r.stderr}"
    return r.stdout


def nbd_map(uri: str) -> list[Extent]:
    """nbdinfo --map, with neighbouring extents alike joined."""
    out: list[Extent] = []
    for e in json.loads(run("nbdinfo", "--map", "--json", uri)):
        data = not e["type"] & 1  # NBD_STATE_HOLE
        if e["type"] & 1:
            assert e["type"] & 2, f"a hole that does not read as zeros: {e}"
        if out and out[-1][2] == data and out[-1][0] + out[-1][1] == e["offset"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], data)
        else:
            out.append((e["offset"], e["length"], data))
    return out


def half_written(nbd: Nbd, trims: bool = True) -> list[Extent]:
    """Write the first half, punch a MiB out of it; what the map must say
    (without Trim the punched MiB is written with zeros: data)."""
    cmds = ["-c", f"write -P 0x5a 0 {32 * MiB}", "-c", f"discard {4 * MiB} {MiB}"]
    run("qemu-io", "-f", "raw", *cmds, nbd.uri)
    if not trims:
        return [(0, 32 * MiB, True), (32 * MiB, 32 * MiB, False)]
    return [
        (0, 4 * MiB, True),
        (4 * MiB, MiB, False),
        (5 * MiB, 27 * MiB, True),
        (32 * MiB, 32 * MiB, False),
    ]


def test_map_without_reading_blocks(tmp_path: Path) -> None:
    # The background verify reads too: off, so every Read counted is the map's.
    nbd = Nbd(tmp_path, log_jobs=True, nbd_args=("--verify-rate", "0"))
    try:
        assert nbd_map(nbd.uri) == [(0, SIZE, False)]
        assert nbd.cluster.jobs_logged("Read") == 0, "block status read the blocks"
        expect = half_written(nbd)
        reads = nbd.cluster.jobs_logged("Read")
        assert nbd_map(nbd.uri) == expect
        # After a restart the map comes from the extent files' holes.
        nbd.restart()
        assert nbd_map(nbd.uri) == expect
        assert nbd.cluster.jobs_logged("Read") == reads, "block status read the blocks"
    finally:
        assert nbd.stop() == 0, nbd.output()


def test_map_by_reading_towards_plain_v13_downstairs(tmp_path: Path) -> None:
    nbd = Nbd(tmp_path, plain_v13=(0, 1, 2), log_jobs=True)
    try:
        expect = half_written(nbd, trims=False)
        assert nbd_map(nbd.uri) == expect
        assert nbd.cluster.jobs_logged("Read") > 0
    finally:
        assert nbd.stop() == 0, nbd.output()
