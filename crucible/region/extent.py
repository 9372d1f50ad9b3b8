"""One extent file: block data, two context slots per block, bitmap, metadata.

Crash-safety argument (ext4/xfs, which may persist writes out of order):

* A write puts each block's new context into the block's *inactive* slot and
  only then writes the data; the in-memory active slot flips afterwards. The
  slot that describes the old data is never touched by that write, so after a
  crash a block's data matches the old context or the new one.
* A block written twice between syncs would overwrite the slot holding the
  last *durable* context, so before that we fdatasync ("bonus sync").
* The first write after a flush sets the dirty byte and fdatasyncs it before
  any data moves, so a crashed extent is always known to be dirty. On opening a
  dirty extent the bitmap cannot be trusted and each block's active slot is
  found again by hashing the data against both slots' on-disk hashes.
* A flush fdatasyncs data and contexts first, then writes bitmap + metadata
  (dirty = 0, new numbers) in one pwrite and fdatasyncs again, so a clean
  extent's bitmap always describes durable data.
* On opening a dirty extent, a block whose data matches neither slot was
  torn by a crash mid-write. What it may hold afterwards is any state it had
  between its last flush and that write, since neither was flushed; what
  that means depends on its slots:
  - One slot is empty (never written, or trimmed): that slot is the state
    at the last flush or a later one (an empty slot not describing a state
    that recent would have been overwritten by the write after it, which
    goes to the inactive slot). So the block goes back to never-written,
    and its torn bytes are punched out, so that its data and its context
    agree again (zeros). Rust Crucible also takes the empty slot but keeps
    the torn bytes, so its upstairs later finds data under an empty
    context (MissingBlockContext) and fails that read.
  - Both slots are filled: neither state can be rebuilt, so the block is
    damaged: reads of it fail (MissingContextSlot), `verify` reports it, and
    flushing the extent is refused, since writing clean metadata over it
    would bless the torn bytes. Reconciliation (every dirty extent is
    repaired at activation) then takes another replica as the extent's
    source and overwrites this copy. Rust Crucible instead refuses to open
    the extent, and with it the whole region: one torn block would keep
    this replica, and the volume's activation, down until an operator acts.
  A read-only open changes nothing on disk: a torn block is damaged there.
* Writes of DIRECT_BYTES or more put their data through a second fd opened
  with O_DIRECT (as a VM disk's cache=none does), sparing the copy into
  page-cache pages. Nothing above relies on it: fdatasync is per file, not
  per fd, so a flush covers both, and the kernel keeps the page cache and
  the direct writes coherent.
* A small read that misses the page cache starts reading the window around
  it too (READ_AROUND_BYTES), while such windows are used (MISSES_LIMIT):
  the data large writes sent around the cache comes back in few disk reads.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, Literal

import xxhash

from crucible.common.buffer import Buffer, is_zeros
from crucible.common.errors import CrucibleError, ErrorKind
from crucible.libc import address, cached_pages, libc, raw_bytearray
from crucible.protocol.integrity import block_hashes, plain_hashes
from crucible.protocol.messages import BlockContext, EncryptionContext, ReadBlockContext
from crucible.protocol.wire import struct_run
from crucible.region.context import (
    BadSlot,
    SlotContext,
    decode_slot,
    encode_plain_slots,
    encode_slot,
)
from crucible.region.layout import (
    EXTENT_FORMAT_VERSION,
    META,
    META_SIZE,
    SLOT_SIZE,
    ExtentLayout,
    encode_meta,
    pack_bitmap,
    unpack_bitmap,
)

_Q = struct.Struct("<Q")
_FLIP: Final = bytes.maketrans(b"\x00\x01", b"\x01\x00")  # a slot index: the other slot


def pwrite_all(fd: int, data: Buffer, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


_O_DIRECT: int = getattr(os, "O_DIRECT", 0)  # 0: none on this system
DIRECT_BYTES: Final = 256 << 10  # writes this large bypass the page cache
BOUNCE_KEEP: Final = 4 << 20  # a larger aligned buffer is dropped after its write
# Reads this large read exactly what is asked, with no readahead: the
# upstairs sends a MiB of the volume to one replica and the next MiB to
# another, so what the kernel would read ahead here is served elsewhere.
# What the page cache does not hold whole they read through the O_DIRECT fd
# (see Extent._read_large). Smaller reads keep readahead: the rest of their
# MiB comes here.
EXACT_READ_BYTES: Final = 1 << 20
# A smaller read that misses the page cache also starts reading the aligned
# window around it (the kernel reads just the blocks asked for a random
# read): the upstairs reads a MiB of the volume from one replica, so the
# next reads near it come here. As the kernel's read-around of mmap faults,
# it stops once misses outnumber hits by MISSES_LIMIT: then reads are random
# beyond what the cache holds and the window would only cost disk time. It
# starts again only when hits have brought that down to half the limit, not
# at the first hit: a cache too small for the reads has some hits, and each
# would let one more window through.
# The count is approximate, which a limit this loose allows: a read that comes
# while its window is still being read counts as a miss, and a miss whose own
# block arrives before the try looks again counts as a hit.
READ_AROUND_BYTES: Final = 128 << 10
MISSES_LIMIT: Final = 100


# A page-aligned buffer per thread, reused: O_DIRECT needs aligned memory.
# (A plain threading.local: a subclass of it compiled by mypyc breaks it.)
_local = threading.local()


def bounce_buffer() -> mmap.mmap | None:
    """This thread's aligned buffer, if it has one."""
    buf: mmap.mmap | None = getattr(_local, "buf", None)
    return buf


def direct_pwrite(fd: int, data: memoryview, offset: int) -> None:
    """Write through an O_DIRECT fd: straight from `data` when it is
    page-aligned (a large frame's bulk data is, see framing.py), else by way
    of the aligned buffer. At most one copy in user space instead of the
    kernel's into page-cache pages, which are then not filled (a replica's
    data is read back rarely, its writes are large)."""
    if address(data) % mmap.PAGESIZE == 0:
        pwrite_all(fd, data, offset)
        return
    n = len(data)
    buf = bounce_buffer()
    if buf is None or len(buf) < n:
        buf = mmap.mmap(-1, -(-n // mmap.PAGESIZE) * mmap.PAGESIZE)
        if n <= BOUNCE_KEEP:  # a peer's rare huge write gets one of its own
            _local.buf = buf
    with memoryview(buf) as whole, whole[:n] as view:
        view[:] = data
        pwrite_all(fd, view, offset)


def direct_pread(fd: int, size: int, offset: int) -> memoryview:
    """`size` bytes at `offset` through an O_DIRECT fd, into page-aligned
    memory of the heap's (an mmap per read would fault in every page)."""
    buf = raw_bytearray(size + mmap.PAGESIZE)
    at = -address(buf) % mmap.PAGESIZE
    view = memoryview(buf)[at : at + size]
    check_whole(os.preadv(fd, [view], offset), size, offset)
    return view


class WouldBlock(Exception):
    """A read asked only of the page cache found some of its data missing."""


class CannotProbe(WouldBlock):
    """The filesystem cannot read from the page cache alone (tmpfs, FUSE)."""


# Linux: preadv2 fails with EAGAIN rather than wait for the disk.
_RWF_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)


def pread_cached(fd: int, size: int, offset: int) -> bytearray:
    """`size` bytes at `offset` if the page cache holds all of them; else
    WouldBlock, having waited for nothing (also where RWF_NOWAIT is unknown)."""
    if _RWF_NOWAIT is None:
        raise WouldBlock
    buf = raw_bytearray(size)
    try:
        got = os.preadv(fd, [buf], offset, _RWF_NOWAIT)
    except OSError as e:
        if e.errno == errno.EAGAIN:
            raise WouldBlock from None
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            raise CannotProbe from None
        raise
    if got != size:  # partly cached, or short: the blocking read says which
        raise WouldBlock
    return buf


def pages_spanned(offset: int, size: int) -> int:
    """The page cache's pages a non-empty byte range touches."""
    return (offset + size - 1) // mmap.PAGESIZE - offset // mmap.PAGESIZE + 1


def check_whole(got: int, size: int, offset: int) -> None:
    """A read at `offset` gave `got` of the `size` bytes it asked for: all or an IoError."""
    if got != size:
        raise CrucibleError(
            ErrorKind.IoError, f"short read: {got} of {size} bytes at offset {offset}"
        )


def pread_exact(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    check_whole(len(data), size, offset)
    return data


# A slot's (Some tag, hash, encryption tag) and the rest skipped: plain is (1, hash, 0).
_SLOT_HEAD: Final = f"BQB{SLOT_SIZE - 10}x"


def io_error(e: OSError, what: str) -> CrucibleError:
    return CrucibleError(ErrorKind.IoError, f"{what}: {e.strerror or e}")


_FALLOC_FL_KEEP_SIZE: Final = 1
_FALLOC_FL_PUNCH_HOLE: Final = 2


_SYNC_FILE_RANGE_WRITE: Final = 2
WRITEBACK_BYTES: Final = 256 << 10  # writes this large start their writeback at once


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk now, without waiting.
    Durability still comes from the flush's fdatasync, which then has little
    left to write: the disk works while writes arrive instead of all at once
    at the flush. Only a hint: where unsupported, nothing happens."""
    libc.sync_file_range(fd, ctypes.c_long(offset), ctypes.c_long(length), _SYNC_FILE_RANGE_WRITE)


def advise(fd: int, offset: int, length: int, advice: str) -> bool:
    """posix_fadvise with the advice named ("WILLNEED", "RANDOM"). Only a
    hint: where the kernel or the platform lacks it, nothing happens and the
    answer is False."""
    try:
        os.posix_fadvise(fd, offset, length, getattr(os, "POSIX_FADV_" + advice))
    except (OSError, AttributeError):  # (AttributeError: no posix_fadvise here)
        return False
    return True


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a byte range (it reads back as zeros); where the filesystem
    cannot, write zeros instead."""
    mode = _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE
    if libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
        raise OSError(err, os.strerror(err))
    pwrite_all(fd, bytes(length), offset)


def runs(flags: list[bool]) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive True values."""
    out: list[tuple[int, int]] = []
    start = -1
    for i, f in enumerate(flags):
        if f and start < 0:
            start = i
        elif not f and start >= 0:
            out.append((start, i))
            start = -1
    if start >= 0:
        out.append((start, len(flags)))
    return out


CONTEXT_CHUNK: Final = 32  # blocks whose contexts are read, kept and dropped together
CONTEXT_CHUNKS: Final = 8192  # chunks a region keeps at most (about 1.5 KiB each)


class ContextCache:
    """The contexts of recently read (or largely written) blocks, decoded, so
    that a read needs one syscall (its data) instead of two. Each extent keeps its own in
    chunks of CONTEXT_CHUNK blocks (`Extent.context_chunks`); the extents of
    one region share this budget of `capacity` chunks, and past it all are
    dropped and kept anew (reads that keep to a working set that fits gain;
    others pay one slot array of CONTEXT_CHUNK slots per miss). A large read
    or write keeps the chunks it covers whole, so a large read of what was
    just written reads no slots. Writes and trims update the chunks they
    touch; a closed extent's chunks go with it.
    Only the context is kept: the upstairs still checks every block's data
    against it."""

    def __init__(self, capacity: int = CONTEXT_CHUNKS) -> None:
        self.capacity = capacity
        self.held = 0
        self.extents: set[Extent] = set()

    def room(self, ext: Extent) -> None:
        """`ext` is about to keep one more chunk."""
        if self.held >= self.capacity:
            for e in self.extents:
                e.context_chunks.clear()
            self.extents.clear()
            self.held = 0
        self.held += 1
        self.extents.add(ext)

    def forget(self, ext: Extent) -> None:
        """`ext` drops every chunk it keeps."""
        if ext in self.extents:
            self.extents.discard(ext)
            self.held -= len(ext.context_chunks)
        ext.context_chunks.clear()


class Extent:
    """An open extent. Not thread-safe: the downstairs runs one disk op at a time."""

    def __init__(
        self,
        number: int,
        path: Path,
        layout: ExtentLayout,
        fd: int,
        read_only: bool,
        cache: ContextCache | None = None,
    ) -> None:
        self.number = number
        self.path = path
        self.layout = layout
        self.fd = fd
        self.read_only = read_only
        self.dirty = False
        self.gen = 0
        self.flush_number = 0
        self.active = bytearray(layout.blocks)  # 0 = slot A, 1 = slot B
        self.unsynced = bytearray(layout.blocks)  # written since the last fdatasync
        self.damaged: set[int] = set()
        self._direct = -2  # the O_DIRECT fd for large IO; -2 not opened yet, -1 none
        self._exact = -2  # the fd for large reads the page cache holds, as _direct
        self.misses = 0  # small reads that missed the page cache, less those that hit
        self.read_around = True  # small misses start their window: see MISSES_LIMIT
        self._probe = _RWF_NOWAIT is not None  # cleared where the filesystem has no RWF_NOWAIT
        self.cache = cache
        self.context_chunks: dict[int, list[ReadBlockContext]] = {}  # see ContextCache

    # ---- lifecycle ----------------------------------------------------------

    @staticmethod
    def create(path: Path, layout: ExtentLayout) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, layout.file_size)  # sparse: all slots None, bitmap all A
            pwrite_all(fd, encode_meta(False, 0, 0), layout.meta_offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    @classmethod
    def open(
        cls,
        number: int,
        path: Path,
        layout: ExtentLayout,
        read_only: bool,
        cache: ContextCache | None = None,
    ) -> Extent:
        try:
            fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        except FileNotFoundError:
            raise CrucibleError(ErrorKind.BadMetadata, f"extent file {path} is missing") from None
        except OSError as e:
            raise io_error(e, f"open {path}") from None
        try:
            size = os.fstat(fd).st_size
            if size != layout.file_size:
                raise CrucibleError(
                    ErrorKind.BadMetadata,
                    f"extent file {path} is {size} bytes, expected {layout.file_size}"
                    + (" (truncated)" if size < layout.file_size else ""),
                )
            ext = cls(number, path, layout, fd, read_only, cache)
            ext._load()
            return ext
        except BaseException:
            os.close(fd)
            raise

    def _load(self) -> None:
        lay = self.layout
        tail = pread_exact(self.fd, lay.bitmap_bytes + META_SIZE, lay.bitmap_offset)
        dirty, gen, flush, version, _, _ = META.unpack_from(tail, lay.bitmap_bytes)
        if version != EXTENT_FORMAT_VERSION:
            raise CrucibleError(
                ErrorKind.BadMetadata,
                f"extent file {self.path} has format version {version}, "
                f"expected {EXTENT_FORMAT_VERSION}",
            )
        if dirty > 1:
            raise CrucibleError(ErrorKind.BadMetadata, f"extent {self.path}: dirty byte {dirty}")
        self.dirty, self.gen, self.flush_number = bool(dirty), gen, flush
        self.active = unpack_bitmap(tail[: lay.bitmap_bytes], lay.blocks)
        if self.dirty:
            self._recover_slots(0, lay.blocks)

    def close(self) -> tuple[int, int, bool]:
        self._forget_contexts()
        os.close(self.fd)
        for extra in (self._direct, self._exact):
            if extra >= 0:
                os.close(extra)
        self._direct = self._exact = -2
        self.fd = -1
        return self.gen, self.flush_number, self.dirty

    # ---- slots --------------------------------------------------------------

    def _slot_arrays(self, start: int, n: int) -> tuple[bytes, bytes]:
        lay = self.layout
        a = pread_exact(self.fd, SLOT_SIZE * n, lay.slot_offset(0, start))
        b = pread_exact(self.fd, SLOT_SIZE * n, lay.slot_offset(1, start))
        return a, b

    def where(self, block: int) -> str:
        """A block of this extent as an operator looks for it."""
        return f"block {block} (region block {self.number * self.layout.blocks + block})"

    def _decode(self, raw: bytes, i: int, block: int) -> SlotContext | None:
        """The i-th slot in `raw`, which is that of `block`."""
        try:
            return decode_slot(raw, SLOT_SIZE * i)
        except BadSlot as e:
            where = self.where(block)
            raise CrucibleError(
                ErrorKind.BadContextSlot, f"extent {self.number} {where}: {e}"
            ) from None

    def _recover_slots(self, start: int, n: int) -> None:
        """Choose each block's active slot from the data actually on disk."""
        self._forget_contexts()
        bs = self.layout.block_size
        data = pread_exact(self.fd, n * bs, start * bs)
        raw_a, raw_b = self._slot_arrays(start, n)
        for i in range(n):
            block = start + i
            chunk = data[i * bs : (i + 1) * bs]
            h = xxhash.xxh64_intdigest(chunk)
            slots = (self._decode(raw_a, i, block), self._decode(raw_b, i, block))
            current = self.active[block]
            order = (current, 1 - current)
            chosen = next(
                (s for s in order if (sc := slots[s]) is not None and sc.on_disk_hash == h), None
            )
            empty = next((s for s in order if slots[s] is None), None)
            if chosen is None and empty is not None:
                blank = is_zeros(chunk)
                if blank or not self.read_only:
                    chosen = empty
                    if not blank:  # torn: back to never-written (see the top of the file)
                        punch_hole(self.fd, block * bs, bs)
            if chosen is None:
                self.damaged.add(block)
            else:
                self.active[block] = chosen
                self.damaged.discard(block)

    def active_slots(self, start: int, n: int) -> list[SlotContext | None]:
        act = self.active
        if act.find(1, start, start + n) == -1 or act.find(0, start, start + n) == -1:
            # All in one slot array (the usual case): one read, not two.
            slot = act[start] if n else 0
            raw = pread_exact(self.fd, SLOT_SIZE * n, self.layout.slot_offset(slot, start))
            return [self._decode(raw, i, start + i) for i in range(n)]
        raw_a, raw_b = self._slot_arrays(start, n)
        return [self._decode(raw_b if act[start + i] else raw_a, i, start + i) for i in range(n)]

    # ---- IO -----------------------------------------------------------------

    def _check_range(self, start: int, n: int) -> None:
        if start < 0 or n < 0 or start + n > self.layout.blocks:
            raise CrucibleError(ErrorKind.OffsetInvalid)

    def read(
        self, start: int, n: int, cached_only: bool = False
    ) -> tuple[list[ReadBlockContext], Buffer]:
        """The contexts and data of n blocks. `cached_only`: WouldBlock rather
        than wait for the disk for the data (its contexts are read as usual)."""
        self._check_range(start, n)
        for b in self.damaged:
            if start <= b < start + n:
                raise CrucibleError(ErrorKind.MissingContextSlot, values=(b, self.number))
        size, offset = n * self.layout.block_size, start * self.layout.block_size
        try:
            data: Buffer
            if size >= EXACT_READ_BYTES:
                data = self._read_large(size, offset, cached_only)
            elif cached_only:
                data = pread_cached(self.fd, size, offset)
            else:
                data = self._read_small(size, offset)
            return self._contexts(start, n), data
        except OSError as e:
            raise io_error(e, f"read extent {self.number}") from None

    def _read_large(self, size: int, offset: int, cached_only: bool) -> Buffer:
        """A read of EXACT_READ_BYTES or more. What the page cache holds
        whole is copied from there; the rest is read from the disk through the
        O_DIRECT fd, into the buffer that is sent. A replica rarely has its
        large reads cached (its large writes bypass the page cache), and
        filling pages for one read and copying out of them cost about a third
        of the downstairs' CPU per MiB read. Where the kernel cannot say what
        it holds, a cached-only try is the probe (it starts the read into the
        page cache, which the disk thread's buffered read then waits for)."""
        held = cached_pages(self.fd, offset, size)
        whole = held is not None and held >= pages_spanned(offset, size)
        if cached_only:
            if held is not None and not whole:
                raise WouldBlock  # without starting a buffered read of it
            return pread_cached(self._exact_fd(), size, offset)
        if held is not None and not whole and self._direct_fd() >= 0:
            try:
                return direct_pread(self._direct, size, offset)
            except OSError as e:
                self._direct_refused(e)
        return pread_exact(self._exact_fd(), size, offset)

    def _read_small(self, size: int, offset: int) -> Buffer:
        """A read smaller than EXACT_READ_BYTES: from the page cache when it
        holds the data (no more syscalls than a plain read); else, while the
        read-around is on (see MISSES_LIMIT), with the window around it
        started too. The try already started this read's own blocks, so they
        come first from the disk."""
        if not self._probe or size >= READ_AROUND_BYTES:
            return pread_exact(self.fd, size, offset)
        try:
            data = pread_cached(self.fd, size, offset)
        except CannotProbe:
            self._probe = False
        except WouldBlock:
            if self.read_around:
                end = self.layout.blocks * self.layout.block_size
                at = offset - offset % READ_AROUND_BYTES
                advise(self.fd, at, min(READ_AROUND_BYTES, end - at), "WILLNEED")
            if self.misses < MISSES_LIMIT:
                self.misses += 1
            if self.misses == MISSES_LIMIT:
                self.read_around = False
        else:
            if self.misses:
                self.misses -= 1
            if self.misses <= MISSES_LIMIT // 2:
                self.read_around = True
            return data
        return pread_exact(self.fd, size, offset)

    def _contexts(self, start: int, n: int) -> list[ReadBlockContext]:
        """The contexts of n blocks: from the kept chunks when they hold them
        all; else read, and the chunks the read covers whole are kept."""
        cache = self.cache
        if cache is None or not n:
            return self._read_contexts(start, n)
        c = start // CONTEXT_CHUNK
        last = (start + n - 1) // CONTEXT_CHUNK
        chunks = self.context_chunks
        if c == last:  # a small read: its one chunk, read whole when missing
            chunk = chunks.get(c)
            if chunk is None:
                first = c * CONTEXT_CHUNK
                try:
                    chunk = self._read_contexts(first, self._chunk_len(c))
                except CrucibleError:  # a bad slot in the chunk: this read's own may be good
                    return self._read_contexts(start, n)
                cache.room(self)
                chunks[c] = chunk
            at = start - c * CONTEXT_CHUNK
            return chunk[at : at + n]
        kept = [chunks.get(k) for k in range(c, last + 1)]
        if None not in kept:
            out: list[ReadBlockContext] = []
            for chunk in kept:
                assert chunk is not None
                out += chunk
            at = start - c * CONTEXT_CHUNK
            return out[at : at + n] if at or len(out) != n else out
        ctxs = self._read_contexts(start, n)
        self._keep_whole_chunks(start, ctxs)
        return ctxs

    def _chunk_len(self, c: int) -> int:
        """Blocks in chunk c (the extent's last one may be short)."""
        return min(CONTEXT_CHUNK, self.layout.blocks - c * CONTEXT_CHUNK)

    def _keep_whole_chunks(self, start: int, ctxs: list[ReadBlockContext]) -> None:
        """Keep the chunks that `ctxs`, the contexts from `start` on, cover
        whole and that are not kept yet."""
        cache = self.cache
        if cache is None:
            return
        end = start + len(ctxs)
        for c in range(-(-start // CONTEXT_CHUNK), end // CONTEXT_CHUNK + 1):
            first = c * CONTEXT_CHUNK
            size = self._chunk_len(c)
            if size <= 0 or first + size > end or c in self.context_chunks:
                continue
            cache.room(self)
            self.context_chunks[c] = ctxs[first - start : first - start + size]

    def _update_contexts(self, start: int, n: int, written: Sequence[BlockContext] | None) -> None:
        """n blocks from `start` were written with these contexts (None:
        trimmed): the chunks kept say what a read of them now returns, and
        the chunks written whole are kept (what was just written is often
        read next)."""
        hashes = None if written is None else plain_hashes(written)
        new: list[ReadBlockContext]
        if written is None:
            new = [None] * n
        elif hashes is not None:  # a plain block reads back as its hash
            new = list(hashes)
        else:
            new = [
                ctx.hash if ctx.encryption is None
                else EncryptionContext(bytes(ctx.encryption.nonce), bytes(ctx.encryption.tag))
                for ctx in written
            ]  # fmt: skip
        end = start + n
        for c in range(start // CONTEXT_CHUNK, (end - 1) // CONTEXT_CHUNK + 1):
            chunk = self.context_chunks.get(c)
            if chunk is not None:
                first = c * CONTEXT_CHUNK
                lo, hi = max(start, first), min(end, first + len(chunk))
                chunk[lo - first : hi - first] = new[lo - start : hi - start]
        if n >= CONTEXT_CHUNK:
            self._keep_whole_chunks(start, new)

    def _forget_contexts(self) -> None:
        if self.cache is not None:
            self.cache.forget(self)

    def _read_contexts(self, start: int, n: int) -> list[ReadBlockContext]:
        act = self.active
        if n and (act.find(1, start, start + n) == -1 or act.find(0, start, start + n) == -1):
            # One slot array, and (the usual case) every block plain or never
            # written: one unpack.
            raw = pread_exact(self.fd, SLOT_SIZE * n, self.layout.slot_offset(act[start], start))
            heads = struct_run(_SLOT_HEAD, n).unpack(raw)
            tags = heads[0::3]
            if heads[2::3].count(0) == n:
                written = tags.count(1)
                if written == n:
                    return list(heads[1::3])
                if written + tags.count(0) == n:
                    return [h if t else None for t, h in zip(tags, heads[1::3], strict=True)]
        ctxs: list[ReadBlockContext] = []
        for sc in self.active_slots(start, n):
            if sc is None:
                ctxs.append(None)
            elif sc.context.encryption is not None:
                ctxs.append(sc.context.encryption)
            else:
                ctxs.append(sc.context.hash)
        return ctxs

    def write(
        self,
        start: int,
        data: memoryview,
        contexts: Sequence[BlockContext],
        only_unwritten: bool = False,
    ) -> None:
        """Write blocks whose hashes the caller has already checked."""
        if self.read_only:
            raise CrucibleError(ErrorKind.ModifyingReadOnlyRegion)
        n = len(contexts)
        self._check_range(start, n)
        if not only_unwritten:
            self._write_run(start, data, contexts)
            return
        bs = self.layout.block_size
        unwritten = [sc is None for sc in self.active_slots(start, n)]
        for s, e in runs(unwritten):
            self._write_run(start + s, data[s * bs : e * bs], contexts[s:e])

    def _write_run(self, start: int, data: memoryview, contexts: Sequence[BlockContext]) -> None:
        bs = self.layout.block_size
        flush_id = self.flush_number
        hashes = plain_hashes(contexts)  # (PlainContexts, the usual, has them already)
        if hashes is not None:
            # Plaintext on disk: each hash already covers its block.
            slots = encode_plain_slots(hashes, flush_id)
        else:
            # Sealed blocks keep the hash of their ciphertext as well.
            on_disk = block_hashes(data, bs)
            parts = [
                encode_slot(ctx, ctx.hash if ctx.encryption is None else odh, flush_id)
                for ctx, odh in zip(contexts, on_disk, strict=True)
            ]
            slots = b"".join(parts)
        offset = start * bs
        if len(data) >= DIRECT_BYTES and self._direct_fd() >= 0:
            self._replace_blocks(start, slots, contexts, lambda: self._put_direct(data, offset))
            return
        self._replace_blocks(start, slots, contexts, lambda: pwrite_all(self.fd, data, offset))
        if len(data) >= WRITEBACK_BYTES:
            start_writeback(self.fd, offset, len(data))

    def _direct_fd(self) -> int:
        """The extent's O_DIRECT fd, opened at the first large IO that takes
        it; -1 where the filesystem has none (tmpfs, some FUSE)."""
        if self._direct == -2:
            self._direct = -1
            if _O_DIRECT:
                mode = os.O_RDONLY if self.read_only else os.O_RDWR
                try:
                    self._direct = os.open(self.path, mode | _O_DIRECT)
                except OSError:
                    pass
        return self._direct

    def _direct_refused(self, e: OSError) -> None:
        """An IO through the O_DIRECT fd failed with `e`: an alignment this
        filesystem will not take (EINVAL) means buffered IO from now on."""
        if e.errno != errno.EINVAL:
            raise e
        os.close(self._direct)
        self._direct = -1

    def _exact_fd(self) -> int:
        """The extent's fd for large reads, opened at the first one: the
        same file, with readahead off (POSIX_FADV_RANDOM holds per open
        file); the extent's own fd where that cannot be had."""
        if self._exact == -2:
            self._exact = -1
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except OSError:
                return self.fd
            if not advise(fd, 0, 0, "RANDOM"):
                os.close(fd)
                return self.fd
            self._exact = fd
        return self._exact if self._exact >= 0 else self.fd

    def _put_direct(self, data: memoryview, offset: int) -> None:
        try:
            direct_pwrite(self._direct, data, offset)
        except OSError as e:
            self._direct_refused(e)
            pwrite_all(self.fd, data, offset)

    def trim(self, start: int, n: int) -> None:
        """Make blocks never-written: empty contexts, then the data's space is
        punched out of the file (reading back as zeros). A crash leaves each
        block either as it was or empty, as with a write."""
        if self.read_only:
            raise CrucibleError(ErrorKind.ModifyingReadOnlyRegion)
        self._check_range(start, n)
        bs = self.layout.block_size
        self._replace_blocks(
            start, bytes(SLOT_SIZE * n), None, lambda: punch_hole(self.fd, start * bs, n * bs)
        )

    def _replace_blocks(
        self,
        start: int,
        slots: bytes,
        written: Sequence[BlockContext] | None,
        put_data: Callable[[], None],
    ) -> None:
        """The write protocol: dirty mark (synced) once per flush, a sync before
        reusing a slot not yet durable, new contexts into the inactive slots
        (`slots`: the encoded slot of each block in turn, of `written`, or
        empty for a trim), then the data, then the in-memory flip."""
        lay = self.layout
        n = len(slots) // SLOT_SIZE
        fd = self.fd
        try:
            if not self.dirty:
                pwrite_all(fd, b"\x01", lay.meta_offset)
                os.fdatasync(fd)
                self.dirty = True
            if self.unsynced.find(1, start, start + n) != -1:
                os.fdatasync(fd)
                self.unsynced = bytearray(lay.blocks)
        except OSError as e:
            raise io_error(e, f"write extent {self.number}") from None
        target = self.active[start : start + n].translate(_FLIP)
        i = 0
        try:
            while i < n:
                slot = target[i]
                j = target.find(1 - slot, i)  # where the run of this slot ends
                if j == -1:
                    j = n
                run = slots if i == 0 and j == n else slots[i * SLOT_SIZE : j * SLOT_SIZE]
                pwrite_all(fd, run, lay.slot_offset(slot, start + i))
                i = j
            put_data()
        except OSError as e:
            # Some of the range may be new: find out block by block what is on disk.
            try:
                self._recover_slots(start, n)
            except (OSError, CrucibleError):
                self.damaged.update(range(start, start + n))
            raise io_error(e, f"write extent {self.number}") from None
        self.active[start : start + n] = target
        if self.context_chunks or (self.cache is not None and n >= CONTEXT_CHUNK):
            self._update_contexts(start, n, written)
        self.unsynced[start : start + n] = b"\x01" * n
        if self.damaged:
            self.damaged.difference_update(range(start, start + n))

    def flush(self, flush_number: int, gen_number: int) -> bool:
        """Persist a dirty extent with new numbers; a clean one keeps its own."""
        if not self.dirty:
            return False
        if self.damaged:
            # Clean metadata would describe torn bytes as good: another copy must replace it.
            block = min(self.damaged)
            raise CrucibleError(ErrorKind.MissingContextSlot, values=(block, self.number))
        lay = self.layout
        try:
            os.fdatasync(self.fd)  # data and contexts before the metadata clearing dirty
            pwrite_all(
                self.fd,
                pack_bitmap(self.active) + encode_meta(False, gen_number, flush_number),
                lay.bitmap_offset,
            )
            os.fdatasync(self.fd)
        except OSError as e:
            raise io_error(e, f"flush extent {self.number}") from None
        self.dirty = False
        self.gen = gen_number
        self.flush_number = flush_number
        self.unsynced = bytearray(lay.blocks)
        return True

    # ---- checks -------------------------------------------------------------

    def verify(self) -> list[str]:
        """Every block against its active context; an empty slot must hold zeros."""
        where = self.where
        problems = [f"{where(b)}: data matches neither context slot" for b in sorted(self.damaged)]
        bs = self.layout.block_size
        step = max(1, (8 << 20) // bs)
        for start in range(0, self.layout.blocks, step):
            n = min(step, self.layout.blocks - start)
            data = pread_exact(self.fd, n * bs, start * bs)
            for i, sc in enumerate(self._slots_or_problems(start, n, problems)):
                block = start + i
                if block in self.damaged or sc is False:
                    continue
                chunk = data[i * bs : (i + 1) * bs]
                if sc is None:
                    if not is_zeros(chunk):
                        problems.append(f"{where(block)}: never written but holds data")
                elif xxhash.xxh64_intdigest(chunk) != sc.on_disk_hash:
                    problems.append(f"{where(block)}: data does not match its context hash")
                elif sc.context.encryption is None and sc.context.hash != sc.on_disk_hash:
                    problems.append(f"{where(block)}: context hash differs from on-disk hash")
        return problems

    def _slots_or_problems(
        self, start: int, n: int, problems: list[str]
    ) -> list[SlotContext | Literal[False] | None]:
        """The active slots; a slot that cannot be decoded is False, and said
        in `problems` (every one of them, not only the first)."""
        try:
            return list(self.active_slots(start, n))
        except CrucibleError:
            pass
        out: list[SlotContext | Literal[False] | None] = []
        for block in range(start, start + n):
            raw = pread_exact(
                self.fd, SLOT_SIZE, self.layout.slot_offset(self.active[block], block)
            )
            try:
                out.append(decode_slot(raw, 0))
            except BadSlot as e:
                problems.append(f"{self.where(block)}: bad context slot: {e}")
                out.append(False)
        return out
