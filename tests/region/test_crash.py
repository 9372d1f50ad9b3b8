"""Crash safety of the storage engine: SIGKILL a writer at random points, many
times; after every reopen each block holds its last completed write or, for
the interrupted write, its old or new data, always with a matching context."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import xxhash

from crucible.common.definition import RegionDefinition
from crucible.region.region import Region
from tests.support import pattern

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 12
TIME_BUDGET = 90.0


Parsed = tuple[dict[int, int], tuple[int, int, int] | None, dict[int, int]]


def _parse(log: str, extent_size: int) -> Parsed:
    """Completed versions per block, the interrupted write if any, and per
    extent the number of the last finished flush that followed a write to it."""
    done: dict[int, int] = {}
    pending: tuple[int, int, int] | None = None
    touched: set[int] = set()
    flushed: dict[int, int] = {}
    for line in log.splitlines():
        parts = line.split()
        if parts[0] == "W":
            pending = (int(parts[1]), int(parts[2]), int(parts[3]))
        elif parts[0] == "WD" and pending is not None:
            start, n, v = pending
            for b in range(start, start + n):
                done[b] = v
                touched.add(b // extent_size)
            pending = None
        elif parts[0] == "FD":
            flushed.update(dict.fromkeys(touched, int(parts[1])))
            touched.clear()
    return done, pending, flushed


def test_sigkill_at_random_points(tmp_path: Path) -> None:
    region_dir = tmp_path / "region"
    Region.create(region_dir, RegionDefinition(512, 32, 8, uuid.uuid4())).close()
    rng = random.Random(1234)
    expected: dict[int, int] = {}  # block -> version it must hold (0: never written)
    must_flush: dict[int, int] = {}  # extent -> flush number it must have reached
    deadline = time.monotonic() + TIME_BUDGET
    rounds = 0
    while rounds < ROUNDS and time.monotonic() < deadline:
        rounds += 1
        log_path = tmp_path / f"log{rounds}"
        log_path.touch()
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.region.crash_child",
                str(region_dir),
                str(log_path),
                str(rng.randrange(1 << 30)),
                str(rounds * 1_000_000),
            ],
            cwd=ROOT,
        )
        # Let it get going, then kill it wherever it is.
        while child.poll() is None and log_path.stat().st_size == 0:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert child.returncode == -signal.SIGKILL, "writer died on its own"

        done, pending, flushed = _parse(log_path.read_text(), 32)
        expected.update(done)
        must_flush.update(flushed)
        region = Region.open(region_dir)
        try:
            _check(region, expected, pending)
            flush_numbers = region.extent_versions()[1]
            for eid, n in must_flush.items():
                assert flush_numbers[eid] >= n, f"extent {eid} lost flush {n}"
        finally:
            region.close()
    assert rounds >= 3


def _check(region: Region, expected: dict[int, int], pending: tuple[int, int, int] | None) -> None:
    total = region.definition.total_blocks
    ctxs, data = region.read(0, total)
    in_flight = range(pending[0], pending[0] + pending[1]) if pending else range(0)
    for b in range(total):
        block = data[b * 512 : (b + 1) * 512]
        old = pattern(b, expected[b]) if b in expected else bytes(512)
        allowed = [old]
        if b in in_flight:
            assert pending is not None
            allowed.append(pattern(b, pending[2]))
        assert block in allowed, f"block {b} holds neither its old nor its new data"
        if block == bytes(512) and b not in expected:
            assert ctxs[b] is None or ctxs[b] == xxhash.xxh64_intdigest(block)
        else:
            assert ctxs[b] == xxhash.xxh64_intdigest(block), f"block {b}: context mismatch"
        if pending and b in in_flight and block != old:
            expected[b] = pending[2]  # the interrupted write landed here: now the baseline
    for ext in region.extents:
        assert ext is not None
        assert ext.verify() == [], f"extent {ext.number}"
