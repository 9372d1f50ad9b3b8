"""Running work against the region: blocking disk IO, called from the disk worker."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, BinaryIO, assert_never

import crucible.protocol.messages as m
from crucible.common.definition import RegionError
from crucible.common.errors import CrucibleError, ErrorKind
from crucible.downstairs.core import Work
from crucible.protocol.wire import SocketAddr
from crucible.region import snapshot
from crucible.region.region import Region

log = logging.getLogger("crucible.downstairs")

# Copies extent `eid` from the repair server at an address into a file.
FetchExtent = Callable[[SocketAddr, int, BinaryIO], None]


def run(region: Region, work: Work, fetch: FetchExtent, cached_only: bool = False) -> Any:
    """The outcome of one piece of work: its result, or the CrucibleError it
    failed with. `cached_only` (a read): WouldBlock rather than wait for the disk."""
    try:
        return _run(region, work, fetch, cached_only)
    except CrucibleError as e:
        return e
    except RegionError as e:
        return CrucibleError(ErrorKind.IoError, str(e))
    except OSError as e:
        return CrucibleError(ErrorKind.IoError, f"{e.strerror or e}")


def _run(region: Region, work: Work, fetch: FetchExtent, cached_only: bool) -> Any:
    match work:
        case m.Write():
            return region.write(work.start, work.contexts, work.data)
        case m.ReadRequest():
            return region.read(work.start, work.count, cached_only)
        case m.Flush():
            region.flush(work.flush_number, work.gen_number, work.extent_limit)
            if work.snapshot_name is not None:
                if region.read_only:
                    why = "a read-only region takes no snapshot"
                    raise CrucibleError(ErrorKind.SnapshotFailed, why)
                name = work.snapshot_name
                d = region.definition
                made = snapshot.take(region.dir, d.extent_count, name)
                log.info("snapshot %s %s", name, "taken" if made else "exists already: kept")
            return None
        case m.WriteUnwritten():
            return region.write(work.start, work.contexts, work.data, only_unwritten=True)
        case m.Trim():
            return region.trim(work.start, work.count)
        case m.Barrier() | m.ExtentLiveNoOp():
            return None
        case m.ExtentVersionsPlease():
            # A new session starts from whole extents, even after a repair cut short.
            region.reopen_closed()
            return region.extent_versions()
        case m.ExtentLiveClose() | m.ExtentClose():
            return region.close_extent(work.extent_id)
        case m.ExtentLiveFlushClose():
            region.flush_extent(work.extent_id, work.flush_number, work.gen_number)
            return region.close_extent(work.extent_id)
        case m.ExtentFlush():
            return region.flush_extent(work.extent_id, work.flush_number, work.gen_number)
        case m.ExtentLiveRepair() | m.ExtentRepair():
            addr, eid = work.source_repair_address, work.extent_id
            return region.replace_extent(eid, lambda f: fetch(addr, eid, f))
        case m.ExtentLiveReopen() | m.ExtentReopen():
            return region.reopen_extent(work.extent_id)
        case _:
            assert_never(work)
