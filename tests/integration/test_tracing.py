"""OpenTelemetry traces: real google-genai calls through a real sidecar against the emulator,
exported over OTLP/HTTP protobuf to a real test collector that decodes them."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any, Iterator

import httpx
import pytest
import websockets
from google import genai
from google.genai import errors, types
from google.oauth2.credentials import Credentials

from tests.emulators.live import create_live_app
from tests.emulators.serve import ServerHandle, create_combined_app, running_server
from tests.harness.otlp_receiver import Collector, ReceivedSpan, running_collector
from tests.harness.sidecar_process import SidecarProcess

from .conftest import StartSidecar

DEFAULTS = {"project": "emu-project", "location": "us-central1"}
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50"}  # ms: spans reach the collector quickly


@pytest.fixture
def collector() -> Iterator[tuple[Collector, ServerHandle]]:
    yield from running_collector()


@pytest.fixture
def emulator() -> Iterator[ServerHandle]:
    """The combined emulator with the Live endpoint in front (REST and Live on one port)."""
    with running_server(create_live_app(fallback=create_combined_app(project_id="emu-project"))) as handle:
        yield handle


def traced(start: StartSidecar, receiver: ServerHandle, tracing: dict[str, Any] | None = None,
           env: dict[str, str] | None = None, **config: Any) -> SidecarProcess:
    section = {"enabled": True, "endpoint": receiver.url, **(tracing or {})}
    return start({"defaults": DEFAULTS, "tracing": section, **config}, env={**FAST_EXPORT, **(env or {})})


def client(sidecar: SidecarProcess, headers: dict[str, str] | None = None) -> genai.Client:
    return genai.Client(vertexai=True, project="emu-project", location="us-central1",
                        credentials=Credentials(token="placeholder-app-token"),
                        http_options=types.HttpOptions(base_url=sidecar.base_url, headers=headers or {}))


def vertex_calls(emulator: ServerHandle) -> list[dict[str, Any]]:
    return [r for r in emulator.app.state.requests if "/projects/" in r["path"]]


def metric(sidecar: SidecarProcess, name: str, **labels: str) -> float:
    text = httpx.get(f"{sidecar.admin_url}/metrics").text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.match(rf"^{name}(?:{{(.*)}})? (\S+)$", line)
        if match and (match.group(1) or "").replace(", ", ",") == wanted:
            return float(match.group(2))
    return 0.0


def test_genai_calls_continue_the_callers_trace(start: StartSidecar, emulator: ServerHandle,
                                                collector: tuple[Collector, ServerHandle]) -> None:
    spans, receiver = collector
    sidecar = traced(start, receiver, {"baggage_keys": ["tenant"]})
    caller = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01", "tracestate": "vendor=opaque",
              "baggage": "tenant=acme%20corp,user.secret=do-not-record"}
    genai_client = client(sidecar, caller)
    prompt = "a prompt that must never be recorded"
    response = genai_client.models.generate_content(model="gemini-2.5-flash", contents=prompt)
    chunks = list(genai_client.models.generate_content_stream(model="gemini-2.5-flash", contents="stream this"))
    assert response.usage_metadata is not None and len(chunks) > 1

    unary, stream = spans.wait_for(lambda s: s.trace_id == CALLER_TRACE, count=2)
    for span in (unary, stream):
        assert span.parent_span_id == CALLER_SPAN  # a child of the caller's span
        assert span.span.kind == span.span.SPAN_KIND_CLIENT
        assert span.span.trace_state == "vendor=opaque"
        attributes = span.attributes
        assert attributes["gen_ai.operation.name"] == "generate_content"
        assert attributes["gen_ai.provider.name"] == "gcp.vertex_ai"
        assert attributes["gen_ai.request.model"] == "gemini-2.5-flash"
        assert attributes["gen_ai.response.model"] == "gemini-2.5-flash"  # the response's modelVersion
        assert attributes["server.address"] == "127.0.0.1" and attributes["server.port"] == emulator.port
        assert attributes["vertex_passthrough.route"] == "default"
        assert attributes["vertex_passthrough.credential"] == "default"
        assert attributes["vertex_passthrough.project"] == "emu-project"
        assert attributes["vertex_passthrough.location"] == "us-central1"
        assert attributes["vertex_passthrough.answered_location"] == "us-central1"
        assert attributes["http.response.status_code"] == 200
        assert attributes["tenant"] == "acme corp" and "user.secret" not in attributes  # configured baggage only
        assert span.span.status.code != span.span.status.STATUS_CODE_ERROR
        assert not any(prompt in str(value) for value in attributes.values())
        assert span.resource["service.name"] == "vertex-sidecar"
        assert span.span.end_time_unix_nano > span.span.start_time_unix_nano
    assert unary.name == "generate_content gemini-2.5-flash"
    usage = response.usage_metadata
    assert unary.attributes["gen_ai.usage.input_tokens"] == usage.prompt_token_count
    # Output tokens include the thinking tokens (billed as output), also shown on their own.
    thoughts = usage.thoughts_token_count or 0
    assert unary.attributes["gen_ai.usage.output_tokens"] == usage.candidates_token_count + thoughts
    assert unary.attributes.get("gen_ai.usage.reasoning.output_tokens", 0) == thoughts
    assert unary.attributes["gen_ai.request.stream"] is False
    last_usage = chunks[-1].usage_metadata
    assert last_usage is not None
    assert stream.attributes["gen_ai.request.stream"] is True
    assert stream.attributes["gen_ai.usage.output_tokens"] == (last_usage.candidates_token_count
                                                               + (last_usage.thoughts_token_count or 0))
    assert 0 < stream.attributes["gen_ai.response.time_to_first_chunk"] < 5

    # Google saw the sidecar's span as the parent; tracestate and baggage went on unchanged.
    unary_call, stream_call = vertex_calls(emulator)[-2:]
    assert unary_call["headers"]["traceparent"] == f"00-{CALLER_TRACE}-{unary.span_id}-01"
    assert stream_call["headers"]["traceparent"] == f"00-{CALLER_TRACE}-{stream.span_id}-01"
    assert unary_call["headers"]["tracestate"] == "vendor=opaque"
    # The access log line names the trace and the span.
    deadline = time.monotonic() + 5  # the access log is flushed on its own timer
    while len(entries := [e for e in sidecar.access_log() if e.get("trace_id") == CALLER_TRACE]) < 2:
        assert time.monotonic() < deadline, "no access-log lines with the trace id"
        time.sleep(0.05)
    assert {e["span_id"] for e in entries} == {unary.span_id, stream.span_id}
    assert collector[0].content_types[-1] == "application/x-protobuf"


def test_refused_request_is_an_error_span_and_a_fallback_shows_its_retry(
        start: StartSidecar, emulator: ServerHandle, collector: tuple[Collector, ServerHandle]) -> None:
    spans, receiver = collector
    emulator.app.state.vertex_app.state.fail_locations = {"us-central1": 429}
    sidecar = traced(start, receiver, routes=[{"name": "gemini", "match": {"models": ["gemini-*"]},
                                               "fallback_locations": ["us-east4"]}])
    genai_client = client(sidecar)  # no traceparent: the sidecar starts the trace (ratio 1 by default)
    with pytest.raises(errors.ClientError) as refused:
        genai_client.models.generate_content(model="imagen-3.0-generate-002", contents="not allowed")
    assert refused.value.code == 403
    response = genai_client.models.generate_content(model="gemini-2.5-flash", contents="fall back")
    assert response.text

    (error,) = spans.wait_for(lambda s: s.attributes.get("error.type") == "NO_MATCHING_ROUTE")
    assert error.span.status.code == error.span.status.STATUS_CODE_ERROR
    assert error.attributes["error.type"] == "NO_MATCHING_ROUTE"
    assert error.attributes["http.response.status_code"] == 403
    assert error.parent_span_id == ""  # a root span: the caller sent no context

    (fallback,) = spans.wait_for(lambda s: s.attributes.get("gen_ai.request.model") == "gemini-2.5-flash")
    assert fallback.attributes["http.request.resend_count"] == 1
    assert fallback.attributes["vertex_passthrough.retry_reasons"] == ("fallback",)
    assert fallback.attributes["vertex_passthrough.location"] == "us-central1"
    assert fallback.attributes["vertex_passthrough.answered_location"] == "us-east4"
    assert fallback.attributes["vertex_passthrough.route"] == "gemini"
    assert fallback.span.status.code != fallback.span.status.STATUS_CODE_ERROR
    # Both attempts carried the sidecar's span as their parent.
    attempts = vertex_calls(emulator)[-2:]
    assert [a["upstream_host"] for a in attempts] == ["us-central1-aiplatform.googleapis.com",
                                                      "us-east4-aiplatform.googleapis.com"]
    assert {a["headers"]["traceparent"] for a in attempts} == {f"00-{fallback.trace_id}-{fallback.span_id}-01"}


def test_sampling_follows_the_caller_and_the_ratio(start: StartSidecar, emulator: ServerHandle,
                                                   collector: tuple[Collector, ServerHandle]) -> None:
    spans, receiver = collector
    sidecar = traced(start, receiver, {"sample_ratio": 0})
    plain = client(sidecar)
    plain.models.generate_content(model="gemini-2.5-flash", contents="not sampled")
    assert "traceparent" not in vertex_calls(emulator)[-1]["headers"]  # nothing invented for Google
    unsampled = f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"
    declined = client(sidecar, {"traceparent": unsampled})
    declined.models.generate_content(model="gemini-2.5-flash", contents="no")
    assert vertex_calls(emulator)[-1]["headers"]["traceparent"] == unsampled  # passed on as it came
    sampled_trace = "0af7651916cd43dd8448eb211c80319c"
    sampled = client(sidecar, {"traceparent": f"00-{sampled_trace}-{CALLER_SPAN}-01"})
    sampled.models.generate_content(model="gemini-2.5-flash", contents="yes")
    spans.wait_for(lambda s: s.trace_id == sampled_trace)
    time.sleep(0.3)  # a few export periods: nothing else arrives
    assert [s.trace_id for s in spans.spans] == [sampled_trace]


async def test_live_session_and_turn_spans(start: StartSidecar, emulator: ServerHandle,
                                           collector: tuple[Collector, ServerHandle]) -> None:
    spans, receiver = collector
    sidecar = traced(start, receiver)
    url = sidecar.url.replace("http://", "ws://", 1) + "/vertex_ai/live"
    headers = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
    usages = []
    async with websockets.connect(url, additional_headers=headers) as ws:
        await ws.send(json.dumps({"setup": {"model": "gemini-live-2.5-flash"}}))
        await asyncio.wait_for(ws.recv(), 5)
        for text in ("first turn", "second turn"):
            await ws.send(json.dumps({"clientContent": {"turns": [{"role": "user", "parts": [{"text": text}]}],
                                                        "turnComplete": True}}))
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
                if frame.get("usageMetadata"):
                    usages.append(frame["usageMetadata"])
                if frame.get("serverContent", {}).get("turnComplete"):
                    break

    found = await asyncio.to_thread(spans.wait_for, lambda s: s.trace_id == CALLER_TRACE, 3)
    (session,) = [s for s in found if s.name.startswith("live_session")]
    turns = sorted((s for s in found if s.name.startswith("realtime_inference")),
                   key=lambda s: s.attributes["vertex_passthrough.live.turn"])
    assert session.parent_span_id == CALLER_SPAN and session.name == "live_session gemini-live-2.5-flash"
    assert session.attributes["vertex_passthrough.live.turns"] == 2
    assert session.attributes["gen_ai.realtime_session.id"] == turns[0].attributes["gen_ai.realtime_session.id"]
    assert len(turns) == 2
    for turn, usage in zip(turns, usages):
        assert turn.parent_span_id == session.span_id
        assert turn.attributes["gen_ai.operation.name"] == "realtime_inference"
        assert turn.attributes["gen_ai.usage.input_tokens"] == usage["promptTokenCount"]
        assert turn.attributes["gen_ai.usage.output_tokens"] == usage["candidatesTokenCount"]
        assert 0 <= turn.attributes["gen_ai.response.time_to_first_chunk"] < 5
        assert session.span.start_time_unix_nano <= turn.span.start_time_unix_nano
        assert turn.span.end_time_unix_nano <= session.span.end_time_unix_nano
    assert session.attributes["gen_ai.usage.input_tokens"] == sum(u["promptTokenCount"] for u in usages)
    # Google's Live handshake carried the session span as its parent.
    live_session = emulator.app.state.live.sessions[-1]
    assert live_session.headers["traceparent"] == f"00-{CALLER_TRACE}-{session.span_id}-01"


def test_collector_down_requests_unaffected_drops_counted(start: StartSidecar, emulator: ServerHandle) -> None:
    with running_server(create_combined_app()) as gone:
        closed_url = gone.url  # a port that refuses connections once the server stops
    sidecar = start({"defaults": DEFAULTS, "tracing": {"enabled": True, "endpoint": closed_url}},
                    env={**FAST_EXPORT, "OTEL_EXPORTER_OTLP_TIMEOUT": "500"})
    genai_client = client(sidecar)
    for index in range(5):
        assert genai_client.models.generate_content(model="gemini-2.5-flash", contents=f"call {index}").text
    deadline = time.monotonic() + 10
    while metric(sidecar, "vertex_sidecar_trace_spans_dropped_total", reason="export_failed") < 5:
        assert time.monotonic() < deadline, "the failed exports were not counted"
        time.sleep(0.05)
    assert metric(sidecar, "vertex_sidecar_trace_spans_exported_total") == 0


def test_slow_collector_bounded_queue(start: StartSidecar, emulator: ServerHandle,
                                      collector: tuple[Collector, ServerHandle]) -> None:
    spans, receiver = collector
    spans.delay_s = 30.0  # the first export hangs for the whole test (the sidecar waits up to 20 s)
    sidecar = traced(start, receiver, env={"OTEL_BSP_MAX_QUEUE_SIZE": "8", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4",
                                           "OTEL_EXPORTER_OTLP_TIMEOUT": "20000"})
    started = time.monotonic()
    with httpx.Client(base_url=sidecar.base_url) as http:
        for index in range(40):
            response = http.post("/v1/projects/emu-project/locations/us-central1/publishers/google/models/"
                                 "gemini-2.5-flash:generateContent",
                                 json={"contents": [{"role": "user", "parts": [{"text": f"n{index}"}]}]})
            assert response.status_code == 200
    assert time.monotonic() - started < 10  # requests never waited for the collector
    # One batch (4) is stuck in the export; the queue holds 8; everything after that is dropped.
    assert metric(sidecar, "vertex_sidecar_trace_queue_spans") == 8
    assert metric(sidecar, "vertex_sidecar_trace_spans_dropped_total", reason="queue_full") >= 40 - 8 - 4 - 4
    assert metric(sidecar, "vertex_sidecar_trace_spans_exported_total") == 0
    assert len(spans.headers) == 1  # one export in flight at a time
