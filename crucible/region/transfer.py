"""Import a raw image into a region and export a region's blocks to a file."""

from __future__ import annotations

import os
from pathlib import Path

from crucible.protocol.integrity import block_hashes, plain_contexts
from crucible.region.region import Progress, Region

CHUNK_BYTES = 32 << 20


def import_file(region: Region, source: Path, progress: Progress | None = None) -> int:
    """Copy a raw file into the region from block 0, zero-padding the last
    block, then flush (flush number 1, generation 0). Returns blocks written."""
    bs = region.definition.block_size
    size = source.stat().st_size
    if size > region.definition.total_bytes:
        raise ValueError(
            f"{source} is {size} bytes, larger than the region's {region.definition.total_bytes}"
        )
    step = max(bs, CHUNK_BYTES // bs * bs)
    block = 0
    with open(source, "rb") as f:
        while True:
            chunk = f.read(step)
            if not chunk:
                break
            if len(chunk) % bs:
                chunk += bytes(bs - len(chunk) % bs)
            view = memoryview(chunk)
            n = len(chunk) // bs
            ctxs = plain_contexts(block_hashes(view, bs))
            region.write(block, ctxs, view)
            block += n
            if progress:
                progress(len(chunk))
    region.flush(1, 0)
    return block


def export_file(
    region: Region,
    dest: Path,
    skip: int = 0,
    count: int | None = None,
    progress: Progress | None = None,
) -> int:
    """Write blocks [skip, skip + count) of the region to a raw file."""
    d = region.definition
    total = d.total_blocks
    if skip > total:
        raise ValueError(f"skip of {skip} blocks is past the region's {total} blocks")
    if count is None:
        count = total - skip
    if skip + count > total:
        raise ValueError(f"{skip} + {count} blocks is past the region's {total} blocks")
    step = max(1, CHUNK_BYTES // d.block_size)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = 0
        while done < count:
            n = min(step, count - done)
            _, data = region.read(skip + done, n)
            os.write(fd, data)
            done += n
            if progress:
                progress(len(data))
        os.fsync(fd)
    finally:
        os.close(fd)
    return count
