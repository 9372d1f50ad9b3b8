from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import xxhash

from crucible.common.definition import RegionDefinition
from crucible.protocol.messages import BlockContext
from crucible.region.context import encode_slot
from crucible.region.layout import extent_path
from crucible.region.region import Region

MakeRegion = Callable[..., Region]


@pytest.fixture
def make_region(tmp_path: Path) -> Iterator[MakeRegion]:
    made: list[Region] = []

    def make(
        name: str = "r", bs: int = 512, es: int = 16, ec: int = 4, encrypted: bool = False
    ) -> Region:
        r = Region.create(tmp_path / name, RegionDefinition(bs, es, ec, uuid.uuid4(), encrypted))
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def tear(r: Region, block: int, new: bytes) -> None:
    """Simulate a write to a block of extent 0 cut short on disk: the new
    context landed in the inactive slot, half of the new data landed, dirty
    set; then a crash (the caller reopens the region)."""
    ext = r.extent(0)
    lay = r.layout
    slot = 1 - ext.active[block]
    ctx = BlockContext(xxhash.xxh64_intdigest(new))
    with open(extent_path(r.dir, 0), "r+b") as f:
        f.seek(lay.meta_offset)
        f.write(b"\x01")
        f.seek(lay.slot_offset(slot, block))
        f.write(encode_slot(ctx, ctx.hash, 0))
        f.seek(block * lay.block_size)
        f.write(new[: len(new) // 2])
