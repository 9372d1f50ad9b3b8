"""The main job: three local regions (created sparse the first time, reused
afterwards), three downstairs serving them under dsc, and the volume exported
over NBD by crucible-nbd. Prints the nbd:// URI and commands to try (among
them stopping a downstairs through dsc while the volume stays in use); Ctrl-C
stops everything cleanly. Each run activates with the next generation."""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from crucible.cli_util import fail, port_number, positive_int, stop_process
from crucible.protocol.wire import SocketAddr
from crucible.tools.common import target
from crucible.tools.dsc import DscError, region_ports, request

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
    p.add_argument(
        "--volume-port",
        type=port_number,
        default=7890,
        help="the volume's control API (crucible-stat, /info); its Prometheus metrics on +1",
    )
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
    lock = _lock(args.dir)
    control = f"127.0.0.1:{args.control_port}"
    servers: list[Server] = []
    # Ctrl-C and kill -INT/-TERM stop everything in order, even when started
    # from a script that left SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        dsc_cmd = [BIN / "dsc", "start", "--output-dir", args.dir, "--port-base", args.port,
                   "--control", control]  # fmt: skip
        servers.append(Server("dsc", dsc_cmd, args.dir / "dsc.log"))
        targets = [a for port in ports for a in ("-t", f"127.0.0.1:{port}")]
        volume = f"127.0.0.1:{args.volume_port}"
        metrics = f"127.0.0.1:{args.volume_port + 1}"
        nbd_cmd = [BIN / "crucible-nbd", *targets, "-p", str(args.nbd_port),
                   "--control", volume, "--metrics", metrics]  # fmt: skip
        # Each downstairs's log, from where this run starts, for what went wrong.
        ds_logs = {port: _offset(args.dir / f"downstairs-{port}.log") for port in ports}
        servers.append(Server("crucible-nbd", nbd_cmd, args.dir / "nbd.log"))
        uri = _wait_serving(servers, ds_logs, args.dir, target(control))
        print(
            f"three downstairs serve {args.dir} on ports {', '.join(map(str, ports))} "
            f"under dsc (control API http://{control}/); logs in {args.dir}/*.log"
        )
        print(f"the volume is exported at {uri}")
        print("try:")
        print(f"  nbdinfo {uri}")
        print(f"  nbdinfo --map {uri}")
        print(f"  qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' {uri}")
        print(f"  qemu-img convert -p -f raw -O raw {uri} disk.raw    # the volume to a file")
        print(f"  qemu-img compare -f raw -F raw {uri} disk.raw")
        print(f"  nbdcopy --connections=4 disk.raw {uri}    # and back")
        print(f"  .venv/bin/crucible-downstairs dump {' '.join(f'-d {r}' for r in regions)}")
        print(
            f"  .venv/bin/dsc cmd --control {control} stop 1   "
            "# the volume keeps working; `start 1` brings it back (replayed or live-repaired)"
        )
        print(f"  .venv/bin/crucible-stat {volume}    # watch it live, a line a second")
        print(f"  curl -s http://{volume}/info; curl -s http://{metrics}/metrics")
        if args.once:
            _check(uri)
            return
        print(f"Ctrl-C (or kill -INT {os.getpid()}) stops everything.", flush=True)
        while all(s.proc.poll() is None for s in servers):
            time.sleep(0.5)
        gone = next(s for s in servers if s.proc.poll() is not None)
        fail(PROG, f"{gone.name} exited: {gone.cause()}")
    except KeyboardInterrupt:
        pass
    finally:
        # crucible-nbd first: it flushes and deactivates while the downstairs still run;
        # then dsc, which stops them.
        for s in reversed(servers):
            s.stop()
        print("stopped")
        os.close(lock)


def _run_dsc(*args: object) -> None:
    r = subprocess.run([str(BIN / "dsc"), *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        fail(PROG, r.stderr.strip() or "dsc failed")


def _lock(directory: Path) -> int:
    """One demo per directory: a lock held while it runs, naming its pid."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "demo.pid"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        fail(
            PROG,
            f"the demo is already running on {directory} (pid {pid}); stop it with Ctrl-C "
            f"where it runs, or kill -INT {pid}",
        )
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _offset(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def first_error(path: Path, offset: int) -> str:
    """What a server that failed said: its first line that reports an error
    (one-line CLI errors, logged errors), else its last line."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            lines = [x.strip() for x in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return f"(no log at {path})"
    lines = [x for x in lines if x]
    for line in lines:
        if re.search(r"\berror\b|\bERROR\b", line):
            return line
    return lines[-1] if lines else "(it printed nothing)"


class Server:
    """One process the demo runs, with its log."""

    def __init__(self, name: str, cmd: list[object], log: Path) -> None:
        self.name = name
        self.log = log
        self.offset = _offset(log)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            # Its own session: a Ctrl-C at the terminal reaches the demo alone,
            # which stops the servers in order.
            self.proc = subprocess.Popen(
                [str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def cause(self) -> str:
        return f"{first_error(self.log, self.offset)} (see {self.log})"

    def stop(self) -> None:
        stop_process(self.proc, timeout=60)


def _wait_serving(
    servers: list[Server], ds_logs: dict[int, int], directory: Path, control: SocketAddr
) -> str:
    """The export's URI once crucible-nbd serves and dsc's control API
    answers; or the first failure, said as soon as a server (dsc, a
    downstairs, crucible-nbd) has exited. (dsc starts the downstairs before
    it listens: the export can serve while dsc is failing to.)"""
    nbd = servers[-1]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        for s in servers:
            if s.proc.poll() is not None:
                fail(PROG, f"{s.name} exited at start: {s.cause()}")
        try:
            fleet: list[dict[str, Any]] | None = request(control, "GET", "/list", timeout=2)
        except DscError:
            fleet = None  # dsc is not answering yet
        for d in fleet or []:
            if str(d.get("state", "")).startswith("exited"):
                log = directory / f"downstairs-{d['port']}.log"
                line = first_error(log, ds_logs.get(d["port"], 0))
                fail(PROG, f"downstairs {d['cid']} (port {d['port']}) exited at start: {line}")
        for line in nbd.log.read_text(errors="replace")[nbd.offset :].splitlines():
            if fleet is not None and line.startswith("serving ") and " at nbd://" in line:
                print(line)
                return line.rsplit(" at ", 1)[1]
        time.sleep(0.2)
    fail(PROG, f"crucible-nbd did not start in 90 s: {nbd.cause()}")


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
