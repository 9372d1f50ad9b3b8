"""What the sans-IO upstairs asks its driver to do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import crucible.protocol.messages as m
from crucible.protocol.wire import SocketAddr


@dataclass
class Connect:
    client: int
    target: SocketAddr


# Send and Complete, made for every IO, have an __init__ of their own: compiled
# with mypyc, the one a dataclass generates runs interpreted, several times slower.
@dataclass(init=False)
class Send:
    client: int
    msg: m.Message

    def __init__(self, client: int, msg: m.Message) -> None:
        self.client = client
        self.msg = msg


@dataclass
class Drop:
    client: int
    reason: str


@dataclass(init=False)
class Complete:
    """A guest request is finished: `result` is its value or a CrucibleError."""

    token: Any
    result: Any

    def __init__(self, token: Any, result: Any) -> None:
        self.token = token
        self.result = result


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
