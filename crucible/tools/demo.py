"""The main job: create three regions under a folder (once), run three
downstairs on them, do the seed's replicated write/flush/read through the
upstairs, and keep the downstairs serving until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

from crucible.cli_util import fail

PROG = "scripts/demo"
BIN = Path(sys.executable).parent


def main() -> None:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--dir", type=Path, default=Path("var/demo"), help="where the regions live")
    p.add_argument("--port", type=int, default=3801, help="first downstairs port (3 in a row)")
    p.add_argument("--once", action="store_true", help="stop after the check instead of serving")
    args = p.parse_args()

    ports = [args.port + i for i in range(3)]
    regions = [args.dir / str(port) for port in ports]
    for region in regions:
        if not (region / "region.json").exists():
            subprocess.run([BIN / "crucible-downstairs", "create", "-d", str(region)], check=True)
    procs = []
    logs = []
    try:
        for region, port in zip(regions, ports, strict=True):
            log = open(region.parent / f"{port}.log", "ab")  # noqa: SIM115 - kept while serving
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [
                        BIN / "crucible-downstairs",
                        "run",
                        "-d",
                        str(region),
                        "-p",
                        str(port),
                        "-a",
                        "127.0.0.1",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        time.sleep(1.0)
        for proc, port in zip(procs, ports, strict=True):
            if proc.poll() is not None:
                fail(PROG, f"downstairs on port {port} exited; see {args.dir}/{port}.log")
        targets = " ".join(f"-t 127.0.0.1:{port}" for port in ports)
        print(f"three downstairs are serving {args.dir} on ports {ports[0]}-{ports[-1]}")
        print(f"logs: {args.dir}/<port>.log")
        print(f"running the seed's write/flush/read: crucible {targets}")
        seed = subprocess.run([BIN / "crucible", "-q", *targets.split()], check=False)
        if seed.returncode != 0:
            fail(PROG, "the replicated write/flush/read failed")
        print("next:")
        print(f"  .venv/bin/crucible {targets}")
        print(f"  .venv/bin/crutest generic {targets} --verify-out {args.dir}/verify.json")
        print(f"  .venv/bin/crutest verify {targets} --verify-in {args.dir}/verify.json")
        print(f"  .venv/bin/crutest perf {targets} --io-size 4096 --io-depth 32")
        print(f"  .venv/bin/crucible-downstairs dump {' '.join(f'-d {r}' for r in regions)}")
        if args.once:
            return
        print("Ctrl-C stops them.")
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(30)
        for log in logs:
            log.close()
        print("stopped")


if __name__ == "__main__":
    main()
