"""google-cloud-aiplatform's `vertexai.generative_models` (deprecated in favour of google-genai,
still shipped by 2.7.0) on its REST transport, through the sidecar's forward proxy.

The client runs as an app would, in a process of its own on the python of
.tools/aiplatform-venv (scripts/get-aiplatform-client.sh; tests/aiplatform pins it): not in
the project's venv, where the package's `*-nspkg.pth` would put a `google` module into every
interpreter, the metadata-mode sidecar's included (tests/unit/test_metadata_token.py). The environment is the webhook's
(`test_node_sdk.proxy_env`: HTTPS_PROXY, NO_PROXY, the CA bundle variables) and the app's own
ADC from its own metadata server; its token must never reach the upstream, the sidecar's must.

Locally the tests skip when `scripts/get-aiplatform-client.sh` has not run; under CI they fail.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.emulators.serve import ServerHandle
from tests.harness.sidecar_process import SidecarProcess

# The Python proxy tests' emulator and sidecars, the Node tests' app environment and app identity.
from .test_forward_proxy import (LOCATION, PROJECT, emulator, new_log_lines, shared, start,  # noqa: F401
                                 upstream_requests)
from .test_node_sdk import (app_metadata, assert_never_upstream, assert_sidecar_token, base_env,  # noqa: F401
                            flash_only_env, proxy_env)

ROOT = Path(__file__).resolve().parents[2]
VENV_PYTHON = ROOT / ".tools" / "aiplatform-venv" / "bin" / "python"
SCRIPT = ROOT / "tests" / "aiplatform" / "generative_models_call.py"
GENERATE = f"/projects/{PROJECT}/locations/{LOCATION}/publishers/google/models/gemini-2.5-flash:"


@pytest.fixture(scope="module")
def python() -> str:
    if not VENV_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail("the aiplatform client is missing in CI: .ci/run must run scripts/get-aiplatform-client.sh")
        pytest.skip("the aiplatform client is not installed (bash scripts/get-aiplatform-client.sh)")
    version = subprocess.run([str(VENV_PYTHON), "-c", "import importlib.metadata as m, vertexai.generative_models; "
                              "print(m.version('google-cloud-aiplatform'))"],
                             capture_output=True, text=True, timeout=60)
    assert version.returncode == 0, version.stderr  # a venv without the package (or without the module)
    assert tuple(int(part) for part in version.stdout.strip().split(".")[:2]) >= (2, 7), version.stdout
    return str(VENV_PYTHON)


def vertexai_call(python: str, env: dict[str, str], **request: Any) -> dict[str, Any]:
    request = {"project": PROJECT, "location": LOCATION, "model": "gemini-2.5-flash", **request}
    result = subprocess.run([python, str(SCRIPT), json.dumps(request)], capture_output=True, text=True, env=env,
                            cwd=env["HOME"], timeout=90)
    assert result.returncode == 0 and result.stdout.strip(), (result.returncode, result.stdout, result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_vertexai_generative_models_rest_through_the_proxy(python: str, shared: SidecarProcess,
                                                           emulator: ServerHandle, app_metadata: ServerHandle,
                                                           tmp_path: Path) -> None:
    env = proxy_env(shared, app_metadata, tmp_path)
    before_log, before_upstream = len(shared.access_log()), len(upstream_requests(emulator))

    answer = vertexai_call(python, env, prompt="vertexai via proxy")
    assert answer["ok"] and "vertexai via proxy" in answer["text"], answer
    entry = upstream_requests(emulator)[-1]
    assert entry["upstream_host"] == "us-central1-aiplatform.googleapis.com"
    assert entry["path"].endswith(GENERATE + "generateContent"), entry["path"]
    assert_sidecar_token(entry, app_metadata)

    streamed = vertexai_call(python, env, prompt="vertexai streamed", stream=True)
    assert streamed["ok"] and "vertexai streamed" in streamed["text"], streamed
    assert len(streamed["chunks"]) > 1
    entry = upstream_requests(emulator)[-1]
    assert entry["path"].endswith(GENERATE + "streamGenerateContent"), entry["path"]
    assert "alt=sse" not in entry["query"]  # the REST transport streams a JSON array, relayed as it comes
    assert_sidecar_token(entry, app_metadata)
    assert len(upstream_requests(emulator)) == before_upstream + 2

    log = new_log_lines(shared, before_log, 2)
    assert [e["status"] for e in log] == [200, 200]
    assert all(e["via_proxy"] == "us-central1-aiplatform.googleapis.com" and e["model"] == "gemini-2.5-flash"
               for e in log)


def test_vertexai_refused_model_is_the_sidecars_403(python: str, start: Callable[..., SidecarProcess],
                                                    emulator: ServerHandle, app_metadata: ServerHandle,
                                                    tmp_path: Path) -> None:
    env = flash_only_env(start, app_metadata, tmp_path)
    refused = vertexai_call(python, env, model="gemini-2.5-pro", prompt="not allowed")
    # google.api_core's exception for an HTTP 403 (the REST transport maps the status itself).
    assert not refused["ok"] and refused["error"]["code"] == 403, refused
    assert refused["error"]["name"] == "Forbidden" and "gemini-2.5-pro" in refused["error"]["message"], refused
    assert_never_upstream(emulator, "gemini-2.5-pro")
    assert vertexai_call(python, env, prompt="allowed")["ok"]


def test_vertexai_in_base_url_mode(python: str, shared: SidecarProcess, emulator: ServerHandle,
                                   app_metadata: ServerHandle, tmp_path: Path) -> None:
    """`vertexai.init(api_endpoint="http://127.0.0.1:4000/vertex_ai")`, no proxy: the REST
    transport keeps the endpoint's scheme and path prefix and appends Google's own paths."""
    env = base_env(app_metadata, tmp_path)
    before = len(shared.access_log())
    for stream, action in ((False, "generateContent"), (True, "streamGenerateContent")):
        answer = vertexai_call(python, env, prompt="vertexai via base url", stream=stream, api_endpoint=shared.base_url)
        assert answer["ok"] and "vertexai via base url" in answer["text"], answer
        entry = upstream_requests(emulator)[-1]
        assert entry["path"].endswith(GENERATE + action), entry["path"]
        assert_sidecar_token(entry, app_metadata)
    log = new_log_lines(shared, before, 2)
    assert [e["status"] for e in log] == [200, 200] and not any(e.get("via_proxy") for e in log)
