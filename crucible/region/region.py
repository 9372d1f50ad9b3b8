"""A region: its definition and its extents, with IO that spans extents."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from crucible.common.buffer import Buffer
from crucible.common.definition import RegionDefinition, RegionError
from crucible.common.errors import CrucibleError, ErrorKind
from crucible.protocol.integrity import block_hash, block_hashes, plain_hashes
from crucible.protocol.messages import BlockContext, ReadBlockContext
from crucible.region.definition import (
    REGION_JSON,
    fsync_dir,
    load_definition,
    save_definition,
)
from crucible.region.extent import ContextCache, Extent
from crucible.region.layout import (
    EXTENT_FORMAT_VERSION,
    META,
    META_SIZE,
    ExtentLayout,
    extent_path,
    staging_dir,
)

Progress = Callable[[int], None]
FLUSH_THREADS = 8
_EXTENT_NAME = re.compile(r"[0-9A-F]{2}/[0-9A-F]{3}/[0-9A-F]{3}")


def check_write(contexts: Sequence[BlockContext], data: memoryview, block_size: int) -> None:
    """Shape and hash of a write, checked before anything touches the disk."""
    if len(data) % block_size:
        raise CrucibleError(ErrorKind.DataLenUnaligned)
    if len(data) // block_size != len(contexts):
        raise CrucibleError(
            ErrorKind.InvalidNumberOfBlocks,
            f"{len(contexts)} contexts for {len(data) // block_size} blocks",
        )
    hashes = plain_hashes(contexts)
    if hashes is not None:
        if block_hashes(data, block_size) != hashes:  # in one pass
            raise CrucibleError(ErrorKind.HashMismatch)
        return
    for i, ctx in enumerate(contexts):
        if block_hash(ctx, data[i * block_size : (i + 1) * block_size]) != ctx.hash:
            raise CrucibleError(ErrorKind.HashMismatch)


class Region:
    def __init__(self, directory: Path, definition: RegionDefinition, read_only: bool) -> None:
        self.dir = directory
        self.definition = definition
        self.read_only = read_only
        self.layout = ExtentLayout(definition.extent_size, definition.block_size)
        self.extents: list[Extent | None] = []
        self.dirty_extents: set[int] = set()
        # Times each extent was closed: a copy taken while it stayed closed
        # sees the same count before and after (repair.py checks).
        self.close_counts: dict[int, int] = {}
        self._flush_pool: ThreadPoolExecutor | None = None
        self._lock_fd: int | None = None
        self.context_cache = ContextCache()

    # ---- create / open / close ------------------------------------------------

    @classmethod
    def create(
        cls, directory: Path, definition: RegionDefinition, progress: Progress | None = None
    ) -> Region:
        """Create every extent, then region.json last: a crash mid-way leaves
        no region.json, so nothing half-made is ever opened."""
        definition.validate()
        if (directory / REGION_JSON).exists():
            raise RegionError(f"a region already exists at {directory}")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            layout = ExtentLayout(definition.extent_size, definition.block_size)
            dirs = set()
            for eid in range(definition.extent_count):
                path = extent_path(directory, eid)
                Extent.create(path, layout)
                dirs.add(path.parent)
                if progress:
                    progress(1)
            for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
                fsync_dir(d)
            for d in {p.parent for p in dirs}:
                fsync_dir(d)
            save_definition(definition, directory)
        except OSError as e:
            raise RegionError(f"cannot create region at {directory}: {e.strerror or e}") from None
        return cls.open(directory)

    @classmethod
    def open(cls, directory: Path, read_only: bool = False) -> Region:
        """Open a region; unless read-only, it is locked against every other
        writable open (a second downstairs on it) until closed."""
        definition = load_definition(directory)
        region = cls(directory, definition, read_only)
        try:
            if not read_only:
                region._lock()
            region._check_no_extra_extents()
            for eid in range(definition.extent_count):
                if not read_only:
                    region._settle_staging(eid)
                region.extents.append(region._open_extent(eid))
        except CrucibleError as e:
            region.close()
            d = definition
            said = f"{directory / REGION_JSON} says bs:{d.block_size} es:{d.extent_size}"
            detail = e.detail or str(e)
            if e.kind == ErrorKind.BadMetadata and "bytes, expected" in detail:
                detail += f" ({said}: the definition does not match the extent files)"
            if detail.endswith(os.strerror(errno.EMFILE)):
                n = d.extent_count
                detail += f" (its {n} extent files are all held open: raise the limit, ulimit -n)"
            raise RegionError(f"cannot open region at {directory}: {detail}") from None
        except RegionError:
            region.close()
            raise
        except OSError as e:
            region.close()
            raise RegionError(f"cannot open region at {directory}: {e}") from None
        region.dirty_extents = {i for i, e in enumerate(region.extents) if e and e.dirty}
        return region

    def _lock(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RegionError(
                    f"region at {self.dir} is in use by another process "
                    "(a downstairs already serving it?)"
                ) from None
            raise
        self._lock_fd = fd

    def _check_no_extra_extents(self) -> None:
        """Extent files beyond extent_count mean region.json was changed under
        the data (serving it would silently drop what they hold)."""
        count = self.definition.extent_count
        extra = []
        for sub, dirs, files in os.walk(self.dir):
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # snapshots, staging
            rel = os.path.relpath(sub, self.dir)
            for name in files:
                path = f"{rel}/{name}"
                if _EXTENT_NAME.fullmatch(path) and int(path.replace("/", ""), 16) >= count:
                    extra.append(path)
        if extra:
            raise RegionError(
                f"cannot open region at {self.dir}: {self.dir / REGION_JSON} says {count} "
                f"extents, but {len(extra)} more extent files are there (e.g. {min(extra)}): "
                "the definition does not match the extent files"
            )

    def _open_extent(self, eid: int) -> Extent:
        path = extent_path(self.dir, eid)
        return Extent.open(eid, path, self.layout, self.read_only, self.context_cache)

    def close(self) -> None:
        if self._flush_pool is not None:
            self._flush_pool.shutdown()
            self._flush_pool = None
        for ext in self.extents:
            if ext is not None:
                ext.close()
        self.extents = []
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    # ---- geometry ----------------------------------------------------------------

    def extent(self, eid: int) -> Extent:
        if not 0 <= eid < len(self.extents):
            raise CrucibleError(ErrorKind.InvalidExtent)
        ext = self.extents[eid]
        if ext is None:
            raise CrucibleError(ErrorKind.IoError, f"extent {eid} is closed")
        return ext

    def split(self, start: int, count: int) -> Iterator[tuple[int, int, int, int]]:
        """(extent id, block in extent, n blocks, blocks before this piece) per piece."""
        total = self.definition.total_blocks
        if start < 0 or count < 0 or start + count > total:
            raise CrucibleError(ErrorKind.OffsetInvalid)
        es = self.definition.extent_size
        done = 0
        while done < count:
            block = start + done
            eid, off = divmod(block, es)
            n = min(es - off, count - done)
            yield eid, off, n, done
            done += n

    def _pieces(self, start: int, count: int) -> list[tuple[int, int, int, int]]:
        """`split` as a list; a range within one extent (the usual case)
        without running the generator."""
        es = self.definition.extent_size
        eid, off = divmod(start, es)
        if start >= 0 and eid < len(self.extents) and 0 < count <= es - off:
            return [(eid, off, count, 0)]
        return list(self.split(start, count))

    def extent_versions(self) -> tuple[list[int], list[int], list[bool]]:
        exts = [self.extent(i) for i in range(len(self.extents))]
        return [e.gen for e in exts], [e.flush_number for e in exts], [e.dirty for e in exts]

    # ---- IO --------------------------------------------------------------------------

    def write(
        self,
        start: int,
        contexts: Sequence[BlockContext],
        data: Buffer,
        only_unwritten: bool = False,
    ) -> None:
        if self.read_only:
            raise CrucibleError(ErrorKind.ModifyingReadOnlyRegion)
        bs = self.definition.block_size
        view = memoryview(data).cast("B")
        check_write(contexts, view, bs)
        pieces = self._pieces(start, len(contexts))
        exts = [self.extent(eid) for eid, *_ in pieces]  # all open, before any write
        for ext, (eid, off, n, before) in zip(exts, pieces, strict=True):
            end = before + n
            whole = n == len(contexts)  # within one extent, the usual case: nothing cut
            ext.write(
                off,
                view if whole else view[before * bs : end * bs],
                contexts if whole else contexts[before:end],
                only_unwritten,
            )
            if ext.dirty:
                self.dirty_extents.add(eid)

    def trim(self, start: int, count: int) -> None:
        if self.read_only:
            raise CrucibleError(ErrorKind.ModifyingReadOnlyRegion)
        pieces = self._pieces(start, count)
        exts = [self.extent(eid) for eid, *_ in pieces]
        for ext, (eid, off, n, _) in zip(exts, pieces, strict=True):
            ext.trim(off, n)
            self.dirty_extents.add(eid)

    def read(
        self, start: int, count: int, cached_only: bool = False
    ) -> tuple[list[ReadBlockContext], Buffer]:
        """`cached_only`: raise extent.WouldBlock rather than wait for the disk."""
        pieces = self._pieces(start, count)
        if len(pieces) == 1:
            eid, off, n, _ = pieces[0]
            return self.extent(eid).read(off, n, cached_only)
        ctxs: list[ReadBlockContext] = []
        parts = []
        for eid, off, n, _ in pieces:
            c, d = self.extent(eid).read(off, n, cached_only)
            ctxs.extend(c)
            parts.append(d)
        return ctxs, b"".join(parts)

    def flush(self, flush_number: int, gen_number: int, extent_limit: int | None = None) -> None:
        if extent_limit is not None and extent_limit >= self.definition.extent_count:
            raise CrucibleError(ErrorKind.InvalidExtent)
        todo = [
            ext
            for eid in sorted(self.dirty_extents)
            if (extent_limit is None or eid <= extent_limit)
            # a closed extent is being repaired; it is flushed through ExtentFlush
            and (ext := self.extents[eid]) is not None
        ]
        if len(todo) > 1:
            # Extents are separate files: their fdatasyncs overlap well.
            if self._flush_pool is None:
                self._flush_pool = ThreadPoolExecutor(FLUSH_THREADS, "flush")
            done = self._flush_pool.map(lambda e: e.flush(flush_number, gen_number), todo)
            list(done)  # re-raises the first failure
        elif todo:
            todo[0].flush(flush_number, gen_number)
        for ext in todo:
            self.dirty_extents.discard(ext.number)

    # ---- per-extent operations for reconciliation and repair ---------------------

    def flush_extent(self, eid: int, flush_number: int, gen_number: int) -> None:
        self.extent(eid).flush(flush_number, gen_number)
        self.dirty_extents.discard(eid)

    def close_extent(self, eid: int) -> tuple[int, int, bool]:
        ext = self.extent(eid)
        self.extents[eid] = None
        self.dirty_extents.discard(eid)
        self.close_counts[eid] = self.close_counts.get(eid, 0) + 1
        return ext.close()

    def reopen_extent(self, eid: int) -> None:
        if not 0 <= eid < len(self.extents):
            raise CrucibleError(ErrorKind.InvalidExtent)
        if self.extents[eid] is not None:
            raise CrucibleError(ErrorKind.GenericError, f"extent {eid} is already open")
        if not self.read_only:
            self._settle_staging(eid)
        ext = self._open_extent(eid)
        self.extents[eid] = ext
        if ext.dirty:
            self.dirty_extents.add(eid)

    def reopen_closed(self) -> list[int]:
        """Reopen extents an interrupted repair left closed; returns their ids."""
        closed = [eid for eid, ext in enumerate(self.extents) if ext is None]
        for eid in closed:
            self.reopen_extent(eid)
        return closed

    def is_closed(self, eid: int) -> bool:
        return 0 <= eid < len(self.extents) and self.extents[eid] is None

    def closed_since(self, eid: int) -> int | None:
        """While extent `eid` is closed, a number that changes if it is reopened
        and closed again; None while it is open."""
        return self.close_counts.get(eid, 0) if self.is_closed(eid) else None

    def restamp(self, gen_number: int) -> None:
        """Every extent says generation `gen_number` (its data and flush number
        kept): a clone starts a life of its own, at generation 1."""
        for eid in range(len(self.extents)):
            ext = self.extent(eid)
            ext.dirty = True
            ext.flush(ext.flush_number, gen_number)
            self.dirty_extents.discard(eid)

    def replace_extent(self, eid: int, fetch: Callable[[BinaryIO], object]) -> None:
        """Replace a closed extent's file with one written by `fetch`, crash-safely:
        fill DIR/xxx.copy/, rename it to .replace, rename the file over the
        extent, then .replace -> .completed -> gone. `_settle_staging` finishes
        or undoes any of these steps after a crash."""
        if self.read_only:
            raise CrucibleError(ErrorKind.ModifyingReadOnlyRegion)
        if not self.is_closed(eid):
            raise CrucibleError(ErrorKind.GenericError, f"extent {eid} must be closed to repair")
        path = extent_path(self.dir, eid)
        copy = staging_dir(path, "copy")
        shutil.rmtree(copy, ignore_errors=True)
        copy.mkdir()
        new_file = copy / path.name
        with open(new_file, "wb") as f:
            fetch(f)
            f.flush()
            os.fsync(f.fileno())
        self._check_extent_file(new_file)
        fsync_dir(copy)
        replace = staging_dir(path, "replace")
        shutil.rmtree(replace, ignore_errors=True)
        os.rename(copy, replace)
        fsync_dir(path.parent)
        self._settle_staging(eid)

    def _check_extent_file(self, path: Path) -> None:
        size = path.stat().st_size
        if size != self.layout.file_size:
            raise CrucibleError(
                ErrorKind.RepairFilesInvalid,
                f"received extent file of {size} bytes, expected {self.layout.file_size}",
            )
        with open(path, "rb") as f:
            f.seek(self.layout.meta_offset)
            meta = f.read(META_SIZE)
        if META.unpack_from(meta)[3] != EXTENT_FORMAT_VERSION:
            raise CrucibleError(ErrorKind.RepairFilesInvalid, "received extent has a bad version")

    def _settle_staging(self, eid: int) -> None:
        path = extent_path(self.dir, eid)
        for stage in ("copy", "completed"):
            shutil.rmtree(staging_dir(path, stage), ignore_errors=True)
        replace = staging_dir(path, "replace")
        if not replace.is_dir():
            return
        staged = replace / path.name
        if staged.exists():
            os.rename(staged, path)
            fsync_dir(path.parent)
        completed = staging_dir(path, "completed")
        os.rename(replace, completed)
        fsync_dir(path.parent)
        shutil.rmtree(completed)
        fsync_dir(path.parent)
