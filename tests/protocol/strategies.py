"""Hypothesis strategies for every wire type, keyed by the annotation names in messages.py."""

from __future__ import annotations

import uuid
from dataclasses import fields
from typing import Any

from hypothesis import strategies as st

from crucible.common.definition import RegionDefinition
from crucible.common.errors import (
    NEGOTIATION_PAYLOAD,
    WITH_STRING,
    CrucibleError,
    ErrorKind,
    NegotiationKind,
)
from crucible.protocol import messages as m

u8 = st.integers(0, 0xFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
uuids = st.builds(uuid.UUID, int=st.integers(0, (1 << 128) - 1))
addrs = st.one_of(
    st.tuples(st.ip_addresses(v=4).map(str), st.integers(0, 65535)),
    st.tuples(st.ip_addresses(v=6).map(str), st.integers(0, 65535)),
)
enc_ctx = st.builds(
    m.EncryptionContext, st.binary(min_size=12, max_size=12), st.binary(min_size=16, max_size=16)
)
block_ctx = st.builds(m.BlockContext, u64, st.none() | enc_ctx)
read_ctx = st.one_of(st.none(), u64, enc_ctx)


@st.composite
def errors(draw: st.DrawFn) -> CrucibleError:
    kind = draw(st.sampled_from(list(ErrorKind)))
    if kind in WITH_STRING:
        return CrucibleError(kind, draw(st.text(max_size=20)))
    if kind == ErrorKind.MissingContextSlot:
        return CrucibleError(kind, values=(draw(u64), draw(u32)))
    if kind == ErrorKind.NegotiationError:
        nk = draw(st.sampled_from(list(NegotiationKind)))
        payload = NEGOTIATION_PAYLOAD[nk]
        extra: tuple[Any, ...] = ()
        if payload is not None:
            one = {"u64": u64, "u32": u32, "bool": st.booleans(), "uuid": uuids}[payload]
            extra = (draw(one), draw(one))
        return CrucibleError(kind, values=(int(nk), *extra))
    return CrucibleError(kind)


region_defs = st.builds(
    RegionDefinition,
    block_size=st.sampled_from([512, 1024, 4096, 32768]),
    extent_size=u64,
    extent_count=u32,
    uuid=uuids,
    encrypted=st.booleans(),
    database_read_version=u64,
    database_write_version=u64,
)

FIELD_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "u8": u8,
    "ClientId": u8,
    "u32": u32,
    "ExtentId": u32,
    "u64": u64,
    "JobId": u64,
    "RepairId": u64,
    "bool": st.booleans(),
    "Uuid": uuids,
    "SocketAddr": addrs,
    "Deps": st.lists(u64, max_size=5),
    "U64Vec": st.lists(u64, max_size=5),
    "U32Vec": st.lists(u32, max_size=5),
    "U8Vec": st.lists(u8, max_size=5),
    "BoolVec": st.lists(st.booleans(), max_size=5),
    "OptJobId": st.none() | u64,
    "OptU32": st.none() | u32,
    "OptSnapshot": st.none() | st.text(max_size=10),
    "CrucibleError": errors(),
    "UnitResult": st.none() | errors(),
    "CloseResult": st.tuples(u64, u64, st.booleans()) | errors(),
    "RegionDefinition": region_defs,
    "Contexts": st.lists(block_ctx, max_size=4),
    "ReadBlocks": st.lists(read_ctx, max_size=4) | errors(),
    "Data": st.binary(max_size=64),
}


# The shapes the hand-packed fast paths take: plain contexts, Ok results.
PLAIN_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "Contexts": st.lists(u64.map(m.BlockContext), max_size=4)
    | st.lists(u64, max_size=4).map(m.PlainContexts)
    | st.lists(st.builds(m.BlockContext, u64, enc_ctx), max_size=4),
    "ReadBlocks": st.lists(u64, max_size=4) | st.lists(enc_ctx, max_size=4),
    "UnitResult": st.none(),
    "Uuid": st.sampled_from([uuid.UUID(int=1), uuid.UUID(int=(1 << 128) - 1)]) | uuids,
}


def message_strategy(cls: type, plain_bias: bool = False) -> st.SearchStrategy[Any]:
    """Any message of this type; with `plain_bias`, mostly in the plain shapes."""

    def field(name: str) -> st.SearchStrategy[Any]:
        general = FIELD_STRATEGIES[name]
        plain = PLAIN_STRATEGIES.get(name) if plain_bias else None
        return general if plain is None else plain | plain | general

    return st.builds(cls, *[field(str(f.type)) for f in fields(cls)])


messages = st.one_of([message_strategy(cls) for cls in m.MESSAGE_TYPES])
