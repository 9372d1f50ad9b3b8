"""crucible-agent: one per storage host. It creates and destroys regions on
that host's storage on request (Crucible's agent API), runs a downstairs for
each, and keeps its state in DATADIR/agent.sqlite3.

    crucible-agent run -d DATADIR -l ADDR:PORT [--address ADDR]
                       [--downstairs-ports LOW-HIGH] [--metrics ADDR:PORT]
    crucible-agent openapi           print the API's OpenAPI document
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from crucible.agent.agent import Agent, Settings
from crucible.agent.disk import Disk
from crucible.agent.model import State
from crucible.agent.server import BASE, OPENAPI, make_app
from crucible.agent.store import Store, StoreError
from crucible.cli_util import (
    add_tls_options,
    fail,
    run_service,
    wait_for_stop_signal,
)
from crucible.common.address import is_loopback
from crucible.downstairs.repair import REPAIR_PORT_OFFSET
from crucible.observe import options
from crucible.observe.options import Observing
from crucible.tools import http_api

PROG = "crucible-agent"
log = logging.getLogger("crucible.agent")


def port_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    if not sep or not low.isdigit() or not high.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW-HIGH")
    lo, hi = int(low), int(high)
    top = 65535 - REPAIR_PORT_OFFSET  # each downstairs also serves repair that far above
    if not 1 <= lo <= hi <= top:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= LOW <= HIGH <= {top}")
    return lo, hi


def _default_downstairs() -> str:
    beside = Path(sys.executable).parent / "crucible-downstairs"
    return str(beside) if beside.exists() else (shutil.which("crucible-downstairs") or str(beside))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Serve regions on this host.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = sub.add_parser("run", help="serve the agent's API")
    r.add_argument(
        "-d",
        "--data",
        type=Path,
        required=True,
        metavar="DATADIR",
        help="where regions, logs and the agent's state live",
    )
    r.add_argument(
        "-l",
        "--listen",
        type=options.listen_address,
        required=True,
        metavar="ADDR:PORT",
        help="where to serve the API",
    )
    r.add_argument(
        "--address",
        help="the address every downstairs listens on and clients dial (default: the -l address)",
    )
    r.add_argument(
        "--downstairs-ports",
        type=port_range,
        default=(19000, 19999),
        metavar="LOW-HIGH",
        help="ports for downstairs (default 19000-19999; each also uses port + 4000 for repair)",
    )
    r.add_argument(
        "-D",
        "--downstairs-bin",
        default=_default_downstairs(),
        metavar="PATH",
        help="the crucible-downstairs command (default: the one installed with this one)",
    )
    g = r.add_argument_group("observability")
    g.add_argument(
        "--metrics",
        type=options.listen_address,
        metavar="ADDR:PORT",
        help="serve Prometheus metrics at http://ADDR:PORT/metrics",
    )
    g.add_argument("--log-format", choices=("text", "json"), default="text")
    add_tls_options(r)
    sub.add_parser("openapi", help="print the API's OpenAPI document")
    return p  # fmt: skip


class AgentMetrics(Collector):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        regions = GaugeMetricFamily("crucible_agent_regions", "Regions by state", labels=["state"])
        snaps = GaugeMetricFamily(
            "crucible_agent_running_snapshots", "Running snapshots by state", labels=["state"]
        )
        for state in State:
            n = sum(1 for r in self.agent.store.regions.values() if r.state is state)
            regions.add_metric([state.value], n)
            n = sum(1 for s in self.agent.store.snapshots.values() if s.state is state)
            snaps.add_metric([state.value], n)
        sup = self.agent.supervisor
        running = GaugeMetricFamily(
            "crucible_agent_downstairs_running", "Downstairs processes running", sup.running
        )
        restarts = CounterMetricFamily(
            "crucible_agent_downstairs_restarts", "Downstairs started again after they exited",
            sup.restarts,
        )  # fmt: skip
        yield from (regions, snaps, running, restarts)


async def serve(args: argparse.Namespace) -> int:
    host, port = args.listen
    address = args.address or host
    if address in ("0.0.0.0", "::"):
        raise ValueError("--address: give the address clients dial for the downstairs")
    args.data.mkdir(parents=True, exist_ok=True)
    store = Store(args.data)
    disk = Disk(args.data, [args.downstairs_bin])
    agent = Agent(Settings(address, *args.downstairs_ports), store, disk)
    await agent.start()
    obs = Observing(args, PROG, args.tls)
    if obs.registry is not None:
        obs.registry.register(AgentMetrics(agent))
    tls = args.tls.server_context() if args.tls else None
    try:
        serving = await http_api.start(make_app(agent), host, port, tls, "agent")
    except ValueError:
        await agent.close()
        raise
    if tls is None and not is_loopback(host):
        log.warning("serving the agent's API on %s without TLS: anyone who can reach it can "
                    "create and destroy regions", host)  # fmt: skip
    scheme = "https" if tls else "http"
    log.info("agent at %s://%s:%d%s, data in %s, downstairs on %s ports %d-%d", scheme, host,
             port, BASE, args.data, address, *args.downstairs_ports)  # fmt: skip
    try:
        await wait_for_stop_signal()
    finally:
        log.info("stopping; the downstairs keep serving")
        await serving.cleanup()
        await agent.close()
    return 0


def main() -> None:
    p = build_parser()
    args = p.parse_args()
    if args.command == "openapi":
        print(json.dumps(OPENAPI, indent=2))
        sys.exit(0)
    try:
        run_service(PROG, p, args, serve, (StoreError,))
    except OSError as e:
        fail(PROG, f"{e.filename or args.data}: {e.strerror}")
