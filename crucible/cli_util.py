"""Small helpers shared by the console commands: argument types, errors, progress."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import math
import resource
import signal
import subprocess
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn

from tqdm import tqdm

from crucible.common.definition import RegionError, validate_block_size
from crucible.libc import libc
from crucible.observe import logs
from crucible.tls import TlsError, TlsFiles


class CliError(Exception):
    """A failure to report as one line and a non-zero exit."""


def fail(prog: str, message: str, code: int = 1) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(code)


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < minimum:
        raise argparse.ArgumentTypeError(f"{v} {what}")
    return v


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "must be at least 1")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "must not be negative")


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def non_negative_float(text: str) -> float:
    v = _number(text)
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number, not negative")
    return v


def positive_float(text: str) -> float:
    v = _number(text)
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number above 0")
    return v


def port_number(text: str) -> int:
    v = non_negative_int(text)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"port {v} is out of range 0..65535")
    return v


def block_size(text: str) -> int:
    v = positive_int(text)
    try:
        validate_block_size(v)
    except RegionError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return v


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def byte_size(text: str) -> int:
    """A size in bytes: 4096, 64M, 10G, 1TiB (powers of 1024)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (t[:-1], t[-1]) if t and t[-1] in _UNITS else (t, "")
    if not number.isdigit() or int(number) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 4096, 64M, 10G, 1T)")
    return int(number) * _UNITS[unit]


def add_tls_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "mutual TLS", "on every port this command serves or dials; give all three or none"
    )
    g.add_argument("--cert-pem", type=Path, metavar="PATH", help="this end's certificate (PEM)")
    g.add_argument("--key-pem", type=Path, metavar="PATH", help="its private key (PEM)")
    g.add_argument(
        "--root-cert-pem",
        type=Path,
        metavar="PATH",
        help="the CA certificate every peer's certificate must be signed by (PEM)",
    )


def tls_files(p: argparse.ArgumentParser, args: argparse.Namespace) -> TlsFiles | None:
    """The TLS flags add_tls_options added: all three, or None."""
    given = (args.cert_pem, args.key_pem, args.root_cert_pem)
    if not any(given):
        return None
    if not all(given):
        p.error("--cert-pem, --key-pem and --root-cert-pem go together")
    return TlsFiles(*given)


def progress(total: int, unit: str, desc: str) -> tqdm:
    """A progress bar on stderr that stays quiet when stderr is not a terminal."""
    return tqdm(
        total=total,
        unit=unit,
        unit_scale=True,
        desc=desc,
        disable=not sys.stderr.isatty(),
        leave=False,
    )


def setup_logging(quiet_jobs: bool = False, fmt: str = "text") -> None:
    """Log to stdout, as text lines or JSON objects (`--log-format`)."""
    logs.setup(fmt)
    if quiet_jobs:
        logging.getLogger("crucible.downstairs.jobs").setLevel(logging.WARNING)


def stop_process(
    proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 30.0
) -> int:
    """Signal a child and wait for it; SIGKILL it if it outlives the timeout."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def run_service(
    prog: str,
    p: argparse.ArgumentParser,
    args: argparse.Namespace,
    serve: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
    errors: tuple[type[Exception], ...] = (),
) -> None:
    """A server's main: its TLS files checked, logs at info, `serve(args)`
    run until it returns (a stop signal); a bad flag, a port in use or one of
    `errors` is one line and exit status 1."""
    args.tls = tls_files(p, args)
    setup_logging(fmt=args.log_format)
    logging.getLogger().setLevel(logging.INFO)
    try:
        if args.tls is not None:
            args.tls.server_context()
        sys.exit(run_async(serve(args)))
    except (ValueError, TlsError) as e:
        fail(prog, str(e))
    except errors as e:
        fail(prog, str(e))
    except KeyboardInterrupt:
        sys.exit(130)


async def wait_for_stop_signal() -> None:
    """Return on SIGINT or SIGTERM (a server's orderly shutdown)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


# Free memory at the top of the heap is given back only beyond this: above
# any heap the IO limits allow (the upstairs' Options and the NBD server's,
# the downstairs' PAUSE_BYTES), so a process keeps its peak.
_KEEP_FREED = 1 << 30


def tune_allocator() -> None:
    """Serve IO buffers (up to tens of MiB) from the heap, and keep freed heap
    memory for reuse. By default glibc maps each large buffer afresh and unmaps
    it when freed, so every 1 MiB write or read faults in 256 new pages: about
    1 ms of kernel time per MiB, against 0.06 ms for reused memory. Giving
    back the top of the heap whenever it passes a lower threshold does the
    same more slowly: crucible-nbd's heap peaks at 100-160 MiB under 1 MiB
    writes, and at a 128 MiB threshold it shrank and grew again all along,
    67 page faults per MiB written."""
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:  # glibc; elsewhere the allocator's defaults stay
        mallopt(_M_MMAP_THRESHOLD, 64 << 20)
        mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED)


def raise_open_file_limit() -> None:
    """Let this process open as many files as the system allows it: the soft
    limit up to the hard one. A downstairs holds every extent file of its
    region open (and large IO opens one or two more fds of an extent), so a
    region of a few thousand extents is past the usual soft limit of 1024."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard and hard != resource.RLIM_INFINITY:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass  # as it was: opening too many files then fails with a clear error


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run on uvloop when it is installed, in a process tuned for IO:
    see tune_allocator. The cycle collector runs less often: every IO
    allocates a few objects and few of them form cycles, and a young-generation
    pass per few hundred IOs shows as latency spikes."""
    tune_allocator()
    gc.freeze()  # what start-up built lives for good: never scan it
    gc.set_threshold(20_000, 20, 20)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
