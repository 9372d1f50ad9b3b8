"""dsc, the downstairs controller: creates N local regions, runs a downstairs on
each, and stops, starts or kills them on request through a small HTTP API.

    dsc create --region-count 3 --output-dir DIR [--block-size N] [--extent-size N]
               [--extent-count N] [--port-base 8810] [--encrypted]
    dsc start --output-dir DIR [--region-count 3] [--port-base 8810] [--control ADDR:PORT]
    dsc cmd [--control ADDR:PORT] state|stop|start|kill CID | stop-all|start-all|stop-rand|
            list|shutdown

Downstairs i listens on port-base + 10*i; its region is DIR/<port>.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from aiohttp import web

from crucible.cli_util import (
    add_tls_options,
    block_size,
    fail,
    port_number,
    positive_int,
    run_async,
    stop_process,
    tls_files,
    wait_for_stop_signal,
)
from crucible.observe import options
from crucible.tools import http_api
from crucible.tools.common import target
from crucible.tools.http_api import ERROR_SCHEMA, json_app, json_content, schema_ref

PROG = "dsc"
BIN = Path(sys.executable).parent
DEFAULT_CONTROL = "127.0.0.1:9998"


def region_ports(port_base: int, count: int) -> list[int]:
    return [port_base + 10 * i for i in range(count)]


class Downstairs:
    """One managed downstairs process."""

    def __init__(self, cid: int, region: Path, port: int, extra: tuple[str, ...] = ()) -> None:
        self.cid = cid
        self.region = region
        self.port = port
        self.extra = extra  # flags for its crucible-downstairs run (tracing, metrics, logs)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = region.parent / f"downstairs-{port}.log"

    @property
    def state(self) -> str:
        if self.proc is None:
            return "stopped"
        code = self.proc.poll()
        return "running" if code is None else f"exited({code})"

    def start(self) -> None:
        if self.state == "running":
            return
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(BIN / "crucible-downstairs"),
                    "run",
                    "-d",
                    str(self.region),
                    "-p",
                    str(self.port),
                    "-a",
                    "127.0.0.1",
                    "-q",
                    *self.extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            stop_process(self.proc, sig)

    def describe(self) -> dict[str, Any]:
        pid = self.proc.pid if self.proc is not None and self.state == "running" else None
        return {
            "cid": self.cid,
            "port": self.port,
            "region": str(self.region),
            "state": self.state,
            "pid": pid,
        }


def make_app(fleet: list[Downstairs], stop: asyncio.Event) -> web.Application:
    def one(request: web.Request) -> Downstairs:
        cid = int(request.match_info["cid"])
        if cid >= len(fleet):
            raise web.HTTPNotFound(text=f"no downstairs {cid}")
        return fleet[cid]

    async def state(request: web.Request) -> web.Response:
        return web.json_response(one(request).describe())

    async def listing(request: web.Request) -> web.Response:
        return web.json_response([d.describe() for d in fleet])

    def action(fn: Any) -> Any:
        async def handler(request: web.Request) -> web.Response:
            d = one(request)
            await asyncio.to_thread(fn, d)
            return web.json_response(d.describe())

        return handler

    async def stop_all(request: web.Request) -> web.Response:
        await asyncio.gather(*(asyncio.to_thread(d.stop) for d in fleet))
        return web.json_response([d.describe() for d in fleet])

    async def start_all(request: web.Request) -> web.Response:
        for d in fleet:
            d.start()
        return web.json_response([d.describe() for d in fleet])

    async def stop_rand(request: web.Request) -> web.Response:
        running = [d for d in fleet if d.state == "running"]
        if not running:
            raise web.HTTPConflict(text="no downstairs is running")
        d = random.choice(running)
        await asyncio.to_thread(d.stop)
        return web.json_response(d.describe())

    async def shutdown(request: web.Request) -> web.Response:
        stop.set()
        return web.json_response(True)

    cid = r"{cid:\d{1,4}}"
    return json_app(
        [
            web.get("/list", listing),
            web.get(f"/state/cid/{cid}", state),
            web.post(f"/stop/cid/{cid}", action(lambda d: d.stop())),
            web.post(f"/start/cid/{cid}", action(lambda d: d.start())),
            web.post(f"/kill/cid/{cid}", action(lambda d: d.stop(signal.SIGKILL))),
            web.post("/stop/all", stop_all),
            web.post("/start/all", start_all),
            web.post("/stop/rand", stop_rand),
            web.post("/shutdown", shutdown),
        ],
        OPENAPI,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser("create", help="create the regions")
    c.add_argument("--region-count", type=positive_int, default=3)
    c.add_argument("--output-dir", type=Path, required=True)
    c.add_argument("--port-base", type=port_number, default=8810)
    c.add_argument("--block-size", type=block_size, default=4096)
    c.add_argument("--extent-size", type=positive_int, default=100)
    c.add_argument("--extent-count", type=positive_int, default=15)
    c.add_argument("--encrypted", action="store_true", help="regions for an encrypted volume")
    s = sub.add_parser("start", help="run a downstairs on each region, with a control API")
    s.add_argument("--region-count", type=positive_int, default=3)
    s.add_argument("--output-dir", type=Path, required=True)
    s.add_argument("--port-base", type=port_number, default=8810)
    s.add_argument(
        "--control",
        type=target,
        default=target(DEFAULT_CONTROL),
        help=f"control API address (default {DEFAULT_CONTROL})",
    )
    options.add_options(s, metrics=False)
    s.add_argument(
        "--metrics",
        type=options.listen_address,
        metavar="ADDR:PORT",
        help="downstairs i serves Prometheus metrics on ADDR:PORT+i",
    )
    add_tls_options(s)
    m = sub.add_parser("cmd", help="ask a running dsc to do something")
    m.add_argument("--control", type=target, default=target(DEFAULT_CONTROL))
    m.add_argument(
        "action",
        choices=[
            "list",
            "state",
            "stop",
            "start",
            "kill",
            "stop-all",
            "start-all",
            "stop-rand",
            "shutdown",
        ],
    )
    m.add_argument("cid", type=int, nargs="?", help="downstairs number, for one-downstairs actions")
    return p


def main() -> None:
    p = build_parser()
    args = p.parse_args()
    if args.command == "create":
        for port in region_ports(args.port_base, args.region_count):
            region = args.output_dir / str(port)
            r = subprocess.run(
                [
                    str(BIN / "crucible-downstairs"),
                    "create",
                    "-d",
                    str(region),
                    "--block-size",
                    str(args.block_size),
                    "--extent-size",
                    str(args.extent_size),
                    "--extent-count",
                    str(args.extent_count),
                    *(["--encrypted"] if args.encrypted else []),
                ],
                capture_output=True,
                text=True,
            )
            if r.returncode != 0:
                fail(PROG, r.stderr.strip().splitlines()[-1] if r.stderr else "create failed")
            print(r.stdout.strip())
        return
    if args.command == "start":
        tls_files(p, args)  # all three or none
        sys.exit(run_async(_start(args)))
    if args.action in ("state", "stop", "start", "kill") and args.cid is None:
        p.error(f"{args.action} needs a downstairs number")
    sys.exit(_cmd(args))


def _downstairs_flags(args: argparse.Namespace, i: int) -> tuple[str, ...]:
    """What downstairs i is told of tracing, metrics and the log format."""
    flags = ["--log-format", args.log_format]
    if args.trace_endpoint:
        flags += ["--trace-endpoint", args.trace_endpoint, "--trace-sample", str(args.trace_sample)]
    if args.metrics:
        host, port = args.metrics
        flags += ["--metrics", f"{host}:{port + i}"]
    if args.cert_pem:
        flags += ["--cert-pem", str(args.cert_pem), "--key-pem", str(args.key_pem)]
        flags += ["--root-cert-pem", str(args.root_cert_pem)]
    return tuple(flags)


async def _start(args: argparse.Namespace) -> int:
    fleet = [
        Downstairs(i, args.output_dir / str(port), port, _downstairs_flags(args, i))
        for i, port in enumerate(region_ports(args.port_base, args.region_count))
    ]
    missing = [str(d.region) for d in fleet if not (d.region / "region.json").exists()]
    if missing:
        fail(PROG, f"no region at {', '.join(missing)}: run dsc create first")
    stop = asyncio.Event()
    host, port = args.control
    try:
        runner = await http_api.start(make_app(fleet, stop), host, port)
    except OSError as e:
        fail(PROG, f"cannot listen on {host}:{port}: {e.strerror}")
    for d in fleet:
        d.start()
    print(
        f"dsc: {len(fleet)} downstairs on ports {[d.port for d in fleet]}, "
        f"control API on http://{host}:{port}/",
        flush=True,
    )
    waiter = asyncio.ensure_future(wait_for_stop_signal())
    await asyncio.wait(
        [waiter, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED
    )
    for d in fleet:
        d.stop()
    await runner.cleanup()
    print("dsc: stopped", flush=True)
    return 0


class DscError(Exception):
    pass


def request(control: tuple[str, int], method: str, path: str, timeout: float = 60) -> Any:
    """One call to a running dsc's control API; its JSON answer."""
    host, port = control
    req = urllib.request.Request(f"http://{host}:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read().decode().strip()
        try:
            body = json.loads(body)["message"]
        except (ValueError, KeyError, TypeError):
            pass
        raise DscError(body or str(e.reason)) from None
    except (urllib.error.URLError, OSError) as e:
        raise DscError(f"no dsc answers at {host}:{port}: {getattr(e, 'reason', e)}") from None


def _cmd(args: argparse.Namespace) -> int:
    paths = {
        "list": ("GET", "/list"),
        "state": ("GET", f"/state/cid/{args.cid}"),
        "stop": ("POST", f"/stop/cid/{args.cid}"),
        "start": ("POST", f"/start/cid/{args.cid}"),
        "kill": ("POST", f"/kill/cid/{args.cid}"),
        "stop-all": ("POST", "/stop/all"),
        "start-all": ("POST", "/start/all"),
        "stop-rand": ("POST", "/stop/rand"),
        "shutdown": ("POST", "/shutdown"),
    }
    method, path = paths[args.action]
    try:
        print(json.dumps(request(args.control, method, path), indent=2))
    except DscError as e:
        fail(PROG, f"{args.action}: {e}")
    return 0


if __name__ == "__main__":
    main()


_CID = {"name": "cid", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}}


def _op(summary: str, op_id: str, schema: dict[str, Any], one: bool = False) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "summary": summary,
        "operationId": op_id,
        "responses": {"200": json_content(schema)},
    }
    if one:
        doc["parameters"] = [_CID]
        doc["responses"]["404"] = json_content(schema_ref("Error"), "no such downstairs")
    return doc


_ONE = schema_ref("Downstairs")
_ALL = {"type": "array", "items": schema_ref("Downstairs")}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "dsc control", "version": "0.0.1"},
    "paths": {
        "/list": {"get": _op("Every downstairs", "dsc_list", _ALL)},
        "/state/cid/{cid}": {"get": _op("One downstairs", "dsc_get_ds_state", _ONE, True)},
        "/stop/cid/{cid}": {"post": _op("Stop one (SIGTERM)", "dsc_stop", _ONE, True)},
        "/start/cid/{cid}": {"post": _op("Start one", "dsc_start", _ONE, True)},
        "/kill/cid/{cid}": {"post": _op("SIGKILL one", "dsc_stop_kill", _ONE, True)},
        "/stop/all": {"post": _op("Stop every one", "dsc_stop_all", _ALL)},
        "/start/all": {"post": _op("Start every one", "dsc_start_all", _ALL)},
        "/stop/rand": {
            "post": {
                **_op("Stop one picked at random", "dsc_stop_rand", _ONE),
                "responses": {
                    "200": json_content(_ONE),
                    "409": json_content(schema_ref("Error"), "none is running"),
                },
            }
        },
        "/shutdown": {"post": _op("Stop them all and exit", "dsc_shutdown", {"type": "boolean"})},
    },
    "components": {
        "schemas": {
            "Error": ERROR_SCHEMA,
            "Downstairs": {
                "type": "object",
                "required": ["cid", "port", "region", "state", "pid"],
                "properties": {
                    "cid": {"type": "integer"},
                    "port": {"type": "integer"},
                    "region": {"type": "string"},
                    "state": {"type": "string", "description": "running, stopped or exited(N)"},
                    "pid": {"type": "integer", "nullable": True},
                },
            },
        }
    },
}
