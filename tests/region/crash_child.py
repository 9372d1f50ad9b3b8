"""Child process for the crash test: writes and flushes a region until killed.

Each step is logged before it starts ("W start n version", "F number") and
after it ends ("WD version", "FD number"), so the parent knows exactly which
operation the kill interrupted.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

from crucible.region.region import Region
from tests.support import contexts_for, pattern


def main() -> None:
    region_dir, log_path, seed, first_version = sys.argv[1:5]
    rng = random.Random(int(seed))
    region = Region.open(Path(region_dir))
    total = region.definition.total_blocks
    flush_no = max(region.extent_versions()[1]) + 1
    version = int(first_version)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    while True:
        if rng.random() < 0.15:
            os.write(log, f"F {flush_no}\n".encode())
            region.flush(flush_no, 1)
            os.write(log, f"FD {flush_no}\n".encode())
            flush_no += 1
            continue
        start = rng.randrange(total)
        n = rng.randint(1, min(40, total - start))
        os.write(log, f"W {start} {n} {version}\n".encode())
        data = b"".join(pattern(b, version) for b in range(start, start + n))
        region.write(start, contexts_for(data), data)
        os.write(log, f"WD {version}\n".encode())
        version += 1


if __name__ == "__main__":
    main()
