"""Benchmark: proxy mode (zero code change) vs base-URL mode, the same unary call, TLS on both legs.

    .venv/bin/python -m bench.proxy_bench [--duration 5] [--concurrency 64]

One sidecar (pinned to core 0) serves both modes: its TLS listener (base-URL mode: the app
dials ``https://localhost:PORT/vertex_ai/...``) and its forward proxy (proxy mode: the app
sends ``CONNECT us-central1-aiplatform.googleapis.com:443`` and speaks TLS to the sidecar's
certificate for that name). The sidecar reaches a TLS fake upstream (`fake_upstream.FakeVertex`
behind a certificate from a CA of its own). One load generator, the same code for every
mode (keep-alive connections, one request at a time each; CONNECT and TLS handshakes happen
once per connection, before timing starts), shares core 1 with the upstream. "direct" is
the same client straight to the upstream, the reference the added latency is measured
against. Reported as ratios of the same run: proxy-mode throughput / base-URL throughput,
and each mode's added p50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.cores import pinned
from bench.run import GEN_PATH, REQUEST_BODY, ROOT, start
from tests.harness.processes import stop_processes

HOST = "us-central1-aiplatform.googleapis.com"


def request_bytes(path: str, host: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(REQUEST_BODY)}\r\n\r\n{REQUEST_BODY}").encode()


async def _open(mode: str, address: tuple[str, int], context: ssl.SSLContext
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if mode == "proxy":
        reader, writer = await asyncio.open_connection(*address)
        writer.write(f"CONNECT {HOST}:443 HTTP/1.1\r\nhost: {HOST}:443\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        await writer.start_tls(context, server_hostname=HOST)
        return reader, writer
    server_hostname = "localhost" if mode == "base_url" else "127.0.0.1"
    return await asyncio.open_connection(*address, ssl=context, server_hostname=server_hostname)


async def load(mode: str, address: tuple[str, int], path: str, host: str, context: ssl.SSLContext,
               concurrency: int, duration: float) -> dict[str, Any]:
    request = request_bytes(path, host)
    connections = [await _open(mode, address, context) for _ in range(concurrency)]
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if not head.startswith(b"HTTP/1.1 200"):
                errors += 1

    began = time.perf_counter()
    await asyncio.gather(*(worker(r, w) for r, w in connections))
    elapsed = time.perf_counter() - began
    for _, writer in connections:
        writer.close()
    latencies.sort()
    return {"rps": round(len(latencies) / elapsed), "p50_ms": round(statistics.median(latencies) * 1000, 3),
            "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 3), "requests": len(latencies),
            "errors": errors}


def serve_tls_upstream(cert: str, key: str) -> None:
    """`--serve-upstream`: the fake upstream behind TLS (prints its port)."""
    import uvloop

    from bench.fake_upstream import FakeVertex

    async def serve() -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server = await asyncio.get_running_loop().create_server(FakeVertex, "127.0.0.1", 0, ssl=context, backlog=4096)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    uvloop.run(serve())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--serve-upstream", nargs=2, metavar=("CERT", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_tls_upstream(*args.serve_upstream)
        return 0
    from vertex_sidecar.config import TlsSettings
    from vertex_sidecar.tls import prepare_tls

    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="vertex-proxy-bench-"))
    procs: list[subprocess.Popen[str]] = []
    try:
        upstream_tls = prepare_tls(TlsSettings(state_dir=str(tmp / "upstream-ca"),
                                               ca_bundle_path=str(tmp / "upstream-trust" / "bundle.pem")))
        upstream, port_line = start(pinned(1, [py, "-m", "bench.proxy_bench", "--serve-upstream",
                                               upstream_tls.cert_file, upstream_tls.key_file]))
        procs.append(upstream)
        upstream_port = int(port_line)
        port_file = tmp / "emulator.port"
        emulator, _ = start(pinned(1, [py, "-m", "tests.emulators", "--port", "0", "--port-file", str(port_file)]))
        procs.append(emulator)
        for _ in range(200):
            if port_file.exists() and port_file.read_text().strip():
                break
            time.sleep(0.05)
        metadata = f"127.0.0.1:{port_file.read_text().strip()}"
        upstream_url = f"https://127.0.0.1:{upstream_port}"
        config = tmp / "sidecar.yaml"
        config.write_text(
            "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\ntls_listen: 127.0.0.1:0\nproxy_listen: 127.0.0.1:0\n"
            f"tls: {{state_dir: {tmp / 'sidecar-tls'}, ca_bundle_path: {tmp / 'shared' / 'ca-bundle.pem'}}}\n"
            f"upstreams: {{aiplatform: '{upstream_url}'}}\n")
        sidecar, listening_line = start(
            pinned(0, [py, "-m", "vertex_sidecar", "--config", str(config), "--log-level", "warning"]),
            env={"GCE_METADATA_HOST": metadata, "GCE_METADATA_IP": metadata, "MALLOC_ARENA_MAX": "2",
                 "HOME": str(tmp), "CLOUDSDK_CONFIG": str(tmp / "gcloud"),
                 "SSL_CERT_FILE": upstream_tls.ca_bundle_path})  # the sidecar trusts the fake upstream
        procs.append(sidecar)
        listening = json.loads(listening_line)
        import urllib.request

        for _ in range(400):
            try:
                if urllib.request.urlopen(f"http://{listening['admin_listen']}/readyz", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.05)

        def address(text: str) -> tuple[str, int]:
            host, port = text.rsplit(":", 1)
            return host, int(port)

        app_trust = ssl.create_default_context(cafile=listening["ca_bundle"])
        upstream_trust = ssl.create_default_context(cafile=upstream_tls.ca_bundle_path)
        modes = {
            "direct": (address(f"127.0.0.1:{upstream_port}"), GEN_PATH, "127.0.0.1", upstream_trust),
            "base_url": (address(listening["tls_listen"]), "/vertex_ai" + GEN_PATH, "localhost", app_trust),
            "proxy": (address(listening["proxy_listen"]), GEN_PATH, HOST, app_trust),
        }
        import uvloop

        results: dict[str, Any] = {"concurrency": args.concurrency, "duration_s": args.duration}
        for mode, (where, path, host, context) in modes.items():  # warm up: connections, the first token
            uvloop.run(load(mode, where, path, host, context, 8, 1.0))
        for concurrency in sorted({1, args.concurrency}):
            row = {mode: uvloop.run(load(mode, where, path, host, context, concurrency, args.duration))
                   for mode, (where, path, host, context) in modes.items()}
            direct = row["direct"]["p50_ms"]
            row["added_p50_ms"] = {mode: round(row[mode]["p50_ms"] - direct, 3) for mode in ("base_url", "proxy")}
            row["proxy_over_base_url_rps"] = round(row["proxy"]["rps"] / row["base_url"]["rps"], 3)
            results[f"c{concurrency}"] = row
    finally:
        stop_processes(procs)
        shutil.rmtree(tmp, ignore_errors=True)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "proxy_mode.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
