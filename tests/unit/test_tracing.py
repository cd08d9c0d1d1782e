"""Tracing: W3C context parsing, sampling, settings from config and OTEL_* variables, the OTLP
encoding (decoded back with opentelemetry-proto), and no OpenTelemetry import when off."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.harness.otlp_receiver import value_of
from vertex_sidecar.config import ConfigError, TracingConfig, parse_config
from vertex_sidecar.observe import RequestRecord
from vertex_sidecar.otlp_export import SpanEncoder
from vertex_sidecar.trace_context import (
    Sampler,
    caller_context,
    format_traceparent,
    parse_baggage,
    parse_traceparent,
    propagate,
    sampler_from_env,
)
from vertex_sidecar.trace_spans import STATUS_ERROR, SpanData
from vertex_sidecar.tracing import TracingSetupError, tracing_settings

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


@pytest.mark.parametrize("header, sampled", [
    (f"00-{TRACE}-{SPAN}-01", True),
    (f"00-{TRACE}-{SPAN}-00", False),
    (f"00-{TRACE}-{SPAN}-03", True),  # other flag bits are ignored
    (f"cc-{TRACE}-{SPAN}-01-what-the-future-holds", True),  # a later version may append fields
    (f"  00-{TRACE}-{SPAN}-01 ", True),
])
def test_valid_traceparent(header: str, sampled: bool) -> None:
    parent = parse_traceparent(header.encode())
    assert parent is not None
    assert parent.trace_id.hex() == TRACE and parent.span_id.hex() == SPAN and parent.sampled is sampled


@pytest.mark.parametrize("header", [
    "", "00", f"ff-{TRACE}-{SPAN}-01", f"00-{'0' * 32}-{SPAN}-01", f"00-{TRACE}-{'0' * 16}-01",
    f"00-{TRACE.upper()}-{SPAN}-01", f"00-{TRACE}-{SPAN}-01-extra", f"00-{TRACE[:-1]}-{SPAN}-01",
    f"00_{TRACE}_{SPAN}_01", f"0g-{TRACE}-{SPAN}-01", f"cc-{TRACE}-{SPAN}-01x",
])
def test_malformed_traceparent_is_ignored(header: str) -> None:
    assert parse_traceparent(header.encode()) is None


def test_caller_context_and_propagation() -> None:
    headers = [(b"content-type", b"application/json"), (b"Traceparent", f"00-{TRACE}-{SPAN}-01".encode()),
               (b"tracestate", b"a=1"), (b"tracestate", b"b=2"), (b"baggage", b"tenant=acme,user=x;prop=1")]
    parent, index, baggage = caller_context(headers, read_baggage=True, baggage_keys=("tenant", "absent"))
    assert parent is not None and parent.trace_state == "a=1,b=2" and index == 1
    assert baggage == {"tenant": "acme"}
    ours = format_traceparent(parent.trace_id, bytes.fromhex("1111111111111111"), True)
    propagate(headers, index, ours)
    assert headers[1] == (b"traceparent", f"00-{TRACE}-1111111111111111-01".encode())
    assert len(headers) == 5  # replaced, not added
    fresh: list[tuple[bytes, bytes]] = []
    propagate(fresh, None, ours)
    assert fresh == [(b"traceparent", ours)]
    # An oversized tracestate is not propagated into the span (the header itself passes on untouched).
    parent, _, _ = caller_context([(b"traceparent", f"00-{TRACE}-{SPAN}-01".encode()), (b"tracestate", b"x" * 600)],
                                  read_baggage=False, baggage_keys=())
    assert parent is not None and parent.trace_state == ""


def test_baggage_values_are_decoded_and_capped() -> None:
    assert parse_baggage(b"k=a%20b, other=1,k=second", ["k"]) == {"k": "a b"}
    assert len(parse_baggage(b"k=" + b"v" * 1000, ["k"])["k"]) == 256
    assert parse_baggage(b"no-equals,k", ["k"]) == {}


def test_sampler() -> None:
    parent_on = parse_traceparent(f"00-{TRACE}-{SPAN}-01".encode())
    parent_off = parse_traceparent(f"00-{TRACE}-{SPAN}-00".encode())
    low, high = bytes(8) + (1).to_bytes(8, "big"), bytes(8) + (2 ** 64 - 1).to_bytes(8, "big")
    half = Sampler(0.5)
    assert half.sampled(low, None) and not half.sampled(high, None)
    assert half.sampled(high, parent_on) and not half.sampled(low, parent_off)  # parent-based
    assert Sampler(0.0, parent_based=False).sampled(low, parent_on) is False
    assert Sampler(1.0).sampled(high, None)
    assert sampler_from_env("parentbased_traceidratio", "0.25") == Sampler(0.25, True)
    assert sampler_from_env("traceidratio", "7") == Sampler(1.0, False)
    assert sampler_from_env("always_off", None) == Sampler(0.0, False)
    assert sampler_from_env("nonsense", None) == Sampler(1.0, True)


def test_settings_from_config_and_environment() -> None:
    assert tracing_settings(TracingConfig(), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}).enabled is False
    on = TracingConfig(enabled=True)
    assert tracing_settings(on, {}).endpoint == "http://localhost:4318/v1/traces"
    assert tracing_settings(on, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}).endpoint == "http://c:4318/v1/traces"
    both = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:9/x"}
    assert tracing_settings(on, both).endpoint == "http://t:9/x"  # signal-specific, used as is
    assert tracing_settings(TracingConfig(enabled=True, endpoint="https://mine:4318"), both).endpoint == \
        "https://mine:4318/v1/traces"
    assert tracing_settings(on, {"OTEL_SDK_DISABLED": "true"}).enabled is False
    assert tracing_settings(on, {"OTEL_TRACES_EXPORTER": "none"}).enabled is False
    with pytest.raises(TracingSetupError, match="http/protobuf"):
        tracing_settings(on, {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    env = {"OTEL_SERVICE_NAME": "team-a-llm", "OTEL_RESOURCE_ATTRIBUTES": "k8s.pod.name=p-1,k8s.namespace.name=ns%2Cx",
           "OTEL_EXPORTER_OTLP_HEADERS": "x-token=a%3Db", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "250",
           "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip", "OTEL_BSP_MAX_QUEUE_SIZE": "100", "OTEL_PROPAGATORS": "tracecontext",
           "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1", "UNRELATED": "x"}
    settings = tracing_settings(on, env)
    assert settings.resource["service.name"] == "team-a-llm"
    assert settings.resource["k8s.pod.name"] == "p-1" and settings.resource["k8s.namespace.name"] == "ns,x"
    assert settings.sampler == Sampler(0.1, True) and settings.read_baggage is False and settings.continue_caller
    assert "UNRELATED" not in settings.environ
    export = settings.export_settings()
    assert export.headers == {"x-token": "a=b"} and export.timeout_s == 0.25
    assert export.compression == "gzip" and export.max_queue == 100 and export.max_batch == 512
    assert tracing_settings(TracingConfig(enabled=True, sample_ratio=0.0), env).sampler == Sampler(0.0, True)


def test_tracing_config_validation() -> None:
    config = parse_config({"tracing": {"enabled": True, "endpoint": "http://otel:4318", "sample_ratio": 0.5,
                                       "baggage_keys": ["tenant", "session.id"]}})
    assert config.tracing == TracingConfig(True, "http://otel:4318", 0.5, ("tenant", "session.id"))
    assert parse_config({}).tracing.enabled is False
    for bad, message in (({"enabled": "yes"}, "true or false"), ({"endpoint": "otel:4318"}, "http"),
                         ({"sample_ratio": 2}, "from 0 to 1"), ({"baggage_keys": ["bad key"]}, "baggage key"),
                         ({"sampling": 1}, "unknown key")):
        with pytest.raises(ConfigError, match=message):
            parse_config({"tracing": bad})


def test_encoding_decodes_with_opentelemetry_proto() -> None:
    encoder = SpanEncoder({"service.name": "vertex-sidecar", "k8s.pod.name": "p-1"})
    first = SpanData(trace_id=bytes.fromhex(TRACE), span_id=bytes.fromhex(SPAN), parent_span_id=b"\x01" * 8,
                     name="generate_content gemini-2.5-flash", start_ns=1_000, end_ns=2_000, trace_state="a=1",
                     attributes={"gen_ai.request.model": "gemini-2.5-flash", "server.port": 443,
                                 "gen_ai.request.stream": True, "ttfc": 0.25, "reasons": ("fallback", "x")},
                     events=[(1_500, "first_chunk", {"n": 1})])
    second = SpanData(trace_id=bytes.fromhex(TRACE), span_id=b"\x02" * 8, parent_span_id=b"", name="x",
                      start_ns=3, end_ns=4,
                      attributes={"gen_ai.request.model": "gemini-2.5-flash", "big": 2 ** 40,
                                  # written directly, not through KeyValue messages:
                                  "vertex_passthrough.request_id": "f41adf04", "vertex_passthrough.cost_usd": 1.5e-05,
                                  "gen_ai.response.time_to_first_chunk": 0.25},
                      status=STATUS_ERROR, status_message="NO_MATCHING_ROUTE")
    body = encoder.request([encoder.span(first), encoder.span(second), encoder.span(first)])  # cached fragments
    message = ExportTraceServiceRequest.FromString(body)
    (resource_spans,) = message.resource_spans
    assert {kv.key: value_of(kv.value) for kv in resource_spans.resource.attributes} == {
        "service.name": "vertex-sidecar", "k8s.pod.name": "p-1"}
    (scope_spans,) = resource_spans.scope_spans
    assert scope_spans.scope.name == "vertex_sidecar"
    spans = scope_spans.spans
    assert len(spans) == 3
    decoded = {kv.key: value_of(kv.value) for kv in spans[0].attributes}
    assert decoded == first.attributes
    assert spans[0].trace_id.hex() == TRACE and spans[0].parent_span_id == b"\x01" * 8
    assert spans[0].trace_state == "a=1" and spans[0].kind == spans[0].SPAN_KIND_CLIENT
    assert (spans[0].start_time_unix_nano, spans[0].end_time_unix_nano) == (1_000, 2_000)
    assert spans[0].events[0].name == "first_chunk" and spans[0].events[0].time_unix_nano == 1_500
    assert {kv.key: value_of(kv.value) for kv in spans[1].attributes} == second.attributes
    assert spans[1].status.code == spans[1].status.STATUS_CODE_ERROR and spans[1].status.message == "NO_MATCHING_ROUTE"
    assert spans[2] == spans[0]


def _imports_opentelemetry(config: dict[str, object]) -> bool:
    """Build a sidecar as the CLI does, in a fresh interpreter, and report whether OpenTelemetry got imported."""
    code = textwrap.dedent(f"""
        import sys
        from vertex_sidecar.cli import build_sidecar
        from vertex_sidecar.config import parse_config
        sidecar = build_sidecar(parse_config({config!r}))
        print(any(name == "opentelemetry" or name.startswith("opentelemetry.") for name in sys.modules))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip() == "True"


def test_no_opentelemetry_import_when_tracing_is_off() -> None:
    assert _imports_opentelemetry({}) is False
    assert _imports_opentelemetry({"tracing": {"enabled": False}}) is False
    assert _imports_opentelemetry({"tracing": {"enabled": True}}) is True  # the check can tell


def _rest_record(request_id: str, output_tokens: int) -> "RequestRecord":
    r = RequestRecord.for_request([(b"x-request-id", request_id.encode())], method="POST", service="aiplatform")
    r.route, r.project, r.location, r.answered_location = "gemini", "p-1", "us-central1", "us-east4"
    r.model, r.publisher, r.operation, r.status, r.upstream_status = "gemini-2.5-flash", "google", \
        "generateContent", 200, 200
    r.extra.update(fallbacks=1, tokens={"input_tokens": 3, "output_tokens": output_tokens, "total_tokens": 9,
                                        "reasoning_tokens": 2}, cost_usd=0.5)
    r.finish()
    return r


def test_rest_spans_share_what_alike_requests_have_in_common() -> None:
    from vertex_sidecar.trace_spans import RestSpans, SpanContext

    def record(request_id: str, output_tokens: int) -> RequestRecord:
        return _rest_record(request_id, output_tokens)

    asked: list[str | None] = []
    builder = RestSpans(credential=lambda route: asked.append(route) or "cred",  # type: ignore[func-returns-value]
                        server=lambda r: ("us-east4-aiplatform.googleapis.com", 443))
    context = SpanContext(bytes.fromhex(TRACE), bytes.fromhex(SPAN), b"", "", {"tenant": "t", "gen_ai.request.model": "x"})
    spans = [builder.span(record(f"r{n}", n), context) for n in (5, 6)]
    assert asked == ["gemini"] and spans[0].shared is spans[1].shared  # built once for the group
    encoder = SpanEncoder({})
    message = ExportTraceServiceRequest.FromString(encoder.request([encoder.span(s) for s in spans]))
    decoded = [{kv.key: value_of(kv.value) for kv in span.attributes}
               for span in message.resource_spans[0].scope_spans[0].spans]
    for n, attributes in zip((5, 6), decoded):
        assert attributes["vertex_passthrough.request_id"] == f"r{n}"
        assert attributes["gen_ai.usage.output_tokens"] == n and attributes["gen_ai.usage.reasoning.output_tokens"] == 2
        assert attributes["gen_ai.request.model"] == "gemini-2.5-flash"  # baggage never overrides ours
        assert attributes["tenant"] == "t" and attributes["vertex_passthrough.credential"] == "cred"
        assert attributes["http.request.resend_count"] == 1 and attributes["vertex_passthrough.cost_usd"] == 0.5
        assert attributes["server.address"] == "us-east4-aiplatform.googleapis.com"
    keys = [kv.key for kv in message.resource_spans[0].scope_spans[0].spans[0].attributes]
    assert len(keys) == len(set(keys))  # no attribute twice


@pytest.mark.parametrize("case", ["plain", "caller parent, state and baggage", "stream", "odd values"])
def test_a_rest_span_encoded_directly_is_the_span_built_then_encoded(case: str) -> None:
    """The tracer writes a REST request's span straight from its group and values
    (`SpanEncoder.rest_span`); the bytes are those of the `SpanData` that `RestSpans.span`
    builds, encoded by the general path, and decode to what the record says."""
    from vertex_sidecar.trace_spans import RestSpans, SpanContext, span_times

    record = _rest_record("r-1", 7)
    context = SpanContext(bytes.fromhex(TRACE), bytes.fromhex(SPAN), b"", "", {})
    if case == "caller parent, state and baggage":
        context = SpanContext(bytes.fromhex(TRACE), bytes.fromhex(SPAN), b"\x07" * 8, "v=1,w=2",
                              {"tenant": "t-9", "vertex_passthrough.route": "not ours"})
    elif case == "stream":
        record.operation, record.first_byte_s = "streamGenerateContent", 0.125
        record.extra["response_model"] = "gemini-2.5-flash-001"
    elif case == "odd values":  # longer than the head tables, negative and wide ints, no cost
        record.request_id = "r" * 300
        record.extra["response_model"] = "m" * 1000
        record.extra["tokens"] = {"input_tokens": -1, "output_tokens": 2 ** 40, "cached_input_tokens": 200,
                                  "cache_write_tokens": 0, "total_tokens": 0}
        record.extra["cost_usd"] = 0.0
    builder = RestSpans(credential=lambda _: "cred", server=lambda _: ("us-east4-aiplatform.googleapis.com", 443))
    encoder = SpanEncoder({})
    built = builder.span(record, context)
    direct = encoder.rest_span(context, builder.group(record), record)
    assert direct == SpanEncoder({}).span(built)
    (span,) = ExportTraceServiceRequest.FromString(encoder.request([direct])).resource_spans[0].scope_spans[0].spans
    attributes = {kv.key: value_of(kv.value) for kv in span.attributes}
    assert attributes == {**built.shared.items, **built.attributes}  # type: ignore[union-attr]
    assert span.parent_span_id == context.parent_span_id and span.trace_state == context.trace_state
    assert (span.start_time_unix_nano, span.end_time_unix_nano) == span_times(record)
    assert attributes["vertex_passthrough.request_id"] == record.request_id
    assert attributes["vertex_passthrough.route"] == "gemini"  # the caller's baggage never replaces ours
    if case == "caller parent, state and baggage":
        assert attributes["tenant"] == "t-9"
    elif case == "stream":
        assert attributes["gen_ai.response.time_to_first_chunk"] == 0.125
        assert attributes["gen_ai.response.model"] == "gemini-2.5-flash-001"
    elif case == "odd values":
        assert attributes["gen_ai.usage.input_tokens"] == -1 and attributes["gen_ai.usage.output_tokens"] == 2 ** 40
        assert attributes["gen_ai.usage.cache_read.input_tokens"] == 200
        assert "gen_ai.usage.cache_creation.input_tokens" not in attributes
        assert "vertex_passthrough.cost_usd" not in attributes and len(attributes["gen_ai.response.model"]) == 1000
    else:
        assert attributes["gen_ai.usage.output_tokens"] == 7 and attributes["vertex_passthrough.cost_usd"] == 0.5
