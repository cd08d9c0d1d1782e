"""Benchmark: fleet-wide limits on (Redis on loopback) vs limits off, side by side in one run.

    .venv/bin/python -m bench.fleet_bench [--duration 5]     # also part of `make bench`

Two sidecars, one after the other pinned to core 0, serve the same small unary call from
the fake upstream: "off" has a route without limits, "fleet" the same route with
`requests_per_minute` and `tokens_per_minute` counted fleet-wide through a real
`redis-server` (started here, on loopback, on core 1 with the load generator). The limits
are high enough never to refuse, so the run measures what counting costs: leases taken
from memory per request, the background sync with Redis. Runs alternate off/fleet
(ROUNDS, alternating which goes first); the best of each is kept. Reported as ratios of
the same run: fleet throughput / off throughput at 64 concurrent (best against best, and
the median of the rounds), fleet p50 - off p50, and CPU time per request of each sidecar
(the scheduler's accounting, which other load on the machine does not bias as it biases
req/s).
"""

from __future__ import annotations

import argparse
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

import yaml

from bench.cores import pinned
from tests.harness.processes import stop_processes

ROUNDS = 4  # off and fleet alternate, each round in the other order
LIMITS = {"requests_per_minute": 10_000_000, "tokens_per_minute": 10_000_000_000, "scope": "fleet"}


def _sidecar_config(upstream_port: int, store: dict[str, Any] | None) -> dict[str, Any]:
    route: dict[str, Any] = {"name": "bench", "match": {"models": ["*"]}}
    config: dict[str, Any] = {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
                              "upstreams": {"aiplatform": f"http://127.0.0.1:{upstream_port}"},
                              "routes": [route]}
    if store is not None:
        route["limits"] = dict(LIMITS)
        config["store"] = store
    return config


def _start_sidecar(py: str, tmp: Path, name: str, config: dict[str, Any], metadata: str,
                   ) -> tuple[subprocess.Popen[str], str]:
    from bench.run import start

    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    sidecar, listening = start(pinned(0, [py, "-m", "vertex_sidecar", "--config", str(path), "--log-level", "warning"]),
                               env={"GCE_METADATA_HOST": metadata, "GCE_METADATA_IP": metadata,
                                    "MALLOC_ARENA_MAX": "2", "HOME": str(tmp), "CLOUDSDK_CONFIG": str(tmp / "gcloud")})
    info = json.loads(listening)
    for _ in range(200):
        try:
            if urllib.request.urlopen(f"http://{info['admin_listen']}/readyz", timeout=1).status == 200:
                break
        except OSError:
            time.sleep(0.05)
    return sidecar, f"http://{info['listen']}/vertex_ai"


def _admitted(admin_metrics: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in admin_metrics.splitlines()
               if line.startswith("vertex_sidecar_requests_total{") and 'code="200"' in line)


def measure(py: str, tmp: Path, upstream_port: int, metadata: str, script: Path, duration: float) -> dict[str, Any]:
    """Both configurations against the running fake upstream and metadata emulator."""
    from bench.run import GEN_PATH, cpu_ticks, wrk
    from tests.harness.redis_server import REDIS_SERVER, RedisServer

    if REDIS_SERVER is None:
        return {"skipped": "redis-server is not installed (apt-get install -y redis-server)"}
    redis_dir = tmp / "redis"
    redis_dir.mkdir(exist_ok=True)
    redis = RedisServer(redis_dir)
    binary = REDIS_SERVER
    redis.proc = subprocess.Popen(pinned(1, [binary, "--bind", "127.0.0.1", "--port", str(redis.port), "--save", "",
                                             "--appendonly", "no", "--dir", str(redis_dir)]),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    redis._wait_listening()
    procs: list[Any] = [redis.proc]
    best: dict[str, dict[str, dict[str, Any]]] = {"off": {}, "fleet": {}}
    try:
        sidecars = {
            "off": _start_sidecar(py, tmp, "off", _sidecar_config(upstream_port, None), metadata),
            "fleet": _start_sidecar(py, tmp, "fleet", _sidecar_config(upstream_port, redis.store_config()), metadata),
        }
        procs += [proc for proc, _ in sidecars.values()]
        for _, base in sidecars.values():
            wrk(base + GEN_PATH, 16, 1.0, script)  # warm up: connections, first token, first leases
        cpu: dict[str, list[float]] = {"off": [], "fleet": []}  # CPU seconds per request at 64 concurrent
        ratios: list[float] = []  # fleet/off req/s at 64 concurrent, per round
        for round_ in range(ROUNDS):
            order = list(sidecars.items()) if round_ % 2 == 0 else list(reversed(sidecars.items()))
            rps: dict[str, float] = {}
            for name, (proc, base) in order:
                for concurrency in (1, 64):
                    before = cpu_ticks(proc.pid)
                    stats = wrk(base + GEN_PATH, concurrency, duration, script)
                    if concurrency == 64 and stats["requests"]:
                        ticks = cpu_ticks(proc.pid) - before
                        cpu[name].append(ticks / os.sysconf("SC_CLK_TCK") / stats["requests"])
                        rps[name] = stats["rps"]
                    kept = best[name].get(str(concurrency))
                    if kept is None or stats["rps"] > kept["rps"]:
                        best[name][str(concurrency)] = stats
            ratios.append(rps["fleet"] / rps["off"])
        keys = redis.client().keys("vxp:*")
    finally:
        stop_processes(procs)
    off, fleet = best["off"], best["fleet"]
    return {
        "limits": LIMITS,
        "off_rps_64": round(off["64"]["rps"]), "fleet_rps_64": round(fleet["64"]["rps"]),
        "rps_ratio_64": round(fleet["64"]["rps"] / off["64"]["rps"], 3),  # best against best
        "rps_ratio_64_per_round": [round(r, 3) for r in ratios],
        "rps_ratio_64_median": round(statistics.median(ratios), 3),
        "off_p50_1_ms": off["1"]["p50_us"] / 1000, "fleet_p50_1_ms": fleet["1"]["p50_us"] / 1000,
        "added_p50_1_ms": round((fleet["1"]["p50_us"] - off["1"]["p50_us"]) / 1000, 3),
        "off_p50_64_ms": off["64"]["p50_us"] / 1000, "fleet_p50_64_ms": fleet["64"]["p50_us"] / 1000,
        "added_p50_64_ms": round((fleet["64"]["p50_us"] - off["64"]["p50_us"]) / 1000, 3),
        # The scheduler's CPU accounting is not biased by other load on the machine, wrk's req/s is.
        "off_cpu_us_per_request": round(min(cpu["off"]) * 1e6, 1),
        "fleet_cpu_us_per_request": round(min(cpu["fleet"]) * 1e6, 1),
        "cpu_ratio": round(min(cpu["fleet"]) / min(cpu["off"]), 3),
        "errors": off["64"]["errors"] + fleet["64"]["errors"],
        "redis_keys": len(keys),  # proof that the fleet sidecar did count through Redis
    }


def render(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return f"Fleet limits: skipped ({result['skipped']})"
    return "\n".join([
        "| limits | req/s at 64 | ratio vs off | p50 at 1 | added p50 at 1 | p50 at 64 | added p50 at 64 |",
        "|---|---|---|---|---|---|---|",
        f"| off | {result['off_rps_64']:,} | 1.00 | {result['off_p50_1_ms']:.3f} ms | - "
        f"| {result['off_p50_64_ms']:.3f} ms | - |",
        f"| fleet (Redis) | {result['fleet_rps_64']:,} | {result['rps_ratio_64']:.2f} | {result['fleet_p50_1_ms']:.3f} ms"
        f" | {result['added_p50_1_ms']:+.3f} ms | {result['fleet_p50_64_ms']:.3f} ms"
        f" | {result['added_p50_64_ms']:+.3f} ms |",
        f"\nCPU per request at 64 concurrent: off {result['off_cpu_us_per_request']} µs, fleet "
        f"{result['fleet_cpu_us_per_request']} µs (×{result['cpu_ratio']}); req/s ratio per round "
        f"{result['rps_ratio_64_per_round']} (median {result['rps_ratio_64_median']}); {result['redis_keys']} keys in Redis",
    ])


def main() -> int:
    from bench.run import WRK_SCRIPT, start

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("wrk is needed: apt-get install -y wrk", file=sys.stderr)
        return 2
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="vertex-fleet-bench-"))
    procs: list[Any] = []
    try:
        upstream, port_line = start(pinned(1, [py, "-m", "bench.fake_upstream", "0"]))
        procs.append(upstream)
        port_file = tmp / "emulator.port"
        emulator, _ = start(pinned(1, [py, "-m", "tests.emulators", "--port", "0", "--port-file", str(port_file)]))
        procs.append(emulator)
        for _ in range(100):
            if port_file.exists() and port_file.read_text().strip():
                break
            time.sleep(0.05)
        script = tmp / "post.lua"
        script.write_text(WRK_SCRIPT)
        result = measure(py, tmp, int(port_line), f"127.0.0.1:{port_file.read_text().strip()}", script,
                         args.duration)
    finally:
        stop_processes(procs)
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=2))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
