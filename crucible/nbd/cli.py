"""crucible-nbd: export a volume of three downstairs over NBD."""

from __future__ import annotations

import argparse
import errno
import logging
import sys

from crucible.cli_util import (
    fail,
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
    new_upstairs,
    observed,
)
from crucible.upstairs.guest import Upstairs

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
    up = new_upstairs(args)
    try:
        async with observed(args, up, "crucible-nbd", nbd=True):
            return await _serve(args, up)
    finally:
        await up.close()


async def _serve(args: argparse.Namespace, up: Upstairs) -> int:
    export = Export(up, args.export_name, args.read_only)
    server = NbdServer(export, args.bind, args.port, args.handshake_timeout, args.max_connections)
    try:
        await server.bind()  # before activating: never take over a volume and then fail
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"port {args.port} on {args.bind} is already in use") from None
        raise ValueError(f"cannot listen on {args.bind}:{args.port}: {e.strerror}") from None
    gen = await activate(up, args.gen, args.activate_timeout)
    await server.serve()
    host = f"[{args.bind}]" if ":" in args.bind else args.bind
    uri = f"nbd://{host}:{server.port}/{args.export_name}"
    print(
        f"serving {export.size} bytes ({up.total_blocks} blocks of {up.block_size}) "
        f"with generation {gen}{' read-only' if args.read_only else ''} at {uri}",
        flush=True,
    )
    await wait_for_stop_signal()
    log.info("stopping: closing clients, flushing")
    await server.stop()
    if up.info().state == "active":
        await up.deactivate()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    main()
