"""Incremental usage parsers: real-shaped bodies, every split point, hostile input."""

from __future__ import annotations

import gzip
import json
import random
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vertex_sidecar.usage import (
    MAX_VALUE_BYTES,
    CountTokensParser,
    GeminiUsageParser,
    GzipUsageParser,
    NullUsageParser,
    PredictUsageParser,
    Usage,
    UsageObjectParser,
    UsageParser,
    new_usage_parser,
    operation_from_method,
    usage_from_live_message,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "usage"

# fixture -> (new_usage_parser args, expected non-default Usage fields)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "gemini_generate_thinking.json": (
        {"publisher": "google", "method": "generateContent"},
        {
            "response_model": "gemini-2.5-flash",  # from modelVersion
            "input_tokens": 1301,
            "output_tokens": 42 + 537,
            "reasoning_tokens": 537,
            "total_tokens": 1880,
            "input_by_modality": {"TEXT": 11, "IMAGE": 1290},
            "output_by_modality": {"TEXT": 42},
        },
    ),
    "gemini_generate_tricky.json": (
        {"publisher": "google", "method": "generateContent"},
        {
            "response_model": "gemini-2.5-pro",  # from modelVersion
            "input_tokens": 40210 + 295,
            "output_tokens": 118,
            "cached_input_tokens": 32768,
            "tool_use_prompt_tokens": 295,
            "total_tokens": 40623,
            "input_by_modality": {"TEXT": 8210 + 295, "AUDIO": 32000},
            "output_by_modality": {"TEXT": 118},
        },
    ),
    "gemini_stream.sse": (
        {"publisher": "google", "method": "streamGenerateContent"},
        {
            "response_model": "gemini-2.0-flash-001",  # from modelVersion
            "input_tokens": 8,
            "output_tokens": 31,
            "total_tokens": 39,
            "input_by_modality": {"TEXT": 8},
            "output_by_modality": {"TEXT": 31},
        },
    ),
    "gemini_stream_array.json": (
        {"publisher": "google", "method": "streamGenerateContent"},
        {
            "response_model": "gemini-2.0-flash-001",  # from modelVersion
            "input_tokens": 8,
            "output_tokens": 31,
            "total_tokens": 39,
            "input_by_modality": {"TEXT": 8},
            "output_by_modality": {"TEXT": 31},
        },
    ),
    "count_tokens.json": (
        {"publisher": "google", "method": "countTokens"},
        {"input_tokens": 31, "total_tokens": 31, "billable": False},
    ),
    "embeddings_predict.json": (
        {"publisher": "google", "method": "predict"},
        {"input_tokens": 6 + 11 + 2048, "total_tokens": 2065, "billable_characters": 8243},
    ),
    "imagen_predict.json": (
        {"publisher": "google", "method": "predict"},
        {"images": 2},
    ),
    "anthropic_raw.json": (
        {"publisher": "anthropic", "method": "rawPredict"},
        {
            "input_tokens": 412 + 1024 + 2048,
            "output_tokens": 96,
            "cached_input_tokens": 2048,
            "cache_write_tokens": 1024,
            "total_tokens": 412 + 1024 + 2048 + 96,
        },
    ),
    "anthropic_stream.sse": (
        {"publisher": "anthropic", "method": "streamRawPredict"},
        {
            "input_tokens": 21 + 1536,
            "output_tokens": 57,
            "cached_input_tokens": 1536,
            "total_tokens": 21 + 1536 + 57,
        },
    ),
    "openai_chat.json": (
        {"publisher": "", "method": "chat/completions", "is_openai_compat": True},
        {
            "input_tokens": 1214,
            "output_tokens": 305,
            "cached_input_tokens": 1024,
            "reasoning_tokens": 297,
            "total_tokens": 1519,
        },
    ),
    "openai_stream.sse": (
        {"publisher": "", "method": "chat/completions", "is_openai_compat": True},
        {"input_tokens": 9, "output_tokens": 12, "total_tokens": 21},
    ),
}


def body(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def expected(name: str) -> Usage:
    return Usage(found=True, **CASES[name][1])


def make(name: str) -> UsageParser:
    return new_usage_parser(**CASES[name][0])


def run(parser: UsageParser, chunks: Iterator[bytes] | list[bytes]) -> Usage:
    for chunk in chunks:
        parser.feed(chunk)
    return parser.result()


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> str:
    return request.param


# --------------------------------------------------------------------------- fixtures


def test_fixture_fed_whole(case: str) -> None:
    assert run(make(case), [body(case)]) == expected(case)


def test_every_single_split_point(case: str) -> None:
    data = body(case)
    want = expected(case)
    for cut in range(len(data) + 1):
        assert run(make(case), [data[:cut], data[cut:]]) == want, f"split at {cut}"


def test_random_multi_splits(case: str) -> None:
    data = body(case)
    want = expected(case)
    rnd = random.Random(case)
    for _ in range(300):
        cuts = [rnd.randrange(len(data) + 1) for _ in range(rnd.randint(2, 40))]
        assert run(make(case), split_at(data, cuts)) == want, f"cuts {sorted(cuts)}"


def test_one_byte_at_a_time(case: str) -> None:
    data = body(case)
    assert run(make(case), [data[i : i + 1] for i in range(len(data))]) == expected(case)


def test_truncated_bodies_never_raise(case: str) -> None:
    data = body(case)
    seen = False
    for cut in range(len(data) + 1):
        got = run(make(case), [data[:cut]])
        assert isinstance(got, Usage)
        assert got.found or not seen, f"usage lost when the body grew to {cut} bytes"
        seen = got.found
    assert got == expected(case)


def test_gzip_every_split_point(case: str) -> None:
    data = gzip.compress(body(case))
    want = expected(case)
    for cut in range(len(data) + 1):
        parser = new_usage_parser(**CASES[case][0], content_encoding="gzip")
        assert isinstance(parser, GzipUsageParser)
        assert run(parser, [data[:cut], data[cut:]]) == want, f"split at {cut}"


def test_inputs_other_than_bytes_are_accepted(case: str) -> None:
    data = body(case)
    parser = make(case)
    parser.feed(bytearray(data[:10]))  # type: ignore[arg-type]
    parser.feed(memoryview(data)[10:])  # type: ignore[arg-type]
    assert parser.result() == expected(case)


# --------------------------------------------------------------------------- semantics


def test_stream_keeps_last_usage_with_counts() -> None:
    frames = [
        {"usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 3, "totalTokenCount": 11}},
        {"usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 9, "totalTokenCount": 17}},
        {"usageMetadata": {"trafficType": "ON_DEMAND"}},  # no counts: ignored
    ]
    data = b"".join(b"data: " + json.dumps(f).encode() + b"\r\n\r\n" for f in frames)
    got = run(GeminiUsageParser(), [data])
    assert (got.input_tokens, got.output_tokens, got.total_tokens) == (8, 9, 17)


def test_whitespace_between_key_colon_and_value() -> None:
    data = b'{"usageMetadata" \r\n\t :\n  {"promptTokenCount" : 4 , "candidatesTokenCount":\n2}}'
    for cut in range(len(data) + 1):
        got = run(GeminiUsageParser(), [data[:cut], data[cut:]])
        assert (got.input_tokens, got.output_tokens) == (4, 2), cut


def test_key_as_string_value_is_not_a_key() -> None:
    data = b'{"tags": ["usageMetadata", "usage"], "k": "usageMetadata" , "v": 1}'
    assert not run(GeminiUsageParser(), [data]).found
    assert not run(UsageObjectParser(), [data]).found


def test_escaped_quote_before_key_text_is_not_a_key() -> None:
    # A key whose text ends in \"usageMetadata: the needle matches but follows a backslash.
    data = b'{"say \\"usageMetadata": {"promptTokenCount": 5}, "x": 1}'
    assert json.loads(data)  # valid JSON
    assert not run(GeminiUsageParser(), [data]).found


def test_usage_null_in_openai_chunks_is_ignored() -> None:
    data = b'data: {"usage": null, "choices": []}\n\ndata: {"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n'
    data += b'data: {"usage": null}\n\n'
    got = run(UsageObjectParser(), [data])
    assert (got.input_tokens, got.output_tokens, got.total_tokens) == (3, 4, 7)


def test_anthropic_stream_merges_cumulative_fields() -> None:
    data = (
        b'data: {"type":"message_start","message":{"usage":{"input_tokens":10,"output_tokens":1}}}\n\n'
        b'data: {"type":"message_delta","usage":{"output_tokens":30}}\n\n'
        b'data: {"type":"message_delta","usage":{"input_tokens":10,"cache_read_input_tokens":5,"output_tokens":44}}\n\n'
    )
    got = run(new_usage_parser("anthropic", "streamRawPredict"), [data])
    assert (got.input_tokens, got.cached_input_tokens, got.output_tokens) == (15, 5, 44)


def test_anthropic_count_tokens_is_not_billable() -> None:
    parser = new_usage_parser(
        "anthropic", "rawPredict", model="publishers/anthropic/models/count-tokens"
    )
    assert isinstance(parser, CountTokensParser)
    got = run(parser, [b'{"input_tokens": 1234}'])
    assert (got.input_tokens, got.billable, got.found) == (1234, False, True)


def test_embed_content_usage_metadata() -> None:
    data = b'{"embedding": {"values": [0.1, -0.2]}, "usageMetadata": {"promptTokenCount": 7, "totalTokenCount": 7}}'
    got = run(new_usage_parser("google", "embedContent"), [data])
    assert (got.input_tokens, got.found) == (7, True)


def test_imagen_gcs_output_counts_images() -> None:
    data = b'{"predictions": [{"gcsUri": "gs://b/1.png", "mimeType": "image/png"}, {"gcsUri": "gs://b/2.png", "mimeType": "image/png"}]}'
    assert run(PredictUsageParser(), [data]).images == 2


def test_no_usage_means_not_found() -> None:
    got = run(GeminiUsageParser(), [b'{"error": {"code": 429, "message": "Resource exhausted", "status": "RESOURCE_EXHAUSTED"}}'])
    assert got == Usage()
    assert run(NullUsageParser(), [b"anything"]) == Usage()


def test_numbers_in_counts_are_sanitised() -> None:
    data = b'{"usageMetadata": {"promptTokenCount": -5, "candidatesTokenCount": 1e300, "thoughtsTokenCount": "7", "totalTokenCount": 3.0}}'
    got = run(GeminiUsageParser(), [data])
    assert (got.input_tokens, got.output_tokens, got.total_tokens, got.found) == (0, 0, 3, True)


def test_usage_from_live_message_vertex_and_developer_api_names() -> None:
    vertex = {
        "usageMetadata": {
            "promptTokenCount": 120,
            "candidatesTokenCount": 340,
            "totalTokenCount": 460,
            "promptTokensDetails": [{"modality": "AUDIO", "tokenCount": 100}, {"modality": "TEXT", "tokenCount": 20}],
            "candidatesTokensDetails": [{"modality": "AUDIO", "tokenCount": 340}],
        }
    }
    got = usage_from_live_message(vertex)
    assert got is not None
    assert (got.input_tokens, got.output_tokens, got.total_tokens) == (120, 340, 460)
    assert got.input_by_modality == {"AUDIO": 100, "TEXT": 20}
    assert got.output_by_modality == {"AUDIO": 340}
    developer = {
        "usageMetadata": {
            "promptTokenCount": 12,
            "responseTokenCount": 30,
            "thoughtsTokenCount": 5,
            "responseTokensDetails": [{"modality": "TEXT", "tokenCount": 30}],
        }
    }
    got = usage_from_live_message(developer)
    assert got is not None
    assert (got.output_tokens, got.reasoning_tokens, got.total_tokens) == (35, 5, 47)
    assert usage_from_live_message({"serverContent": {"turnComplete": True}}) is None
    assert usage_from_live_message({"usageMetadata": "junk"}) is None


def test_as_log_dict_is_compact() -> None:
    assert Usage(input_tokens=3, output_tokens=4, total_tokens=7, found=True).as_log_dict() == {
        "input_tokens": 3,
        "output_tokens": 4,
        "total_tokens": 7,
    }
    full = run(make("gemini_generate_tricky.json"), [body("gemini_generate_tricky.json")]).as_log_dict()
    assert full["cached_input_tokens"] == 32768
    assert full["input_by_modality"] == {"TEXT": 8505, "AUDIO": 32000}
    assert run(make("count_tokens.json"), [body("count_tokens.json")]).as_log_dict()["billable"] is False
    json.dumps(full)


# --------------------------------------------------------------------------- hostile input


PARSER_FACTORIES = [
    GeminiUsageParser,
    UsageObjectParser,
    lambda: UsageObjectParser(merge=True),
    CountTokensParser,
    PredictUsageParser,
    lambda: GzipUsageParser(GeminiUsageParser()),
]


@pytest.mark.parametrize("factory", PARSER_FACTORIES)
def test_random_bytes_never_raise(factory: Any) -> None:
    rnd = random.Random(1234)
    alphabet = b'{}[]":,\\ \n0123456789-eusageMetadatokn'
    for _ in range(300):
        parser = factory()
        for _ in range(rnd.randint(1, 8)):
            if rnd.random() < 0.5:
                chunk = rnd.randbytes(rnd.randint(0, 300))
            else:
                chunk = bytes(rnd.choice(alphabet) for _ in range(rnd.randint(0, 300)))
            parser.feed(chunk)
        assert isinstance(parser.result(), Usage)
        assert parser.buffered_bytes <= MAX_VALUE_BYTES + 1024


def test_fragments_of_usage_keys_in_random_junk() -> None:
    rnd = random.Random(99)
    pieces = [b'"usageMetadata"', b":", b"{", b"}", b'"', b"\\", b'"promptTokenCount"', b"12", b" ", b"[", b"]", b","]
    for _ in range(2000):
        data = b"".join(rnd.choice(pieces) for _ in range(rnd.randint(1, 60)))
        whole = run(GeminiUsageParser(), [data])
        cut = rnd.randrange(len(data) + 1)
        assert run(GeminiUsageParser(), [data[:cut], data[cut:]]) == whole, data


def test_deeply_nested_junk_is_bounded() -> None:
    parser = GeminiUsageParser()
    parser.feed(b'{"usageMetadata": ')
    for _ in range(200):
        parser.feed(b"{" * 5000)
        assert parser.buffered_bytes <= MAX_VALUE_BYTES
    parser.feed(b"[" * 100_000 + b'"' * 10_001)
    assert not parser.result().found
    # Real usage after the junk is still found: the scanner recovers.
    parser.feed(b'\n"usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 4}')
    assert parser.result().found


def test_oversized_object_is_abandoned_then_later_usage_found() -> None:
    huge = b'{"usageMetadata": {"promptTokenCount": 1, "blob": "' + b"x" * (2 * MAX_VALUE_BYTES) + b'"}}'
    real = b'\n{"usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 6}}'
    for chunk_size in (1000, 65536, 10**7):
        parser = GeminiUsageParser()
        data = huge + real
        for i in range(0, len(data), chunk_size):
            parser.feed(data[i : i + chunk_size])
            assert parser.buffered_bytes <= MAX_VALUE_BYTES
        got = parser.result()
        assert (got.input_tokens, got.output_tokens) == (5, 6)


def test_ten_megabyte_body_with_usage_at_the_end() -> None:
    text = ("Lorem ipsum \\\"dolor\\\" sit amet, usageMetadata: {promptTokenCount: 1}. " * 160_000)[: 10 * 2**20]
    data = (
        b'{"candidates": [{"content": {"role": "model", "parts": [{"text": "'
        + text.encode()
        + b'"}]}, "finishReason": "STOP"}], "usageMetadata": {"promptTokenCount": 17, '
        b'"candidatesTokenCount": 2600000, "totalTokenCount": 2600017}}'
    )
    assert len(data) > 10 * 10**6
    whole = run(GeminiUsageParser(), [data])
    chunked = run(GeminiUsageParser(), [data[i : i + 16384] for i in range(0, len(data), 16384)])
    assert whole == chunked
    assert (whole.input_tokens, whole.output_tokens) == (17, 2_600_000)


def test_memory_stays_bounded_on_a_50_megabyte_stream_without_usage() -> None:
    frame = (
        b'data: {"candidates": [{"content": {"role": "model", "parts": [{"text": "'
        + b"All work and no play makes Jack a dull boy. " * 20
        + b'"}]}}], "modelVersion": "gemini-2.0-flash-001"}\r\n\r\n'
    )
    block = frame * (65536 // len(frame) + 1)
    parsers: list[UsageParser] = [GeminiUsageParser(), UsageObjectParser(), PredictUsageParser()]
    fed = 0
    offset = 0
    while fed < 50 * 2**20:
        size = 65536 - (offset % 977)  # uneven chunks so frames straddle boundaries
        chunk = block[offset % len(frame) :][:size]
        offset += len(chunk)
        fed += len(chunk)
        for parser in parsers:
            parser.feed(chunk)
            assert parser.buffered_bytes <= 64
    for parser in parsers:
        assert not parser.result().found


def test_gzip_bomb_output_is_bounded_and_capped() -> None:
    data = gzip.compress(b" " * (64 * 2**20) + b'{"usageMetadata": {"promptTokenCount": 1}}')
    inner = GeminiUsageParser()
    parser = GzipUsageParser(inner, max_output=8 * 2**20)
    for i in range(0, len(data), 4096):
        parser.feed(data[i : i + 4096])
        assert parser.buffered_bytes <= 4096 + 64
    assert not parser.result().found  # stopped at the cap, never raised
    parser = GzipUsageParser(GeminiUsageParser())
    parser.feed(data)
    assert parser.result().input_tokens == 1


def test_gzip_multi_member_and_zlib_and_corrupt() -> None:
    one = b'data: {"usageMetadata": {"promptTokenCount": 2}}\n\n'
    two = b'data: {"usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 1}}\n\n'
    parser: UsageParser = GzipUsageParser(GeminiUsageParser())
    parser.feed(gzip.compress(one) + gzip.compress(two))
    assert parser.result().input_tokens == 9
    parser = new_usage_parser("google", "streamGenerateContent", content_encoding="deflate")
    parser.feed(zlib.compress(two))
    assert parser.result().input_tokens == 9
    parser = GzipUsageParser(GeminiUsageParser())
    parser.feed(b"\x1f\x8b not really gzip")
    parser.feed(gzip.compress(two))
    assert not parser.result().found


def test_a_bug_inside_a_parser_never_escapes_feed(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = GeminiUsageParser()

    def boom(key: bytes, raw: bytes) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(GeminiUsageParser, "_on_value", boom)
    parser.feed(body("gemini_generate_thinking.json"))
    parser.feed(b"more")
    assert parser.buffered_bytes == 0
    assert isinstance(parser.result(), Usage)


# --------------------------------------------------------------------------- selection


@pytest.mark.parametrize(
    ("publisher", "method", "compat", "model", "kind"),
    [
        ("google", "generateContent", False, "", GeminiUsageParser),
        ("google", ":streamGenerateContent", False, "", GeminiUsageParser),
        ("google", "countTokens", False, "", CountTokensParser),
        ("google", "predict", False, "imagen-4.0-generate-001", PredictUsageParser),
        ("google", "embedContent", False, "", PredictUsageParser),
        ("anthropic", "rawPredict", False, "claude-sonnet-4-5@20250929", UsageObjectParser),
        ("anthropic", "streamRawPredict", False, "", UsageObjectParser),
        ("", "chat/completions", True, "", UsageObjectParser),
        ("", "chat/completions", False, "", UsageObjectParser),
        ("google", "computeTokens", False, "", NullUsageParser),
        ("", "operations", False, "", NullUsageParser),
        ("", "endpoints/openapi/chat/completions", False, "", UsageObjectParser),
    ],
)
def test_parser_selection(publisher: str, method: str, compat: bool, model: str, kind: type) -> None:
    assert type(new_usage_parser(publisher, method, compat, model=model)) is kind


def test_unreadable_encodings_get_the_null_parser() -> None:
    assert isinstance(new_usage_parser("google", "generateContent", content_encoding="br"), NullUsageParser)
    assert isinstance(new_usage_parser("google", "generateContent", content_encoding="identity"), GeminiUsageParser)
    assert isinstance(new_usage_parser("google", "computeTokens", content_encoding="gzip"), NullUsageParser)


@pytest.mark.parametrize(
    ("method", "publisher", "model", "operation"),
    [
        ("generateContent", "google", "gemini-2.5-pro", "generate_content"),
        ("streamGenerateContent", "google", "", "generate_content"),
        ("BidiGenerateContent", "google", "", "generate_content"),
        ("countTokens", "google", "", "count_tokens"),
        ("computeTokens", "google", "", "compute_tokens"),
        ("embedContent", "google", "", "embeddings"),
        ("batchEmbedContents", "google", "", "embeddings"),
        ("predict", "google", "text-embedding-005", "embeddings"),
        ("predict", "google", "publishers/google/models/imagen-4.0-generate-001", "generate_image"),
        ("predict", "google", "", "predict"),
        ("predictLongRunning", "google", "veo-3.0-generate-001", "generate_video"),
        ("rawPredict", "anthropic", "claude-sonnet-4-5@20250929", "chat"),
        ("streamRawPredict", "anthropic", "claude-haiku-4-5", "chat"),
        ("rawPredict", "anthropic", "count-tokens", "count_tokens"),
        ("rawPredict", "", "", "predict"),
        ("chat/completions", "", "", "chat"),
        ("completions", "", "", "text_completion"),
        ("embeddings", "", "", "embeddings"),
        (":generateContent", "google", "", "generate_content"),
        ("endpoints/openapi/chat/completions", "", "", "chat"),
        ("fetchPredictOperation", "google", "", "other"),
        ("", "", "", "other"),
    ],
)
def test_operation_from_method(method: str, publisher: str, model: str, operation: str) -> None:
    assert operation_from_method(method, publisher, model) == operation


@pytest.mark.parametrize(("factory", "key"), [(GeminiUsageParser, b"usageMetadata"), (UsageObjectParser, b"usage"),
                                              (lambda: UsageObjectParser(merge=True), b"usage")])
def test_deeply_nested_usage_object_never_raises_from_result(factory: Any, key: bytes) -> None:
    # Small enough to be captured (< MAX_VALUE_BYTES), too deep for the JSON decoder's recursion limit.
    nested = b'{"a":' * 5000 + b"1" + b"}" * 5000
    data = b'{"' + key + b'": {"promptTokenCount": 1, "prompt_tokens": 1, "x": ' + nested + b"}}"
    assert len(data) < MAX_VALUE_BYTES
    parser = factory()
    parser.feed(data)
    assert parser.result() == Usage()


@pytest.mark.parametrize("body, model", [
    (b'{"candidates": [], "modelVersion": "gemini-2.5-flash-001"}', "gemini-2.5-flash-001"),
    # A model's text that quotes the key is inside a string: escaped quotes, never read.
    (b'{"candidates": [{"content": {"parts": [{"text": "say \\"modelVersion\\": \\"fake\\""}]}}]}', None),
    (b'{"modelVersion": "' + b"m" * 300 + b'"}', None),  # too long to be a model name
    (b'{"modelVersion": 3}', None),
    (b'{"modelVersion": "tab\\there"}', None),  # not printable once decoded
])
def test_the_answering_model_comes_from_model_version(body: bytes, model: str | None) -> None:
    for chunks in ([body], [body[i : i + 1] for i in range(len(body))]):
        parser = new_usage_parser(publisher="google", method="generateContent")
        assert run(parser, chunks).response_model == model
