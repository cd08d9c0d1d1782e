"""Routes and policy through the real sidecar: matching, aliases, limits, fallbacks, keys, reload."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.emulators.serve import ServerHandle
from tests.harness.sidecar_process import SidecarProcess
from vertex_sidecar.callerkeys import hash_key

from .conftest import StartSidecar

PROMPT = {"contents": [{"role": "user", "parts": [{"text": "one two three"}]}]}
BASE = "v1/projects/emu-project/locations/{location}/publishers/google/models/{model}:generateContent"


def call(sidecar: SidecarProcess, model: str = "gemini-2.5-flash", location: str = "us-central1",
         project: str = "emu-project", **kwargs: Any) -> httpx.Response:
    path = BASE.format(location=location, model=model).replace("emu-project", project)
    return httpx.post(f"{sidecar.base_url}/{path}", json=kwargs.pop("json", PROMPT), timeout=30, **kwargs)


def last_vertex_call(emulator: ServerHandle) -> dict:
    return [r for r in emulator.app.state.requests if "/projects/" in r["path"]][-1]


ROUTES = {
    "defaults": {"project": "emu-project", "location": "us-central1"},
    "routes": [
        {"name": "flash", "match": {"projects": ["emu-project"], "locations": ["us-*", "global"],
                                    "models": ["gemini-2.5-flash*", "endpoints/42"]},
         "aliases": {"fast": "gemini-2.5-flash"}, "quota_project": "billing-proj"},
        {"name": "europe", "match": {"projects": ["emu-project"], "locations": ["europe-*"],
                                     "models": ["gemini-*"]},
         "defaults": {"location": "europe-west4"}},
    ],
}


@pytest.fixture
def routed(start: StartSidecar) -> SidecarProcess:
    return start(ROUTES)


def test_first_match_wins_and_unmatched_is_403_naming_the_rules(routed: SidecarProcess,
                                                                 emulator: ServerHandle) -> None:
    assert call(routed).status_code == 200
    assert call(routed, model="gemini-2.5-pro", location="europe-west1").status_code == 200
    denied = call(routed, model="gemini-2.5-pro", location="us-central1")
    assert denied.status_code == 403
    error = denied.json()["error"]
    assert error["status"] == "PERMISSION_DENIED"
    assert "model=gemini-2.5-pro" in error["message"] and "flash:" in error["message"]
    assert "europe:" in error["message"]
    # Never a silent rewrite: a project the routes do not allow is refused, not replaced.
    before = len(emulator.app.state.requests)
    assert call(routed, project="other-project").status_code == 403
    assert len(emulator.app.state.requests) == before


def test_every_path_shape_is_checked_against_the_model_allowlist(routed: SidecarProcess) -> None:
    base = f"{routed.base_url}/v1/projects/emu-project/locations/us-central1"
    assert httpx.post(f"{base}/endpoints/42:predict", json={"instances": [{}]}).status_code != 403
    assert httpx.post(f"{base}/endpoints/43:predict", json={"instances": [{}]}).status_code == 403
    # publisher-less collection form → completed from each route's defaults, then checked
    assert httpx.post(f"{routed.base_url}/models/gemma-3-27b:generateContent", json=PROMPT).status_code == 403
    # ...the europe route completes it with its own default location and allows gemini-*
    assert httpx.post(f"{routed.base_url}/models/gemini-2.5-pro:generateContent", json=PROMPT).status_code == 200
    # operations carry no model: only routes allowing every model may serve them
    assert httpx.get(f"{base}/operations/1").status_code == 403
    # OpenAI-compatible: the model is in the body
    chat = f"{base}/endpoints/openapi/chat/completions"
    ok = httpx.post(chat, json={"model": "google/gemini-2.5-flash", "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200, ok.text
    refused = httpx.post(chat, json={"model": "google/gemini-2.5-pro", "messages": [{"role": "user", "content": "x"}]})
    assert refused.status_code == 403
    bad = httpx.post(chat, content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["status"] == "INVALID_ARGUMENT"


def test_aliases_are_rewritten_in_path_and_openai_body(routed: SidecarProcess, emulator: ServerHandle) -> None:
    assert call(routed, model="fast").status_code == 200
    seen = last_vertex_call(emulator)
    assert seen["path"].endswith("/publishers/google/models/gemini-2.5-flash:generateContent")
    chat = f"{routed.base_url}/v1/projects/emu-project/locations/us-central1/endpoints/openapi/chat/completions"
    response = httpx.post(chat, json={"model": "google/fast", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200, response.text
    assert response.json()["model"].endswith("gemini-2.5-flash")


def test_per_route_defaults_complete_collection_paths(routed: SidecarProcess, emulator: ServerHandle) -> None:
    response = httpx.post(f"{routed.base_url}/publishers/google/models/gemini-2.5-flash:generateContent",
                          json=PROMPT)
    assert response.status_code == 200
    assert last_vertex_call(emulator)["upstream_host"] == "us-central1-aiplatform.googleapis.com"


def test_quota_project_header(routed: SidecarProcess, emulator: ServerHandle) -> None:
    assert call(routed, headers={"x-goog-user-project": "callers-choice"}).status_code == 200
    assert last_vertex_call(emulator)["headers"]["x-goog-user-project"] == "billing-proj"


def test_requests_per_minute_limit(start: StartSidecar) -> None:
    sidecar = start({"routes": [{"name": "tight", "limits": {"requests_per_minute": 3}}]})
    assert [call(sidecar).status_code for _ in range(3)] == [200, 200, 200]
    refused = call(sidecar)
    assert refused.status_code == 429
    assert refused.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert 1 <= int(refused.headers["retry-after"]) <= 60


def test_tokens_per_minute_limit_counts_response_usage(start: StartSidecar) -> None:
    sidecar = start({"routes": [{"name": "tokens", "limits": {"tokens_per_minute": 40}}]})
    statuses = [call(sidecar).status_code for _ in range(6)]
    assert statuses[0] == 200 and 429 in statuses, statuses
    assert wait_until(lambda: any(e["status"] == 429 for e in sidecar.access_log()))
    refused = next(e for e in sidecar.access_log() if e["status"] == 429)
    assert refused["error"] == "ROUTE_RATE_LIMITED"


def test_body_limit_per_route(start: StartSidecar) -> None:
    sidecar = start({"routes": [{"name": "small", "limits": {"max_body_bytes": 200}}]})
    big = {"contents": [{"role": "user", "parts": [{"text": "x" * 500}]}]}
    assert call(sidecar, json=big).status_code == 413
    assert call(sidecar).status_code == 200


def test_fallback_location_on_429(start: StartSidecar, emulator: ServerHandle) -> None:
    emulator.app.state.vertex_app.state.fail_locations = {"us-central1": 429}
    sidecar = start({"routes": [{"name": "fallback", "fallback_locations": ["us-east4", "europe-west4"]}]})
    response = call(sidecar)
    assert response.status_code == 200, response.text
    hosts = [r["upstream_host"] for r in emulator.app.state.requests if "/projects/" in r["path"]][-2:]
    assert hosts == ["us-central1-aiplatform.googleapis.com", "us-east4-aiplatform.googleapis.com"]
    entry = wait_for_entry(sidecar)
    assert entry["location"] == "us-central1" and entry["answered_location"] == "us-east4"
    metrics = httpx.get(f"{sidecar.admin_url}/metrics").text
    assert ('vertex_sidecar_upstream_retries_total{location="us-east4",reason="fallback",route="fallback"} 1.0'
            in metrics.replace(", ", ","))
    # A large streamed body is not kept, so it is not replayed: the 429 reaches the caller.
    huge = {"contents": [{"role": "user", "parts": [{"text": "y " * 400_000}]}]}
    assert call(sidecar, json=huge).status_code == 429


def test_fallback_must_be_allowed_by_the_route(tmp_path: Path) -> None:
    from vertex_sidecar.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="not allowed by match.locations"):
        parse_config({"routes": [{"match": {"locations": ["us-*"]}, "fallback_locations": ["europe-west4"]}]})


def test_caller_keys(tmp_path: Path, start: StartSidecar, emulator: ServerHandle) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# accepted callers\nbilling-job: {hash_key('s3cret-key')}\n")
    sidecar = start({"caller_keys": {"file": str(keys), "header": "x-team-key"}})
    missing = call(sidecar)
    assert missing.status_code == 401 and missing.json()["error"]["status"] == "UNAUTHENTICATED"
    assert call(sidecar, headers={"x-team-key": "wrong"}).status_code == 401
    assert call(sidecar, headers={"x-team-key": "s3cret-key"}).status_code == 200
    assert "x-team-key" not in last_vertex_call(emulator)["headers"]
    assert "s3cret-key" not in keys.read_text()


def k8s_style_update(directory: Path, config: dict[str, Any]) -> None:
    """Update a mounted-ConfigMap-like directory the way the kubelet does: a new timestamped
    dir, then an atomic swap of the `..data` symlink."""
    stamp = directory / f"..{time.time_ns()}"
    stamp.mkdir()
    (stamp / "config.yaml").write_text(yaml.safe_dump(config))
    tmp_link = directory / "..data_tmp"
    tmp_link.symlink_to(stamp.name)
    os.replace(tmp_link, directory / "..data")


def test_hot_reload_through_a_configmap_symlink_swap(tmp_path: Path, start: StartSidecar) -> None:
    mount = tmp_path / "configmap"
    mount.mkdir()
    # A poll interval far beyond the test's waits: the reloads below come from inotify events,
    # through both symlink hops (the sidecar's file -> the mount's file -> `..data`).
    flash_only = {"reload_interval_seconds": 600, "routes": [{"name": "r", "match": {"models": ["gemini-2.5-flash"]}}]}
    sidecar = start(flash_only)
    k8s_style_update(mount, {**flash_only, "upstreams": yaml.safe_load(sidecar.config_path.read_text())["upstreams"],
                             "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"})
    (mount / "config.yaml").symlink_to("..data/config.yaml")
    # Point the running sidecar's own config file at the mount, as in a pod.
    os.replace(sidecar.config_path, tmp_path / "original.yaml")
    sidecar.config_path.symlink_to(mount / "config.yaml")
    base = yaml.safe_load((mount / "config.yaml").read_text())
    assert call(sidecar, model="gemini-2.5-pro").status_code == 403

    # A slow stream started under the old config finishes under it.
    streamed: list[int] = []

    def slow_stream() -> None:
        url = (f"{sidecar.base_url}/v1/projects/emu-project/locations/us-central1/publishers/google/models/"
               "gemini-2.5-flash:streamGenerateContent?alt=sse")
        with httpx.stream("POST", url, json={"contents": [{"role": "user", "parts": [{"text": "a b c d"}]}]},
                          headers={"x-emulator-chunk-delay": "0.4", "x-emulator-chunks": "4"}, timeout=30) as r:
            streamed.append(r.status_code)
            streamed.append(len(r.read()))

    thread = threading.Thread(target=slow_stream)
    thread.start()
    time.sleep(0.2)
    k8s_style_update(mount, {**base, "routes": [{"name": "r", "match": {"models": ["gemini-2.5-pro"]}}]})
    assert wait_until(lambda: call(sidecar, model="gemini-2.5-pro").status_code == 200)
    assert call(sidecar, model="gemini-2.5-flash").status_code == 403
    thread.join(20)
    assert streamed and streamed[0] == 200 and streamed[1] > 0

    # An invalid file is refused with one log line; the running config stays.
    k8s_style_update(mount, {**base, "routes": [{"name": "r", "limits": {"requests_per_minute": "many"}}]})
    assert wait_until(lambda: any("refused the new config" in line for line in sidecar.stderr_lines))
    assert call(sidecar, model="gemini-2.5-pro").status_code == 200
    refused = [line for line in sidecar.stderr_lines if "refused the new config" in line]
    assert len(refused) == 1 and "requests_per_minute" in refused[0]


def wait_until(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def wait_for_entry(sidecar: SidecarProcess) -> dict:
    assert wait_until(lambda: bool(sidecar.access_log()), 5)
    return sidecar.access_log()[-1]
