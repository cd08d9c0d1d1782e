"""Screenshot one dashboard panel's query in Prometheus's own graph page (a manual check).

    .venv/bin/python -m bench.screenshot_dashboard [--panel TITLE] [--seconds 45] [--out PATH]

Starts the combined Google emulator, a real sidecar and a real Prometheus (Debian's
`prometheus`) on free loopback ports, sends varied traffic for a while, then opens
Prometheus's /graph page with the panel's query (dashboard variables expanded) in
headless Chromium (`apt-get install -y chromium`) and saves a PNG. The default output,
bench/results/, is git-ignored. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.emulators.serve import create_combined_app, running_server  # noqa: E402
from tests.harness.sidecar_process import start_sidecar  # noqa: E402
from tests.integration.conftest import adc_env, upstreams_for  # noqa: E402
from tests.integration.test_prometheus import start_prometheus  # noqa: E402

DEFAULT_PANEL = "Tokens / s by model (input + output)"
DASHBOARD = ROOT / "charts" / "vertex-passthrough" / "files" / "dashboards" / "vertex-sidecar-overview.json"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]
MODELS = ["gemini-2.5-flash", "gemini-2.0-flash-001", "gemini-2.5-pro"]


def panel_query(title: str, window: str) -> str:
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel.get("title") == title:
            expr: str = panel["targets"][0]["expr"]
            for variable in ("$namespace", "$route", "$model"):
                expr = expr.replace(variable, ".*")
            return expr.replace("$__rate_interval", window).replace("$__range", window)
    raise SystemExit(f"no panel titled {title!r} in {DASHBOARD.name}")


def traffic(base: str, stop: threading.Event) -> None:
    """Prompts of random length to random models, unary and streamed."""
    words = "the quick brown fox jumps over the lazy dog while the sidecar counts every token".split()
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            model = random.choice(MODELS)
            text = " ".join(random.choices(words, k=random.randint(5, 60)))
            method = random.choice(["generateContent", "streamGenerateContent?alt=sse"])
            client.post(f"{base}/publishers/google/models/{model}:{method}",
                        json={"contents": [{"role": "user", "parts": [{"text": text}]}]})
            stop.wait(random.uniform(0.01, 0.05))


def screenshot(url: str, out: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is needed: apt-get install -y chromium")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1400,900",
                        "--virtual-time-budget=15000", "--hide-scrollbars", f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--panel", default=DEFAULT_PANEL, help="panel title in the overview dashboard")
    parser.add_argument("--seconds", type=float, default=45.0, help="how long to send traffic")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dashboard-panel.png")
    args = parser.parse_args(argv)
    expr = panel_query(args.panel, "10s")
    work = Path(tempfile.mkdtemp(prefix="vertex-screenshot-"))
    with running_server(create_combined_app(project_id="emu-project")) as emulator:
        sidecar = start_sidecar({"upstreams": upstreams_for(emulator),
                                 "defaults": {"project": "emu-project", "location": "us-central1"}},
                                work, env=adc_env(emulator))
        prometheus = start_prometheus(work / "prometheus", sidecar.admin_url.removeprefix("http://"))
        stop = threading.Event()
        sender = threading.Thread(target=traffic, args=(f"{sidecar.base_url}/v1/projects/emu-project/locations/"
                                                        "us-central1", stop), daemon=True)
        try:
            sender.start()
            print(f"sending traffic for {args.seconds:.0f}s; Prometheus at {prometheus.url}", flush=True)
            time.sleep(args.seconds)
            stop.set()
            sender.join(10)
            time.sleep(2)  # one more scrape
            params = {"g0.expr": expr, "g0.tab": "0", "g0.stacked": "0", "g0.show_exemplars": "0",
                      "g0.range_input": f"{max(1, round(args.seconds / 60 + 0.5))}m"}
            url = f"{prometheus.url}/graph?{urlencode(params)}"
            screenshot(url, args.out)
        finally:
            stop.set()
            prometheus.stop()
            sidecar.terminate()
    print(f"panel {args.panel!r}\nquery {expr}\nscreenshot {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
