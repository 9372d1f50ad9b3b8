"""The C library, for the few calls Python's os module lacks (fallocate hole
punching, sync_file_range, mallopt). Errors are read with ctypes.get_errno()."""

from __future__ import annotations

import ctypes
import ctypes.util

libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
