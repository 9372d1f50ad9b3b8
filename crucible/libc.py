"""The C library, for the few calls Python's os module lacks (fallocate hole
punching, sync_file_range, mallopt, malloc_trim, cachestat). Errors are read
with ctypes.get_errno()."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import signal
import sys
from typing import cast

libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

ZEROED_BYTES = 64 << 10
_new_bytearray = ctypes.pythonapi.PyByteArray_FromStringAndSize
_new_bytearray.restype = ctypes.py_object
_new_bytearray.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)


def trim_heap() -> None:
    """Return the heap's free memory to the system now, not at the trim
    threshold (see cli_util.tune_allocator): after a peer's large buffers die."""
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:  # glibc only
        trim(0)


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child between fork and exec: be killed when the parent dies, so a
    job the parent would redo after a restart is never left running too."""
    prctl = getattr(libc, "prctl", None)
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def address(buf: bytearray | memoryview) -> int:
    """Where a writable, non-empty buffer starts in memory; -1 for one that is
    read-only (ctypes can only take a writable buffer)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(buf))
    except (TypeError, ValueError):
        return -1


def raw_bytearray(n: int) -> bytearray:
    """A bytearray of n bytes left as the allocator gave them, not zeroed: for
    a buffer that is filled whole before any of it is read. Zeroing a MiB
    costs about as much as receiving it, and a length a peer claims but
    never sends then adds no resident memory beyond what the allocator holds.
    Below ZEROED_BYTES zeroing costs less than the ctypes call."""
    if n < ZEROED_BYTES:
        return bytearray(n)
    return cast(bytearray, _new_bytearray(None, n))


_SYS_CACHESTAT = 451  # one number on every architecture, from Linux 6.5 on
_has_cachestat = sys.platform == "linux"  # cleared once the kernel says it has none


def cached_pages(fd: int, offset: int, length: int) -> int | None:
    """How many pages of a file's byte range the page cache holds, found
    without reading any of it; None where the kernel cannot say (cachestat
    came in Linux 6.5; a seccomp filter may refuse it)."""
    global _has_cachestat
    if not _has_cachestat:
        return None
    span = (ctypes.c_uint64 * 2)(offset, length)
    stat = (ctypes.c_uint64 * 5)()  # cached, dirty, writeback, evicted, recently evicted
    if libc.syscall(ctypes.c_long(_SYS_CACHESTAT), ctypes.c_long(fd), span, stat, ctypes.c_long(0)):
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
            _has_cachestat = False
        return None
    return int(stat[0])
