"""A test OpenTelemetry collector: a real HTTP server on loopback that accepts OTLP/HTTP
protobuf at /v1/traces and decodes it with the opentelemetry-proto package.

Knobs: `delay_s` (a slow collector: each export waits before it is answered), `status`
(answer every export with this HTTP status).
"""

from __future__ import annotations

import asyncio
import gzip
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.emulators.serve import ServerHandle, running_server


@dataclass
class ReceivedSpan:
    span: Span
    resource: dict[str, Any]
    attributes: dict[str, Any]

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_span_id(self) -> str:
        return self.span.parent_span_id.hex()


@dataclass
class Collector:
    spans: list[ReceivedSpan] = field(default_factory=list)
    exports: int = 0
    content_types: list[str] = field(default_factory=list)
    encodings: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    delay_s: float = 0.0
    status: int = 200

    def wait_for(self, predicate: Callable[[ReceivedSpan], bool], count: int = 1,
                 timeout: float = 10.0) -> list[ReceivedSpan]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [span for span in list(self.spans) if predicate(span)]
            if len(found) >= count:
                return found
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {count} span(s); got {[s.name for s in self.spans]}")


def value_of(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return tuple(value_of(item) for item in value.array_value.values)
    return getattr(value, kind) if kind else None


def create_collector_app(collector: Collector) -> Starlette:
    async def traces(request: Request) -> Response:
        body = await request.body()
        collector.content_types.append(request.headers.get("content-type", ""))
        collector.encodings.append(request.headers.get("content-encoding", ""))
        collector.headers.append(dict(request.headers))
        if collector.delay_s:
            await asyncio.sleep(collector.delay_s)
        if collector.status != 200:
            return Response(status_code=collector.status)
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        message = ExportTraceServiceRequest.FromString(body)
        collector.exports += 1
        for resource_spans in message.resource_spans:
            resource = {kv.key: value_of(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    collector.spans.append(ReceivedSpan(
                        span, resource, {kv.key: value_of(kv.value) for kv in span.attributes}))
        return Response(ExportTraceServiceResponse().SerializeToString(), media_type="application/x-protobuf")

    return Starlette(routes=[Route("/v1/traces", traces, methods=["POST"])])


def running_collector() -> Iterator[tuple[Collector, ServerHandle]]:
    collector = Collector()
    with running_server(create_collector_app(collector)) as handle:
        yield collector, handle
