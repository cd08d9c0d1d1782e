"""CPU pinning for the benchmarks: the sidecar gets one core to itself."""

from __future__ import annotations

import os
import shutil


def pinned(core: int, argv: list[str]) -> list[str]:
    """`argv` run on one CPU core, when the machine has more than one and taskset exists."""
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", str(core), *argv]
    return argv
