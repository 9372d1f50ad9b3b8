"""crucible: the original client. Connects to three downstairs, writes 1024
bytes across an extent boundary, flushes, reads them back, verifies, exits.
With --vcr, the whole volume: across each boundary between its regions too."""

from __future__ import annotations

import argparse
import logging
import sys

from crucible.cli_util import fail, run_async
from crucible.common.errors import CrucibleError, ErrorKind
from crucible.observe import logs
from crucible.tools.common import (
    activate_volume,
    add_observe_options,
    add_target_options,
    check_args,
    observed,
    open_parts,
    region_starts,
)
from crucible.volume.build import VolumeParts

PROG = "crucible"


def main() -> None:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    add_target_options(p)
    add_observe_options(p)
    p.add_argument("-q", "--quiet", action="store_true", help="only errors and the result")
    args = p.parse_args()
    check_args(p, args)
    logs.setup(args.log_format, logging.WARNING if args.quiet else logging.DEBUG, "%(message)s")
    try:
        run_async(_run(args))
    except CrucibleError as e:
        fail(PROG, str(e.detail or e))
    except ValueError as e:
        fail(PROG, str(e))
    except KeyboardInterrupt:
        sys.exit(130)


async def _run(args: argparse.Namespace) -> None:
    parts = open_parts(args)
    if not parts.regions:
        raise ValueError(f"{args.vcr} names no region to write to, only a read-only parent")
    try:
        async with observed(args, parts, "crucible"):
            await _check(args, parts)
    finally:
        await parts.close()


async def _check(args: argparse.Namespace, parts: VolumeParts) -> None:
    gens = await activate_volume(args, parts)
    dev = parts.device
    bs = dev.block_size
    # The last block of extent 0 and the first of extent 1: with the seed's
    # geometry (bs 512, es 100) that is byte offset 50688, 1024 bytes. In a
    # volume of several regions, also the last block of each and the first
    # of the next.
    first = parts.regions[0][0].region.extent_size - 1
    spots = [(first, f"offset {first * bs}")]
    for i, start in enumerate(region_starts(parts)[1:], 1):
        if start - 1 != first:
            spots.append((start - 1, f"offset {(start - 1) * bs} (sub-volumes {i - 1} and {i})"))
    length = 2 * bs
    gen = "/".join(map(str, gens))
    written = []
    for i, (block, where) in enumerate(spots):
        data = bytes((j * 7 + 1 + i) & 0xFF for j in range(length))
        head = f"active with generation {gen}: " if i == 0 else ""
        print(f"{head}writing {length} bytes at {where}")
        await dev.write(block, data)
        written.append((block, data, where))
    await dev.flush()
    for block, data, where in written:
        got = await dev.read(block, 2)
        if got != data:
            raise CrucibleError(
                ErrorKind.GenericError, f"read back different data than written at {where}"
            )
        print(f"read back {length} bytes at {where}: verified")
    await parts.deactivate()
    print("all Tests done")


if __name__ == "__main__":
    main()
