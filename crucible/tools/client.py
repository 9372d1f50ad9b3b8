"""crucible: the original client. Connects to three downstairs, writes 1024
bytes across an extent boundary, flushes, reads them back, verifies, exits."""

from __future__ import annotations

import argparse
import logging
import sys

from crucible.cli_util import fail, run_async
from crucible.common.errors import CrucibleError, ErrorKind
from crucible.observe import logs
from crucible.tools.common import (
    activate,
    add_observe_options,
    add_target_options,
    check_args,
    observed,
    one_region,
)

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
    except KeyboardInterrupt:
        sys.exit(130)


async def _run(args: argparse.Namespace) -> None:
    parts = one_region(args, PROG)
    up, region = parts.regions[0]
    floor = region.gen if region else 1
    async with up, observed(args, parts, "crucible"):
        gen = await activate(up, args.gen, args.activate_timeout, floor)
        bs = up.block_size
        # The last block of extent 0 and the first of extent 1: with the seed's
        # geometry (bs 512, es 100) that is byte offset 50688, 1024 bytes.
        block = up.region.extent_size - 1
        offset, length = block * bs, 2 * bs
        data = bytes((i * 7 + 1) & 0xFF for i in range(length))
        print(f"active with generation {gen}: writing {length} bytes at offset {offset}")
        await up.write(block, data)
        await up.flush()
        got = await up.read(block, 2)
        if got != data:
            raise CrucibleError(ErrorKind.GenericError, "read back different data than written")
        print(f"read back {length} bytes at offset {offset}: verified")
        await up.deactivate()
        print("all Tests done")


if __name__ == "__main__":
    main()
