"""What the sidecar decides on is what Google is sent: escaped dot segments, escaped names, duplicate
JSON keys, Live aliases and query parameters — through a real sidecar against the emulators."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Callable, Iterator

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from tests.emulators.live import LiveKnobs, create_live_app
from tests.emulators.serve import ServerHandle, create_combined_app, running_server
from tests.harness.sidecar_process import SidecarProcess

from .conftest import StartSidecar

PROMPT = {"contents": [{"role": "user", "parts": [{"text": "one two three"}]}]}
LIVE_MODEL = "gemini-live-2.5-flash"
OK = "v1/projects/p1/locations/us-central1/publishers/google/models/gemini-ok"
BAD = "projects/p2/locations/us-central1/publishers/google/models/gemini-bad:generateContent"
ONLY_P1_OK = {"routes": [{"name": "ok-only", "match": {"projects": ["p1"], "models": ["gemini-ok"]}}]}


@pytest.fixture
def emulator() -> Iterator[ServerHandle]:
    """Vertex REST, metadata, OAuth and the Live endpoint on one port."""
    with running_server(create_live_app(fallback=create_combined_app(project_id="emu-project"))) as handle:
        yield handle


def upstream_calls(emulator: ServerHandle) -> list[dict[str, Any]]:
    return [r for r in emulator.app.state.requests if "/projects/" in r["path"] or "/publishers/" in r["path"]]


def assert_invalid_path(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["status"] == "INVALID_ARGUMENT" and error["details"][0]["reason"] == "INVALID_PATH"
    return error


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out")


@pytest.mark.parametrize("climb", ["%2e%2e", "%2E%2E", ".%2e", "%2e.", "%252e%252e", "%252E%2e"])
def test_escaped_dot_segments_never_reach_google(start: StartSidecar, emulator: ServerHandle, climb: str) -> None:
    sidecar = start(ONLY_P1_OK)
    assert httpx.post(f"{sidecar.base_url}/{OK}:generateContent", json=PROMPT).status_code == 200  # the route works
    before = len(emulator.app.state.requests)
    # Issue 15's request: matched as written it is p1/gemini-ok, normalised it is p2/gemini-bad.
    climbing = f"{sidecar.base_url}/{OK}/" + f"{climb}/" * 6 + BAD
    error = assert_invalid_path(httpx.post(climbing, json=PROMPT))
    assert "dot or empty segment" in error["message"]
    # Discovery Engine paths get the same check.
    discovery = (f"{sidecar.base_url}/discovery/v1/projects/p1/locations/global/collections/c/engines/e/"
                 f"{climb}/{climb}/engines/other/servingConfigs/default_search:search")
    assert_invalid_path(httpx.post(discovery, json={"query": "x"}))
    assert len(emulator.app.state.requests) == before, "nothing was sent upstream"


@pytest.mark.parametrize("segment", ["gemini-ok%2F..%2F..", "gemini-ok%5C..", "gemini-ok%252F.."])
def test_escaped_slashes_and_backslashes_never_reach_google(start: StartSidecar, emulator: ServerHandle,
                                                            segment: str) -> None:
    sidecar = start(ONLY_P1_OK)
    before = len(emulator.app.state.requests)
    path = OK.replace("gemini-ok", segment)
    assert_invalid_path(httpx.post(f"{sidecar.base_url}/{path}:generateContent", json=PROMPT))
    assert len(emulator.app.state.requests) == before


def test_escaped_model_names_are_matched_limited_priced_and_forwarded_decoded(
        start: StartSidecar, emulator: ServerHandle) -> None:
    sidecar = start({"routes": [
        {"name": "pro", "match": {"projects": ["emu-project"], "models": ["gemini-2.5-pro"]},
         "limits": {"requests_per_minute": 1}},
        {"name": "flash", "match": {"projects": ["emu-project"], "models": ["gemini-2.5-flash"]}},
    ]})
    url = f"{sidecar.base_url}/v1/projects/emu-project/locations/us-central1/publishers/google/models/{{}}:generateContent"
    assert httpx.post(url.format("gemini-2.5-pr%6F"), json=PROMPT).status_code == 200
    seen = upstream_calls(emulator)[-1]
    assert seen["path"].endswith("/models/gemini-2.5-pro:generateContent")
    entry = wait_until(lambda: next((e for e in sidecar.access_log() if e.get("route") == "pro"), None))
    assert entry["model"] == "gemini-2.5-pro" and entry["cost_usd"] > 0 and entry.get("pricing") != "unknown"
    # The escaped spelling counts against the plain one's limit: it is the same model.
    limited = httpx.post(url.format("gemini-2.5-pro"), json=PROMPT)
    assert limited.status_code == 429 and limited.json()["error"]["details"][0]["reason"] == "ROUTE_RATE_LIMITED"
    assert httpx.post(url.format("g%65mini-2.5-pro"), json=PROMPT).status_code == 429
    # An escape of a reserved character is no model name at all: refused, not guessed at.
    before = len(emulator.app.state.requests)
    assert_invalid_path(httpx.post(url.format("gemini-2.5-pro%3Agenerate"), json=PROMPT))
    assert_invalid_path(httpx.post(url.format("gemini%2B2.5-flash"), json=PROMPT))
    assert len(emulator.app.state.requests) == before


# ------------------------------------------------------------------------------------ Live


def live_url(sidecar: SidecarProcess, query: str = "") -> str:
    return sidecar.url.replace("http://", "ws://", 1) + "/vertex_ai/live" + (f"?{query}" if query else "")


async def closed_with(ws: Any) -> tuple[int | None, str]:
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    return ws.close_code, ws.close_reason or ""


def live_knobs(emulator: ServerHandle) -> LiveKnobs:
    return emulator.app.state.live


@pytest.mark.parametrize("model", [
    f"projects/p1/locations/us-central1/publishers/google/models/gemini-ok/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/"
    f"projects/p2/locations/us-central1/publishers/google/models/gemini-bad",
    "projects/p1/locations/us-central1/publishers/google/models/%2e%2e",
    "projects/p1/locations/us-central1/publishers/google/models/.%2E",
    "projects/p1/locations/us-central1/publishers/google/models/%252e%252e",
    "projects/p1/locations/us-central1/publishers/google/models/gemini-ok%2F..",
    "publishers/google/models/gemini-liv%65-2.5-flash",  # escapes are not decoded in a JSON name: refused
])
async def test_live_setup_model_with_escapes_is_refused(start: StartSidecar, emulator: ServerHandle,
                                                        model: str) -> None:
    sidecar = start({"defaults": {"project": "emu-project", "location": "us-central1"},
                     "routes": [{"name": "ok", "match": {"projects": ["p1", "emu-project"], "models": ["gemini-ok", LIVE_MODEL]}}]})
    async with websockets.connect(live_url(sidecar)) as ws:
        await ws.send(json.dumps({"setup": {"model": model}}))
        code, reason = await closed_with(ws)
    assert code == 1007 and ("refused" in reason or "not a valid model name" in reason), reason
    assert not live_knobs(emulator).sessions, "a refused setup never reaches Google"


# ------------------------------------------------------------------------ duplicate keys


def test_openai_body_with_a_duplicate_model_is_refused(start: StartSidecar, emulator: ServerHandle) -> None:
    sidecar = start({"routes": [{"name": "flash", "match": {"projects": ["emu-project"],
                                                            "models": ["gemini-2.5-flash"]}}]})
    chat = f"{sidecar.base_url}/v1/projects/emu-project/locations/us-central1/endpoints/openapi/chat/completions"
    messages = '"messages": [{"role": "user", "content": "hi"}]'
    plain = '{"model": "google/gemini-2.5-flash", ' + messages + "}"
    assert httpx.post(chat, content=plain, headers={"content-type": "application/json"}).status_code == 200
    before = len(emulator.app.state.requests)
    for body in ('{"model": "google/gemini-2.5-pro", ' + messages + ', "model": "google/gemini-2.5-flash"}',
                 '{"model": "google/gemini-2.5-flash", ' + messages.replace('"hi"}', '"hi", "role": "system"}')
                 + "}"):
        response = httpx.post(chat, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["status"] == "INVALID_ARGUMENT" and "appears twice" in error["message"]
    assert len(emulator.app.state.requests) == before


async def test_live_setup_with_a_duplicate_model_is_refused(start: StartSidecar, emulator: ServerHandle) -> None:
    sidecar = start({"defaults": {"project": "emu-project", "location": "us-central1"},
                     "routes": [{"name": "live", "match": {"models": ["gemini-live-*"]}}]})
    setup = '{"setup": {"model": "gemini-live-2.5-flash", "model": "gemini-2.5-pro"}}'
    async with websockets.connect(live_url(sidecar)) as ws:
        await ws.send(setup)
        code, reason = await closed_with(ws)
    assert code == 1007 and "'model' appears twice" in reason, reason
    assert not live_knobs(emulator).sessions


# ------------------------------------------------------------------ Live aliases and query


async def test_live_aliases_apply_to_full_names_and_bad_query_parameters_are_refused(
        start: StartSidecar, emulator: ServerHandle) -> None:
    sidecar = start({"defaults": {"project": "emu-project", "location": "us-central1"},
                     "routes": [{"name": "live", "match": {"models": ["gemini-live-*"]},
                                 "aliases": {"fast": LIVE_MODEL}}]})
    full_alias = "projects/emu-project/locations/europe-west4/publishers/google/models/fast"
    async with websockets.connect(live_url(sidecar)) as ws:
        await ws.send(json.dumps({"setup": {"model": full_alias}}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10)) == {"setupComplete": {}}
    record = live_knobs(emulator).sessions[-1]
    assert record.setup is not None and record.setup["setup"]["model"] == (
        f"projects/emu-project/locations/europe-west4/publishers/google/models/{LIVE_MODEL}")
    assert record.upstream_host == "europe-west4-aiplatform.googleapis.com"

    full = f"projects/emu-project/locations/us-central1/publishers/google/models/{LIVE_MODEL}"
    for query, words in [("vertex_location=evil.example.com", "vertex_location"),
                         ("vertex_location=us-central1%2F..%2F", "vertex_location"),
                         ("vertex_project=a%2Fb", "vertex_project")]:
        async with websockets.connect(live_url(sidecar, query)) as ws:
            await ws.send(json.dumps({"setup": {"model": full}}))
            code, reason = await closed_with(ws)
        assert code == 1007 and words in reason, reason
    assert len(live_knobs(emulator).sessions) == 1


# ------------------------------------------------------------------- GetPublisherModel


def test_publisher_model_get_is_forwarded_unscoped_with_the_route_policy(
        start: StartSidecar, emulator: ServerHandle) -> None:
    from google import genai
    from google.genai import errors, types
    from google.oauth2.credentials import Credentials

    sidecar = start({"defaults": {"project": "emu-project", "location": "us-central1"},
                     "routes": [{"name": "flash", "match": {"projects": ["emu-project"], "models": ["gemini-2.5-flash*"]},
                                 "defaults": {"location": "europe-west4"}}]})
    client = genai.Client(vertexai=True, project="emu-project", location="us-central1",
                          credentials=Credentials(token="placeholder-app-token"),
                          http_options=types.HttpOptions(base_url=sidecar.base_url))
    model = client.models.get(model="gemini-2.5-flash")  # GET v1beta1/publishers/google/models/M
    assert model.name == "publishers/google/models/gemini-2.5-flash" and model.version == "default"
    seen = upstream_calls(emulator)[-1]
    assert (seen["method"], seen["path"]) == ("GET", "/v1beta1/publishers/google/models/gemini-2.5-flash")
    assert seen["upstream_host"] == "europe-west4-aiplatform.googleapis.com"  # the route's default location
    assert seen["headers"]["authorization"].startswith("Bearer ya29.")

    # v1, as the Vertex SDK's from_pretrained calls it, with a version suffix.
    raw = httpx.get(f"{sidecar.base_url}/v1/publishers/google/models/gemini-2.5-flash@001")
    assert raw.status_code == 200 and raw.json()["versionId"] == "001"
    assert upstream_calls(emulator)[-1]["path"] == "/v1/publishers/google/models/gemini-2.5-flash@001"

    # The routes still apply to the model name, and to the listing (which names no model).
    before = len(emulator.app.state.requests)
    with pytest.raises(errors.ClientError) as info:
        client.models.get(model="gemini-2.5-pro")
    assert info.value.code == 403
    assert httpx.get(f"{sidecar.base_url}/v1beta1/publishers/google/models").status_code == 403
    assert httpx.get(f"{sidecar.base_url}/v1/publishers/google/models/gemini-2.5-fl%61sh").status_code == 200
    assert len(emulator.app.state.requests) == before + 1


def test_publisher_model_listing_with_an_allow_all_route(sidecar: SidecarProcess, emulator: ServerHandle) -> None:
    listing = httpx.get(f"{sidecar.base_url}/v1beta1/publishers/google/models")
    assert listing.status_code == 200, listing.text
    names = [m["name"] for m in listing.json()["publisherModels"]]
    assert "publishers/google/models/gemini-2.5-flash" in names
    embedding = httpx.get(f"{sidecar.base_url}/v1/publishers/google/models/text-embedding-005").json()
    assert embedding["predictSchemata"]["instanceSchemaUri"].endswith("/text_embedding_1.0.0.yaml")
    assert upstream_calls(emulator)[-1]["upstream_host"] == "us-central1-aiplatform.googleapis.com"


def test_an_escaped_openai_compatible_path_still_has_its_body_model_checked(
        start: StartSidecar, emulator: ServerHandle) -> None:
    sidecar = start({"routes": [{"name": "flash", "match": {"projects": ["emu-project"],
                                                            "models": ["gemini-2.5-flash"]}}]})
    chat = f"{sidecar.base_url}/v1/projects/emu-project/locations/us-central1/endpoints/open%61pi/chat/completions"
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(chat, json={"model": "google/gemini-2.5-pro", **body}).status_code == 403
    ok = httpx.post(chat, json={"model": "google/gemini-2.5-flash", **body})
    assert ok.status_code == 200, ok.text
    assert upstream_calls(emulator)[-1]["path"].endswith("/endpoints/openapi/chat/completions")
