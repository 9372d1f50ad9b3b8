"""Pieces the upstairs tools share: targets on the command line, activation."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import resource
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from crucible.cli_util import add_tls_options, fail, non_negative_float, tls_files
from crucible.common.address import host_port
from crucible.common.errors import CrucibleError, ErrorKind
from crucible.observe import logs, options
from crucible.observe.metrics import NbdMetrics, UpstairsMetrics
from crucible.observe.options import Observing
from crucible.observe.tracing import UpstairsTracer
from crucible.protocol.wire import SocketAddr
from crucible.tls import TlsError
from crucible.tools import control
from crucible.upstairs.core import MAX_GEN
from crucible.upstairs.encryption import NIL_VOLUME, BadKey, BlockCipher, parse_key
from crucible.upstairs.guest import Upstairs
from crucible.upstairs.options import Options

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
        required=True,
        metavar="HOST:PORT",
        help="a downstairs; give exactly three",
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
    args: argparse.Namespace, up: Upstairs, service: str, nbd: bool = False
) -> AsyncIterator[Observing]:
    """Metrics, tracing, log ids and the control API of an upstairs, for as
    long as the block runs; queued spans are sent at its end."""
    obs = Observing(args, service, args.tls)
    logs.context["upstairs_id"] = lambda: str(up.session_ids()[0])
    logs.context["session_id"] = lambda: str(up.session_ids()[1])
    if obs.registry is not None:
        UpstairsMetrics(obs.registry)
        if nbd:
            NbdMetrics(obs.registry)
    if obs.tracing is not None:
        UpstairsTracer(obs.tracing, up.session_ids)
    addr = getattr(args, "control", None)
    server_tls = args.tls.server_context() if args.tls and addr else None
    runner = await control.serve(up, addr[0], addr[1], server_tls) if addr else None
    try:
        yield obs
    finally:
        if runner is not None:
            await runner.cleanup()
        await asyncio.to_thread(obs.close)


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


def new_upstairs(args: argparse.Namespace) -> Upstairs:
    """The upstairs the flags of add_target_options describe."""
    tls = args.tls.client_context() if args.tls else None
    return Upstairs(args.target, upstairs_options(args), args.id, tls)


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
    if len(targets) != 3:
        p.error(f"give exactly three targets with -t (got {len(targets)})")
    if len(set(targets)) != 3:
        p.error("the three targets must be different")


async def activate(up: Upstairs, gen: int | None, timeout: float) -> int:
    """Activate, and return the generation used. Without an explicit gen, start
    at 1 and, if the downstairs hold a higher one, go one above it."""
    want = 1 if gen is None else gen
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
