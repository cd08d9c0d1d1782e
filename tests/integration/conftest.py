"""Fixtures: the combined Google emulator on loopback and the real sidecar process."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.emulators.serve import ServerHandle, create_combined_app, running_server
from tests.harness.sidecar_process import SidecarProcess, start_sidecar

StartSidecar = Callable[..., SidecarProcess]


@pytest.fixture
def emulator() -> Iterator[ServerHandle]:
    """Metadata server + OAuth token endpoint + Vertex AI REST, one port, shared token registry."""
    with running_server(create_combined_app(project_id="emu-project")) as handle:
        yield handle


def upstreams_for(emulator: ServerHandle) -> dict[str, str]:
    """Every Google host → the emulator, keeping the chosen host visible in its request log."""
    base = f"{emulator.url}/_upstream"
    return {
        "aiplatform": f"{base}/{{location}}-aiplatform.googleapis.com",
        "aiplatform_global": f"{base}/aiplatform.googleapis.com",
        "aiplatform_multiregion": f"{base}/aiplatform.{{location}}.rep.googleapis.com",
        "discovery": f"{base}/discoveryengine.googleapis.com",
        "discovery_multiregion": f"{base}/{{location}}-discoveryengine.googleapis.com",
    }


def adc_env(emulator: ServerHandle) -> dict[str, str]:
    """Point google-auth's ADC at the emulator's metadata server, as on GKE."""
    host = f"127.0.0.1:{emulator.port}"
    return {"GCE_METADATA_HOST": host, "GCE_METADATA_IP": host}


@pytest.fixture
def start(tmp_path: Path, emulator: ServerHandle) -> Iterator[StartSidecar]:
    """Start sidecars wired to the emulator (ADC through its metadata server); all stopped at the end."""
    started: list[SidecarProcess] = []

    def _start(config: dict[str, Any] | None = None, *, env: dict[str, str] | None = None,
               wait_ready: bool = True) -> SidecarProcess:
        merged: dict[str, Any] = {"upstreams": upstreams_for(emulator)}
        merged.update(config or {})
        sidecar = start_sidecar(merged, tmp_path, env={**adc_env(emulator), **(env or {})},
                                wait_ready=wait_ready, name=f"sidecar-{len(started)}.yaml")
        started.append(sidecar)
        return sidecar

    yield _start
    for sidecar in started:
        sidecar.terminate()


@pytest.fixture
def sidecar(start: StartSidecar) -> SidecarProcess:
    """A sidecar with the built-in allow-all policy and project/location defaults."""
    return start({"defaults": {"project": "emu-project", "location": "us-central1"}})
