"""Which blocks of a region hold data, from the extent files' own map of
data and holes (SEEK_DATA / SEEK_HOLE), without reading any block.

A never-written block's data is a hole (extent files are created sparse),
and so is a trimmed one (trim punches it out); a written block always has
data. So the allocated blocks are a superset of the written ones, never
less: a filesystem that cannot keep holes, or a block once written with
zeros, only shows more data. Every hole reads as zeros. The cost is a few
system calls per run of data or hole, not per block.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from crucible.common.definition import RegionDefinition
from crucible.region.layout import extent_path

Runs = list[tuple[int, int]]  # (first block, block count), sorted and disjoint


def data_ranges(fd: int, length: int) -> list[tuple[int, int]]:
    """[start, end) byte ranges holding data in the first `length` bytes."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < length:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # nothing but hole from here on
                break
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no map here: all data
                out.append((pos, length))
                break
            raise
        if start >= length:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), length)
        out.append((start, end))
        pos = end
    return out


def allocated_runs(directory: Path, definition: RegionDefinition) -> Runs:
    """The runs of blocks that hold data, over the whole region."""
    bs = definition.block_size
    es = definition.extent_size
    runs: Runs = []
    for eid in range(definition.extent_count):
        fd = os.open(extent_path(directory, eid), os.O_RDONLY)  # its own: no shared offset
        try:
            ranges = data_ranges(fd, es * bs)
        finally:
            os.close(fd)
        base = eid * es
        for start, end in ranges:
            first = base + start // bs
            last = base + -(-end // bs)  # a block partly holding data counts as data
            if runs and runs[-1][0] + runs[-1][1] >= first:
                prev = runs[-1][0]
                runs[-1] = (prev, max(runs[-1][0] + runs[-1][1], last) - prev)
            else:
                runs.append((first, last - first))
    return runs
