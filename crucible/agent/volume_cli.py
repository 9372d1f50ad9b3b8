"""crucible-volume: volumes whose three replicas are regions on three hosts'
agents.

    crucible-volume create --agents A,B,C --size SIZE --out VCR.json
                           [--block-size N] [--extent-size BLOCKS] [--encrypted]
    crucible-volume delete VCR.json [--agents A,B,C]

`create` asks three agents (each HOST:PORT of a crucible-agent) for one
region each, waits until all three serve, and writes the volume's VCR (with
a fresh key when --encrypted). Given more than three agents it takes the
three with the fewest live regions; never two replicas on one agent. If any
region fails, the others are deleted again. `delete` finds each target's
region on its host's agent (the agents given, or port 17000 of each target's
host) and deletes it.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crucible.agent.client import AgentCallError, AgentClient
from crucible.cli_util import (
    add_tls_options,
    block_size,
    byte_size,
    fail,
    non_negative_int,
    positive_int,
    tls_files,
)
from crucible.common.address import host_port
from crucible.tls import TlsError
from crucible.volume import vcr as v

PROG = "crucible-volume"
AGENT_PORT = 17000
MAX_EXTENT = 64 << 20  # bytes; Crucible's usual extent
MIN_EXTENT = 1 << 20
LIVE = ("requested", "created")


def agents(text: str) -> list[tuple[str, int]]:
    try:
        found = [host_port(a.strip(), "HOST:PORT") for a in text.split(",") if a.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if len(set(found)) != len(found):
        raise argparse.ArgumentTypeError("an agent is named twice: one replica per agent")
    return found


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Volumes placed on region agents.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser("create", help="a new volume: one region on each of three agents")
    c.add_argument(
        "--agents",
        type=agents,
        required=True,
        metavar="A,B,C",
        help="crucible-agent addresses (HOST:PORT), three or more",
    )
    c.add_argument(
        "--size",
        type=byte_size,
        required=True,
        help="the volume's size (4096, 64M, 10G...), rounded up to whole extents",
    )
    c.add_argument(
        "--block-size",
        type=block_size,
        default=512,
        help="bytes per block (default 512, as Crucible's; 4096 is faster)",
    )
    c.add_argument(
        "--extent-size",
        type=positive_int,
        metavar="BLOCKS",
        help="blocks per extent (default: 64 MiB of them, less for a small volume)",
    )
    c.add_argument(
        "--encrypted",
        action="store_true",
        help="encrypt the volume (a new key, written into the VCR)",
    )
    c.add_argument("--gen", type=non_negative_int, default=1, help="generation (default 1)")
    c.add_argument(
        "-o",
        "--out",
        type=Path,
        required=True,
        metavar="VCR.json",
        help="where to write the volume's VCR",
    )
    c.add_argument(
        "--timeout", type=positive_int, default=600, help="seconds to wait for the regions (600)"
    )
    add_tls_options(c)
    d = sub.add_parser("delete", help="delete a volume's regions")
    d.add_argument("vcr", type=Path, metavar="VCR.json")
    d.add_argument(
        "--agents",
        type=agents,
        metavar="A,B,C",
        help=f"the agents that hold its regions (default: port {AGENT_PORT} of each target's host)",
    )
    d.add_argument(
        "--timeout",
        type=positive_int,
        default=120,
        help="seconds to wait for the regions to go (120)",
    )
    add_tls_options(d)
    return p  # fmt: skip


def extent_blocks(size: int, bs: int) -> int:
    """64 MiB extents, halved (down to 1 MiB) until the volume has 16 or more."""
    extent = MAX_EXTENT
    while extent > MIN_EXTENT and extent * 16 > size:
        extent //= 2
    return max(1, extent // bs)


def _wait(
    what: str, timeout: float, check: Callable[[], tuple[bool, str]], say: Callable[[str], None]
) -> None:
    """Poll `check` (done, status line) until done or `timeout`; the status
    is said each time it changes."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        done, status = check()
        if status != last:
            say(f"{what}: {status}")
            last = status
        if done:
            return
        if time.monotonic() > deadline:
            raise ValueError(f"{what}: not done after {timeout:g} s ({status})")
        time.sleep(0.2)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _states(placed: list[tuple[AgentClient, str]]) -> list[dict[str, Any]]:
    return [c.region(rid) for c, rid in placed]


def create(args: argparse.Namespace, tls: Any) -> v.VolumeVcr:
    if len(args.agents) < 3:
        raise ValueError(f"--agents: three are needed, one per replica (got {len(args.agents)})")
    bs = args.block_size
    es = args.extent_size or extent_blocks(args.size, bs)
    ec = -(-args.size // (bs * es))
    clients = [AgentClient(a, tls) for a in args.agents]
    if len(clients) > 3:  # the three holding the fewest live regions
        load = {c.name: sum(r["state"] in LIVE for r in c.regions()) for c in clients}
        clients = sorted(clients, key=lambda c: load[c.name])[:3]
    request = {"block_size": bs, "extent_size": es, "extent_count": ec,
               "encrypted": args.encrypted}  # fmt: skip
    placed: list[tuple[AgentClient, str]] = []
    try:
        for c in clients:
            rid = str(uuid.uuid4())
            c.create({"id": rid, **request})
            placed.append((c, rid))

        def check() -> tuple[bool, str]:
            found = _states(placed)
            failed = [(c, r) for (c, _), r in zip(placed, found, strict=True)
                      if r["state"] == "failed"]  # fmt: skip
            if failed:
                c, r = failed[0]
                raise ValueError(f"agent {c.name}: region {r['id']} failed: {r.get('error')}")
            states = [r["state"] for r in found]
            return all(s == "created" for s in states), ", ".join(states)

        _wait("regions", args.timeout, check, _say)
    except (ValueError, AgentCallError):
        for c, rid in placed:  # no half-made volume left behind
            try:
                c.delete(rid)
            except AgentCallError as e:
                _say(f"{PROG}: could not delete region {rid} again: {e}")
        raise
    targets = tuple(
        (r.get("address") or c.addr[0], int(r["port_number"]))
        for (c, _), r in zip(placed, _states(placed), strict=True)
    )
    key = base64.b64encode(os.urandom(32)).decode() if args.encrypted else None
    opts = v.RegionOpts(uuid.uuid4(), targets, key=key)
    region = v.RegionVcr(bs, es, ec, args.gen, opts)
    volume = v.VolumeVcr(uuid.uuid4(), bs, (region,))
    v.check(volume)
    return volume


def _find(clients: list[AgentClient], target: tuple[str, int]) -> tuple[AgentClient, str] | None:
    for c in clients:
        for r in c.regions():
            addr = r.get("address") or c.addr[0]
            if (addr, r["port_number"]) == target and r["state"] not in ("destroyed",):
                return c, str(r["id"])
    return None


def delete(args: argparse.Namespace, tls: Any) -> None:
    volume = v.load(args.vcr)
    targets = [t for r in v.regions(volume) for t in r.opts.target]
    doomed: list[tuple[AgentClient, str]] = []
    for t in targets:
        named = args.agents or [(t[0], AGENT_PORT)]
        found = _find([AgentClient(a, tls) for a in named], t)
        if found is None:
            _say(f"{t[0]}:{t[1]}: no region there (deleted already?)")
            continue
        found[0].delete(found[1])
        doomed.append(found)

    def check() -> tuple[bool, str]:
        states = [r["state"] for r in _states(doomed)]
        if "failed" in states:
            c, rid = doomed[states.index("failed")]
            raise ValueError(f"agent {c.name}: deleting region {rid} failed: "
                             f"{c.region(rid).get('error')}")  # fmt: skip
        return all(s == "destroyed" for s in states), ", ".join(states) or "none"

    _wait("regions", args.timeout, check, _say)


def main() -> None:
    p = build_parser()
    args = p.parse_args()
    try:
        files = tls_files(p, args)
        tls = files.client_context() if files is not None else None
        if args.command == "create":
            volume = create(args, tls)
            v.save(args.out, volume)
            region = v.regions(volume)[0]
            size = region.total_blocks * region.block_size
            where = ", ".join(f"{h}:{p}" for h, p in region.opts.target)
            print(f"volume {volume.id}: {size} bytes on {where}")
            print(f"wrote {args.out}; serve it with: crucible-nbd --vcr {args.out}")
        else:
            delete(args, tls)
            print(f"deleted the regions of {args.vcr}")
    except (ValueError, AgentCallError, TlsError) as e:
        fail(PROG, str(e))
    except OSError as e:
        fail(PROG, f"{e.filename or ''}: {e.strerror}".lstrip(": "))
    sys.exit(0)
