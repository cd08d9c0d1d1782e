"""Run the real `vertex-sidecar` as a subprocess on free loopback ports.

The sidecar runs in its own process because google-auth reads `GCE_METADATA_HOST` at
import time, and because that is how it runs in a pod: its own process, its own loop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx
import yaml


# Everything any sidecar of this test session printed or served on its admin port, for
# the audit that no token or key material ever shows up (tests/integration/test_zz_secrets_audit.py).
SESSION_OUTPUT: list[tuple[str, str]] = []


@dataclass
class SidecarProcess:
    proc: subprocess.Popen[str]
    url: str  # http://127.0.0.1:PORT
    admin_url: str
    config_path: Path
    stdout_lines: list[str] = field(default_factory=list)
    stderr_lines: list[str] = field(default_factory=list)
    listening: dict[str, Any] = field(default_factory=dict)  # the first stdout line: bound addresses

    @property
    def base_url(self) -> str:
        """What an app puts in GOOGLE_VERTEX_BASE_URL."""
        return f"{self.url}/vertex_ai"

    def access_log(self) -> list[dict[str, Any]]:
        entries = []
        for line in list(self.stdout_lines):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if "request_id" in entry:
                entries.append(entry)
        return entries

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited with {self.proc.returncode}:\n" + "\n".join(self.stderr_lines))
            try:
                last = httpx.get(f"{self.admin_url}/readyz", timeout=2)
                if last.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"sidecar not ready: {last.text if last is not None else 'no answer'}")

    def collect_for_audit(self) -> None:
        if self.proc.poll() is None:
            for path in ("/metrics", "/readyz"):
                try:
                    SESSION_OUTPUT.append((f"{self.admin_url}{path}", httpx.get(self.admin_url + path, timeout=5).text))
                except httpx.HTTPError:
                    pass

    def terminate(self, timeout: float = 30.0) -> int:
        self.collect_for_audit()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        time.sleep(0.05)  # let the pump threads read the last lines
        SESSION_OUTPUT.append((f"sidecar {self.config_path.name} stdout", "\n".join(self.stdout_lines)))
        SESSION_OUTPUT.append((f"sidecar {self.config_path.name} stderr", "\n".join(self.stderr_lines)))
        return self.proc.returncode


def _pump(stream: Any, sink: list[str]) -> None:
    for line in stream:
        sink.append(line.rstrip("\n"))


def start_sidecar(config: dict[str, Any], tmp_path: Path, *, env: dict[str, str] | None = None,
                  wait_ready: bool = True, name: str = "sidecar.yaml") -> SidecarProcess:
    config = {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", **config}
    config_path = tmp_path / name
    config_path.write_text(yaml.safe_dump(config))
    proc_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("GOOGLE_", "GCE_METADATA")) and k != "CLOUDSDK_CONFIG"}
    # No stray gcloud credentials of the machine: ADC must come from what the test sets.
    proc_env["CLOUDSDK_CONFIG"] = str(tmp_path / "gcloud")
    proc_env["HOME"] = str(tmp_path)
    proc_env.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "vertex_sidecar", "--config", str(config_path), "--log-level", "info"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=proc_env,
    )
    stdout: list[str] = []
    stderr: list[str] = []
    assert proc.stdout is not None and proc.stderr is not None
    threading.Thread(target=_pump, args=(proc.stderr, stderr), daemon=True).start()
    # The first stdout line announces the bound ports.
    first = proc.stdout.readline()
    if not first:
        proc.wait(10)
        time.sleep(0.1)
        raise RuntimeError(f"sidecar did not start (exit {proc.returncode}):\n" + "\n".join(stderr))
    listening = json.loads(first)
    threading.Thread(target=_pump, args=(proc.stdout, stdout), daemon=True).start()
    sidecar = SidecarProcess(proc, f"http://{listening['listen']}", f"http://{listening['admin_listen']}",
                             config_path, stdout, stderr, listening)
    if wait_ready:
        sidecar.wait_ready()
    return sidecar


def stop_all(sidecars: Iterator[SidecarProcess]) -> None:
    for sidecar in sidecars:
        sidecar.terminate()
