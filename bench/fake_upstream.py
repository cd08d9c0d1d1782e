"""A deliberately minimal, fast stand-in for Vertex AI, for the benchmark only.

It must not be the bottleneck, so it is a raw asyncio protocol (no framework):
  POST .../*:generateContent            → a small real-shaped JSON answer
  POST .../*:streamGenerateContent      → SSE: first frame at once, then N frames
        (query `frames`, `gap_ms`: frames after the first, pause between them)
  GET  .../*:download?bytes=N           → N bytes streamed in 64 KiB chunks
Run: python -m bench.fake_upstream PORT
"""

from __future__ import annotations

import asyncio
import sys
from urllib.parse import parse_qs

GENERATE_BODY = (
    b'{"candidates":[{"content":{"role":"model","parts":[{"text":"Hello from the fake upstream."}]},'
    b'"finishReason":"STOP","avgLogprobs":-0.12}],"usageMetadata":{"promptTokenCount":8,'
    b'"candidatesTokenCount":6,"totalTokenCount":14,"promptTokensDetails":[{"modality":"TEXT","tokenCount":8}],'
    b'"candidatesTokensDetails":[{"modality":"TEXT","tokenCount":6}]},"modelVersion":"gemini-2.5-flash",'
    b'"createTime":"2026-11-26T08:00:00.000000Z","responseId":"bench"}'
)
GENERATE_RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json; charset=UTF-8\r\n"
                     b"content-length: %d\r\n\r\n" % len(GENERATE_BODY)) + GENERATE_BODY
SSE_FRAME = (b'data: {"candidates":[{"content":{"role":"model","parts":[{"text":"chunk "}]}}],'
             b'"modelVersion":"gemini-2.5-flash"}\r\n\r\n')
SSE_LAST = (b'data: {"candidates":[{"content":{"role":"model","parts":[{"text":"end"}]},"finishReason":"STOP"}],'
            b'"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":20,"totalTokenCount":28}}\r\n\r\n')
CHUNK = bytes(range(256)) * 256  # 64 KiB


class FakeVertex(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""
        self.busy = False
        self.paused = asyncio.Event()
        self.paused.set()

    def pause_writing(self) -> None:
        self.paused.clear()

    def resume_writing(self) -> None:
        self.paused.set()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while not self.busy:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1")
            lines = head.split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            length = 0
            chunked = False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.lower() == "content-length":
                    length = int(value)
                elif name.lower() == "transfer-encoding" and "chunked" in value.lower():
                    chunked = True
            if chunked:
                terminator = self.buffer.find(b"\r\n0\r\n\r\n", end)
                if terminator < 0:
                    return
                self.buffer = self.buffer[terminator + 7:]
            else:
                if len(self.buffer) < end + 4 + length:
                    return
                self.buffer = self.buffer[end + 4 + length:]
            self.respond(method, target)

    def respond(self, method: str, target: str) -> None:
        path, _, query = target.partition("?")
        params = {k: v[0] for k, v in parse_qs(query).items()}
        if path.endswith(":streamGenerateContent"):
            self.busy = True
            asyncio.ensure_future(self.stream(int(params.get("frames", "3")), float(params.get("gap_ms", "50"))))
        elif path.endswith(":download"):
            self.busy = True
            asyncio.ensure_future(self.download(int(params.get("bytes", "0"))))
        else:
            self.transport.write(GENERATE_RESPONSE)

    async def stream(self, frames: int, gap_ms: float) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
        self.transport.write(b"%x\r\n%s\r\n" % (len(SSE_FRAME), SSE_FRAME))
        for _ in range(frames):
            await asyncio.sleep(gap_ms / 1000)
            if self.transport.is_closing():
                return
            self.transport.write(b"%x\r\n%s\r\n" % (len(SSE_FRAME), SSE_FRAME))
        self.transport.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(SSE_LAST), SSE_LAST))
        self.busy = False

    async def download(self, size: int) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                             b"content-length: %d\r\n\r\n" % size)
        remaining = size
        while remaining > 0 and not self.transport.is_closing():
            piece = CHUNK if remaining >= len(CHUNK) else CHUNK[:remaining]
            self.transport.write(piece)
            remaining -= len(piece)
            await self.paused.wait()
        self.busy = False


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FakeVertex, "127.0.0.1", port, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    import uvloop

    uvloop.run(serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
