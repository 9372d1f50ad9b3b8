"""Stand-in OTLP collectors for tests: OTLP/HTTP (protobuf on POST /v1/traces)
and OTLP/gRPC, decoding with opentelemetry-proto into flat span records."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass
class OSpan:
    service: str
    resource: dict[str, Any]
    name: str
    trace_id: int
    span_id: int
    parent_span_id: int  # 0: a root span
    attributes: dict[str, Any]
    events: list[str]


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


def decode(request: trace_service_pb2.ExportTraceServiceRequest) -> list[OSpan]:
    out = []
    for rs in request.resource_spans:
        res = _attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    OSpan(
                        service=str(res.get("service.name", "")),
                        resource=res,
                        name=s.name,
                        trace_id=int.from_bytes(s.trace_id, "big"),
                        span_id=int.from_bytes(s.span_id, "big"),
                        parent_span_id=int.from_bytes(s.parent_span_id, "big")
                        if s.parent_span_id
                        else 0,
                        attributes=_attrs(s.attributes),
                        events=[e.name for e in s.events],
                    )
                )
    return out


class _Collected:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self._spans: list[OSpan] = []
        self.requests = 0

    def add(self, spans: list[OSpan]) -> None:
        with self.cond:
            self.requests += 1
            if len(self._spans) < 200_000:
                self._spans.extend(spans)
            self.cond.notify_all()

    def spans(self) -> list[OSpan]:
        with self.cond:
            return list(self._spans)

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)


class OtlpHttpReceiver(_Collected):
    """POST /v1/traces on 127.0.0.1, a free port (`.port`)."""

    def __init__(self) -> None:
        super().__init__()
        collected = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                req = trace_service_pb2.ExportTraceServiceRequest()
                req.ParseFromString(body)
                collected.add(decode(req))
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> OtlpHttpReceiver:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class OtlpGrpcReceiver(_Collected):
    """The TraceService on 127.0.0.1, a free port (`.port`)."""

    def __init__(self) -> None:
        super().__init__()
        collected = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(
                self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
            ) -> trace_service_pb2.ExportTraceServiceResponse:
                collected.add(decode(request))
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        add = trace_service_pb2_grpc.add_TraceServiceServicer_to_server
        add(Service(), self.server)  # type: ignore[no-untyped-call]
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def close(self) -> None:
        self.server.stop(None)

    def __enter__(self) -> OtlpGrpcReceiver:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
