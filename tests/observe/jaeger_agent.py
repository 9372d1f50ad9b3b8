"""A stand-in Jaeger agent for tests: receives `Agent.emitBatch` datagrams on UDP and decodes them.

The decoding walks the compact-protocol structs generically by field id with the `thrift`
library's reader, knowing only the Jaeger IDL (field ids and types), so it checks the
exporter's encoding instead of sharing it. Fields it does not know, or whose wire type is not
the IDL's, are skipped.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from thrift.protocol.TCompactProtocol import TCompactProtocol
from thrift.Thrift import TMessageType, TType
from thrift.transport.TTransport import TMemoryBuffer

MAX_SPANS = 100_000  # kept; later batches are counted in `discarded` and not stored

_U64 = (1 << 64) - 1


@dataclass
class JSpan:
    trace_id: int  # 128-bit, unsigned: high << 64 | low
    span_id: int  # unsigned
    parent_span_id: int  # unsigned, 0 for a root span
    operation: str
    flags: int
    start_us: int
    duration_us: int
    tags: dict[str, object]
    references: list[tuple[int, int, int]]  # (refType, trace id, span id), ids unsigned
    logs: list[tuple[int, dict[str, object]]]  # (timestamp µs, fields)
    service: str = ""  # the serviceName of the batch it came in


@dataclass
class Batch:
    service: str
    process_tags: dict[str, object]
    spans: list[JSpan]
    seq_no: int | None = None
    size: int = 0  # bytes of the datagram it came in


Reader = Callable[[Any], Any]


def _struct(prot: Any, fields: dict[int, tuple[int, Reader]]) -> dict[int, Any]:
    """Read a struct: the fields listed by id (with their IDL type) are read, others skipped."""
    values: dict[int, Any] = {}
    prot.readStructBegin()
    while True:
        _, ftype, fid = prot.readFieldBegin()
        if ftype == TType.STOP:
            break
        expected = fields.get(fid)
        if expected is not None and expected[0] == ftype:
            values[fid] = expected[1](prot)
        else:
            prot.skip(ftype)
        prot.readFieldEnd()
    prot.readStructEnd()
    return values


def _list(element: Reader) -> Reader:
    def read(prot: Any) -> list[Any]:
        _, size = prot.readListBegin()
        items = [element(prot) for _ in range(size)]
        prot.readListEnd()
        return items

    return read


def _str(prot: Any) -> str:
    data: bytes = prot.readBinary()
    return data.decode("utf-8")


def _bytes(prot: Any) -> bytes:
    data: bytes = prot.readBinary()
    return data


def _int(prot: Any) -> int:  # readI32 and readI64 are the same zigzag varint
    value: int = prot.readI64()
    return value


def _double(prot: Any) -> float:
    value: float = prot.readDouble()
    return value


def _bool(prot: Any) -> bool:
    value: bool = prot.readBool()
    return value


_VALUE_FIELD = {0: 3, 1: 4, 2: 5, 3: 6, 4: 7}  # Tag.vType -> the field holding the value


def _tag(prot: Any) -> tuple[str, object]:
    f = _struct(
        prot,
        {
            1: (TType.STRING, _str),
            2: (TType.I32, _int),
            3: (TType.STRING, _str),
            4: (TType.DOUBLE, _double),
            5: (TType.BOOL, _bool),
            6: (TType.I64, _int),
            7: (TType.STRING, _bytes),
        },
    )
    return f[1], f[_VALUE_FIELD[f[2]]]


def _tags(prot: Any) -> dict[str, object]:
    return dict(_list(_tag)(prot))


def _log(prot: Any) -> tuple[int, dict[str, object]]:
    f = _struct(prot, {1: (TType.I64, _int), 2: (TType.LIST, _tags)})
    return f[1], f[2]


def _trace_id(high: int, low: int) -> int:
    return ((high & _U64) << 64) | (low & _U64)


def _ref(prot: Any) -> tuple[int, int, int]:
    f = _struct(
        prot,
        {
            1: (TType.I32, _int),
            2: (TType.I64, _int),
            3: (TType.I64, _int),
            4: (TType.I64, _int),
        },
    )
    return f[1], _trace_id(f[3], f[2]), f[4] & _U64


def _span(prot: Any) -> JSpan:
    f = _struct(
        prot,
        {
            1: (TType.I64, _int),
            2: (TType.I64, _int),
            3: (TType.I64, _int),
            4: (TType.I64, _int),
            5: (TType.STRING, _str),
            6: (TType.LIST, _list(_ref)),
            7: (TType.I32, _int),
            8: (TType.I64, _int),
            9: (TType.I64, _int),
            10: (TType.LIST, _tags),
            11: (TType.LIST, _list(_log)),
        },
    )
    return JSpan(
        trace_id=_trace_id(f[2], f[1]),
        span_id=f[3] & _U64,
        parent_span_id=f[4] & _U64,
        operation=f[5],
        flags=f[7],
        start_us=f[8],
        duration_us=f[9],
        tags=f.get(10, {}),
        references=f.get(6, []),
        logs=f.get(11, []),
    )


def _process(prot: Any) -> tuple[str, dict[str, object]]:
    f = _struct(prot, {1: (TType.STRING, _str), 2: (TType.LIST, _tags)})
    return f[1], f.get(2, {})


def _batch(prot: Any) -> Batch:
    f = _struct(
        prot,
        {
            1: (TType.STRUCT, _process),
            2: (TType.LIST, _list(_span)),
            3: (TType.I64, _int),
        },
    )
    service, process_tags = f[1]
    spans: list[JSpan] = f[2]
    for span in spans:
        span.service = service
    return Batch(service, process_tags, spans, seq_no=f.get(3))


def decode(datagram: bytes) -> Batch:
    """One `Agent.emitBatch` datagram; raises on anything else."""
    transport = TMemoryBuffer(datagram)
    prot = TCompactProtocol(transport)
    name, kind, _ = prot.readMessageBegin()
    if name != "emitBatch" or kind != TMessageType.ONEWAY:
        raise ValueError(f"unexpected message {name!r} of type {kind}")
    args = _struct(prot, {1: (TType.STRUCT, _batch)})
    prot.readMessageEnd()
    if transport.read(1):
        raise ValueError("bytes after the message")
    batch: Batch = args[1]
    batch.size = len(datagram)
    return batch


class JaegerAgent:
    """Listens on 127.0.0.1:`port` (an ephemeral port) until closed."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # Datagrams that arrive while the thread decodes wait here; the kernel caps the size
        # at net.core.rmem_max, and a burst beyond it would be lost.
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 23)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._cond = threading.Condition()  # an RLock: predicates may call batches()/spans()
        self._batches: list[Batch] = []
        self._span_count = 0
        self.bad = 0  # datagrams that did not decode
        self.discarded = 0  # batches not kept because MAX_SPANS were
        self._closing = False
        self._thread = threading.Thread(target=self._receive, name="jaeger-agent", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while True:
            data = self._sock.recv(1 << 16)
            if self._closing:
                return
            try:
                batch: Batch | None = decode(data)
            except Exception:
                batch = None
            with self._cond:
                if batch is None:
                    self.bad += 1
                elif self._span_count + len(batch.spans) > MAX_SPANS:
                    self.discarded += 1
                else:
                    self._batches.append(batch)
                    self._span_count += len(batch.spans)
                self._cond.notify_all()

    def batches(self) -> list[Batch]:
        with self._cond:
            return list(self._batches)

    def spans(self) -> list[JSpan]:
        with self._cond:
            return [span for batch in self._batches for span in batch.spans]

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until `predicate()` holds, checking it again after each datagram."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        # A blocked recv() does not notice the socket closing: wake it with an empty datagram.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as waker:
            waker.sendto(b"", ("127.0.0.1", self.port))
        self._thread.join()
        self._sock.close()

    def __enter__(self) -> JaegerAgent:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
