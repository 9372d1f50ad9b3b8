"""Snapshots of a region: point-in-time copies under DIR/.snapshot/NAME/,
each a complete region directory (region.json and every extent file) that
`crucible-downstairs run --snapshot NAME` serves read-only.

A snapshot is taken right after a flush, in the disk worker, so nothing is
written meanwhile and every extent is clean. Each file is cloned with
FICLONE where the filesystem shares blocks (btrfs, XFS with reflink, bcachefs:
instant, no space used until the region changes), and copied, holes kept,
where it does not (ext4, tmpfs). The copy is built under a temporary name,
synced, then renamed into place: a crash leaves either no snapshot or a
whole one, and taking one again under a name that exists does nothing.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from crucible.common.errors import CrucibleError, ErrorKind
from crucible.region.allocation import data_ranges
from crucible.region.definition import REGION_JSON, fsync_dir
from crucible.region.layout import extent_relpath

SNAPSHOT_DIR = ".snapshot"
FICLONE = 0x40049409
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        why = f"snapshot name {name!r}: 1-128 letters, digits, '.', '_' or '-', not first '.'"
        raise CrucibleError(ErrorKind.SnapshotFailed, why)


def snapshot_dir(region_dir: Path, name: str) -> Path:
    check_name(name)
    return region_dir / SNAPSHOT_DIR / name


@dataclass(frozen=True)
class SnapshotInfo:
    name: str
    created: float  # seconds since the epoch
    bytes_used: int  # what its files hold (shared with the region when cloned)


def take(region_dir: Path, extent_count: int, name: str) -> bool:
    """Snapshot the (flushed) region; False if one of that name exists already."""
    dest = snapshot_dir(region_dir, name)
    if (dest / REGION_JSON).exists():
        return False
    parent = dest.parent
    parent.mkdir(exist_ok=True)
    tmp = parent / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)  # a snapshot cut short earlier
    tmp.mkdir()
    files = [Path(REGION_JSON)] + [extent_relpath(e) for e in range(extent_count)]
    for rel in files:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        clone_file(region_dir / rel, tmp / rel)
    for d in {(tmp / rel).parent for rel in files}:
        fsync_dir(d)
    tmp.rename(dest)
    fsync_dir(parent)
    return True


def clone_file(src: Path, dst: Path) -> None:
    """`dst` a synced copy of `src`: a reflink where the filesystem makes one,
    else the data ranges copied (holes stay holes)."""
    with open(src, "rb") as s, open(dst, "wb") as d:
        try:
            fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
                raise
            size = os.fstat(s.fileno()).st_size
            for start, end in data_ranges(s.fileno(), size):
                pos = start
                while pos < end:
                    n = os.copy_file_range(s.fileno(), d.fileno(), end - pos, pos, pos)
                    if n == 0:
                        break
                    pos += n
            d.truncate(size)
        os.fsync(d.fileno())


def list_snapshots(region_dir: Path) -> list[SnapshotInfo]:
    root = region_dir / SNAPSHOT_DIR
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if d.name.startswith(".") or not (d / REGION_JSON).exists():
            continue  # one being made, or cut short
        used = sum(f.stat().st_blocks * 512 for f in d.rglob("*") if f.is_file())
        out.append(SnapshotInfo(d.name, (d / REGION_JSON).stat().st_mtime, used))
    return out


def delete(region_dir: Path, name: str) -> None:
    d = snapshot_dir(region_dir, name)
    if not (d / REGION_JSON).exists():
        raise CrucibleError(ErrorKind.SnapshotFailed, f"no snapshot {name!r} at {region_dir}")
    gone = d.with_name(f".{name}.deleting.{time.monotonic_ns()}")
    d.rename(gone)  # gone at once, even if removing its files takes a while
    shutil.rmtree(gone)
