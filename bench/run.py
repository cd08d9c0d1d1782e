"""Benchmark: direct-to-upstream vs through the sidecar, side by side in one run.

    make bench                      # or: .venv/bin/python -m bench.run [--duration 5] [--quick]

Layout (design §6): the sidecar is pinned to core 0; the load generator (wrk, or the
Python stream clients) and the fake upstream share core 1. The upstream is
`bench/fake_upstream.py` (a raw asyncio server, ~60k req/s on one core, so it is never
the bottleneck); Google tokens come from the test emulators' metadata server, so the
sidecar runs its real ADC path. Needs `wrk` (Debian package) and `taskset`.

Reports: req/s at concurrency 1/16/64, p50/p99 latency and the sidecar's added latency,
SSE time to first byte (direct vs sidecar), sidecar RSS idle / under load / during a
1 GB download / holding 1,000 open streams. Results also go to bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.cores import pinned
from bench.nginx_reference import available as nginx_available, free_port, start_nginx
from tests.harness.processes import PeakRss, rss_mb, stop_processes

ROOT = Path(__file__).resolve().parent.parent
GEN_PATH = "/v1/projects/bench-proj/locations/us-central1/publishers/google/models/gemini-2.5-flash:generateContent"
SSE_PATH = ("/v1/projects/bench-proj/locations/us-central1/publishers/google/models/gemini-2.5-flash"
            ":streamGenerateContent?alt=sse")
REQUEST_BODY = '{"contents":[{"role":"user","parts":[{"text":"Say hello in five words."}]}]}'

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  io.write(string.format("JSON {\\"p50_us\\": %%d, \\"p99_us\\": %%d, \\"requests\\": %%d, \\"errors\\": %%d}\\n",
    latency:percentile(50), latency:percentile(99), summary.requests,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status + summary.errors.timeout))
end
""" % REQUEST_BODY


def start(argv: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, **(env or {})}, cwd=ROOT)
    assert proc.stdout is not None
    first = proc.stdout.readline().strip()
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    return proc, first


def wrk(url: str, concurrency: int, duration: float, script: Path) -> dict[str, Any]:
    out = subprocess.run(
        pinned(1, ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--latency", "-s", str(script), url]),
        capture_output=True, text=True, check=True,
    ).stdout
    stats = json.loads(re.search(r"^JSON (.*)$", out, re.M).group(1))  # type: ignore[union-attr]
    stats["rps"] = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return stats


async def _first_byte_times(host: str, port: int, path: str, count: int) -> list[float]:
    """Time from sending a streaming request to the first byte of its first SSE frame."""
    times = []
    request = (f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
               f"content-length: {len(REQUEST_BODY)}\r\n\r\n{REQUEST_BODY}").encode()
    for _ in range(count):
        reader, writer = await asyncio.open_connection(host, port)
        started = time.perf_counter()
        writer.write(request)
        buffered = b""
        while b"data:" not in buffered:
            data = await reader.read(65536)
            if not data:
                raise RuntimeError("stream closed before the first frame")
            buffered += data
        times.append(time.perf_counter() - started)
        writer.close()
        await writer.wait_closed()
    return times


async def _download(host: str, port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    writer.write(f"GET {path} HTTP/1.1\r\nhost: {host}:{port}\r\nconnection: close\r\n\r\n".encode())
    total = 0
    while True:
        data = await reader.read(1 << 20)
        if not data:
            break
        total += len(data)
    writer.close()
    return total


async def _hold_streams(host: str, port: int, path: str, count: int) -> int:
    """Open `count` concurrent SSE streams; return how many completed with their last frame."""
    request = (f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
               f"connection: close\r\ncontent-length: {len(REQUEST_BODY)}\r\n\r\n{REQUEST_BODY}").encode()

    async def one() -> bool:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(request)
        body = await reader.read()
        writer.close()
        return b"usageMetadata" in body

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    return sum(1 for r in results if r is True)


def run_async(coro: Any) -> Any:
    import uvloop

    return uvloop.run(coro)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--quick", action="store_true", help="short runs, smaller download and stream counts")
    parser.add_argument("--idle-seconds", type=float, default=None,
                        help="how long to count the idle sidecar's CPU ticks (default 60, 10 with --quick)")
    parser.add_argument("--keep-cores-awake", action="store_true",
                        help="run a nice-19 busy loop on each core, so idle cores are not in a sleep state "
                             "when a packet arrives (a VM's vCPU wake-up adds ~0.1 ms per hop at 1 concurrent); "
                             "shows latency without that effect, at the cost of a little CPU")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("wrk is needed: apt-get install -y wrk", file=sys.stderr)
        return 2
    duration = 2.0 if args.quick else args.duration
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})  # this script's own threads (log readers, clients) stay off core 0
    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="vertex-bench-"))
    procs: list[subprocess.Popen[str]] = []
    results: dict[str, Any] = {"machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]},
                               "keep_cores_awake": args.keep_cores_awake}
    try:
        if args.keep_cores_awake:
            for core in range(os.cpu_count() or 1):
                procs.append(subprocess.Popen(pinned(core, ["nice", "-n", "19", py, "-c", "while True: pass"])))
        upstream, port_line = start(pinned(1, [py, "-m", "bench.fake_upstream", "0"]))
        procs.append(upstream)
        upstream_port = int(port_line)
        port_file = tmp / "emulator.port"
        emulator, _ = start(pinned(1, [py, "-m", "tests.emulators", "--port", "0", "--port-file", str(port_file)]))
        procs.append(emulator)
        for _ in range(100):
            if port_file.exists() and port_file.read_text().strip():
                break
            time.sleep(0.05)
        emulator_port = int(port_file.read_text().strip())
        config = tmp / "sidecar.yaml"
        config.write_text(
            "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n"
            f"upstreams:\n  aiplatform: http://127.0.0.1:{upstream_port}\n"
        )
        metadata = f"127.0.0.1:{emulator_port}"
        sidecar, listening = start(pinned(0, [py, "-m", "vertex_sidecar", "--config", str(config),
                                              "--log-level", "warning"]),
                                   env={"GCE_METADATA_HOST": metadata, "GCE_METADATA_IP": metadata,
                                        "MALLOC_ARENA_MAX": "2",
                                        "HOME": str(tmp), "CLOUDSDK_CONFIG": str(tmp / "gcloud")})
        procs.append(sidecar)
        info = json.loads(listening)
        sidecar_host, sidecar_port = info["listen"].rsplit(":", 1)
        admin = info["admin_listen"]
        import urllib.request

        for _ in range(200):
            try:
                if urllib.request.urlopen(f"http://{admin}/readyz", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.05)
        direct_base = f"http://127.0.0.1:{upstream_port}"
        sidecar_base = f"http://{sidecar_host}:{sidecar_port}/vertex_ai"
        # Warm up (connections, first token) before measuring anything.
        script = tmp / "post.lua"
        script.write_text(WRK_SCRIPT)
        wrk(sidecar_base + GEN_PATH, 16, 1.0, script)
        time.sleep(0.5)
        results["rss_idle_mb"] = round(rss_mb(sidecar.pid), 1)
        idle_s = args.idle_seconds if args.idle_seconds is not None else (10.0 if args.quick else 60.0)
        before = cpu_ticks(sidecar.pid)
        time.sleep(idle_s)
        results["idle_cpu"] = {"seconds": idle_s, "ticks": cpu_ticks(sidecar.pid) - before,
                               "ticks_per_s": os.sysconf("SC_CLK_TCK")}
        results["rss_idle_client_only_mb"] = _client_only_idle_rss(py, tmp, upstream_port)
        # nginx in the same run, plain proxy_pass (the reference) and with an upstream keep-alive pool.
        nginx_bases: dict[str, str] = {}
        if nginx_available():
            for shape, keepalive in (("nginx", False), ("nginx_keepalive", True)):
                nginx_port = free_port()
                procs.append(start_nginx(tmp, upstream_port, nginx_port, keepalive=keepalive))
                nginx_bases[shape] = f"http://127.0.0.1:{nginx_port}/vertex_ai"
                wrk(nginx_bases[shape] + GEN_PATH, 16, 1.0, script)

        unary: dict[str, Any] = {}
        for concurrency in (1, 16, 64):
            direct = wrk(direct_base + GEN_PATH, concurrency, duration, script)
            if concurrency == 64:
                with PeakRss(sidecar.pid) as sampler:
                    via = wrk(sidecar_base + GEN_PATH, concurrency, duration, script)
                results["rss_load_64_mb"] = round(sampler.peak, 1)
            else:
                via = wrk(sidecar_base + GEN_PATH, concurrency, duration, script)
            references: dict[str, Any] = {}
            for shape, base in nginx_bases.items():
                references.update(_nginx_row(shape, wrk(base + GEN_PATH, concurrency, duration, script), direct, via))
            unary[concurrency] = {
                **references,
                "direct_rps": round(direct["rps"]), "sidecar_rps": round(via["rps"]),
                "direct_p50_ms": direct["p50_us"] / 1000, "sidecar_p50_ms": via["p50_us"] / 1000,
                "direct_p99_ms": direct["p99_us"] / 1000, "sidecar_p99_ms": via["p99_us"] / 1000,
                "added_p50_ms": round((via["p50_us"] - direct["p50_us"]) / 1000, 3),
                "added_p99_ms": round((via["p99_us"] - direct["p99_us"]) / 1000, 3),
                "sidecar_errors": via["errors"],
            }
        results["unary"] = unary

        count = 50 if args.quick else 200
        direct_ttfb = run_async(_first_byte_times("127.0.0.1", upstream_port, SSE_PATH + "&frames=2&gap_ms=5", count))
        via_ttfb = run_async(_first_byte_times(sidecar_host, int(sidecar_port), "/vertex_ai" + SSE_PATH
                                               + "&frames=2&gap_ms=5", count))
        results["sse_ttfb_ms"] = {
            "direct_p50": round(statistics.median(direct_ttfb) * 1000, 3),
            "sidecar_p50": round(statistics.median(via_ttfb) * 1000, 3),
            "added_p50": round((statistics.median(via_ttfb) - statistics.median(direct_ttfb)) * 1000, 3),
        }

        size = (256 if args.quick else 1024) * 1024 * 1024
        idle_before = rss_mb(sidecar.pid)
        with PeakRss(sidecar.pid) as sampler:
            started = time.perf_counter()
            received = run_async(_download(sidecar_host, int(sidecar_port), f"/vertex_ai/v1/projects/bench-proj"
                                           f"/locations/us-central1/publishers/google/models/x:download"
                                           f"?bytes={size}"))
            elapsed = time.perf_counter() - started
        results["download"] = {"bytes": received, "expected_body_bytes": size, "seconds": round(elapsed, 2),
                               "mb_per_s": round(size / elapsed / 1e6), "rss_before_mb": round(idle_before, 1),
                               "rss_peak_mb": round(sampler.peak, 1)}

        streams = 200 if args.quick else 1000
        with PeakRss(sidecar.pid) as sampler:
            completed = run_async(_hold_streams(sidecar_host, int(sidecar_port), "/vertex_ai" + SSE_PATH
                                                + "&frames=4&gap_ms=500", streams))
        results["open_streams"] = {"opened": streams, "completed": completed, "rss_peak_mb": round(sampler.peak, 1)}
        # Fleet-wide limits on (Redis on loopback) vs limits off, two more sidecars (bench/fleet_bench.py).
        from bench import fleet_bench

        results["fleet_limits"] = fleet_bench.measure(py, tmp, upstream_port, metadata, script, duration)
    finally:
        stop_processes(procs)
        shutil.rmtree(tmp, ignore_errors=True)

    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    name = "latest-awake.json" if args.keep_cores_awake else "latest.json"
    (out_dir / name).write_text(json.dumps(results, indent=2))
    print(render(results))
    return 0


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _nginx_row(shape: str, nginx: dict[str, Any], direct: dict[str, Any], via: dict[str, Any]) -> dict[str, Any]:
    """nginx in the same run: the sidecar's throughput and added p50 as ratios of nginx's
    (keys prefixed by the nginx shape: `nginx` or `nginx_keepalive`)."""
    nginx_added = (nginx["p50_us"] - direct["p50_us"]) / 1000
    sidecar_added = (via["p50_us"] - direct["p50_us"]) / 1000
    return {f"{shape}_rps": round(nginx["rps"]), f"{shape}_added_p50_ms": round(nginx_added, 3),
            f"rps_vs_{shape}": round(via["rps"] / nginx["rps"], 2) if nginx["rps"] else None,
            f"added_p50_vs_{shape}": round(sidecar_added / nginx_added, 1) if nginx_added > 0 else None}


def _client_only_idle_rss(py: str, tmp: Path, upstream_port: int) -> float:
    """Idle RSS of a sidecar whose only credential is `client` (no token source at all),
    after a few requests have warmed it like the main one."""
    import urllib.request

    config = tmp / "client-only.yaml"
    config.write_text("listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n"
                      f"upstreams:\n  aiplatform: http://127.0.0.1:{upstream_port}\n"
                      "credentials:\n  default: {type: client}\n")
    proc, listening = start(pinned(0, [py, "-m", "vertex_sidecar", "--config", str(config), "--log-level", "warning"]),
                            env={"MALLOC_ARENA_MAX": "2", "HOME": str(tmp)})
    try:
        listen = json.loads(listening)["listen"]
        for _ in range(20):
            request = urllib.request.Request(f"http://{listen}/vertex_ai{GEN_PATH}", data=REQUEST_BODY.encode(),
                                             headers={"content-type": "application/json",
                                                      "authorization": "Bearer caller-token"})
            urllib.request.urlopen(request, timeout=5).read()
        time.sleep(0.5)
        return round(rss_mb(proc.pid), 1)
    finally:
        stop_processes([proc])


def render(results: dict[str, Any]) -> str:
    lines = ["| concurrency | direct req/s | nginx req/s (keep-alive) | sidecar req/s | sidecar/nginx req/s "
             "(keep-alive) | direct p50 | sidecar p50 | added p50 | nginx added p50 (keep-alive) "
             "| sidecar/nginx added p50 (keep-alive) | added p99 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def pair(row: dict[str, Any], key: str, unit: str = "") -> str:
        plain, pooled = row.get(key.format("nginx"), "-"), row.get(key.format("nginx_keepalive"), "-")
        return f"{plain}{unit} ({pooled}{unit})"

    for concurrency, row in results["unary"].items():
        lines.append(f"| {concurrency} | {row['direct_rps']:,} | {pair(row, '{}_rps')} | {row['sidecar_rps']:,}"
                     f" | {pair(row, 'rps_vs_{}', '×')} | {row['direct_p50_ms']:.3f} ms"
                     f" | {row['sidecar_p50_ms']:.3f} ms | {row['added_p50_ms']:+.3f} ms"
                     f" | {pair(row, '{}_added_p50_ms', ' ms')} | {pair(row, 'added_p50_vs_{}', '×')}"
                     f" | {row['added_p99_ms']:+.3f} ms |")
    idle = results["idle_cpu"]
    lines.append(f"\nIdle sidecar CPU: {idle['ticks']} ticks in {idle['seconds']:g} s "
                 f"({idle['ticks'] * 60 / idle['seconds']:.1f} per 60 s; {idle['ticks_per_s']} ticks = 1 s of a core)")
    sse = results["sse_ttfb_ms"]
    dl = results["download"]
    streams = results["open_streams"]
    lines += [
        "",
        f"SSE time to first byte (p50): direct {sse['direct_p50']} ms, sidecar {sse['sidecar_p50']} ms "
        f"(added {sse['added_p50']:+} ms)",
        f"Sidecar RSS: idle {results['rss_idle_mb']} MB (only `client` credentials: "
        f"{results['rss_idle_client_only_mb']} MB), under load at 64 concurrent {results['rss_load_64_mb']} MB",
        f"Download of {dl['expected_body_bytes'] / 2**30:.2f} GiB through the sidecar: {dl['mb_per_s']} MB/s, "
        f"RSS {dl['rss_before_mb']} → peak {dl['rss_peak_mb']} MB",
        f"Open streams: {streams['completed']}/{streams['opened']} completed, RSS peak {streams['rss_peak_mb']} MB",
    ]
    if "fleet_limits" in results:
        from bench import fleet_bench

        lines += ["", "Fleet-wide limits (Redis on loopback) vs limits off:", fleet_bench.render(results["fleet_limits"])]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
