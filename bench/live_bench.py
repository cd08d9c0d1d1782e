"""Benchmark of the Live API relay: direct vs through the sidecar, side by side in one run.

    .venv/bin/python -m bench.live_bench                       # 2,000 round trips + a 10-minute audio session
    .venv/bin/python -m bench.live_bench --audio-seconds 60    # a shorter audio session

Layout as in `bench.run`: the sidecar pinned to core 0; the Live emulator
(`tests.emulators.live` in front of the combined emulator, whose metadata server gives the
sidecar its ADC token) and this script's clients on core 1.

1. Per-message relay latency: a client sends one ``realtimeInput`` text message and times
   the first reply message (one message each way). Direct (the emulator, with a token
   from its metadata server) vs the sidecar's plain listener vs its TLS listener.
2. A simulated audio session: 20 ms PCM chunks (16 kHz, base64) at real-time pace, the
   "model" answering every second with 1 s of 24 kHz audio in 5 chunks; the sidecar's
   RSS is sampled throughout and must stay flat.
Results go to stdout and bench/results/live-latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import websockets

from bench.cores import pinned
from tests.harness.processes import rss_mb, stop_processes

ROOT = Path(__file__).resolve().parent.parent
MODEL = "gemini-live-2.5-flash"
LIVE_PATH = "/ws/google.cloud.aiplatform.v1.LlmBidiService/BidiGenerateContent"
TEXT_SETUP = json.dumps({"setup": {"model": f"projects/bench-proj/locations/us-central1/publishers/google/models/{MODEL}",
                                   "generationConfig": {"responseModalities": ["TEXT"]}}})
AUDIO_SETUP = json.dumps({"setup": {"model": f"projects/bench-proj/locations/us-central1/publishers/google/models/{MODEL}",
                                    "generationConfig": {"responseModalities": ["AUDIO"]}}})
PING = json.dumps({"realtimeInput": {"text": "ping"}})
CHUNK_MS = 20
AUDIO_CHUNK = json.dumps({"realtimeInput": {"audio": {"mimeType": "audio/pcm;rate=16000",
                                                      "data": base64.b64encode(bytes(640)).decode()}}})


# ------------------------------------------------------------------- the emulator process


def serve_emulator(port_file: Path) -> None:
    """Runs in its own process: the Live emulator in front of the combined emulator."""
    import uvicorn

    sys.path.insert(0, str(ROOT))
    from tests.emulators.live import create_live_app
    from tests.emulators.serve import bind_loopback, create_combined_app

    app = create_live_app(fallback=create_combined_app(project_id="bench-proj"))
    knobs = app.state.live
    knobs.chunks = 5  # a turn: 5 chunks of 0.2 s of 24 kHz audio (audio) or short text
    knobs.turn_every_audio_chunks = 1000 // CHUNK_MS  # the model answers every second of audio
    sock = bind_loopback()
    port_file.write_text(str(sock.getsockname()[1]))
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", ws_per_message_deflate=False)
    uvicorn.Server(config).run(sockets=[sock])


# ------------------------------------------------------------------------- measurements


async def round_trips(url: str, count: int, headers: dict[str, str] | None = None,
                      context: ssl.SSLContext | None = None) -> list[float]:
    """Seconds from sending one message to the first reply message, `count` times."""
    times: list[float] = []
    async with websockets.connect(url, additional_headers=headers, ssl=context, compression=None) as ws:
        await ws.send(TEXT_SETUP)
        await ws.recv()
        for i in range(count + 50):
            started = time.perf_counter()
            await ws.send(PING)
            await ws.recv()
            elapsed = time.perf_counter() - started
            while b'"turnComplete"' not in await ws.recv():
                pass
            if i >= 50:  # warm-up excluded
                times.append(elapsed)
    return times


async def audio_session(url: str, seconds: float, sidecar_pid: int, sample_every_s: float) -> dict[str, Any]:
    """Real-time audio both ways for `seconds`; the sidecar's RSS sampled as it goes."""
    samples: list[tuple[float, float]] = []
    received = {"messages": 0, "bytes": 0, "turns": 0}
    async with websockets.connect(url, compression=None, max_size=None) as ws:
        await ws.send(AUDIO_SETUP)
        await ws.recv()

        async def read() -> None:
            async for message in ws:
                received["messages"] += 1
                received["bytes"] += len(message)
                if b'"turnComplete"' in message:
                    received["turns"] += 1

        reader = asyncio.ensure_future(read())
        started = time.perf_counter()
        next_sample = 0.0
        sent = 0
        while (elapsed := time.perf_counter() - started) < seconds:
            if elapsed >= next_sample:
                samples.append((round(elapsed, 1), round(rss_mb(sidecar_pid), 2)))
                next_sample += sample_every_s
            await ws.send(AUDIO_CHUNK)
            sent += 1
            await asyncio.sleep(max(0.0, started + sent * CHUNK_MS / 1000 - time.perf_counter()))
        samples.append((round(time.perf_counter() - started, 1), round(rss_mb(sidecar_pid), 2)))
        await asyncio.sleep(1.0)
        await ws.close()
        reader.cancel()
    values = [rss for _, rss in samples]
    return {"seconds": seconds, "chunks_sent": sent, **{f"received_{k}": v for k, v in received.items()},
            "rss_start_mb": values[0], "rss_min_mb": min(values), "rss_max_mb": max(values),
            "rss_end_mb": values[-1], "rss_growth_mb": round(values[-1] - values[0], 2), "samples": samples}


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"p50_ms": round(statistics.median(ordered) * 1000, 3),
            "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1] * 1000, 3),
            "mean_ms": round(statistics.fmean(ordered) * 1000, 3)}


# ---------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000, help="round trips per latency run")
    parser.add_argument("--audio-seconds", type=float, default=600.0, help="length of the audio session")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--serve-emulator", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_emulator:
        serve_emulator(args.serve_emulator)
        return 0
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    tmp = Path(tempfile.mkdtemp(prefix="vertex-live-bench-"))
    py = sys.executable
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs: list[subprocess.Popen[str]] = []
    results: dict[str, Any] = {"machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]}}
    try:
        port_file = tmp / "emulator.port"
        procs.append(subprocess.Popen(pinned(1, [py, "-m", "bench.live_bench", "--serve-emulator", str(port_file)]),
                                      cwd=ROOT, env=env, text=True))
        deadline = time.monotonic() + 20
        while not (port_file.exists() and port_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        emulator = f"127.0.0.1:{int(port_file.read_text())}"
        _wait_http(f"http://{emulator}/computeMetadata/v1/project/project-id", {"Metadata-Flavor": "Google"})

        config = tmp / "sidecar.yaml"
        config.write_text(
            "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\ntls_listen: 127.0.0.1:0\n"
            f"tls: {{state_dir: {tmp / 'tls'}, ca_bundle_path: {tmp / 'ca-bundle.pem'}}}\n"
            f"upstreams:\n  aiplatform: http://{emulator}/_upstream/{{location}}-aiplatform.googleapis.com\n")
        sidecar = subprocess.Popen(
            pinned(0, [py, "-m", "vertex_sidecar", "--config", str(config), "--log-level", "warning"]),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
            env={**env, "GCE_METADATA_HOST": emulator, "GCE_METADATA_IP": emulator, "MALLOC_ARENA_MAX": "2",
                 "HOME": str(tmp), "CLOUDSDK_CONFIG": str(tmp / "gcloud")})
        procs.append(sidecar)
        assert sidecar.stdout is not None
        listening = json.loads(sidecar.stdout.readline())
        _wait_http(f"http://{listening['admin_listen']}/readyz")
        results["rss_idle_mb"] = round(rss_mb(sidecar.pid), 1)

        token = json.loads(_wait_http(f"http://{emulator}/computeMetadata/v1/instance/service-accounts/default/token",
                                      {"Metadata-Flavor": "Google"}))["access_token"]
        direct_url = f"ws://{emulator}/_upstream/us-central1-aiplatform.googleapis.com{LIVE_PATH}"
        plain_url = f"ws://{listening['listen']}/vertex_ai{LIVE_PATH}"
        tls_url = f"wss://{listening['tls_listen']}/vertex_ai{LIVE_PATH}"
        tls_context = ssl.create_default_context(cafile=listening["ca_bundle"])

        latency: dict[str, Any] = {}
        for name, url, headers, context in (
                ("direct", direct_url, {"Authorization": f"Bearer {token}"}, None),
                ("sidecar", plain_url, None, None),
                ("sidecar_tls", tls_url, None, tls_context)):
            latency[name] = summary(asyncio.run(round_trips(url, args.messages, headers, context)))
        for name in ("sidecar", "sidecar_tls"):
            latency[f"{name}_added_per_message_p50_ms"] = round(
                (latency[name]["p50_ms"] - latency["direct"]["p50_ms"]) / 2, 3)
        results["round_trip"] = {"messages": args.messages, **latency}
        print(json.dumps({"round_trip": results["round_trip"]}, indent=2), flush=True)

        results["audio_session"] = asyncio.run(audio_session(plain_url, args.audio_seconds, sidecar.pid,
                                                             args.sample_every))
        results["rss_after_mb"] = round(rss_mb(sidecar.pid), 1)
    finally:
        stop_processes(procs, timeout_s=15)
        shutil.rmtree(tmp, ignore_errors=True)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "live-latest.json").write_text(json.dumps(results, indent=2) + "\n")
    session = results["audio_session"]
    print(json.dumps({k: v for k, v in session.items() if k != "samples"}, indent=2))
    print(f"sidecar RSS idle {results['rss_idle_mb']} MB; during the {session['seconds']:g} s audio session "
          f"{session['rss_min_mb']}–{session['rss_max_mb']} MB (growth {session['rss_growth_mb']} MB)")
    return 0


def _wait_http(url: str, headers: dict[str, str] | None = None, timeout: float = 20.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as response:
                return response.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
