"""Container lifecycle hooks for the sidecar as a regular container (clusters below 1.29).

Without native sidecars the kubelet starts a pod's containers in order and waits for each
one's `postStart` hook before starting the next. The operator puts the sidecar first with
`postStart: vertex-sidecar --wait-ready URL`, so the app containers start only once the
sidecar answers `/readyz` (it holds a Google token). On termination every container gets
SIGTERM at once after its `preStop`; `--linger SECONDS` as the sidecar's `preStop` keeps it
serving while the app finishes its last calls.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request


def wait_ready(url: str, timeout: float, interval: float = 0.2) -> int:
    """Poll `url` until it answers 200; 0 then, 1 after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback URL from the pod spec
                if response.status == 200:
                    return 0
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            print(f"vertex-sidecar: {url} not ready after {timeout:.0f} s")
            return 1
        time.sleep(interval)


def linger(seconds: float) -> int:
    time.sleep(max(0.0, seconds))
    return 0
