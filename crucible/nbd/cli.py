"""crucible-nbd: export a volume of three downstairs over NBD."""

from __future__ import annotations

import argparse
import errno
import logging
import sys

from crucible.cli_util import (
    fail,
    non_negative_float,
    port_number,
    positive_int,
    run_async,
    setup_logging,
    wait_for_stop_signal,
)
from crucible.common.errors import CrucibleError
from crucible.nbd.server import HANDSHAKE_TIMEOUT, MAX_CONNECTIONS, Export, NbdServer
from crucible.tools.common import (
    activate,
    add_observe_options,
    add_target_options,
    check_args,
    observed,
    open_parts,
)
from crucible.upstairs.guest import Upstairs
from crucible.volume.build import VolumeParts

PROG = "crucible-nbd"
log = logging.getLogger("crucible.nbd")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    add_target_options(p, verify_rate=1.0)
    p.add_argument("-b", "--bind", default="127.0.0.1", help="address to serve on")
    p.add_argument("-p", "--port", type=port_number, default=10809, help="NBD port (10809)")
    p.add_argument("--export-name", default="", help="export name (the default export is '')")
    p.add_argument(
        "--read-only",
        action="store_true",
        help="read-only export (the downstairs run with --mode ro)",
    )
    p.add_argument(
        "--handshake-timeout",
        type=positive_int,
        default=int(HANDSHAKE_TIMEOUT),
        metavar="SECONDS",
        help=f"time a client has for the handshake ({HANDSHAKE_TIMEOUT:g})",
    )
    p.add_argument(
        "--max-connections",
        type=positive_int,
        default=MAX_CONNECTIONS,
        help=f"clients at once; more are refused ({MAX_CONNECTIONS})",
    )
    p.add_argument(
        "--scrub-delay",
        type=non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="with a read-only parent (--vcr): wait this long before copying it in (0)",
    )
    p.add_argument(
        "--scrub-pause",
        type=non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="and pause this long between its 1 MiB chunks (0)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="log only warnings")
    add_observe_options(p)
    return p


def main() -> None:
    p = build_parser()
    args = p.parse_args()
    check_args(p, args)
    setup_logging(fmt=args.log_format)
    logging.getLogger().setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        sys.exit(run_async(serve(args)))
    except CrucibleError as e:
        fail(PROG, str(e.detail or e))
    except ValueError as e:
        fail(PROG, str(e))


async def serve(args: argparse.Namespace) -> int:
    parts = open_parts(args)
    try:
        async with observed(args, parts, "crucible-nbd", nbd=True):
            return await _serve(args, parts)
    finally:
        await parts.close()


async def _serve(args: argparse.Namespace, parts: VolumeParts) -> int:
    export = Export(parts.device, args.export_name, args.read_only)
    server = NbdServer(export, args.bind, args.port, args.handshake_timeout, args.max_connections)
    try:
        await server.bind()  # before activating: never take over a volume and then fail
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"port {args.port} on {args.bind} is already in use") from None
        raise ValueError(f"cannot listen on {args.bind}:{args.port}: {e.strerror}") from None
    timeout = args.activate_timeout

    async def activate_region(up: Upstairs, floor: int) -> int:
        return await activate(up, args.gen, timeout, floor)

    gens = await parts.activate(activate_region)
    up = parts.device
    await server.serve()
    host = f"[{args.bind}]" if ":" in args.bind else args.bind
    uri = f"nbd://{host}:{server.port}/{args.export_name}"
    print(
        f"serving {export.size} bytes ({up.total_blocks} blocks of {up.block_size}) "
        f"with generation {', '.join(map(str, gens)) or '-'}"
        f"{' read-only' if args.read_only else ''} at {uri}",
        flush=True,
    )
    await wait_for_stop_signal()
    log.info("stopping: closing clients, flushing")
    await server.stop()
    await parts.deactivate()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    main()
