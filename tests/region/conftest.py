from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from crucible.common.definition import RegionDefinition
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
