"""A downstairs that drops and comes back soon is resumed with LastFlush and
replayed: IO goes on meanwhile, and at the end the replicas are identical."""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path

import pytest

from crucible.upstairs.guest import Upstairs
from tests.support import Cluster, cluster, states, until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


async def _replay(c: Cluster, rng: random.Random) -> None:
    async with Upstairs(c.targets) as up:
        await up.activate(1)
        bs = up.block_size
        expect: dict[int, bytes] = {}

        async def write_some(n: int) -> None:
            for _ in range(n):
                block = rng.randrange(up.total_blocks - 8)
                data = rng.randbytes(8 * bs)
                await up.write(block, data)
                for i in range(8):
                    expect[block + i] = data[i * bs : (i + 1) * bs]

        await write_some(50)
        await up.flush()
        await write_some(50)  # unflushed: must be replayed to the one that drops
        c.stop(1, signal.SIGKILL)
        await until(lambda: states(up)[1] != "active", "downstairs 1 to drop")
        await write_some(50)  # held for it while it is away
        c.start(1)
        await until(lambda: states(up) == ["active"] * 3, "downstairs 1 to come back")
        await write_some(50)
        await up.flush()
        for block, data in expect.items():
            assert await up.read(block, 1) == data
        assert up.info().downstairs[1].connections == 2  # it came back, not replaced
        await up.deactivate()


def test_offline_downstairs_is_replayed(tmp_path: Path, rng: random.Random) -> None:
    with cluster(tmp_path) as c:
        asyncio.run(_replay(c, rng))
        dump = c.dump()
        assert dump.returncode == 0, dump.stdout
