"""Benchmark: the sidecar with tracing on (100 % sampled, exporting to a local OTLP/HTTP
receiver) against the same sidecar with tracing off, in one run.

    .venv/bin/python -m bench.trace_bench [--duration 3] [--rounds 6]

Layout as in `bench.run`: the sidecars are pinned to core 0 (only one is under load at a
time), wrk, the fake upstream, the metadata emulator and the receiver share core 1. The
receiver decodes every export with opentelemetry-proto and counts the spans, so the run
also shows that every request's span arrived. Rounds alternate off/on so that drift of the
machine hits both alike (in ABBA order); the medians of the rounds are reported, and each
ratio is the median of the rounds' own ratios.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.cores import pinned
from bench.run import GEN_PATH, WRK_SCRIPT, start, wrk
from tests.harness.processes import rss_mb, stop_processes

ROOT = Path(__file__).resolve().parent.parent

RECEIVER = r"""
import asyncio, json, sys
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

spans = 0

async def handle(reader, writer):
    global spans
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = await reader.readexactly(length)
            if head.startswith(b"GET /count"):
                answer = json.dumps({"spans": spans}).encode()
            else:
                message = ExportTraceServiceRequest.FromString(body)
                spans += sum(len(s.spans) for r in message.resource_spans for s in r.scope_spans)
                answer = b""
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: "
                         + str(len(answer)).encode() + b"\r\n\r\n" + answer)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


def cpu_ns(pid: int) -> int:
    """CPU time the process (all its threads) has run, in ns (the scheduler's own count)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        total += int((task / "schedstat").read_text().split()[0])
    return total


def spans_received(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/count", timeout=5) as response:
        return int(json.loads(response.read())["spans"])


def metric(admin: str, name: str) -> float:
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def paired(runs: dict[str, list[dict[str, Any]]], reference: str, key: str) -> float:
    """The median over the rounds of on/reference for `key`."""
    return statistics.median(on[key] / ref[key] for on, ref in zip(runs["on"], runs[reference]))


def simultaneous(off: Any, off_url: str, on: Any, on_url: str, concurrency: int, args: argparse.Namespace,
                 script: Path) -> dict[str, Any]:
    """Both sidecars under load at the same time, on the same core: the scheduler gives each
    half of it, so their throughputs compare the CPU each spends per request under exactly
    the same conditions (a noisy neighbour slows both at once). One pair per round."""
    ratios, cpu_ratios, requests_on = [], [], 0
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for _ in range(args.rounds):
            before = cpu_ns(off.pid), cpu_ns(on.pid)
            off_run, on_run = pool.map(lambda url: wrk(url + GEN_PATH, concurrency, args.duration, script),
                                       (off_url, on_url))
            off_cpu = (cpu_ns(off.pid) - before[0]) / max(off_run["requests"], 1)
            on_cpu = (cpu_ns(on.pid) - before[1]) / max(on_run["requests"], 1)
            ratios.append(round(on_run["rps"] / off_run["rps"], 3))
            cpu_ratios.append(round(on_cpu / off_cpu, 3))
            requests_on += on_run["requests"]
    return {"throughput_ratio": round(statistics.median(ratios), 3), "throughput_ratios": ratios,
            "cpu_ratio": round(statistics.median(cpu_ratios), 3), "cpu_ratios": cpu_ratios, "requests_on": requests_on}


def start_sidecar(tmp: Path, name: str, upstream_port: int, metadata: str, tracing: str,
                  env: dict[str, str] | None = None) -> tuple[Any, str, str]:
    config = tmp / f"{name}.yaml"
    config.write_text("listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n"
                      f"upstreams:\n  aiplatform: http://127.0.0.1:{upstream_port}\n{tracing}")
    py = sys.executable
    proc, listening = start(pinned(0, [py, "-m", "vertex_sidecar", "--config", str(config), "--log-level", "warning"]),
                            env={"GCE_METADATA_HOST": metadata, "GCE_METADATA_IP": metadata, "MALLOC_ARENA_MAX": "2",
                                 "HOME": str(tmp), "CLOUDSDK_CONFIG": str(tmp / "gcloud"), **(env or {})})
    info = json.loads(listening)
    admin = info["admin_listen"]
    for _ in range(200):
        try:
            if urllib.request.urlopen(f"http://{admin}/readyz", timeout=1).status == 200:
                break
        except OSError:
            time.sleep(0.05)
    return proc, f"http://{info['listen']}/vertex_ai", admin


def set_tracing(config: Path, admin: str, enabled: bool) -> None:
    """Switch the traced sidecar's tracing by a config reload (the same process, the same
    caches: a paired comparison that the machine's other load cannot bias)."""
    reloads = f'vertex_sidecar_config_reloads_total{{result="success"}}'
    before = metric(admin, reloads)
    text = config.read_text()
    config.write_text(text.replace(f"enabled: {str(not enabled).lower()}", f"enabled: {str(enabled).lower()}"))
    deadline = time.monotonic() + 10
    while metric(admin, reloads) <= before:
        if time.monotonic() > deadline:
            raise RuntimeError("the traced sidecar did not reload its config")
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=6, help="off/on rounds per concurrency")
    parser.add_argument("--on-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment of the traced sidecar (e.g. OTEL_BSP_MAX_QUEUE_SIZE=1 to see the "
                             "request-path cost without the export)")
    parser.add_argument("--concurrency", type=int, action="append", help="default: 1 and 64")
    parser.add_argument("--sample-ratio", type=float, default=1.0, help="the traced sidecar's sample_ratio")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("wrk is needed: apt-get install -y wrk", file=sys.stderr)
        return 2
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="vertex-trace-bench-"))
    procs: list[subprocess.Popen[str]] = []
    results: dict[str, Any] = {"machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]}}
    try:
        upstream, port_line = start(pinned(1, [py, "-m", "bench.fake_upstream", "0"]))
        procs.append(upstream)
        receiver, receiver_port = start(pinned(1, [py, "-c", RECEIVER]))
        procs.append(receiver)
        port_file = tmp / "emulator.port"
        emulator, _ = start(pinned(1, [py, "-m", "tests.emulators", "--port", "0", "--port-file", str(port_file)]))
        procs.append(emulator)
        for _ in range(100):
            if port_file.exists() and port_file.read_text().strip():
                break
            time.sleep(0.05)
        metadata = f"127.0.0.1:{port_file.read_text().strip()}"
        off, off_url, off_admin = start_sidecar(tmp, "off", int(port_line), metadata, "")
        procs.append(off)
        on, on_url, on_admin = start_sidecar(
            tmp, "on", int(port_line), metadata,
            f"tracing:\n  enabled: true\n  endpoint: http://127.0.0.1:{receiver_port}\n  sample_ratio: {args.sample_ratio}\n",
            env=dict(item.split("=", 1) for item in args.on_env))
        procs.append(on)
        script = tmp / "post.lua"
        script.write_text(WRK_SCRIPT)
        for url in (off_url, on_url):  # warm up: connections, first token, first export
            wrk(url + GEN_PATH, 16, 1.0, script)
        time.sleep(6)  # the warm-up's spans are exported on the 5 s schedule
        results["rss_idle_mb"] = {"off": round(rss_mb(off.pid), 1), "on": round(rss_mb(on.pid), 1)}
        exported_before = spans_received(int(receiver_port))
        requests_on = 0
        rows: dict[int, Any] = {}
        for concurrency in args.concurrency or (1, 64):
            runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": [], "paused": []}
            modes = [("off", off, off_url), ("on", on, on_url), ("paused", on, on_url)]
            for round_index in range(args.rounds):
                # ABBA: every other round runs the modes in reverse, so that a drift of the
                # machine within a round biases neither side.
                for mode, proc, url in (modes if round_index % 2 == 0 else modes[::-1]):
                    if mode == "paused":
                        set_tracing(tmp / "on.yaml", on_admin, False)
                    before = cpu_ns(proc.pid)
                    measured = wrk(url + GEN_PATH, concurrency, args.duration, script)
                    # CPU per request: what tracing costs, whatever else the machine is doing.
                    measured["cpu_us_per_request"] = (cpu_ns(proc.pid) - before) / 1000 / max(measured["requests"], 1)
                    runs[mode].append(measured)
                    if mode == "paused":
                        set_tracing(tmp / "on.yaml", on_admin, True)
                requests_on += runs["on"][-1]["requests"]
            row = {mode: {"rps": round(statistics.median(r["rps"] for r in runs[mode])),
                          "p50_ms": statistics.median(r["p50_us"] for r in runs[mode]) / 1000,
                          "p99_ms": statistics.median(r["p99_us"] for r in runs[mode]) / 1000,
                          "cpu_us_per_request": round(statistics.median(r["cpu_us_per_request"] for r in runs[mode]), 1),
                          "errors": sum(r["errors"] for r in runs[mode])} for mode in runs}
            # Ratios: the median over the rounds of each round's ratio (its runs were seconds
            # apart, so a machine that got slower for a while shifts both sides alike).
            for reference, suffix in (("off", ""), ("paused", "_vs_paused")):
                row["throughput_ratio" + suffix] = round(paired(runs, reference, "rps"), 3)
                row["throughput_ratios" + suffix] = [round(on_run["rps"] / ref_run["rps"], 3)
                                                     for on_run, ref_run in zip(runs["on"], runs[reference])]
                row["cpu_ratio" + suffix] = round(paired(runs, reference, "cpu_us_per_request"), 3)
                row["added_p50_ms" + suffix] = round(statistics.median(
                    (on_run["p50_us"] - ref_run["p50_us"]) / 1000 for on_run, ref_run in zip(runs["on"], runs[reference])), 3)
            row["simultaneous"] = simultaneous(off, off_url, on, on_url, concurrency, args, script)
            requests_on += row["simultaneous"]["requests_on"]
            rows[concurrency] = row
        results["unary"] = rows
        results["rss_after_mb"] = {"off": round(rss_mb(off.pid), 1), "on": round(rss_mb(on.pid), 1)}
        time.sleep(6)  # the last batch goes out on the schedule
        results["spans"] = {"requests_traced": requests_on,
                            "received": spans_received(int(receiver_port)) - exported_before,
                            "dropped": metric(on_admin, "vertex_sidecar_trace_spans_dropped_total")}
    finally:
        stop_processes(procs)
        shutil.rmtree(tmp, ignore_errors=True)
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "tracing.json").write_text(json.dumps(results, indent=2))
    print(render(results))
    return 0


def render(results: dict[str, Any]) -> str:
    lines = ["| concurrency | off req/s | on req/s | on/off | off p50 | on p50 | added p50 | CPU/request off | on | on/off |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for concurrency, row in results["unary"].items():
        lines.append(f"| {concurrency} | {row['off']['rps']:,} | {row['on']['rps']:,} | {row['throughput_ratio']:.3f} | "
                     f"{row['off']['p50_ms']:.3f} ms | {row['on']['p50_ms']:.3f} ms | {row['added_p50_ms']:+.3f} ms | "
                     f"{row['off']['cpu_us_per_request']} µs | {row['on']['cpu_us_per_request']} µs | "
                     f"{row['cpu_ratio']:.3f} |")
    lines += ["", "Paired: the traced sidecar against itself with tracing switched off by a config reload:", "",
              "| concurrency | paused req/s | on req/s | on/paused | added p50 | CPU/request paused | on | on/paused |",
              "|---|---|---|---|---|---|---|---|"]
    for concurrency, row in results["unary"].items():
        lines.append(f"| {concurrency} | {row['paused']['rps']:,} | {row['on']['rps']:,} | "
                     f"{row['throughput_ratio_vs_paused']:.3f} | {row['added_p50_ms_vs_paused']:+.3f} ms | "
                     f"{row['paused']['cpu_us_per_request']} µs | {row['on']['cpu_us_per_request']} µs | "
                     f"{row['cpu_ratio_vs_paused']:.3f} |")
    lines += ["", "Simultaneous: both sidecars under load at once, sharing one core (median of the rounds, and their range):",
              "", "| concurrency | on/off throughput | range | on/off CPU per request | range |", "|---|---|---|---|---|"]
    for concurrency, row in results["unary"].items():
        both = row["simultaneous"]
        lines.append(f"| {concurrency} | {both['throughput_ratio']:.3f} | {min(both['throughput_ratios']):.3f}–"
                     f"{max(both['throughput_ratios']):.3f} | {both['cpu_ratio']:.3f} | {min(both['cpu_ratios']):.3f}–"
                     f"{max(both['cpu_ratios']):.3f} |")
    spans = results["spans"]
    lines.append(f"\nspans: {spans['received']:,} received for {spans['requests_traced']:,} traced requests, "
                 f"{spans['dropped']:.0f} dropped; RSS idle off {results['rss_idle_mb']['off']} MB, "
                 f"on {results['rss_idle_mb']['on']} MB; after load off {results['rss_after_mb']['off']} MB, "
                 f"on {results['rss_after_mb']['on']} MB")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
