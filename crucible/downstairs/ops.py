"""Running work against the region: blocking disk IO, called from the disk worker."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, BinaryIO

from crucible.downstairs.core import Work
from crucible.protocol import messages as m
from crucible.protocol.errors import CrucibleError, ErrorKind
from crucible.protocol.wire import SocketAddr
from crucible.region.definition import RegionError
from crucible.region.region import Region

# Copies extent `eid` from the repair server at an address into a file.
FetchExtent = Callable[[SocketAddr, int, BinaryIO], None]


def run(region: Region, work: Work, fetch: FetchExtent) -> Any:
    """The outcome of one piece of work: its result, or the CrucibleError it failed with."""
    try:
        return _run(region, work, fetch)
    except CrucibleError as e:
        return e
    except RegionError as e:
        return CrucibleError(ErrorKind.IoError, str(e))
    except OSError as e:
        return CrucibleError(ErrorKind.IoError, f"{e.strerror or e}")


def _run(region: Region, work: Work, fetch: FetchExtent) -> Any:
    if isinstance(work, m.Write):
        return region.write(work.start, work.contexts, work.data)
    if isinstance(work, m.WriteUnwritten):
        return region.write(work.start, work.contexts, work.data, only_unwritten=True)
    if isinstance(work, m.ReadRequest):
        return region.read(work.start, work.count)
    if isinstance(work, m.Trim):
        return region.trim(work.start, work.count)
    if isinstance(work, m.Flush):
        region.flush(work.flush_number, work.gen_number, work.extent_limit)
        if work.snapshot_name is not None:
            raise CrucibleError(ErrorKind.SnapshotFailed, "snapshots are not supported here")
        return None
    if isinstance(work, m.Barrier | m.ExtentLiveNoOp):
        return None
    if isinstance(work, m.ExtentVersionsPlease):
        # A new session starts from whole extents, even after a repair cut short.
        region.reopen_closed()
        return region.extent_versions()
    if isinstance(work, m.ExtentLiveClose | m.ExtentClose):
        return region.close_extent(work.extent_id)
    if isinstance(work, m.ExtentLiveFlushClose):
        region.flush_extent(work.extent_id, work.flush_number, work.gen_number)
        return region.close_extent(work.extent_id)
    if isinstance(work, m.ExtentFlush):
        return region.flush_extent(work.extent_id, work.flush_number, work.gen_number)
    if isinstance(work, m.ExtentLiveRepair | m.ExtentRepair):
        addr, eid = work.source_repair_address, work.extent_id
        return region.replace_extent(eid, lambda f: fetch(addr, eid, f))
    if isinstance(work, m.ExtentLiveReopen | m.ExtentReopen):
        return region.reopen_extent(work.extent_id)
    raise CrucibleError(ErrorKind.Unsupported, type(work).__name__)
