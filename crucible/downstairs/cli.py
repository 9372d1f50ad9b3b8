"""crucible-downstairs: create, run, export, dump and verify a region.

The seed's form `crucible-downstairs -c -p PORT -d DIR` still works: it creates
the region (block size 512, extent size 100, extent count 10) if it is absent,
then runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from crucible.cli_util import (
    add_tls_options,
    block_size,
    fail,
    non_negative_int,
    port_number,
    positive_int,
    progress,
    raise_open_file_limit,
    run_async,
    setup_logging,
    tls_files,
    wait_for_stop_signal,
)
from crucible.common.address import host_port, is_loopback
from crucible.common.definition import RegionDefinition, RegionError
from crucible.common.errors import CrucibleError
from crucible.downstairs.clone import clone, source_region
from crucible.downstairs.server import IDLE_TIMEOUT, DownstairsServer, ListenError
from crucible.observe import logs, options
from crucible.observe.metrics import DownstairsMetrics
from crucible.observe.options import Observing
from crucible.observe.tracers import DownstairsTracer
from crucible.region import snapshot
from crucible.region.inspect import dump_block, dump_extent_blocks, dump_extents, verify_region
from crucible.region.region import Region
from crucible.region.transfer import export_file, import_file
from crucible.tls import TlsError

PROG = "crucible-downstairs"
SEED_BLOCK_SIZE, SEED_EXTENT_SIZE, SEED_EXTENT_COUNT = 512, 100, 10
COMMANDS = ("create", "run", "export", "dump", "verify", "snapshot", "clone")
log = logging.getLogger("crucible.downstairs")


def _add_run_options(p: argparse.ArgumentParser, port_required: bool) -> None:
    p.add_argument("-d", "--data", type=Path, required=True, help="region directory")
    p.add_argument(
        "-p",
        "--port",
        type=port_number,
        required=port_required,
        default=9000,
        help="TCP port to serve on (repair server on port + 4000)",
    )
    p.add_argument("-a", "--address", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    p.add_argument("--mode", choices=("rw", "ro"), default="rw", help="read-write or read-only")
    p.add_argument(
        "--snapshot", metavar="NAME", help="serve the region's snapshot NAME (read-only)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="do not log every job")
    p.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT, help=argparse.SUPPRESS)
    p.add_argument(
        "--no-extensions",
        action="store_true",
        help="behave as a plain Crucible V13 downstairs: no Trim, no capabilities page",
    )
    options.add_options(p)
    add_tls_options(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Serve a Crucible region.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("create", help="create a new region")
    c.add_argument("-u", "--uuid", type=uuid.UUID, default=None, help="region UUID (random)")
    c.add_argument("-d", "--data", type=Path, required=True, help="region directory")
    c.add_argument(
        "--block-size",
        type=block_size,
        default=512,
        help="bytes per block: a power of two, 512..32768 (default 512)",
    )
    c.add_argument(
        "--extent-size", type=positive_int, default=100, help="blocks per extent (default 100)"
    )
    c.add_argument(
        "--extent-count",
        type=positive_int,
        default=None,
        help="number of extents (default 15, or enough for --import-path)",
    )
    c.add_argument("--encrypted", action="store_true", help="region holds encrypted blocks")
    c.add_argument("-i", "--import-path", type=Path, help="raw image to import")

    r = sub.add_parser("run", help="serve a region over TCP")
    _add_run_options(r, port_required=False)

    e = sub.add_parser("export", help="copy a region's blocks to a raw file")
    e.add_argument("-d", "--data", type=Path, required=True, help="region directory")
    e.add_argument("-e", "--export-path", type=Path, required=True, help="output file")
    e.add_argument("--count", type=non_negative_int, default=None, help="blocks to export")
    e.add_argument("-s", "--skip", type=non_negative_int, default=0, help="blocks to skip")

    d = sub.add_parser("dump", help="compare extent metadata of up to three regions")
    d.add_argument(
        "-d",
        "--data",
        type=Path,
        action="append",
        required=True,
        help="region directory (repeat up to three times)",
    )
    d.add_argument("-e", "--extent", type=non_negative_int, help="compare one extent's blocks")
    d.add_argument("-b", "--block", type=non_negative_int, help="compare one block")

    v = sub.add_parser("verify", help="check every block against its context")
    v.add_argument("-d", "--data", type=Path, required=True, help="region directory")

    k = sub.add_parser("clone", help="a new region copied from a read-only downstairs")
    k.add_argument("-d", "--data", type=Path, required=True, help="the new region's directory")
    k.add_argument(
        "--source",
        type=_address,
        required=True,
        metavar="ADDR:PORT",
        help="the source downstairs' repair server (its port + 4000)",
    )
    k.add_argument("-u", "--uuid", type=uuid.UUID, default=None, help="region UUID (random)")
    add_tls_options(k)

    s = sub.add_parser("snapshot", help="list or delete a region's snapshots")
    s.add_argument("action", choices=("list", "delete"))
    s.add_argument("name", nargs="?", help="the snapshot to delete")
    s.add_argument("-d", "--data", type=Path, required=True, help="region directory")
    s.add_argument("--json", action="store_true", help="list as JSON")
    return parser


def build_seed_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Seed form: create the region if asked and absent, then run it.",
        epilog=f"Subcommands: {', '.join(COMMANDS)} (see {PROG} COMMAND --help).",
    )
    p.add_argument(
        "-c",
        "--create",
        action="store_true",
        help="create the region (bs 512, es 100, ec 10) if it does not exist",
    )
    _add_run_options(p, port_required=True)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] not in COMMANDS and args_list[0] not in ("-h", "--help"):
        parser = build_seed_parser()
        args = parser.parse_args(args_list)
        args.command = "seed"
    else:
        parser = build_parser()
        args = parser.parse_args(args_list)
    if args.command in ("run", "seed", "clone"):
        args.tls = tls_files(parser, args)
    raise_open_file_limit()
    try:
        code = _dispatch(args)
    except (RegionError, CrucibleError, ValueError, TlsError) as e:
        fail(PROG, str(e))
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        # Output piped into something that stopped reading (`| head`): not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "create":
        return cmd_create(args)
    if args.command in ("run", "seed"):
        return cmd_run(args)
    if args.command == "export":
        return cmd_export(args)
    if args.command == "dump":
        return cmd_dump(args)
    if args.command == "snapshot":
        return cmd_snapshot(args)
    if args.command == "clone":
        return cmd_clone(args)
    return cmd_verify(args)


def cmd_create(args: argparse.Namespace) -> int:
    count = args.extent_count
    if args.import_path is not None:
        if args.encrypted:
            raise ValueError("an encrypted region cannot be imported without its key")
        if not args.import_path.is_file():
            raise ValueError(f"import file {args.import_path} does not exist")
        need = math.ceil(args.import_path.stat().st_size / (args.block_size * args.extent_size))
        count = max(count or 0, need, 1)
    definition = RegionDefinition(
        block_size=args.block_size,
        extent_size=args.extent_size,
        extent_count=15 if count is None else count,
        uuid=args.uuid or uuid.uuid4(),
        encrypted=args.encrypted,
    )
    region = _create(args.data, definition)
    try:
        if args.import_path is not None:
            size = args.import_path.stat().st_size
            with progress(size, "B", "import") as bar:
                blocks = import_file(region, args.import_path, bar.update)
            print(f"imported {size} bytes ({blocks} blocks) from {args.import_path}")
    finally:
        region.close()
    return 0


def _create(directory: Path, definition: RegionDefinition) -> Region:
    with progress(definition.extent_count, "extent", "create") as bar:
        region = Region.create(directory, definition, bar.update)
    d = definition
    print(
        f"created region {d.uuid} at {directory}: bs:{d.block_size} es:{d.extent_size} "
        f"ec:{d.extent_count} ({d.total_bytes} bytes){' encrypted' if d.encrypted else ''}"
    )
    return region


def cmd_run(args: argparse.Namespace) -> int:
    setup_logging(args.quiet, args.log_format)
    log.info(
        "options: data=%s address=%s port=%d mode=%s", args.data, args.address, args.port, args.mode
    )
    read_only = args.mode == "ro"
    if args.command == "seed" and args.create and not (args.data / "region.json").exists():
        definition = RegionDefinition(
            SEED_BLOCK_SIZE, SEED_EXTENT_SIZE, SEED_EXTENT_COUNT, uuid.uuid4()
        )
        _create(args.data, definition).close()
    data = args.data
    if args.snapshot is not None:  # a snapshot is served as it is: read-only
        data, read_only, args.mode = snapshot.snapshot_dir(args.data, args.snapshot), True, "ro"
        if not (data / "region.json").exists():
            raise ValueError(f"no snapshot {args.snapshot!r} at {args.data}")
    region = Region.open(data, read_only=read_only)
    d = region.definition
    logs.context["downstairs_id"] = lambda: str(d.uuid)
    log.info("opened region %s at %s (%s)", d.uuid, args.data, args.mode)
    log.info(
        "bs:%d es:%d ec:%d encrypted:%s", d.block_size, d.extent_size, d.extent_count, d.encrypted
    )
    gens, flushes, dirty = region.extent_versions()
    log.info("current flush numbers [0..%d]: %s", d.extent_count, _preview(flushes))
    log.info("current generation numbers: %s", _preview(gens))
    if any(dirty):
        log.info("dirty extents: %s", [i for i, x in enumerate(dirty) if x][:32])
    try:
        return run_async(_serve(region, args))  # type: ignore[no-any-return]
    finally:
        region.close()


def _preview(values: list[int] | list[bool], limit: int = 16) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


async def _serve(region: Region, args: argparse.Namespace) -> int:
    attrs = {"crucible.region": str(region.definition.uuid)}
    obs = Observing(args, "crucible-downstairs", args.tls, attrs)
    try:
        return await _run_server(region, args, obs)
    finally:
        await asyncio.to_thread(obs.close)


async def _run_server(region: Region, args: argparse.Namespace, obs: Observing) -> int:
    if obs.registry is not None:
        DownstairsMetrics(obs.registry, lambda: len(region.dirty_extents))
    if obs.tracing is not None:
        DownstairsTracer(obs.tracing, region.definition.extent_size)
    server = DownstairsServer(
        region,
        args.address,
        args.port,
        idle_timeout=args.idle_timeout,
        extensions=not args.no_extensions,
        tls=args.tls,
    )
    if args.tls is None and not is_loopback(args.address):
        log.warning(
            "listening on %s without TLS: anyone who can reach ports %d and %d can read "
            "and write this region (give --cert-pem, --key-pem and --root-cert-pem)",
            args.address,
            server.port,
            server.repair_port,
        )
    try:
        await server.start()
    except ListenError as e:
        raise ValueError(str(e)) from None
    stop = asyncio.ensure_future(wait_for_stop_signal())
    await asyncio.wait([stop, server.died], return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    log.info("shutting down")
    await server.stop()
    if server.died.done():
        raise ValueError(f"the server stopped working: {server.death}")
    return 0


def _address(text: str) -> tuple[str, int]:
    try:
        return host_port(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_clone(args: argparse.Namespace) -> int:
    setup_logging()
    tls = None if args.tls is None else args.tls.client_context()
    total = source_region(args.source, tls).total_bytes
    with progress(total, "B", "clone") as bar:
        d = clone(args.data, args.source, args.uuid, bar.update, tls)
    print(
        f"cloned region {d.uuid} at {args.data} from {args.source[0]}:{args.source[1]}: "
        f"bs:{d.block_size} es:{d.extent_size} ec:{d.extent_count} ({d.total_bytes} bytes)"
    )
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    if not (args.data / "region.json").exists():
        raise ValueError(f"no region at {args.data}")
    if args.action == "delete":
        if args.name is None:
            raise ValueError("snapshot delete needs the snapshot's name")
        snapshot.delete(args.data, args.name)
        print(f"deleted snapshot {args.name}")
        return 0
    found = snapshot.list_snapshots(args.data)
    if args.json:
        print(json.dumps([dataclasses.asdict(s) for s in found]))
        return 0
    for s in found:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created))
        print(f"{s.name}  {when}  {s.bytes_used} bytes")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    region = Region.open(args.data, read_only=True)
    try:
        d = region.definition
        total = (d.total_blocks - args.skip) if args.count is None else args.count
        with progress(max(0, total) * d.block_size, "B", "export") as bar:
            n = export_file(region, args.export_path, args.skip, args.count, bar.update)
        print(f"exported {n} blocks ({n * d.block_size} bytes) to {args.export_path}")
    finally:
        region.close()
    return 0


def cmd_dump(args: argparse.Namespace) -> int:
    if len(args.data) > 3:
        raise ValueError("dump compares at most three regions")
    if (args.extent is not None or args.block is not None) and len(args.data) < 2:
        raise ValueError("-e and -b compare regions: give at least two -d")
    regions = []
    try:
        for path in args.data:
            regions.append(Region.open(path, read_only=True))
        geometry = {(r.definition.block_size, r.definition.extent_size) for r in regions}
        if len(geometry) > 1:
            raise ValueError("regions have different block or extent sizes")
        if args.extent is not None:
            if args.extent >= min(r.definition.extent_count for r in regions):
                raise ValueError(f"extent {args.extent} does not exist")
            return 1 if dump_extent_blocks(regions, args.extent, print) else 0
        if args.block is not None:
            if args.block >= min(r.definition.total_blocks for r in regions):
                raise ValueError(f"block {args.block} does not exist")
            return dump_block(regions, args.block, print)
        return 1 if dump_extents(regions, print) else 0
    finally:
        for r in regions:
            r.close()


def cmd_verify(args: argparse.Namespace) -> int:
    region = Region.open(args.data, read_only=True)
    try:
        problems = verify_region(region, print)
        d = region.definition
        if problems:
            print(f"verify failed: {problems} problems in {args.data}")
            return 1
        print(f"verified {d.total_blocks} blocks in {d.extent_count} extents: all good")
        return 0
    finally:
        region.close()


if __name__ == "__main__":
    main()
