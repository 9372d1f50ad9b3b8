"""Pieces the upstairs tools share: targets on the command line, activation."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import logging
import resource
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge

from crucible.cli_util import add_tls_options, fail, non_negative_float, tls_files
from crucible.common.address import host_port
from crucible.common.errors import CrucibleError, ErrorKind
from crucible.observe import logs, options
from crucible.observe.metrics import NbdMetrics, UpstairsMetrics
from crucible.observe.options import Observing
from crucible.observe.tracers import UpstairsTracer
from crucible.protocol.wire import SocketAddr
from crucible.tls import TlsError
from crucible.tools import control
from crucible.upstairs.core import MAX_GEN
from crucible.upstairs.encryption import NIL_VOLUME, BadKey, BlockCipher, parse_key
from crucible.upstairs.guest import Upstairs
from crucible.upstairs.options import Options
from crucible.volume import vcr
from crucible.volume.build import VolumeParts, build
from crucible.volume.volume import ScrubOptions, Volume

log = logging.getLogger("crucible.tools")


def target(text: str) -> SocketAddr:
    """HOST:PORT (IPv6 as [ADDR]:PORT)."""
    try:
        return host_port(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def key_text(text: str) -> bytes:
    """--key: base64 of 32 bytes."""
    try:
        return parse_key(text)
    except BadKey as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def key_file(text: str) -> bytes:
    """--key-file: a file holding the key in base64."""
    try:
        return parse_key(Path(text).read_text())
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {e.strerror or e}") from None
    except (BadKey, UnicodeDecodeError) as e:
        raise argparse.ArgumentTypeError(f"{text}: {e}") from None


def add_target_options(p: argparse.ArgumentParser, verify_rate: float = 0.0) -> None:
    """-t (three times) and the upstairs' flags; `verify_rate`: the default MiB/s of
    the background verify (0: off)."""
    p.add_argument(
        "-t",
        "--target",
        type=target,
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a downstairs; give exactly three (or --vcr)",
    )
    p.add_argument(
        "--vcr",
        type=Path,
        metavar="FILE",
        help="the volume's construction request (Crucible's VCR JSON) instead of -t",
    )
    p.add_argument(
        "-g",
        "--gen",
        type=int,
        default=None,
        help="generation to activate with (default: one above the highest stored)",
    )
    p.add_argument(
        "--activate-timeout",
        type=float,
        default=30.0,
        help="seconds to wait for all downstairs (default 30)",
    )
    p.add_argument(
        "--read-all-replicas",
        action="store_true",
        help="send every read to all three downstairs and compare them (default: "
        "one, another when it fails)",
    )
    p.add_argument(
        "--verify-rate",
        type=non_negative_float,
        default=verify_rate,
        metavar="MIB_S",
        help="compare the replicas in the background at this many MiB of the volume "
        f"per second, rewriting one that differs from the others (0: off; default {verify_rate:g})",
    )
    p.add_argument(
        "--id",
        "--uuid",
        type=uuid.UUID,
        default=None,
        metavar="UUID",
        help="the volume's upstairs id (random when not given); with a key it is bound "
        "into every block, so give the same id each time the volume is opened",
    )
    keys = p.add_mutually_exclusive_group()
    keys.add_argument(
        "--key",
        type=key_text,
        metavar="BASE64",
        help="the volume's encryption key, base64 of 32 bytes (visible to ps: prefer --key-file)",
    )
    keys.add_argument(
        "--key-file", type=key_file, metavar="PATH", help="a file holding the key in base64"
    )
    add_tls_options(p)


def add_observe_options(p: argparse.ArgumentParser, control: bool = True) -> None:
    """--trace-endpoint, --trace-sample, --metrics, --log-format, and --control."""
    options.add_options(p)
    if control:
        p.add_argument(
            "--control",
            type=options.listen_address,
            metavar="ADDR:PORT",
            help="serve the control API (GET /info, GET /work, /openapi.json) there",
        )


@contextlib.asynccontextmanager
async def observed(
    args: argparse.Namespace, parts: VolumeParts, service: str, nbd: bool = False
) -> AsyncIterator[Observing]:
    """Metrics, tracing, log ids and the control APIs of a volume's upstairs,
    for as long as the block runs; queued spans are sent at its end. The
    first region's upstairs speaks for the volume in the log ids, traces and
    --control; a region whose VCR names a control address serves its own."""
    obs = Observing(args, service, args.tls)
    if obs.registry is not None:
        UpstairsMetrics(obs.registry)
        if nbd:
            NbdMetrics(obs.registry)
    controls = [(up, r.opts.control) for up, r in parts.regions if r and r.opts.control]
    if parts.regions:
        up = parts.regions[0][0]
        logs.context["upstairs_id"] = lambda: str(up.session_ids()[0])
        logs.context["session_id"] = lambda: str(up.session_ids()[1])
        if obs.tracing is not None:
            UpstairsTracer(obs.tracing, up.session_ids)
        addr = getattr(args, "control", None)
        if addr:
            controls.insert(0, (up, addr))
    server_tls = args.tls.server_context() if args.tls and controls else None
    whole = parts.volume if parts.device is parts.volume else None
    runners = [await control.serve(up, a[0], a[1], server_tls, whole) for up, a in controls]
    if obs.registry is not None and whole is not None and whole.parent is not None:
        scrub_gauges(obs.registry, whole)
    try:
        yield obs
    finally:
        for runner in runners:
            if runner is not None:
                await runner.cleanup()
        await asyncio.to_thread(obs.close)


def scrub_gauges(registry: CollectorRegistry, volume: Volume) -> None:
    """The copy of a volume's read-only parent, as Prometheus gauges."""
    point = Gauge("crucible_volume_scrub_point_blocks", "blocks of the parent copied in",
                  registry=registry)  # fmt: skip
    point.set_function(lambda: volume.scrub_point)
    total = Gauge("crucible_volume_scrub_total_blocks", "blocks of the parent", registry=registry)
    total.set_function(lambda: volume.parent_blocks)
    done = Gauge("crucible_volume_scrub_done", "1 once the parent is copied and dropped",
                 registry=registry)  # fmt: skip
    done.set_function(lambda: 1.0 if volume.scrub_done else 0.0)


def upstairs_options(args: argparse.Namespace) -> Options:
    """The upstairs' options from the flags add_target_options (and
    --read-only, where a tool has it) added."""
    key: bytes | None = args.key or args.key_file
    cipher = None
    if key is not None:
        # A core dump would hold the key.
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        cipher = BlockCipher(key, args.id or NIL_VOLUME)
    return Options(
        read_only=getattr(args, "read_only", False),
        read_all_replicas=args.read_all_replicas,
        verify_rate=args.verify_rate * (1 << 20),
        cipher=cipher,
    )


def open_parts(args: argparse.Namespace) -> VolumeParts:
    """The volume the flags of add_target_options describe: -t's one region,
    or what --vcr builds (nothing connected yet)."""
    if args.vcr is None:
        tls = args.tls.client_context() if args.tls else None
        up = Upstairs(args.target, upstairs_options(args), args.id, tls)
        return VolumeParts(Volume([up]), [(up, None)])
    timeout = args.activate_timeout

    async def activate_parent(up: Upstairs, floor: int) -> int:
        return await activate(up, None, timeout, floor)

    read_only = getattr(args, "read_only", False)
    scrub = ScrubOptions(
        getattr(args, "scrub_delay", 0.0),
        getattr(args, "scrub_pause", 0.0),
        functools.partial(forget_parent, args.vcr, args.vcr_request),
    )
    tls = args.tls.client_context() if args.tls else None
    opts = upstairs_options(args)
    return build(args.vcr_request, activate_parent, read_only, opts, scrub, tls)


def forget_parent(path: Path, request: vcr.Vcr) -> None:
    """The scrub is done: the VCR file is rewritten without the read-only
    parent, so the volume opens without it from now on (the parent may go)."""
    if not isinstance(request, vcr.VolumeVcr) or request.read_only_parent is None:
        return
    try:
        vcr.save(path, dataclasses.replace(request, read_only_parent=None))
    except OSError as e:
        log.warning("the scrub is done, but %s could not be rewritten without its parent (%s): "
                    "the next start copies the parent in again", path, e.strerror or e)  # fmt: skip
        return
    log.info("the scrub is done: %s no longer names the read-only parent", path)


def one_region(args: argparse.Namespace, what: str) -> VolumeParts:
    """What the flags describe, for a workload that drives one region's
    upstairs (parts.regions[0][0]); ValueError for a VCR of more, or of a
    read-only parent. `what` names the workload in the error."""
    parts = open_parts(args)
    if len(parts.regions) != 1 or parts.volume.parent is not None:
        n = len(parts.regions)
        raise ValueError(
            f"{what} drives one region's upstairs, and {args.vcr} describes "
            f"{n} sub-volume{'' if n == 1 else 's'}"
            f"{' and a read-only parent' if parts.volume.parent else ''}: "
            "give it -t, or a VCR of one region"
        )
    return parts


async def activate_volume(args: argparse.Namespace, parts: VolumeParts) -> list[int]:
    """Every region of the volume activated (--gen, or one above what its
    downstairs hold, from the VCR's gen up), the parent opened and its scrub
    started: the generations used, one per region."""

    async def activate_region(up: Upstairs, floor: int) -> int:
        return await activate(up, args.gen, args.activate_timeout, floor)

    return await parts.activate(activate_region)


def region_starts(parts: VolumeParts) -> list[int]:
    """The block at which each region sub-volume starts in the volume (once
    they are active)."""
    return parts.volume.sub_starts


def describe(parts: VolumeParts) -> str:
    """The volume's shape in a few words: `N blocks of B bytes (E extents of
    S)` for one region; for a volume of more, or of a parent, each
    sub-volume's extents and the parent's size (once active)."""
    dev = parts.device
    shape = [
        f"{up.region.extent_count} extents of {up.region.extent_size}" for up, _ in parts.regions
    ]
    text = f"{dev.total_blocks} blocks of {dev.block_size} bytes"
    if dev is not parts.volume:  # one region: the upstairs itself
        return f"{text} ({shape[0]})"
    n = len(parts.regions)
    text += f" in {n} sub-volume{'' if n == 1 else 's'} ({'; '.join(shape) or 'none'})"
    if parts.volume.parent_blocks:
        text += f" over a read-only parent of {parts.volume.parent_blocks} blocks"
    return text


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What add_target_options' flags say together: three different
    targets; the TLS files (args.tls), all or none."""
    targets: list[SocketAddr] = args.target
    args.tls = tls_files(p, args)
    if args.tls is not None:
        try:
            args.tls.client_context()  # loads the files: a bad one is said now
        except TlsError as e:
            fail(p.prog, str(e))
    if args.vcr is not None:
        if targets:
            p.error("give -t or --vcr, not both")
        try:
            args.vcr_request = vcr.load(args.vcr)
        except OSError as e:
            fail(p.prog, f"cannot read {args.vcr}: {e.strerror}")
        except vcr.VcrError as e:
            fail(p.prog, f"{args.vcr}: {e}")
        return
    if len(targets) != 3:
        p.error(f"give exactly three targets with -t (got {len(targets)})")
    if len(set(targets)) != 3:
        p.error("the three targets must be different")


async def activate(up: Upstairs, gen: int | None, timeout: float, floor: int = 1) -> int:
    """Activate, and return the generation used. Without an explicit gen, start
    at `floor` (a VCR's) and, if the downstairs hold a higher one, go one above it."""
    want = max(1, floor) if gen is None else gen
    for _ in range(2):
        try:
            await asyncio.wait_for(up.activate(want), timeout)
            return want
        except CrucibleError as e:
            if gen is None and e.kind == ErrorKind.GenerationNumberInvalid and e.values:
                floor = int(e.values[1])
                if floor >= MAX_GEN:
                    raise CrucibleError(
                        ErrorKind.GenerationNumberInvalid,
                        f"the downstairs hold generation {floor}, the highest there is: "
                        "no upstairs can activate above it",
                    ) from None
                log.info("downstairs hold generation %d; activating with %d", floor, floor + 1)
                want = floor + 1
                continue
            raise
        except TimeoutError:
            problems = [
                f"{d.target} is {d.state}" + (f" ({d.last_error})" if d.last_error else "")
                for d in up.info().downstairs
                if d.state != "wait-quorum"
            ]
            raise CrucibleError(
                ErrorKind.UpstairsInactive,
                f"not active after {timeout:g} s: " + "; ".join(problems),
            ) from None
    raise CrucibleError(ErrorKind.GenerationNumberInvalid, "could not settle on a generation")
