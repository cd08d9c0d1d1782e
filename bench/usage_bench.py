"""Micro-benchmark of the usage parsers (not a test; run by hand).

    .venv/bin/python bench/usage_bench.py

Reports the cost of accounting one small unary generateContent response (parser creation,
feed, result, cost) in microseconds, and throughput in MB/s on large streamed responses:
Vertex SSE (usage in every frame), the JSON-array stream form, a body with no usage at all,
an Imagen response (base64 images), and the same SSE stream gzip-compressed.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sidecar"))

from vertex_sidecar.pricing import PricingTable  # noqa: E402
from vertex_sidecar.usage import UsageParser, new_usage_parser  # noqa: E402

SMALL = json.dumps(
    {
        "candidates": [
            {
                "content": {"role": "model", "parts": [{"text": "Paris is the capital of France. " * 12}]},
                "finishReason": "STOP",
                "avgLogprobs": -0.0412,
            }
        ],
        "usageMetadata": {
            "promptTokenCount": 9,
            "candidatesTokenCount": 96,
            "totalTokenCount": 105,
            "trafficType": "ON_DEMAND",
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 9}],
            "candidatesTokensDetails": [{"modality": "TEXT", "tokenCount": 96}],
        },
        "modelVersion": "gemini-2.0-flash-001",
        "createTime": "2025-06-17T09:12:44.503921Z",
        "responseId": "LPNQaO_jHoGrmecPmvanuAo",
    },
    indent=2,
).encode()


def frame(i: int, final: bool) -> dict[str, object]:
    usage: dict[str, object] = {"trafficType": "ON_DEMAND"}
    if final or i % 4 == 0:
        usage.update(promptTokenCount=9, candidatesTokenCount=i, totalTokenCount=9 + i)
    return {
        "candidates": [{"content": {"role": "model", "parts": [{"text": f"token {i} " * 40}]}}],
        "usageMetadata": usage,
        "modelVersion": "gemini-2.0-flash-001",
        "createTime": "2025-06-17T11:20:31.118230Z",
        "responseId": "H_xQaNuXB9HJmecPuK-E-Ao",
    }


def sse_stream(size: int) -> bytes:
    parts: list[bytes] = []
    total = i = 0
    while total < size:
        part = b"data: " + json.dumps(frame(i, False), separators=(",", ":")).encode() + b"\r\n\r\n"
        parts.append(part)
        total += len(part)
        i += 1
    parts.append(b"data: " + json.dumps(frame(i, True), separators=(",", ":")).encode() + b"\r\n\r\n")
    return b"".join(parts)


def array_stream(size: int) -> bytes:
    parts: list[bytes] = []
    total = i = 0
    while total < size:
        part = json.dumps(frame(i, False), indent=2).encode()
        parts.append(part)
        total += len(part) + 4
        i += 1
    parts.append(json.dumps(frame(i, True), indent=2).encode())
    return b"[" + b"\n,\r\n".join(parts) + b"\n]"


def no_usage_stream(size: int) -> bytes:
    piece = b'data: {"candidates":[{"content":{"parts":[{"text":"' + b"lorem ipsum " * 60 + b'"}]}}]}\r\n\r\n'
    return piece * (size // len(piece) + 1)


def imagen_body(size: int) -> bytes:
    image = base64.b64encode(os.urandom(size // 4 * 3 // 4)).decode()
    predictions = [{"mimeType": "image/png", "bytesBase64Encoded": image} for _ in range(4)]
    return json.dumps({"predictions": predictions}, indent=2).encode()


def best_of(runs: int, fn: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def small_response_us(iterations: int = 20_000) -> tuple[float, float]:
    table = PricingTable.default()

    def parse_only() -> None:
        for _ in range(iterations):
            parser = new_usage_parser("google", "generateContent")
            parser.feed(SMALL)
            parser.result()

    def with_cost() -> None:
        for _ in range(iterations):
            parser = new_usage_parser("google", "generateContent")
            parser.feed(SMALL)
            table.cost("publishers/google/models/gemini-2.0-flash-001", parser.result())

    return (
        best_of(5, parse_only) / iterations * 1e6,
        best_of(5, with_cost) / iterations * 1e6,
    )


def throughput(make: Callable[[], UsageParser], data: bytes, chunk: int) -> float:
    chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]

    def go() -> None:
        parser = make()
        for piece in chunks:
            parser.feed(piece)
        assert parser.result().found or b"usage" not in data[-2000:]

    return len(data) / best_of(3, go) / 1e6


def main() -> None:
    parse_us, cost_us = small_response_us()
    print(f"small generateContent ({len(SMALL)} B): {parse_us:.1f} us parse+result, "
          f"{cost_us:.1f} us with cost")
    size = 64 * 2**20
    gemini = lambda: new_usage_parser("google", "streamGenerateContent")  # noqa: E731
    sse = sse_stream(size)
    frames = sse.count(b"data: ")
    cases = [
        (f"SSE stream, usage in every frame ({frames} frames of ~{len(sse) // frames} B), 16 KiB chunks",
         gemini, sse, 16384),
        ("SSE stream, same, 64 KiB chunks", gemini, sse, 65536),
        ("JSON-array stream, 16 KiB chunks", gemini, array_stream(size), 16384),
        ("SSE stream without any usage, 64 KiB chunks", gemini, no_usage_stream(size), 65536),
        ("Imagen predict (4 base64 images), 64 KiB chunks",
         lambda: new_usage_parser("google", "predict"), imagen_body(size), 65536),
    ]
    for label, make, data, chunk in cases:
        print(f"{label}: {throughput(make, data, chunk):,.0f} MB/s")
    compressed = gzip.compress(sse, 6)
    gz = lambda: new_usage_parser("google", "streamGenerateContent", content_encoding="gzip")  # noqa: E731
    rate = throughput(gz, compressed, 16384) * len(sse) / len(compressed)
    print(f"gzip SSE stream, 16 KiB compressed chunks: {rate:,.0f} MB/s of inflated body")


if __name__ == "__main__":
    main()
