"""GeminiUsageParser.result() is computed once per usage seen (telemetry and token limits both ask)."""

from __future__ import annotations

from vertex_sidecar import usage as usage_module
from vertex_sidecar.usage import GeminiUsageParser


def test_result_is_decoded_once_and_follows_new_usage(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls = []
    real = usage_module._gemini_usage
    monkeypatch.setattr(usage_module, "_gemini_usage", lambda meta: calls.append(meta) or real(meta))
    parser = GeminiUsageParser()
    parser.feed(b'data: {"usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 4, '
                b'"totalTokenCount": 7}}\r\n\r\n')
    first, second = parser.result(), parser.result()
    assert first is second and (first.input_tokens, first.output_tokens) == (3, 4)
    assert len(calls) == 1
    parser.feed(b'data: {"usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 9, '
                b'"totalTokenCount": 12}}\r\n\r\n')
    assert parser.result().output_tokens == 9 and len(calls) == 2
