"""Telemetry: usage → metrics and access-log fields, label hygiene, the non-HTTP hooks."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from vertex_sidecar.config import Config, parse_config
from vertex_sidecar.observe import AccessLog, RequestRecord
from vertex_sidecar.pricing import PricingTable
from vertex_sidecar.telemetry import MAX_LABEL_VALUES, MAX_MODEL_LABELS, Telemetry
from vertex_sidecar.usage import Usage

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "usage"
GEMINI_JSON = json.dumps({
    "candidates": [{"content": {"role": "model", "parts": [{"text": "Echo: hi"}]}, "finishReason": "STOP"}],
    "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 20, "thoughtsTokenCount": 5,
                      "cachedContentTokenCount": 4, "totalTokenCount": 35},
}).encode()


class Harness:
    """A Telemetry with its access log captured, driving records the way the proxy does."""

    def __init__(self, config: Config | None = None) -> None:
        self.telemetry = Telemetry(config or Config())
        self.log = io.StringIO()
        self.observers = self.telemetry.observers(AccessLog(self.log))

    def request(self, body: bytes | list[bytes] = b"", *, status: int = 200, route: str | None = "default",
                model: str | None = "gemini-2.5-flash", publisher: str | None = "google",
                operation: str | None = "generateContent", content_type: str = "application/json",
                encoding: str | None = None, upstream_status: int | None | str = "same",
                error_reason: str | None = None,
                headers: list[tuple[bytes, bytes]] | None = None, tags: str | None = None,
                first_byte_delay: float = 0.0) -> dict[str, Any]:
        record = RequestRecord(request_id="r", method="POST", started=time.perf_counter() - 1.0,
                               wall_time=time.time(), tags=tags, request_headers=headers)
        self.observers.request_started(record)
        record.route, record.model, record.publisher, record.operation = route, model, publisher, operation
        record.status = status
        record.upstream_status = status if upstream_status == "same" else upstream_status  # type: ignore[assignment]
        record.error_reason = error_reason
        record.response_content_type = content_type
        record.response_content_encoding = encoding
        parser = self.observers.response_started(record)
        chunks = body if isinstance(body, list) else [body]
        record.first_byte_s = 0.5 + first_byte_delay
        for chunk in chunks:
            if parser is not None:
                parser.feed(chunk)
        record.finish()
        self.observers.request_finished(record)
        self.observers.flush()
        return json.loads(self.log.getvalue().splitlines()[-1])

    def value(self, name: str, **labels: str) -> float:
        value = self.telemetry.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def exposition(self) -> str:
        body, content_type = self.telemetry.render()
        assert content_type.startswith("text/plain; version=0.0.4")
        return body.decode()


def tokens(h: Harness, token_type: str, model: str = "gemini-2.5-flash", operation: str = "generate_content",
           route: str = "default") -> float:
    return h.value("gen_ai_client_token_usage_sum", gen_ai_token_type=token_type, gen_ai_request_model=model,
                   gen_ai_operation_name=operation, route=route)


def test_unary_generate_counts_tokens_cost_and_logs_them() -> None:
    h = Harness()
    entry = h.request(GEMINI_JSON)
    assert h.value("vertex_sidecar_requests_total", route="default", model="gemini-2.5-flash",
                   operation="generate_content", code="200") == 1
    assert tokens(h, "input") == 10 and tokens(h, "output") == 25
    assert tokens(h, "cached_input") == 4 and tokens(h, "reasoning") == 5
    expected = PricingTable.default().cost("gemini-2.5-flash", Usage(
        input_tokens=10, output_tokens=25, cached_input_tokens=4, reasoning_tokens=5, total_tokens=35, found=True))
    assert h.value("vertex_sidecar_cost_usd_total", route="default", model="gemini-2.5-flash") == pytest.approx(
        expected.usd)
    assert entry["tokens"] == {"input_tokens": 10, "output_tokens": 25, "total_tokens": 35,
                               "cached_input_tokens": 4, "reasoning_tokens": 5}
    assert entry["cost_usd"] == pytest.approx(expected.usd) and entry["pricing"] == "known"
    assert h.value("gen_ai_server_request_duration_seconds_count", gen_ai_request_model="gemini-2.5-flash",
                   gen_ai_operation_name="generate_content", route="default") == 1
    # unary: no time to first token
    assert h.value("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model="gemini-2.5-flash",
                   gen_ai_operation_name="generate_content", route="default") == 0
    assert h.value("vertex_sidecar_inflight_requests") == 0


def test_sse_stream_records_ttft_and_time_per_output_token() -> None:
    h = Harness()
    data = (FIXTURES / "gemini_stream.sse").read_bytes()
    entry = h.request([data[i:i + 37] for i in range(0, len(data), 37)], operation="streamGenerateContent",
                      content_type="text/event-stream")
    labels = {"gen_ai_request_model": "gemini-2.5-flash", "gen_ai_operation_name": "generate_content",
              "route": "default"}
    assert h.value("gen_ai_server_time_to_first_token_seconds_count", **labels) == 1
    assert h.value("gen_ai_server_time_to_first_token_seconds_sum", **labels) == pytest.approx(0.5)
    output = entry["tokens"]["output_tokens"]
    assert output > 1
    per_token = h.value("gen_ai_server_time_per_output_token_seconds_sum", **labels)
    assert per_token == pytest.approx((1.0 - 0.5) / (output - 1), rel=0.05)


@pytest.mark.parametrize("encoding", [None, "gzip"])
def test_gzip_bodies_are_counted_with_or_without_the_header(encoding: str | None) -> None:
    h = Harness()
    compressed = gzip.compress(GEMINI_JSON)
    entry = h.request([compressed[:7], compressed[7:]], encoding=encoding)
    assert entry["tokens"]["input_tokens"] == 10


def test_zlib_bodies_are_sniffed_and_unreadable_encodings_skipped() -> None:
    h = Harness()
    assert h.request(zlib.compress(GEMINI_JSON))["tokens"]["output_tokens"] == 25
    assert "tokens" not in h.request(b"\x00brotli-bytes", encoding="br")


def test_openai_compatible_model_comes_from_the_response() -> None:
    h = Harness()
    body = (FIXTURES / "openai_chat.json").read_bytes()
    entry = h.request(body, model=None, publisher=None, operation="chat/completions")
    assert entry["model"] == "google/gemini-2.5-flash"
    assert entry["pricing"] == "known" and entry["cost_usd"] > 0
    assert tokens(h, "input", operation="chat") == 1214
    assert h.value("vertex_sidecar_requests_total", route="default", model="gemini-2.5-flash", operation="chat",
                   code="200") == 1


def test_anthropic_raw_predict() -> None:
    h = Harness()
    body = (FIXTURES / "anthropic_raw.json").read_bytes()
    entry = h.request(body, model="claude-sonnet-4-5@20250929", publisher="anthropic", operation="rawPredict")
    assert entry["tokens"]["input_tokens"] == 412 + 1024 + 2048
    assert h.value("vertex_sidecar_requests_total", route="default", model="claude-sonnet-4-5", operation="chat",
                   code="200") == 1


def test_errors_count_by_code_and_upstream_reason_without_usage() -> None:
    h = Harness()
    h.request(b'{"error": {"code": 429}}', status=429)
    h.request(b'{"error": {"code": 503}}', status=503)
    h.request(b"", status=504, upstream_status=None, error_reason="UPSTREAM_TIMEOUT")
    h.request(b"", status=503, upstream_status=None, error_reason="CREDENTIALS_UNAVAILABLE")
    for reason in ("status_429", "status_503", "timeout"):
        assert h.value("vertex_sidecar_upstream_errors_total", route="default", reason=reason) == 1
    assert "CREDENTIALS_UNAVAILABLE" not in h.exposition()
    assert h.value("vertex_sidecar_requests_total", route="default", model="gemini-2.5-flash",
                   operation="generate_content", code="503") == 2
    assert tokens(h, "input") == 0


def test_model_labels_stay_low_cardinality() -> None:
    h = Harness()
    h.request(GEMINI_JSON, model="gemini-2.0-flash-001")  # alias → family
    h.request(b"", status=404, model="no-such-model-1")  # unknown and failed → other
    h.request(b"", status=403, route=None, model=None, operation=None)  # unroutable
    h.request(b"{}", model="endpoints/1234567", operation="predict", publisher=None)
    exposition = h.exposition()
    assert 'model="gemini-2.0-flash"' in exposition and "gemini-2.0-flash-001" not in exposition
    assert "no-such-model-1" not in exposition and 'model="other"' in exposition
    assert 'route="none"' in exposition and 'model="none"' in exposition and 'operation="other"' in exposition
    assert 'model="endpoint"' in exposition and "1234567" not in exposition
    for i in range(MAX_MODEL_LABELS + 20):
        h.request(b"{}", model=f"tuned-model-{i}", publisher="google")
    admitted = {line.split('model="')[1].split('"')[0] for line in h.exposition().splitlines()
                if line.startswith("vertex_sidecar_requests_total{") and "tuned-model-" in line}
    assert len(admitted) == MAX_MODEL_LABELS


def test_tags_go_to_the_log_not_to_metrics() -> None:
    h = Harness()
    entry = h.request(GEMINI_JSON, tags="team-a, experiment-42,,prod")
    assert entry["tags"] == ["team-a", "experiment-42", "prod"]
    assert "team-a" not in h.exposition()


def test_configured_header_labels() -> None:
    config = parse_config({"metrics": {"header_labels": {"X-Team": "team"}}})
    h = Harness(config)
    h.request(GEMINI_JSON, headers=[(b"x-team", b"search"), (b"authorization", b"Bearer secret")])
    h.request(GEMINI_JSON, headers=[(b"x-team", b'bad value "quoted"')])
    h.request(GEMINI_JSON)
    base = {"route": "default", "model": "gemini-2.5-flash", "operation": "generate_content", "code": "200"}
    assert h.value("vertex_sidecar_requests_total", **base, team="search") == 1
    assert h.value("vertex_sidecar_requests_total", **base, team="other") == 1
    assert h.value("vertex_sidecar_requests_total", **base, team="") == 1
    assert h.value("vertex_sidecar_cost_usd_total", route="default", model="gemini-2.5-flash", team="search") > 0
    assert h.value("gen_ai_client_token_usage_sum", gen_ai_token_type="input", gen_ai_request_model="gemini-2.5-flash",
                   gen_ai_operation_name="generate_content", route="default", team="search") == 10
    for i in range(MAX_LABEL_VALUES + 5):
        h.request(GEMINI_JSON, headers=[(b"x-team", f"t{i}".encode())])
    teams = {line.split('team="')[1].split('"')[0] for line in h.exposition().splitlines()
             if line.startswith("vertex_sidecar_requests_total{")}
    assert len(teams) <= MAX_LABEL_VALUES + 2  # + "" and "other"
    assert "secret" not in h.exposition()


def test_reload_swaps_pricing_and_rebuilds_labelled_series() -> None:
    h = Harness()
    h.request(GEMINI_JSON)
    before = h.value("vertex_sidecar_cost_usd_total", route="default", model="gemini-2.5-flash")
    h.telemetry.config_reloaded("success", parse_config({
        "pricing": {"models": {"gemini-2.5-flash": {"input": 300.0}}},
        "metrics": {"header_labels": {"x-team": "team"}}}))
    entry = h.request(GEMINI_JSON, headers=[(b"x-team", b"a")])
    assert entry["cost_usd"] > before * 10
    assert h.value("vertex_sidecar_requests_total", route="default", model="gemini-2.5-flash",
                   operation="generate_content", code="200", team="a") == 1
    assert h.value("vertex_sidecar_config_reloads_total", result="success") == 1


def test_unknown_models_are_logged_as_unpriced() -> None:
    h = Harness()
    entry = h.request(GEMINI_JSON, model="my-tuned-gemini")
    assert entry["pricing"] == "unknown" and entry["cost_usd"] == 0
    assert h.value("vertex_sidecar_requests_total", route="default", model="my-tuned-gemini",
                   operation="generate_content", code="200") == 1


def test_credentials_live_ready_and_build_info() -> None:
    h = Harness()
    t = h.telemetry
    t.token_refreshed("default", "success")
    t.token_refreshed("default", "success")
    t.token_refreshed("team-b", "failure")
    assert h.value("vertex_sidecar_token_refresh_total", credential="default", result="success") == 2
    assert h.value("vertex_sidecar_token_refresh_total", credential="team-b", result="failure") == 1
    t.live_session_started("gemini")
    t.live_session_started("gemini")
    fields = t.live_turn_usage("gemini", "gemini-2.0-flash-live-001",
                               Usage(input_tokens=7, output_tokens=3, total_tokens=10, found=True))
    t.live_session_ended("gemini", 12.5)
    # Not in the pricing table: unpriced, and labelled by its own id (it answered).
    assert fields["tokens"]["input_tokens"] == 7 and fields["pricing"] == "unknown" and fields["cost_usd"] == 0
    priced = t.live_turn_usage("gemini", "gemini-2.5-flash", Usage(input_tokens=10**6, found=True))
    assert priced["pricing"] == "known" and priced["cost_usd"] == pytest.approx(0.30)
    assert h.value("vertex_sidecar_live_sessions", route="gemini") == 1
    assert h.value("vertex_sidecar_live_sessions_started_total", route="gemini") == 2
    live_model = "gemini-2.0-flash-live-001"
    assert h.value("vertex_sidecar_live_tokens_total", route="gemini", model=live_model, gen_ai_token_type="input") == 7
    assert h.value("vertex_sidecar_live_turns_total", route="gemini", model=live_model) == 1
    assert h.value("vertex_sidecar_live_session_duration_seconds_sum", route="gemini") == 12.5
    assert h.value("gen_ai_client_token_usage_sum", gen_ai_token_type="output", gen_ai_request_model=live_model,
                   gen_ai_operation_name="generate_content", route="gemini") == 3
    assert h.value("vertex_sidecar_cost_usd_total", route="gemini", model="gemini-2.5-flash") == pytest.approx(0.30)
    ready = [True]
    t.set_ready_probe(lambda: ready[0])
    assert h.value("vertex_sidecar_ready") == 1
    ready[0] = False
    assert h.value("vertex_sidecar_ready") == 0
    assert 'vertex_sidecar_build_info{python=' in h.exposition()


def test_each_telemetry_has_its_own_registry() -> None:
    first, second = Harness(), Harness()
    first.request(GEMINI_JSON)
    assert second.value("vertex_sidecar_requests_total", route="default", model="gemini-2.5-flash",
                        operation="generate_content", code="200") == 0


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_exposition_passes_promtool_check_metrics() -> None:
    h = Harness(parse_config({"metrics": {"header_labels": {"x-team": "team"}}}))
    h.request(GEMINI_JSON, headers=[(b"x-team", b"a")])
    h.request((FIXTURES / "gemini_stream.sse").read_bytes(), operation="streamGenerateContent",
              content_type="text/event-stream")
    h.request(b"", status=503)
    h.telemetry.token_refreshed("default", "success")
    h.telemetry.live_session_started("r")
    result = subprocess.run(["promtool", "check", "metrics"], input=h.exposition(), capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


def test_accounting_overhead_is_small() -> None:
    """Loose guard (the budget, 0.2 ms p50, is measured in bench/): 2,000 requests well under a second."""
    h = Harness()
    h.request(GEMINI_JSON)  # warm the caches
    start = time.perf_counter()
    for _ in range(2000):
        record = RequestRecord(request_id="r", method="POST", started=time.perf_counter(), wall_time=0.0)
        h.telemetry.request_started(record)
        record.route, record.model, record.publisher, record.operation = (
            "default", "gemini-2.5-flash", "google", "generateContent")
        record.status = record.upstream_status = 200
        parser = h.telemetry.response_started(record)
        assert parser is not None
        parser.feed(GEMINI_JSON)
        record.finish()
        h.telemetry.request_finished(record)
    per_request = (time.perf_counter() - start) / 2000
    assert per_request < 0.5e-3, f"{per_request * 1e6:.0f} µs per request"


def test_count_tokens_is_logged_but_not_counted() -> None:
    h = Harness()
    entry = h.request(b'{"totalTokens": 12, "totalBillableCharacters": 40}', operation="countTokens")
    assert entry["tokens"]["input_tokens"] == 12 and entry["tokens"]["billable"] is False
    assert entry["cost_usd"] == 0
    assert tokens(h, "input", operation="count_tokens") == 0
    assert h.value("vertex_sidecar_requests_total", route="default", model="gemini-2.5-flash",
                   operation="count_tokens", code="200") == 1


def test_a_telemetry_failure_never_costs_the_access_log_line(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness()

    def broken(*args: Any) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(h.telemetry, "_series_for", broken)
    entry = h.request(GEMINI_JSON)
    assert entry["status"] == 200 and h.value("vertex_sidecar_inflight_requests") == 0


def test_reloads_do_not_hand_out_fresh_label_budgets() -> None:
    """The caps bound the series of the process: a reload (same header labels) keeps them."""
    config = parse_config({"metrics": {"header_labels": {"x-team": "team"}}})
    h = Harness(config)
    for reload in range(3):
        for i in range(MAX_MODEL_LABELS):
            h.request(b"{}", model=f"tuned-{reload}-{i}", headers=[(b"x-team", f"t{reload}-{i}".encode())])
        h.telemetry.config_reloaded("success", config)
    lines = [line for line in h.exposition().splitlines() if line.startswith("vertex_sidecar_requests_total{")]
    models = {line.split('model="')[1].split('"')[0] for line in lines}
    teams = {line.split('team="')[1].split('"')[0] for line in lines}
    assert len(models - {"other"}) == MAX_MODEL_LABELS
    assert len(teams - {"other"}) <= MAX_LABEL_VALUES


class _FlakyStream(io.StringIO):
    broken = True

    def write(self, text: str) -> int:
        if self.broken:
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


def test_a_broken_log_stream_never_fails_the_request_nor_piles_up_lines() -> None:
    stream = _FlakyStream()
    access_log = AccessLog(stream)
    observers = Telemetry(Config()).observers(access_log)
    for i in range(1000):
        record = RequestRecord(request_id=f"r{i}", method="POST", started=time.perf_counter(), wall_time=time.time())
        observers.request_started(record)
        record.status = 200
        record.finish()
        observers.request_finished(record)  # flushes every 256 lines: must not raise
        assert len(access_log._pending) < 256
    observers.flush()
    assert access_log.dropped == 1000 and not access_log._pending
    stream.broken = False
    access_log.write({"request_id": "after"})
    observers.flush()
    assert json.loads(stream.getvalue())["request_id"] == "after" and access_log.dropped == 0
