"""The main job: three local regions (created sparse the first time, reused
afterwards), three downstairs serving them under dsc, and the volume exported
over NBD by crucible-nbd. Prints the nbd:// URI and commands to try (among
them stopping a downstairs through dsc while the volume stays in use); Ctrl-C
stops everything cleanly. Each run activates with the next generation."""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from crucible.cli_util import fail, port_number, positive_int, stop_process
from crucible.tools.dsc import region_ports

PROG = "scripts/demo"
BIN = Path(sys.executable).parent


def main() -> None:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--dir", type=Path, default=Path("var/demo"), help="where the regions live")
    p.add_argument(
        "--port",
        type=port_number,
        default=3801,
        help="first downstairs port (then +10 and +20; repair ports +4000)",
    )
    p.add_argument("--control-port", type=port_number, default=9998, help="dsc's control API")
    p.add_argument("--nbd-port", type=port_number, default=10809, help="NBD port")
    p.add_argument("--size-gib", type=positive_int, default=2, help="volume size for new regions")
    p.add_argument(
        "--once",
        action="store_true",
        help="check the export with nbdinfo and a write/read, then stop",
    )
    args = p.parse_args()

    ports = region_ports(args.port, 3)
    regions = [args.dir / str(port) for port in ports]
    block_size, extent_size = 4096, 8192  # 32 MiB extents
    extents = max(1, (args.size_gib << 30) // (block_size * extent_size))
    present = [(r / "region.json").exists() for r in regions]
    if not any(present):
        _run_dsc(
            "create", "--region-count", "3", "--output-dir", args.dir, "--port-base", args.port,
            "--block-size", block_size, "--extent-size", extent_size, "--extent-count", extents,
        )  # fmt: skip
    elif not all(present):
        missing = ", ".join(str(r) for r, ok in zip(regions, present, strict=True) if not ok)
        fail(PROG, f"{args.dir} holds only some of the regions (missing {missing})")
    control = f"127.0.0.1:{args.control_port}"
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[IO[bytes]] = []
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        procs.append(
            _spawn(
                [BIN / "dsc", "start", "--output-dir", args.dir, "--port-base", args.port,
                 "--control", control],
                args.dir / "dsc.log",
                logs,
            )
        )  # fmt: skip
        targets = [a for port in ports for a in ("-t", f"127.0.0.1:{port}")]
        nbd_log = args.dir / "nbd.log"
        procs.append(
            _spawn([BIN / "crucible-nbd", *targets, "-p", str(args.nbd_port)], nbd_log, logs)
        )
        uri = _wait_serving(nbd_log, procs, args)
        print(
            f"three downstairs serve {args.dir} on ports {', '.join(map(str, ports))} "
            f"under dsc (control API http://{control}/); logs in {args.dir}/*.log"
        )
        print(f"the volume is exported at {uri}")
        print("try:")
        print(f"  nbdinfo {uri}")
        print(f"  nbdinfo --map {uri}")
        print(f"  qemu-img convert -n -f raw -O raw disk.raw {uri}")
        print(f"  qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' {uri}")
        print(f"  nbdcopy --connections=4 {uri} copy.raw")
        print(f"  .venv/bin/crucible-downstairs dump {' '.join(f'-d {r}' for r in regions)}")
        print(
            f"  .venv/bin/dsc cmd --control {control} stop 1   "
            "# the volume keeps working; `start 1` brings it back (replayed or live-repaired)"
        )
        if args.once:
            _check(uri)
            return
        print("Ctrl-C stops everything.", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        fail(PROG, "a server exited; see the logs in " + str(args.dir))
    except KeyboardInterrupt:
        pass
    finally:
        # crucible-nbd first: it flushes and deactivates while the downstairs still run;
        # then dsc, which stops them.
        for proc in reversed(procs):
            stop_process(proc, timeout=60)
        for log in logs:
            log.close()
        print("stopped")


def _run_dsc(*args: object) -> None:
    r = subprocess.run([str(BIN / "dsc"), *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        fail(PROG, r.stderr.strip() or "dsc failed")


def _spawn(cmd: list[object], log_path: Path, logs: list[IO[bytes]]) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115 - kept open while the server runs
    logs.append(log)
    return subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT)


def _wait_serving(
    nbd_log: Path, procs: list[subprocess.Popen[bytes]], args: argparse.Namespace
) -> str:
    start = nbd_log.stat().st_size if nbd_log.exists() else 0
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                fail(PROG, f"a server exited at start; see the logs in {args.dir}")
        text = nbd_log.read_text()[start:] if nbd_log.exists() else ""
        for line in text.splitlines():
            if line.startswith("serving ") and " at nbd://" in line:
                print(line)
                return line.rsplit(" at ", 1)[1]
        time.sleep(0.2)
    fail(PROG, f"crucible-nbd did not start; see {nbd_log}")


def _check(uri: str) -> None:
    if shutil.which("qemu-io") is None:
        return
    r = subprocess.run(
        [
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 1000 70000",
            "-c",
            "read -P 0x5a 1000 70000",
            uri,
        ],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0 or "verification failed" in r.stdout:
        fail(PROG, f"write/read through NBD failed: {r.stdout}{r.stderr}")
    print("checked: a write and read back through NBD match")


if __name__ == "__main__":
    main()
