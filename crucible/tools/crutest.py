"""crutest: workloads run through an upstairs against three downstairs (or
through a volume of several regions and perhaps a read-only parent, --vcr),
every read checked against a verify log that can be saved and loaded across
runs."""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from pathlib import Path

from crucible.cli_util import fail, positive_int, run_async
from crucible.common.errors import CrucibleError
from crucible.observe import logs
from crucible.tools.common import (
    activate_volume,
    add_observe_options,
    add_target_options,
    check_args,
    describe,
    observed,
    one_region,
    open_parts,
    target,
)
from crucible.tools.fault_workloads import repair, replace, replay
from crucible.tools.verify_log import VerifyLog
from crucible.tools.workloads import (
    Run,
    VerifyError,
    Workload,
    WorkloadError,
    big,
    burst,
    deactivate,
    dep,
    fill,
    generic,
    one,
    perf,
    rand,
    snapshot,
    span,
    verify,
    verify_replicas,
)
from crucible.volume.build import VolumeParts

PROG = "crutest"
log = logging.getLogger("crucible.crutest")

WORKLOADS: dict[str, Workload] = {
    "one": one,
    "fill": fill,
    "big": big,
    "rand": rand,
    "burst": burst,
    "span": span,
    "dep": dep,
    "generic": generic,
    "verify": verify,
    "perf": perf,
    "deactivate": deactivate,
    "replay": replay,
    "repair": repair,
    "replace": replace,
    "verify-replicas": verify_replicas,
    "snapshot": snapshot,
}
# Workloads that drive one region's upstairs by nature (its replicas, its
# downstairs through dsc, a target replaced): -t, or a VCR of one region.
ONE_REGION = frozenset({"replay", "repair", "replace", "verify-replicas"})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("workload", choices=sorted(WORKLOADS), help="what to run")
    add_target_options(p)
    add_observe_options(p)
    p.add_argument(
        "-c",
        "--count",
        type=positive_int,
        default=None,
        help="operations, rounds or bursts (default depends on the workload)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    p.add_argument("--verify-out", type=Path, help="save the verify log here at the end")
    p.add_argument(
        "--verify-in",
        type=Path,
        help="load a verify log and check the whole volume against it first",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (printed if not given)")
    p.add_argument("--io-size", type=positive_int, default=4096, help="perf: bytes per IO")
    p.add_argument("--io-depth", type=positive_int, default=32, help="perf: IOs in flight")
    p.add_argument("--time", type=float, default=5.0, help="perf: seconds per phase")
    p.add_argument(
        "--read-only",
        action="store_true",
        help="open the volume read-only (downstairs run with --mode ro)",
    )
    p.add_argument(
        "--dsc",
        type=target,
        metavar="HOST:PORT",
        help="replay, repair: the control API of the dsc running the downstairs",
    )
    p.add_argument(
        "--kill", action="store_true", help="replay: SIGKILL the downstairs instead of a stop"
    )
    p.add_argument(
        "--replacement",
        type=target,
        metavar="HOST:PORT",
        help="replace: a downstairs with an empty region to take the last target's place",
    )
    p.add_argument(
        "--no-deactivate",
        action="store_true",
        help="end without the final flush and deactivation (leaves work unflushed)",
    )
    return p


DEFAULT_COUNTS = {
    "rand": 200,
    "burst": 10,
    "dep": 20,
    "generic": 500,
    "perf": 1 << 62,
    "deactivate": 5,
    "replay": 5,
    "repair": 1,
    "replace": 200,
}


def main() -> None:
    p = build_parser()
    args = p.parse_args()
    check_args(p, args)
    level = logging.WARNING if args.quiet else logging.INFO
    logs.setup(args.log_format, level, "%(asctime)s %(message)s")
    if args.verify_out is not None and args.workload == "perf":
        p.error("perf writes data the verify log does not track; drop --verify-out")
    if args.workload in ("replay", "repair") and args.dsc is None:
        p.error(f"{args.workload} needs --dsc HOST:PORT, the control API of a running dsc")
    if args.workload == "replace" and args.replacement is None:
        p.error("replace needs --replacement HOST:PORT, a downstairs with an empty region")
    try:
        code = run_async(_main(args))
    except CrucibleError as e:
        fail(PROG, str(e.detail or e))
    except VerifyError as e:
        fail(PROG, f"verify failed: {e}")
    except WorkloadError as e:
        fail(PROG, str(e))
    except ValueError as e:
        fail(PROG, str(e))
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


async def _main(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    one = args.workload in ONE_REGION
    parts = one_region(args, args.workload) if one else open_parts(args)
    try:
        async with observed(args, parts, "crutest"):
            return await _run(args, parts, seed)
    finally:
        await parts.close()


async def _run(args: argparse.Namespace, parts: VolumeParts, seed: int) -> int:
    gens = await activate_volume(args, parts)
    dev = parts.device
    if args.verify_in is not None:
        vlog = VerifyLog.load(args.verify_in)
        if (vlog.block_size, vlog.total_blocks) != (dev.block_size, dev.total_blocks):
            raise ValueError(
                f"verify log {args.verify_in} is for {vlog.total_blocks} "
                f"blocks of {vlog.block_size}, the volume has "
                f"{dev.total_blocks} of {dev.block_size}"
            )
    else:
        vlog = VerifyLog(dev.block_size, dev.total_blocks)
    count = args.count or DEFAULT_COUNTS.get(args.workload, 1)
    run = Run(parts, vlog, random.Random(seed), count, args, gens)
    if args.verify_out is not None:
        vlog.journal_to(args.verify_out)  # survives a kill: every write is logged first
    gen = "/".join(map(str, gens)) or "-"
    print(f"crutest {args.workload}: gen {gen}, seed {seed}, {describe(parts)}")
    t0 = time.monotonic()
    if args.verify_in is not None:
        await run.verify_all(allow_range=True)
        print(f"volume matches verify log {args.verify_in}")
    await WORKLOADS[args.workload](run)
    if not args.no_deactivate and not args.read_only:
        await run.flush()
    if args.verify_out is not None:
        vlog.save(args.verify_out)
        print(f"verify log saved to {args.verify_out}")
    if not args.no_deactivate:
        await parts.deactivate()
    secs = time.monotonic() - t0
    for note in run.notes:
        print(note)
    errors = sum(up.info().integrity_errors for up, _ in parts.regions)
    print(
        f"done: {run.writes} writes ({run.bytes_written} bytes), {run.reads} reads "
        f"({run.bytes_read} bytes), {run.flushes} flushes in {secs:.2f} s; "
        f"integrity errors: {errors}"
    )
    return 0


if __name__ == "__main__":
    main()
