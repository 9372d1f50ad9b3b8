"""crucible-pantry run -l ADDR:PORT: the pantry's HTTP API (Crucible's)."""

from __future__ import annotations

import argparse
import asyncio
import logging

from crucible.cli_util import (
    add_tls_options,
    run_service,
    wait_for_stop_signal,
)
from crucible.observe import options
from crucible.pantry.server import make_app
from crucible.pantry.service import Pantry
from crucible.tools import http_api

PROG = "crucible-pantry"
log = logging.getLogger("crucible.pantry")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = sub.add_parser("run", help="serve the pantry's API")
    r.add_argument("-l", "--listen", type=options.listen_address, required=True,
                   metavar="ADDR:PORT", help="where to serve it")  # fmt: skip
    r.add_argument("--log-format", choices=("text", "json"), default="text")
    add_tls_options(r)
    return p


async def serve(args: argparse.Namespace) -> int:
    pantry = Pantry()
    host, port = args.listen
    tls = args.tls.server_context() if args.tls else None
    serving = await http_api.start(make_app(pantry), host, port, tls, "pantry")
    log.info("pantry at %s://%s:%d%s", "https" if tls else "http", host, port, "/crucible/pantry/0")
    try:
        await wait_for_stop_signal()
    finally:
        for vid in list(pantry.volumes):
            try:
                await pantry.detach(vid)
            except Exception as e:
                log.warning("detaching %s: %s", vid, e)
        await serving.cleanup()
    return 0


def main() -> None:
    p = build_parser()
    run_service(PROG, p, p.parse_args(), serve)


if __name__ == "__main__":
    asyncio.run(serve(build_parser().parse_args()))
