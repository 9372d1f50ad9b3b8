"""A new region filled from a running read-only downstairs (a snapshot's, say)
through its repair server: `crucible-downstairs clone -d NEWDIR --source ADDR:PORT`.

The new region gets the source's geometry and a UUID of its own; each extent
file is copied crash-safely (the repair path: staged, synced, renamed in), and
`NEWDIR/.clone` records the source and the extents done, so an interrupted
clone goes on where it stopped when run again. At the end every extent is
stamped generation 0, so the new volume activates at generation 1.
"""

from __future__ import annotations

import functools
import json
import logging
import ssl
import uuid
from collections.abc import Callable
from pathlib import Path

from crucible.common.definition import RegionDefinition
from crucible.downstairs.repair import ask_region, fetch_extent, get_json
from crucible.protocol.wire import SocketAddr
from crucible.region.definition import REGION_JSON, write_json_atomic
from crucible.region.region import Region

log = logging.getLogger("crucible.downstairs")
MARKER = ".clone"


SOURCE = "the source's repair server"


def source_region(source: SocketAddr, tls: ssl.SSLContext | None = None) -> RegionDefinition:
    """What the source serves (asked over TLS with a client context)."""
    return ask_region(source, tls, SOURCE)


def clone(
    directory: Path,
    source: SocketAddr,
    region_uuid: uuid.UUID | None,
    progress: Callable[[int], None],
    tls: ssl.SSLContext | None = None,
) -> RegionDefinition:
    """Fill (or finish filling) the region at `directory` from `source` (over
    TLS with a client context); its definition."""
    src = source_region(source, tls)
    if get_json(source, "/region-mode", tls, SOURCE) is not True:
        raise ValueError(
            f"{source[0]}:{source[1]} serves a writable region: clone a read-only one "
            "(a snapshot: crucible-downstairs run --snapshot NAME)"
        )
    marker = directory / MARKER
    if (directory / REGION_JSON).exists():
        if not marker.exists():
            raise ValueError(f"{directory} holds a region already")
        state = json.loads(marker.read_text())
        if state.get("source") != f"{source[0]}:{source[1]}":
            raise ValueError(f"{directory} is a clone of {state.get('source')} cut short")
        region = Region.open(directory)
        d = region.definition
        if (d.block_size, d.extent_size, d.extent_count) != (
            src.block_size,
            src.extent_size,
            src.extent_count,
        ):
            region.close()
            raise ValueError(f"{directory} does not have the source's geometry")
        done = set(state.get("done", []))
        log.info("clone: going on (%d of %d extents done)", len(done), d.extent_count)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        state = {"source": f"{source[0]}:{source[1]}", "done": []}
        write_json_atomic(marker, state)
        d = RegionDefinition(
            src.block_size, src.extent_size, src.extent_count, region_uuid or uuid.uuid4(),
            src.encrypted,
        )  # fmt: skip
        region = Region.create(directory, d)
        done = set()
    try:
        for eid in range(d.extent_count):
            if eid in done:
                progress(d.extent_bytes)
                continue
            region.close_extent(eid)
            region.replace_extent(eid, functools.partial(fetch_extent, source, eid, tls=tls))
            region.reopen_extent(eid)
            done.add(eid)
            write_json_atomic(marker, {**state, "done": sorted(done)})
            progress(d.extent_bytes)
        region.restamp(0)
    finally:
        region.close()
    marker.unlink()
    return d
