"""crucible-vcr: write and check Volume Construction Requests.

    crucible-vcr create -t A -t B -t C [-t D -t E -t F ...] -o VCR.json
                        [--gen N] [--id UUID] [--key-file F] [--read-only]
                        [--parent-file PATH | --parent-url URL | --parent-vcr FILE]
    crucible-vcr check VCR.json

`create` makes a volume of one region sub-volume per three targets, in
order; each region's geometry is asked of its first downstairs' repair
server (port + 4000; `--repair-port-offset` otherwise), so the downstairs
must be running. `check` parses and checks a VCR and prints what it
describes, or one line saying what is wrong.
"""

from __future__ import annotations

import argparse
import base64
import ssl
import sys
import uuid
from pathlib import Path

from crucible.cli_util import add_tls_options, fail, non_negative_int, tls_files
from crucible.common.definition import RegionDefinition
from crucible.downstairs.repair import REPAIR_PORT_OFFSET, ask_region
from crucible.protocol.wire import SocketAddr
from crucible.tls import TlsError
from crucible.tools.common import key_file, target
from crucible.volume import vcr as v

PROG = "crucible-vcr"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Write and check VCRs.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser("create", help="a VCR for running downstairs, three per region")
    c.add_argument(
        "-t",
        "--target",
        type=target,
        action="append",
        required=True,
        metavar="HOST:PORT",
        help="a downstairs; three per sub-volume, in order",
    )
    c.add_argument("-o", "--output", type=Path, required=True, help="where to write the VCR")
    c.add_argument("--gen", type=non_negative_int, default=1, help="generation (default 1)")
    c.add_argument("--id", type=uuid.UUID, default=None, help="the volume's id (random)")
    c.add_argument(
        "--key-file",
        type=key_file,
        metavar="PATH",
        help="the key of an encrypted volume (written into the VCR, as Crucible's)",
    )
    c.add_argument("--read-only", action="store_true", help="the regions are read-only")
    c.add_argument(
        "--repair-port-offset",
        type=int,
        default=REPAIR_PORT_OFFSET,
        help=f"a downstairs' repair port is its port plus this ({REPAIR_PORT_OFFSET})",
    )
    parent = c.add_mutually_exclusive_group()
    parent.add_argument("--parent-file", type=Path, metavar="PATH", help="a raw image as parent")
    parent.add_argument("--parent-url", metavar="URL", help="a raw image over HTTP(S) as parent")
    parent.add_argument(
        "--parent-vcr",
        type=Path,
        metavar="FILE",
        help="a read-only region or volume (a VCR) as parent",
    )
    add_tls_options(c)
    k = sub.add_parser("check", help="check a VCR and say what it describes")
    k.add_argument("file", type=Path, metavar="VCR")
    return p  # fmt: skip


def region_info(addr: SocketAddr, offset: int, tls: ssl.SSLContext | None) -> RegionDefinition:
    return ask_region((addr[0], addr[1] + offset), tls, f"{addr[0]}:{addr[1]}")


def create(args: argparse.Namespace) -> v.VolumeVcr:
    targets: list[SocketAddr] = args.target
    if len(targets) % 3:
        raise ValueError(f"give targets in threes, one three per sub-volume (got {len(targets)})")
    key = None if args.key_file is None else base64.b64encode(args.key_file).decode()
    tls, pems = None, (None, None, None)
    if args.tls is not None:  # the VCR carries the PEMs, as Crucible's does
        tls = args.tls.client_context()
        pems = tuple(path.read_text() for path in args.tls)
    subs: list[v.Vcr] = []
    block_size = 0
    for i in range(0, len(targets), 3):
        d = region_info(targets[i], args.repair_port_offset, tls)
        block_size = block_size or d.block_size
        if d.encrypted and key is None:
            raise ValueError(
                f"{targets[i][0]}:{targets[i][1]} holds an encrypted region: give --key-file"
            )
        opts = v.RegionOpts(
            uuid.uuid4(),
            tuple(targets[i : i + 3]),
            key=key,
            cert_pem=pems[0],
            key_pem=pems[1],
            root_cert_pem=pems[2],
            read_only=args.read_only,
        )
        subs.append(v.RegionVcr(d.block_size, d.extent_size, d.extent_count, args.gen, opts))
    parent: v.Vcr | None = None
    if args.parent_file is not None:
        parent = v.FileVcr(uuid.uuid4(), block_size, args.parent_file.resolve())
    elif args.parent_url is not None:
        parent = v.UrlVcr(uuid.uuid4(), block_size, args.parent_url)
    elif args.parent_vcr is not None:
        parent = v.load(args.parent_vcr)
    volume = v.VolumeVcr(args.id or uuid.uuid4(), block_size, tuple(subs), parent)
    v.check(volume)
    return volume


def describe(vcr: v.Vcr, indent: str = "") -> list[str]:
    if isinstance(vcr, v.RegionVcr):
        t = ", ".join(f"{h}:{p}" for h, p in vcr.opts.target)
        size = vcr.total_blocks * vcr.block_size
        flags = [
            f for f, on in (("read-only", vcr.opts.read_only), ("encrypted", vcr.opts.key)) if on
        ]
        return [f"{indent}region {vcr.opts.id}: {size} bytes (bs {vcr.block_size}, "
                f"{vcr.extent_count} x {vcr.blocks_per_extent} blocks) gen {vcr.gen} "
                f"on {t}{' ' + ', '.join(flags) if flags else ''}"]  # fmt: skip
    if isinstance(vcr, v.FileVcr):
        return [f"{indent}file {vcr.path} (bs {vcr.block_size})"]
    if isinstance(vcr, v.UrlVcr):
        return [f"{indent}url {vcr.url} (bs {vcr.block_size})"]
    blocks = v.known_blocks(vcr)
    head = f"{indent}volume {vcr.id}: bs {vcr.block_size}"
    lines = [head + (f", {blocks * vcr.block_size} bytes" if blocks is not None else "")]
    for s in vcr.sub_volumes:
        lines += describe(s, indent + "  ")
    if vcr.read_only_parent is not None:
        lines.append(f"{indent}  read-only parent:")
        lines += describe(vcr.read_only_parent, indent + "    ")
    return lines


def main() -> None:
    p = build_parser()
    args = p.parse_args()
    try:
        if args.command == "create":
            args.tls = tls_files(p, args)
            volume = create(args)
            v.save(args.output, volume)
            print("\n".join(describe(volume)))
            print(f"wrote {args.output}")
        else:
            print("\n".join(describe(v.load(args.file))))
    except OSError as e:
        fail(PROG, f"{e.filename or ''}: {e.strerror}".lstrip(": "))
    except (ValueError, TlsError) as e:  # VcrError included
        fail(PROG, str(e))
    sys.exit(0)
