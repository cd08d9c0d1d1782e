"""Where the sidecar's listeners bind: the admin port on loopback, or on the pod IP given by
the webhook's VERTEX_SIDECAR_ADMIN_HOST (downward API status.podIP), never on every interface."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.harness.sidecar_process import start_sidecar
from vertex_sidecar.cli import admin_listen_from_env
from vertex_sidecar.config import ConfigError, ListenAddress, load_config

pytestmark = pytest.mark.timeout(60)


def test_the_admin_port_defaults_to_loopback() -> None:
    assert load_config(None).admin_listen == ListenAddress("127.0.0.1", 9464)


def test_admin_host_from_the_environment_replaces_the_host_and_keeps_the_port() -> None:
    configured = ListenAddress("127.0.0.1", 9464)
    assert admin_listen_from_env(configured, {}) == configured
    assert admin_listen_from_env(configured, {"VERTEX_SIDECAR_ADMIN_HOST": "10.4.2.7"}) == ListenAddress("10.4.2.7", 9464)
    assert str(admin_listen_from_env(configured, {"VERTEX_SIDECAR_ADMIN_HOST": "fd00::7"})) == "[fd00::7]:9464"
    with pytest.raises(ConfigError, match="not an IP address"):
        admin_listen_from_env(configured, {"VERTEX_SIDECAR_ADMIN_HOST": "0.0.0.0.example"})


def test_a_sidecar_given_a_pod_ip_serves_admin_there_only(tmp_path: Path) -> None:
    # 127.0.0.2 stands in for the pod IP: a loopback address that is not 127.0.0.1.
    sidecar = start_sidecar({"credentials": {"default": {"type": "client"}}}, tmp_path,
                            env={"VERTEX_SIDECAR_ADMIN_HOST": "127.0.0.2"})
    try:
        host, port = sidecar.listening["admin_listen"].rsplit(":", 1)
        assert host == "127.0.0.2"
        assert httpx.get(f"http://127.0.0.2:{port}/healthz").status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/healthz")
    finally:
        sidecar.terminate()
