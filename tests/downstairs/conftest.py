from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Downstairs, create_region


@pytest.fixture
def region(tmp_path: Path) -> Path:
    path = tmp_path / "region"
    create_region(path, "--extent-size", "100", "--extent-count", "10")
    return path


@pytest.fixture
def ds(region: Path) -> Iterator[Downstairs]:
    d = Downstairs(region)
    yield d
    code = d.stop()
    assert code == 0, d.output()
