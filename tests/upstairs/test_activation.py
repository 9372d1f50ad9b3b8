"""Activation: generation rules, fencing of a stale upstairs, reconciliation
after crashes, and read-only volumes."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from crucible.common.errors import CrucibleError, ErrorKind
from crucible.upstairs.guest import Upstairs
from crucible.upstairs.options import Options
from tests.support import BIN, Cluster, cluster, run_tool, states, until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_generation_zero_and_stale_generation_refused(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        r = run_tool("crutest", "one", *c.target_args(), "-q", "--gen", "0")
        assert r.returncode == 1 and "generation 0 is not allowed" in r.stderr
        assert run_tool("crutest", "one", *c.target_args(), "-q", "--gen", "5").returncode == 0
        for gen in ("5", "3"):
            r = run_tool("crutest", "one", *c.target_args(), "-q", "--gen", gen)
            assert r.returncode == 1
            assert f"generation {gen} is not greater than 5" in r.stderr, r.stderr
        assert run_tool("crutest", "one", *c.target_args(), "-q", "--gen", "6").returncode == 0


def test_stale_upstairs_is_fenced(tmp_path: Path) -> None:
    async def go(c: Cluster) -> None:
        old = Upstairs(c.targets)
        new = Upstairs(c.targets)
        try:
            await old.activate(1)
            bs = old.block_size
            await old.write(0, b"A" * bs)
            await old.flush()
            await new.activate(2)
            # Whatever the old one still sends never reaches a disk.
            for _ in range(20):
                try:
                    await old.write(0, b"B" * bs)
                    await old.write(500, b"B" * bs)
                except CrucibleError as e:
                    assert e.kind == ErrorKind.NoLongerActive
                    break
                await asyncio.sleep(0.05)
            with pytest.raises(CrucibleError) as err:
                await old.flush()
            assert err.value.kind == ErrorKind.NoLongerActive
            assert "took over" in str(err.value)
            assert old.info().state == "disabled"
            assert await new.read(0, 1) == b"A" * bs
            assert await new.read(500, 1) == bytes(bs)
            # The fenced upstairs cannot come back with its old generation.
            with pytest.raises(CrucibleError) as err:
                await old.activate(1)
            assert "refused generation 1" in str(err.value)
            await new.write(1, b"C" * bs)
            await new.deactivate()
        finally:
            await old.close()
            await new.close()

    with cluster(tmp_path) as c:
        asyncio.run(go(c))
        assert c.dump().returncode == 0


def _kill_all(c: Cluster, writer: subprocess.Popen[str]) -> None:
    writer.send_signal(signal.SIGKILL)
    for i in range(3):
        c.stop(i, signal.SIGKILL)
    writer.wait()


@pytest.mark.parametrize("partial", [False, True], ids=["all-at-once", "one-first"])
def test_crash_during_unflushed_writes_then_reconcile(tmp_path: Path, partial: bool) -> None:
    rng = random.Random(11 if partial else 5)
    log = tmp_path / "verify.json"
    with cluster(tmp_path, "--extent-count", "20") as c:
        for rnd in range(3):
            writer = subprocess.Popen(
                [
                    str(BIN / "crutest"),
                    "generic",
                    *c.target_args(),
                    "-q",
                    "--count",
                    "100000",
                    "--verify-out",
                    str(log),
                    *(["--verify-in", str(log)] if rnd else []),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            deadline = time.monotonic() + 60
            while (not log.exists() or log.stat().st_size < 20_000) and time.monotonic() < deadline:
                assert writer.poll() is None, writer.communicate()[0]
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.5))
            if partial:  # writes after this reach only the other two
                c.stop(rng.randrange(3), signal.SIGKILL)
                time.sleep(rng.uniform(0.2, 0.6))
            _kill_all(c, writer)
            c.start()
            r = run_tool(
                "crutest",
                "verify",
                *c.target_args(),
                "--verify-in",
                str(log),
                "--verify-out",
                str(log),
            )
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr
            if partial:
                assert "reconciliation: " in r.stdout and "reconciliation done" in r.stdout
            dump = c.dump()
            assert dump.returncode == 0, dump.stdout


def test_downstairs_killed_during_reconciliation(tmp_path: Path) -> None:
    async def make_divergence(c: Cluster) -> None:
        # No idle flush: gen 1 must not be stored (see below).
        async with Upstairs(c.targets, Options(flush_timeout=float("inf"))) as up:
            await up.activate(1)
            data = os.urandom(1 << 20)
            for block in range(0, up.total_blocks, len(data) // up.block_size):
                await up.write(block, data)
            await up.read(0, 1)  # every write before this has reached every downstairs
            c.stop(None, signal.SIGKILL)  # no flush: every extent is left dirty

    async def reconcile_with_a_crash(c: Cluster) -> None:
        async with Upstairs(c.targets) as up:
            # gen 1 = stored + 1: the retry after the crash meets extents the first
            # pass already stamped with this very generation.
            task = asyncio.ensure_future(up.activate(1))
            while up.core.activation.done < 2:
                assert not task.done(), "reconciliation ended before the crash"
                await asyncio.sleep(0.001)
            assert up.core.activation.done < up.core.activation.needed
            c.stop(1, signal.SIGKILL)
            await until(lambda: states(up)[1] == "connecting", "downstairs 1 to drop")
            c.start(1)
            await asyncio.wait_for(task, 120)
            assert up.info().state == "active"
            await up.deactivate()

    with cluster(tmp_path, "--extent-size", "1024", "--extent-count", "100") as c:
        asyncio.run(make_divergence(c))
        c.start()
        asyncio.run(reconcile_with_a_crash(c))
        dump = c.dump()
        assert dump.returncode == 0, dump.stdout


def test_read_only_volume_with_downstairs_down(tmp_path: Path) -> None:
    pattern = bytes(range(256)) * 4

    async def fill(c: Cluster) -> None:
        async with Upstairs(c.targets) as up:
            await up.activate(1)
            await up.write(300, pattern)
            await up.deactivate()

    async def read_only(c: Cluster, expect_clients: int) -> None:
        ups = [Upstairs(c.targets, Options(read_only=True)) for _ in range(2)]
        try:
            for up in ups:
                await asyncio.wait_for(up.activate(1), 60)
            for up in ups:
                assert await up.read(300, 2) == pattern
                with pytest.raises(CrucibleError) as e:
                    await up.write(0, bytes(512))
                assert e.value.kind == ErrorKind.ModifyingReadOnlyRegion
                await up.flush()
                assert up.info().reconcile_needed == 0
        finally:
            for up in ups:
                await up.close()

    with cluster(tmp_path) as c:
        asyncio.run(fill(c))
        c.stop()
        c.start(None, "--mode", "ro")
        asyncio.run(read_only(c, 3))
        c.stop(0)
        asyncio.run(read_only(c, 2))
        c.stop(2)
        asyncio.run(read_only(c, 1))
