"""What the sans-IO upstairs asks its driver to do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from crucible.protocol import messages as m
from crucible.protocol.wire import SocketAddr


@dataclass
class Connect:
    client: int
    target: SocketAddr


@dataclass
class Send:
    client: int
    msg: m.Message


@dataclass
class Drop:
    client: int
    reason: str


@dataclass
class Complete:
    """A guest request is finished: `result` is its value or a CrucibleError."""

    token: Any
    result: Any


@dataclass
class Probe:
    """Ask a downstairs' repair server what it supports (capabilities.py);
    answer with UpstairsCore.probed, quoting `attempt`."""

    client: int
    repair_addr: SocketAddr
    attempt: int


@dataclass
class FetchAllocation:
    """Ask a downstairs' repair server which blocks hold data (ALLOCATION_PATH);
    answer with UpstairsCore.allocation_fetched, quoting `epoch`."""

    client: int
    repair_addr: SocketAddr
    epoch: int


@dataclass
class Log:
    text: str
    level: str = "info"


Action = Connect | Send | Drop | Complete | Probe | FetchAllocation | Log
