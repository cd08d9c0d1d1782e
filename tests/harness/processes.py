"""Watching and handling child processes: RSS from /proc, orderly stops.

Shared by the tests that bound the sidecar's memory and by the benchmarks in bench/.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Iterable


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise LookupError(f"no VmRSS for process {pid}")


class PeakRss:
    """The highest RSS of a process while a `with` block runs (sampled every `interval_s`)."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        self.pid = pid
        self.peak = 0.0
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(self._interval)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def stop_processes(procs: Iterable[subprocess.Popen[str]], timeout_s: float = 10.0) -> None:
    """SIGTERM each (last started first), then SIGKILL what does not exit in time."""
    for proc in reversed(list(procs)):
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
