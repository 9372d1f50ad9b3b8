"""Faults with real downstairs processes: the repair target or the repair
source killed mid live-repair, two of three downstairs gone, and a peer that
goes silent without closing its connection."""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path

import pytest

from crucible.common.errors import CrucibleError
from crucible.upstairs.guest import Upstairs
from crucible.upstairs.options import Options
from tests.support import WAIT, Cluster, Downstairs, cluster, create_region, states, until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

GEOMETRY = ("--block-size", "4096", "--extent-size", "256", "--extent-count", "48")


Scenario = Callable[[Cluster], Coroutine[None, None, None]]


def run_on_cluster(tmp_path: Path, scenario: Scenario) -> None:
    """Run a scenario against three fresh downstairs; the replicas must then match."""
    with cluster(tmp_path, *GEOMETRY) as c:
        asyncio.run(scenario(c))
        dump = c.dump()
        assert dump.returncode == 0 and "all match" in dump.stdout, dump.stdout


class Guest:
    """Writes random blocks, remembers what each holds, and checks it back."""

    def __init__(self, up: Upstairs, rng: random.Random) -> None:
        self.up = up
        self.rng = rng
        self.expect: dict[int, bytes] = {}
        self.refused = 0

    async def write(self, n: int = 8) -> None:
        await self.write_at(self.rng.randrange(self.up.total_blocks - n), n)

    async def write_at(self, block: int, n: int) -> None:
        bs = self.up.block_size
        data = self.rng.randbytes(n * bs)
        try:
            await self.up.write(block, data)
        except CrucibleError:
            self.refused += 1  # refused before anything was queued: nothing changed
            return
        for i in range(n):
            self.expect[block + i] = data[i * bs : (i + 1) * bs]

    async def busy(self, stop: asyncio.Event) -> None:
        """IO until told to stop: writes, reads of written blocks, flushes."""
        k = 0
        while not stop.is_set():
            await self.write()
            k += 1
            if k % 16 == 0:
                try:
                    await self.up.flush()
                except CrucibleError:
                    pass  # while two are out a flush cannot be durable: it says so
            if k % 4 == 0 and self.expect:
                block = next(iter(self.expect))
                assert await self.up.read(block, 1) == self.expect[block]

    async def verify(self) -> None:
        for block, data in self.expect.items():
            assert await self.up.read(block, 1) == data, f"block {block} differs"


async def _kill_mid_repair(rng: random.Random, c: Cluster, who: str) -> None:
    async with Upstairs(c.targets, Options(offline_max_jobs=50)) as up:
        await up.activate(1)
        g = Guest(up, rng)
        es = up.region.extent_size
        c.stop(2, signal.SIGKILL)
        await until(lambda: states(up)[2] != "active", "downstairs 2 to drop")
        while up.info().downstairs[2].mode != "faulted":
            await g.write()
        for e in range(up.region.extent_count):  # every extent now needs a copy
            await g.write_at(e * es, 1)
        await up.flush()
        c.start(2)

        stop = asyncio.Event()
        io = asyncio.create_task(g.busy(stop))

        def mid_repair() -> bool:
            rep = up.info().live_repair
            return rep is not None and rep.extent >= 3

        await until(mid_repair, "live repair to be under way", poll=0.002)
        rep = up.info().live_repair
        assert rep is not None
        victim = rep.targets[0] if who == "target" else rep.source
        c.stop(victim, signal.SIGKILL)
        c.start(victim)
        await until(lambda: up.info().live_repairs_aborted >= 1, "the repair to abort")
        await until(
            lambda: states(up) == ["active"] * 3 and up.info().live_repair is None,
            "all three active again",
        )
        stop.set()
        await io
        await up.flush()
        await g.verify()
        assert up.info().live_repairs >= 1
        await up.deactivate()


@pytest.mark.parametrize("who", ["target", "source"])
def test_downstairs_killed_during_live_repair(tmp_path: Path, who: str, rng: random.Random) -> None:
    run_on_cluster(tmp_path, lambda c: _kill_mid_repair(rng, c, who))


async def _two_gone(rng: random.Random, c: Cluster) -> None:
    async with Upstairs(c.targets, Options(degraded_timeout=1.0)) as up:
        await up.activate(1)
        g = Guest(up, rng)
        for _ in range(20):
            await g.write()
        await up.flush()
        c.stop(1, signal.SIGKILL)
        c.stop(2, signal.SIGKILL)
        await until(lambda: states(up).count("active") == 1, "two downstairs to drop")
        await g.write()  # held for the two while they may come back
        with pytest.raises(CrucibleError, match="reached only 1 of 3"):
            await asyncio.wait_for(up.flush(), WAIT)
        with pytest.raises(CrucibleError, match="only 1 of 3 downstairs can take IO, need 2"):
            await up.write(0, bytes(up.block_size))
        with pytest.raises(CrucibleError, match="only 1 of 3"):
            await up.flush()
        await g.verify()  # reads still work from the one left

        c.start(1)
        c.start(2)
        await until(
            lambda: states(up) == ["active"] * 3 and up.info().live_repair is None,
            "both to come back through live repair",
        )
        for _ in range(20):
            await g.write()
        await up.flush()
        await g.verify()
        await up.deactivate()


def test_two_of_three_gone_fails_clearly(tmp_path: Path, rng: random.Random) -> None:
    run_on_cluster(tmp_path, lambda c: _two_gone(rng, c))


class Proxy:
    """A TCP relay on loopback that can stop forwarding without closing
    anything, like a cut network link."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*self.target)
        except OSError:
            w.close()
            return
        await asyncio.gather(self._pump(r, uw), self._pump(ur, w), return_exceptions=True)
        for x in (w, uw):
            x.close()

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(1 << 16):
            await self.flowing.wait()  # a cut link: nothing passes, nothing closes
            w.write(data)
            await w.drain()
        w.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def _silent_peer(rng: random.Random, c: Cluster) -> None:
    proxy = Proxy(c.targets[0])
    await proxy.start()
    targets = [("127.0.0.1", proxy.port), *c.targets[1:]]
    opts = Options(ping_interval=0.2, timeout=1.5)
    async with Upstairs(targets, opts) as up:
        await up.activate(1)
        g = Guest(up, rng)
        for _ in range(10):
            await g.write()
        proxy.flowing.clear()
        await until(lambda: states(up)[0] != "active", "the silent downstairs to be dropped")
        assert "no message for 1.5 s" in up.info().downstairs[0].last_error
        for _ in range(10):
            await g.write()  # IO goes on with the other two
        await up.flush()
        proxy.flowing.set()
        await until(lambda: states(up) == ["active"] * 3, "the downstairs to come back")
        await g.verify()
        await up.flush()
        await up.deactivate()
    await proxy.close()


def test_silent_peer_is_dropped_by_keepalive(tmp_path: Path, rng: random.Random) -> None:
    run_on_cluster(tmp_path, lambda c: _silent_peer(rng, c))


async def _replace_refusals(rng: random.Random, c: Cluster, odd: Downstairs) -> None:
    async with Upstairs(c.targets) as up:
        await up.activate(1)
        g = Guest(up, rng)
        t0, t1, t2 = c.targets
        nowhere = ("127.0.0.1", 1)
        with pytest.raises(CrucibleError, match="not one of this upstairs' downstairs"):
            await up.replace(nowhere, ("127.0.0.1", odd.port))
        with pytest.raises(CrucibleError, match="already a downstairs here"):
            await up.replace(t2, t1)
        # A region of another shape: that one downstairs is refused, the volume goes on.
        await up.replace(t2, ("127.0.0.1", odd.port))
        await until(lambda: "has bs:" in up.info().downstairs[2].last_error, "a refusal")
        assert up.info().downstairs[2].target == f"127.0.0.1:{odd.port}"  # named for the new one
        for _ in range(10):
            await g.write()
        await up.flush()
        await g.verify()
        with pytest.raises(CrucibleError, match="only one may be out at a time"):
            await up.replace(t0, nowhere)
        assert up.info().state == "active"


def test_replace_refusals(tmp_path: Path, rng: random.Random) -> None:
    create_region(tmp_path / "odd", "--block-size", "4096", "--extent-size", "64")
    odd = Downstairs(tmp_path / "odd")
    try:
        with cluster(tmp_path, *GEOMETRY) as c:
            asyncio.run(_replace_refusals(rng, c, odd))
    finally:
        odd.stop()


async def _stalled(rng: random.Random, c: Cluster) -> None:
    """A downstairs that stops (SIGSTOP: its connection stays open, the
    kernel even acks what is sent) is faulted once the others finish jobs
    and it finishes none, long before the keepalive timeout would."""
    opts = Options(progress_timeout=2.0, timeout=3600.0)  # only progress can fault it
    async with Upstairs(c.targets, opts) as up:
        await up.activate(1)
        g = Guest(up, rng)
        for _ in range(10):
            await g.write()
        await up.flush()
        ds = c.ds[1]
        assert ds is not None
        ds.proc.send_signal(signal.SIGSTOP)
        try:
            stop = asyncio.Event()
            io = asyncio.create_task(g.busy(stop))
            await until(
                lambda: up.info().downstairs[1].mode == "faulted", "the stopped one faulted"
            )
            assert "no job finished in" in up.info().downstairs[1].last_error
            stop.set()
            await io
            for _ in range(20):  # the guest goes on with the two others
                await g.write()
            await up.flush()
        finally:
            ds.proc.send_signal(signal.SIGCONT)
        await until(
            lambda: states(up) == ["active"] * 3 and up.info().live_repair is None,
            "it to come back through live repair",
        )
        await g.verify()
        await up.deactivate()


def test_stalled_downstairs_is_faulted(tmp_path: Path, rng: random.Random) -> None:
    run_on_cluster(tmp_path, lambda c: _stalled(rng, c))
