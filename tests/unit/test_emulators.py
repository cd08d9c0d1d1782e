"""The emulators are faithful as the real clients see them: google-auth, google-genai, raw HTTP."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import google.auth
import google.auth.jwt
import google.oauth2.credentials
import httpx
import pytest
from google import genai
from google.auth import crypt, exceptions
from google.auth.compute_engine import _metadata
from google.auth.compute_engine import credentials as gce_credentials
from google.auth.transport.requests import Request as AuthRequest
from google.genai import errors as genai_errors
from google.oauth2 import service_account

from tests.emulators.emulator_paths import expected_download_sha256
from tests.emulators.keys import new_rsa_key, private_key_pem
from tests.emulators.metadata import create_metadata_app
from tests.emulators.oauth import make_service_account_key
from tests.emulators.serve import ServerHandle, async_running_server, create_combined_app, running_server
from tests.emulators.tokens import TokenRegistry
from tests.emulators.vertex import create_vertex_app

CLOUD = "https://www.googleapis.com/auth/cloud-platform"
EMAIL = "sidecar@emu-project.iam.gserviceaccount.com"
REPO = Path(__file__).resolve().parents[2]
MODELS = "/v1/projects/p/locations/us-central1/publishers/google/models"
CLAUDE = "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5@20250929"
HELLO = {"contents": [{"role": "user", "parts": [{"text": "hello big wide world"}]}]}
FLAVOR = {"Metadata-Flavor": "Google"}


@pytest.fixture
def emu() -> Iterator[ServerHandle]:
    with running_server(create_combined_app()) as handle:
        yield handle


@pytest.fixture
def http(emu: ServerHandle) -> Iterator[httpx.Client]:
    token, _ = emu.app.state.registry.issue("tester", 3600, [CLOUD])
    with httpx.Client(base_url=emu.url, headers={"authorization": f"Bearer {token}"}) as client:
        yield client


@pytest.fixture
def point_google_auth_at(monkeypatch: pytest.MonkeyPatch) -> Any:
    """google-auth reads GCE_METADATA_HOST at import; the module global is what it uses."""

    def point(handle: ServerHandle) -> None:
        host = f"127.0.0.1:{handle.port}"
        monkeypatch.setattr(_metadata, "_GCE_METADATA_HOST", host)
        monkeypatch.setenv("GCE_METADATA_IP", host)

    return point


def _error(response: httpx.Response) -> dict[str, Any]:
    return response.json()["error"]


# --- tokens -----------------------------------------------------------------------------


def test_registry_issue_validate_expire_revoke() -> None:
    now = [100.0]
    registry = TokenRegistry(clock=lambda: now[0])
    token, expires_in = registry.issue("alice", 10.9, ["s1"])
    assert token.startswith("ya29.emu-") and expires_in == 10
    assert registry.validate(token) == "alice" and registry.lookup(token).scopes == ("s1",)
    now[0] += 11
    assert registry.validate(token) is None and registry.lookup(token) is not None
    other, _ = registry.issue("bob", 5)
    registry.revoke(other)
    assert registry.validate(other) is None and registry.lookup(other) is None
    registry.issue("carol", 5)
    registry.revoke_all()
    assert len(registry) == 0 and registry.issued_count == 3
    assert registry.validate("garbage") is None


# --- metadata server --------------------------------------------------------------------


def test_metadata_ping_flavor_and_content_types(emu: ServerHandle) -> None:
    with httpx.Client(base_url=emu.url) as c:
        ping = c.get("/")
        assert ping.status_code == 200 and ping.headers["metadata-flavor"] == "Google"
        base = "/computeMetadata/v1/"
        assert c.get(base + "project/project-id").status_code == 403
        assert (
            c.get(base + "project/project-id", headers={**FLAVOR, "X-Forwarded-For": "1.2.3.4"}).status_code
            == 403
        )
        project = c.get(base + "project/project-id", headers=FLAVOR)
        assert (project.status_code, project.text) == (200, "emu-project")
        assert project.headers["content-type"] == "application/text"
        assert project.headers["metadata-flavor"] == "Google"
        assert c.get(base + "project/numeric-project-id", headers=FLAVOR).text == "123456789012"
        assert c.get(base + "instance/service-accounts/default/email", headers=FLAVOR).text == EMAIL
        assert c.get(base + "project/project-id?alt=json", headers=FLAVOR).json() == "emu-project"
        info = c.get(base + "instance/service-accounts/default/?recursive=true", headers=FLAVOR)
        assert info.headers["content-type"] == "application/json"
        assert info.json()["email"] == EMAIL and info.json()["aliases"] == ["default"]
        token = c.get(base + f"instance/service-accounts/{EMAIL}/token?scopes={CLOUD}", headers=FLAVOR)
        assert token.headers["content-type"] == "application/json"
        body = token.json()
        assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
        assert emu.app.state.registry.lookup(body["access_token"]).scopes == (CLOUD,)
        assert c.get(base + "instance/nope", headers=FLAVOR).status_code == 404


def test_google_auth_compute_engine_credentials(emu: ServerHandle, point_google_auth_at: Any) -> None:
    point_google_auth_at(emu)
    request = AuthRequest()
    assert _metadata.ping(request)
    credentials = gce_credentials.Credentials()
    credentials.refresh(request)
    assert emu.app.state.registry.validate(credentials.token) == EMAIL
    assert credentials.service_account_email == EMAIL
    assert _metadata.get_project_id(request) == "emu-project"
    assert emu.app.state.metadata_app.state.token_requests == 1


def test_google_auth_default_finds_metadata_server_from_env(emu: ServerHandle, tmp_path: Path) -> None:
    """The sidecar's `adc` path: env vars read at import time, in a fresh process."""
    script = (
        "import json, google.auth\n"
        "from google.auth.transport.requests import Request\n"
        "creds, project = google.auth.default(scopes=['https://www.googleapis.com/auth/cloud-platform'])\n"
        "creds.refresh(Request())\n"
        "print(json.dumps({'token': creds.token, 'project': project, 'kind': type(creds).__module__}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GCE_", "CLOUDSDK_"))}
    host = f"127.0.0.1:{emu.port}"
    env.update(
        GCE_METADATA_HOST=host, GCE_METADATA_IP=host, CLOUDSDK_CONFIG=str(tmp_path), HOME=str(tmp_path)
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["project"] == "emu-project" and result["kind"] == "google.auth.compute_engine.credentials"
    assert emu.app.state.registry.validate(result["token"]) == EMAIL


def test_metadata_token_reuse_and_short_lifetime(emu: ServerHandle) -> None:
    url = "/computeMetadata/v1/instance/service-accounts/default/token"
    state = emu.app.state.metadata_app.state
    with httpx.Client(base_url=emu.url, headers=FLAVOR) as c:
        first, second = c.get(url).json(), c.get(url).json()
        assert first["access_token"] == second["access_token"]  # cached like GCE's
        emu.app.state.registry.revoke_all()
        assert c.get(url).json()["access_token"] != first["access_token"]
        state.token_lifetime_s = 1
        short1, short2 = c.get(url).json(), c.get(url).json()
        assert short1["expires_in"] == 1 and short1["access_token"] != short2["access_token"]
        state.fail_tokens = True
        failed = c.get(url)
        assert failed.status_code == 503 and failed.headers["metadata-flavor"] == "Google"
    assert state.token_requests == 6 and state.tokens_issued == 4


def test_metadata_not_ready_like_a_fresh_gke_pod(point_google_auth_at: Any) -> None:
    app = create_metadata_app(TokenRegistry(), unavailable_for_first_s=0.3)
    with running_server(app) as handle:
        point_google_auth_at(handle)
        url = f"{handle.url}/computeMetadata/v1/instance/service-accounts/default/token"
        early = httpx.get(url, headers=FLAVOR)
        assert (early.status_code, early.text) == (404, "Not Found\n")
        assert httpx.get(f"{handle.url}/").status_code == 200  # the server itself answers
        with pytest.raises(exceptions.RefreshError):
            gce_credentials.Credentials().refresh(AuthRequest())
        time.sleep(0.35)
        credentials = gce_credentials.Credentials()
        credentials.refresh(AuthRequest())
        assert app.state.registry.validate(credentials.token) == EMAIL


# --- OAuth token endpoint ---------------------------------------------------------------


def test_service_account_key_file_gets_token(
    emu: ServerHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "key.json"
    info = make_service_account_key(f"{emu.url}/token", path, keys=emu.app.state.keys)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    credentials = service_account.Credentials.from_service_account_file(str(path), scopes=[CLOUD])
    credentials.refresh(AuthRequest())
    assert emu.app.state.registry.validate(credentials.token) == info["client_email"]
    assert credentials.expiry is not None
    # The same file through ADC, as the sidecar's default credential would load it.
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    adc, project = google.auth.default(scopes=[CLOUD])
    adc.refresh(AuthRequest())
    assert project == "emu-project" and emu.app.state.registry.validate(adc.token) == info["client_email"]


def test_tampered_or_unknown_keys_and_missing_scopes_are_rejected(emu: ServerHandle, tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    info = make_service_account_key(f"{emu.url}/token", path, keys=emu.app.state.keys)
    tampered = {**info, "private_key": private_key_pem(new_rsa_key())}
    creds = service_account.Credentials.from_service_account_info(tampered, scopes=[CLOUD])
    with pytest.raises(exceptions.RefreshError, match="invalid_grant: Invalid JWT Signature"):
        creds.refresh(AuthRequest())
    unscoped = service_account.Credentials.from_service_account_info(info)
    with pytest.raises(exceptions.RefreshError, match="invalid_scope"):
        unscoped.refresh(AuthRequest())
    emu.app.state.keys.remove(info["private_key_id"])
    deleted = service_account.Credentials.from_service_account_info(info, scopes=[CLOUD])
    with pytest.raises(exceptions.RefreshError, match="invalid_grant"):
        deleted.refresh(AuthRequest())
    assert emu.app.state.oauth_app.state.tokens_issued == 0


def test_oauth_error_shapes(emu: ServerHandle, tmp_path: Path) -> None:
    info = make_service_account_key(f"{emu.url}/token", tmp_path / "k.json", keys=emu.app.state.keys)
    signer = crypt.RSASigner.from_service_account_info(info)
    long_ago = int(time.time()) - 7200
    stale = google.auth.jwt.encode(
        signer,
        {
            "iss": info["client_email"],
            "aud": "https://oauth2.googleapis.com/token",
            "scope": CLOUD,
            "iat": long_ago,
            "exp": long_ago + 3600,
        },
    ).decode()
    cases = [
        ({}, "invalid_request"),
        ({"grant_type": "password"}, "unsupported_grant_type"),
        ({"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer"}, "invalid_request"),
        (
            {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": "a.b.c"},
            "invalid_grant",
        ),
        ({"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": stale}, "invalid_grant"),
    ]
    for form, error in cases:
        response = httpx.post(f"{emu.url}/token", data=form)
        assert response.status_code == 400 and response.json()["error"] == error, form
        assert "error_description" in response.json()
    assert "iat and exp" in httpx.post(f"{emu.url}/token", data=cases[-1][0]).json()["error_description"]


# --- Vertex: authentication -------------------------------------------------------------


def test_vertex_rejects_missing_invalid_and_expired_tokens(emu: ServerHandle) -> None:
    url = f"{emu.url}{MODELS}/gemini-2.0-flash:generateContent"
    missing = httpx.post(url, json=HELLO)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="https://accounts.google.com/"'
    error = _error(missing)
    assert error["status"] == "UNAUTHENTICATED" and error["message"].startswith("Request is missing required")
    assert error["details"][0]["reason"] == "CREDENTIALS_MISSING"
    assert (
        error["details"][0]["metadata"]["method"]
        == "google.cloud.aiplatform.v1.PredictionService.GenerateContent"
    )

    invalid = httpx.post(url, json=HELLO, headers={"authorization": "Bearer ya29.made-up"})
    assert invalid.status_code == 401
    assert _error(invalid)["message"] == (
        "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie "
        "or other valid authentication credential. "
        "See https://developers.google.com/identity/sign-in/web/devconsole-project."
    )
    assert _error(invalid)["details"][0]["reason"] == "ACCESS_TOKEN_TYPE_UNSUPPORTED"

    expired, _ = emu.app.state.registry.issue("tester", 0, [CLOUD])
    response = httpx.post(url, json=HELLO, headers={"authorization": f"Bearer {expired}"})
    assert response.status_code == 401 and _error(response)["details"][0]["reason"] == "ACCESS_TOKEN_EXPIRED"

    key_only = httpx.post(url, json=HELLO, headers={"x-goog-api-key": "AIza-emu"})
    assert key_only.status_code == 401 and _error(key_only)["message"].startswith(
        "API keys are not supported"
    )

    narrow, _ = emu.app.state.registry.issue(
        "tester", 3600, ["https://www.googleapis.com/auth/devstorage.read_only"]
    )
    scoped = httpx.post(url, json=HELLO, headers={"authorization": f"Bearer {narrow}"})
    assert (
        scoped.status_code == 403
        and _error(scoped)["details"][0]["reason"] == "ACCESS_TOKEN_SCOPE_INSUFFICIENT"
    )
    assert emu.app.state.vertex_app.state.auth_failures == 5


# --- Vertex through google-genai --------------------------------------------------------


def _genai(emu: ServerHandle, token: str) -> genai.Client:
    credentials = google.oauth2.credentials.Credentials(token)
    return genai.Client(
        vertexai=True,
        project="p",
        location="us-central1",
        credentials=credentials,
        http_options={"base_url": emu.url},
    )


def test_google_genai_sdk_against_vertex_emulator(emu: ServerHandle) -> None:
    token, _ = emu.app.state.registry.issue("tester", 3600, [CLOUD])
    client = _genai(emu, token)

    answer = client.models.generate_content(model="gemini-2.0-flash", contents="hello world")
    assert answer.text == "Echo: hello world"
    usage = answer.usage_metadata
    assert (usage.prompt_token_count, usage.candidates_token_count, usage.total_token_count) == (2, 3, 5)

    thinking = client.models.generate_content(model="gemini-2.5-flash", contents="hello world")
    assert (
        thinking.usage_metadata.thoughts_token_count == 6 and thinking.usage_metadata.total_token_count == 11
    )

    chunks = list(
        client.models.generate_content_stream(model="gemini-2.0-flash", contents="hello big wide world")
    )
    assert "".join(c.text for c in chunks) == "Echo: hello big wide world" and len(chunks) == 4
    assert chunks[-1].usage_metadata.candidates_token_count == 5
    assert chunks[-1].usage_metadata.total_token_count == 9

    assert client.models.count_tokens(model="gemini-2.0-flash", contents="one two three").total_tokens == 3

    text = client.models.embed_content(model="text-embedding-005", contents=["a b c", "d e"])
    assert [e.statistics.token_count for e in text.embeddings] == [3, 2]
    assert len(text.embeddings[0].values) == 768 and text.metadata.billable_character_count == 5
    gemini_embedding = client.models.embed_content(
        model="gemini-embedding-001", contents="a b c", config={"output_dimensionality": 16}
    )
    assert len(gemini_embedding.embeddings[0].values) == 16

    with pytest.raises(genai_errors.ClientError) as too_many:
        client.models.generate_content(model="error-429", contents="x")
    assert (too_many.value.code, too_many.value.status) == (429, "RESOURCE_EXHAUSTED")
    with pytest.raises(genai_errors.ServerError) as unavailable:
        client.models.generate_content(model="error-503", contents="x")
    assert unavailable.value.status == "UNAVAILABLE"

    paths = [r["path"] for r in emu.app.state.requests]
    sdk_path = "/v1beta1/projects/p/locations/us-central1/publishers/google/models/gemini-2.0-flash"
    assert paths[0] == sdk_path + ":generateContent"

    emu.app.state.registry.revoke(token)
    with pytest.raises(genai_errors.ClientError) as unauthenticated:
        client.models.generate_content(model="gemini-2.0-flash", contents="hi")
    assert (unauthenticated.value.code, unauthenticated.value.status) == (401, "UNAUTHENTICATED")


# --- Vertex: wire formats ---------------------------------------------------------------


def test_json_array_stream_framing_is_exact(http: httpx.Client) -> None:
    headers = {"x-emulator-chunk-delay": "0.05", "x-emulator-chunks": "3"}
    arrivals: list[tuple[float, bytes]] = []
    start = time.monotonic()
    with http.stream(
        "POST", f"{MODELS}/gemini-2.0-flash:streamGenerateContent", json=HELLO, headers=headers
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "application/json; charset=UTF-8"
        for piece in r.iter_raw():
            arrivals.append((time.monotonic() - start, piece))
    raw = b"".join(p for _, p in arrivals)
    assert raw.startswith(b"[{\n") and raw.endswith(b"\n}\n]")
    assert raw.count(b"\n,\r\n{") == 2
    frames = raw[1:-2].split(b"\n,\r\n")
    parsed = json.loads(raw)
    assert [json.loads(f) for f in frames] == parsed
    assert (
        "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in parsed)
        == "Echo: hello big wide world"
    )
    assert (
        "finishReason" not in parsed[0]["candidates"][0]
        and parsed[-1]["candidates"][0]["finishReason"] == "STOP"
    )
    assert parsed[0]["usageMetadata"] == {"trafficType": "ON_DEMAND"} and "usageMetadata" not in parsed[1]
    assert parsed[-1]["usageMetadata"]["totalTokenCount"] == 9
    assert len({c["responseId"] for c in parsed}) == 1
    assert arrivals[-1][0] - arrivals[0][0] >= 0.09  # chunks really spread over time


def test_sse_stream_framing_and_errors_in_stream_modes(http: httpx.Client) -> None:
    sse = http.post(f"{MODELS}/gemini-2.0-flash:streamGenerateContent?alt=sse", json=HELLO)
    assert sse.headers["content-type"] == "text/event-stream"
    frames = sse.content.split(b"\r\n\r\n")
    assert frames[-1] == b"" and len(frames) == 5
    assert all(f.startswith(b"data: {") and b"\n" not in f for f in frames[:-1])
    assert json.loads(frames[-2][6:])["usageMetadata"]["candidatesTokenCount"] == 5

    array_error = http.post(f"{MODELS}/error-429:streamGenerateContent", json=HELLO)
    assert array_error.status_code == 429 and array_error.json()[0]["error"]["status"] == "RESOURCE_EXHAUSTED"
    sse_error = http.post(f"{MODELS}/error-429:streamGenerateContent?alt=sse", json=HELLO)
    assert sse_error.status_code == 429 and sse_error.json()["error"]["code"] == 429

    with pytest.raises(httpx.RemoteProtocolError):
        http.post(
            f"{MODELS}/gemini-2.0-flash:streamGenerateContent?alt=sse",
            json=HELLO,
            headers={"x-emulator-fail-after-chunks": "2"},
        )


def test_request_validation_errors(http: httpx.Client) -> None:
    url = f"{MODELS}/gemini-2.0-flash:generateContent"
    bad = http.post(url, content=b'{"contents": [nope', headers={"content-type": "application/json"})
    error = _error(bad)
    assert bad.status_code == 400 and error["status"] == "INVALID_ARGUMENT"
    assert error["message"].startswith("Invalid JSON payload received.")
    assert error["details"][0]["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    empty = http.post(url, json={})
    assert _error(empty)["message"].startswith(
        "Unable to submit request because at least one contents field is required"
    )
    unknown = http.post(url, json={**HELLO, "bogus": 1})
    assert (
        _error(unknown)["message"]
        == 'Invalid JSON payload received. Unknown name "bogus": Cannot find field.'
    )
    assert http.post(url, json={"contents": [{"role": "user", "parts": []}]}).status_code == 400
    missing_model = http.post(f"{MODELS}/no-such-model:generateContent", json=HELLO)
    assert (
        missing_model.status_code == 404
        and "Publisher Model `projects/p/locations/us-central1/publishers/google/models/no-such-model`"
        in _error(missing_model)["message"]
    )
    for response in (
        http.get("/v1/nothing/here"),
        http.get(url),
        http.post(f"/v2{MODELS[3:]}/gemini-2.0-flash:generateContent", json=HELLO),
    ):
        assert response.status_code == 404 and _error(response)["status"] == "NOT_FOUND"
    limited = http.post(url, json={**HELLO, "generationConfig": {"maxOutputTokens": 2}}).json()
    assert limited["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert limited["candidates"][0]["content"]["parts"][0]["text"] == "Echo: hello"
    compact = http.post(url + "?prettyPrint=false", json=HELLO)
    assert b"\n" not in compact.content


def test_error_models_and_fault_injection_knobs(emu: ServerHandle, http: httpx.Client) -> None:
    denied = http.post(f"{MODELS}/error-403:generateContent", json=HELLO)
    detail = _error(denied)["details"][0]
    assert denied.status_code == 403 and detail["reason"] == "IAM_PERMISSION_DENIED"
    assert detail["metadata"]["permission"] == "aiplatform.endpoints.predict"
    assert (
        _error(http.post(f"{MODELS}/error-400:generateContent", json=HELLO))["status"] == "INVALID_ARGUMENT"
    )
    assert _error(http.post(f"{MODELS}/error-503:generateContent", json=HELLO))["status"] == "UNAVAILABLE"

    state = emu.app.state.vertex_app.state
    state.fail_next.extend([503, 429])
    codes = [
        http.post(f"{MODELS}/gemini-2.0-flash:generateContent", json=HELLO).status_code for _ in range(3)
    ]
    assert codes == [503, 429, 200]
    state.fail_locations["us-central1"] = 429
    assert http.post(f"{MODELS}/gemini-2.0-flash:generateContent", json=HELLO).status_code == 429
    other_region = (
        "/v1/projects/p/locations/us-east4/publishers/google/models/gemini-2.0-flash:generateContent"
    )
    assert http.post(other_region, json=HELLO).status_code == 200
    state.denied_projects.add("p")
    assert _error(http.post(other_region, json=HELLO))["status"] == "PERMISSION_DENIED"
    assert state.calls["generateContent"] == 9


def test_anthropic_raw_and_stream_raw_predict(http: httpx.Client) -> None:
    body = {
        "anthropic_version": "vertex-2023-10-16",
        "max_tokens": 64,
        "system": [
            {"type": "text", "text": "you are terse and kind", "cache_control": {"type": "ephemeral"}}
        ],
        "messages": [{"role": "user", "content": "say hi please"}],
    }
    first = http.post(f"{CLAUDE}:rawPredict", json=body).json()
    assert first["type"] == "message" and first["id"].startswith("msg_vrtx_")
    assert first["model"] == "claude-sonnet-4-5-20250929" and first["stop_reason"] == "end_turn"
    assert first["content"] == [{"type": "text", "text": "Echo: say hi please"}]
    assert first["usage"] == {
        "input_tokens": 3,
        "cache_creation_input_tokens": 5,
        "cache_read_input_tokens": 0,
        "output_tokens": 4,
    }
    second = http.post(f"{CLAUDE}:rawPredict", json=body).json()
    assert (
        second["usage"]["cache_read_input_tokens"] == 5
        and second["usage"]["cache_creation_input_tokens"] == 0
    )

    no_version = http.post(
        f"{CLAUDE}:rawPredict", json={k: v for k, v in body.items() if k != "anthropic_version"}
    )
    assert no_version.status_code == 400
    assert no_version.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "anthropic_version: Field required"},
    }

    stream = http.post(f"{CLAUDE}:streamRawPredict", json={**body, "stream": True})
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = [block.split("\n") for block in stream.text.strip().split("\n\n")]
    names = [e[0].removeprefix("event: ") for e in events]
    payloads = [json.loads(e[1].removeprefix("data: ")) for e in events]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert all(n == "content_block_delta" for n in names[3:-3])
    assert "".join(p["delta"]["text"] for p in payloads[3:-3]) == "Echo: say hi please"
    assert payloads[0]["message"]["usage"]["input_tokens"] == 3
    assert (
        payloads[-2]["usage"] == {"output_tokens": 4} and payloads[-2]["delta"]["stop_reason"] == "end_turn"
    )


def test_openai_compatible_chat_completions(http: httpx.Client) -> None:
    url = "/v1/projects/p/locations/us-central1/endpoints/openapi/chat/completions"
    body = {"model": "google/gemini-2.0-flash-001", "messages": [{"role": "user", "content": "hi there"}]}
    unary = http.post(url, json=body).json()
    assert (
        unary["object"] == "chat.completion" and unary["choices"][0]["message"]["content"] == "Echo: hi there"
    )
    assert unary["usage"] == {"completion_tokens": 3, "prompt_tokens": 2, "total_tokens": 5}

    plain = http.post(url, json={**body, "stream": True}).text
    assert plain.endswith("data: [DONE]\n\n") and '"usage"' not in plain
    with_usage = http.post(url, json={**body, "stream": True, "stream_options": {"include_usage": True}}).text
    chunks = [json.loads(line[6:]) for line in with_usage.split("\n\n") if line.startswith("data: {")]
    assert chunks[-1]["usage"]["total_tokens"] == 5 and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c for c in chunks[:-1])
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "Echo: hi there"


def test_predict_search_and_operations(http: httpx.Client) -> None:
    embeddings = http.post(
        f"{MODELS}/text-embedding-005:predict",
        json={"instances": [{"content": "two words"}], "parameters": {"outputDimensionality": 4}},
    ).json()
    prediction = embeddings["predictions"][0]["embeddings"]
    assert (
        prediction["statistics"] == {"truncated": False, "token_count": 2} and len(prediction["values"]) == 4
    )
    assert embeddings["metadata"] == {"billableCharacterCount": 8}

    images = http.post(
        f"{MODELS}/imagen-3.0-generate-002:predict",
        json={"instances": [{"prompt": "a cat"}], "parameters": {"sampleCount": 2}},
    ).json()
    assert len(images["predictions"]) == 2 and images["predictions"][0]["mimeType"] == "image/png"
    assert base64.b64decode(images["predictions"][0]["bytesBase64Encoded"]).startswith(b"\x89PNG\r\n\x1a\n")

    engine = "/v1/projects/p/locations/global/collections/default_collection/engines/eng"
    search_path = engine + "/servingConfigs/default_search:search"
    search = http.post(
        search_path, json={"query": "vertex", "pageSize": 2, "contentSearchSpec": {"summarySpec": {}}}
    ).json()
    assert len(search["results"]) == 2 and search["totalSize"] == 3 and "summaryText" in search["summary"]
    assert search["results"][0]["document"]["name"].startswith(
        "projects/p/locations/global/collections/default_collection/dataStores/"
    )
    store = http.post(
        "/v1alpha/projects/p/locations/eu/dataStores/ds1/servingConfigs/default_config:search",
        json={"query": "q"},
    )
    assert store.status_code == 200 and len(store.json()["results"]) == 3

    operation = http.get("/v1/projects/p/locations/us-central1/operations/123").json()
    assert (
        operation["name"] == "projects/p/locations/us-central1/operations/123" and operation["done"] is True
    )


# --- routing, test endpoints, servers ---------------------------------------------------


def test_upstream_prefix_request_log_echo_and_gzip(emu: ServerHandle, http: httpx.Client) -> None:
    prefix = "/_upstream/us-central1-aiplatform.googleapis.com"
    routed = http.post(
        f"{prefix}{MODELS}/gemini-2.0-flash:generateContent?prettyPrint=false",
        json=HELLO,
        headers={"x-goog-user-project": "billing"},
    )
    assert routed.status_code == 200
    entry = emu.app.state.requests[-1]
    assert entry["upstream_host"] == "us-central1-aiplatform.googleapis.com"
    assert (
        entry["path"] == f"{MODELS}/gemini-2.0-flash:generateContent"
        and entry["query"] == "prettyPrint=false"
    )
    assert entry["headers"]["x-goog-user-project"] == "billing" and entry["status"] == 200
    assert entry["auth_subject"] == "tester"

    payload = os.urandom(200_000)
    echo = http.put(
        "/_upstream/example.test/_emulator/echo?a=1&a=2", content=payload, headers={"x-Custom": "V"}
    ).json()
    assert echo["method"] == "PUT" and echo["path"] == "/_emulator/echo" and echo["query_string"] == "a=1&a=2"
    assert echo["headers"]["x-custom"] == "V" and echo["upstream_host"] == "example.test"
    assert echo["body_sha256"] == hashlib.sha256(payload).hexdigest() and echo["body_length"] == len(payload)

    # Metadata and OAuth are reachable behind their own upstream prefixes on the combined app.
    ping = httpx.get(f"{emu.url}/_upstream/metadata.google.internal/")
    assert ping.headers["metadata-flavor"] == "Google"
    token = httpx.post(f"{emu.url}/_upstream/oauth2.googleapis.com/token", data={})
    assert token.status_code == 400 and token.json()["error"] == "invalid_request"

    gzip_headers = {"accept-encoding": "gzip", "x-emulator-gzip": "1"}
    with http.stream(
        "POST", f"{MODELS}/gemini-2.0-flash:generateContent", json=HELLO, headers=gzip_headers
    ) as r:
        compressed = b"".join(r.iter_raw())
    assert r.headers["content-encoding"] == "gzip"
    answer = json.loads(gzip.decompress(compressed))
    assert answer["candidates"][0]["content"]["parts"][0]["text"] == "Echo: hello big wide world"


def test_download_upload_and_slow(emu: ServerHandle) -> None:
    size = 3 * 65536 + 123
    with httpx.Client(base_url=emu.url) as c:
        with c.stream("GET", f"/_emulator/download?bytes={size}") as r:
            assert int(r.headers["content-length"]) == size
            digest = hashlib.sha256()
            for piece in r.iter_bytes():
                digest.update(piece)
        assert digest.hexdigest() == expected_download_sha256(size)
        payload = os.urandom(300_000)
        assert c.post("/_emulator/upload", content=payload).json() == {
            "sha256": hashlib.sha256(payload).hexdigest(),
            "length": len(payload),
        }
        start = time.monotonic()
        assert c.get("/_emulator/slow?first_byte_delay_s=0.1").json() == {"first_byte_delay_s": 0.1}
        assert time.monotonic() - start >= 0.1
    emu.app.state.vertex_app.state.emulator_paths_require_auth = True
    assert httpx.get(f"{emu.url}/_emulator/echo").status_code == 401


async def test_async_server_and_open_vertex_app() -> None:
    app = create_vertex_app(None)  # no registry: no authentication required
    async with async_running_server(app) as handle, httpx.AsyncClient(base_url=handle.url) as client:
        response = await client.post(f"{MODELS}/gemini-2.0-flash:generateContent", json=HELLO)
    assert response.status_code == 200 and response.json()["usageMetadata"]["promptTokenCount"] == 4
    assert app.state.requests[-1]["status"] == 200


def test_standalone_module_writes_port_and_key_file_and_stops_on_sigterm(tmp_path: Path) -> None:
    port_file, key_file = tmp_path / "port", tmp_path / "key.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.emulators",
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--key-file",
            str(key_file),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while not port_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.stderr.read() if proc.stderr else ""
            )
            time.sleep(0.02)
        url = f"http://127.0.0.1:{int(port_file.read_text())}"
        assert httpx.get(url + "/").headers["metadata-flavor"] == "Google"
        credentials = service_account.Credentials.from_service_account_file(str(key_file), scopes=[CLOUD])
        credentials.refresh(AuthRequest())
        answer = httpx.post(
            f"{url}{MODELS}/gemini-2.0-flash:generateContent",
            json=HELLO,
            headers={"authorization": f"Bearer {credentials.token}"},
        )
        assert answer.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 0, stderr
    assert stdout.startswith("emulator listening on http://127.0.0.1:")


def test_metadata_directory_without_slash_redirects_like_the_real_server() -> None:
    """Node's gcp-metadata detects GCE with GET /computeMetadata/v1/instance (no slash)."""
    with running_server(create_metadata_app(TokenRegistry())) as handle:
        flavor = {"Metadata-Flavor": "Google"}
        moved = httpx.get(f"{handle.url}/computeMetadata/v1/instance", headers=flavor)
        assert moved.status_code == 301 and moved.headers["location"] == "/computeMetadata/v1/instance/"
        listing = httpx.get(f"{handle.url}/computeMetadata/v1/instance", headers=flavor, follow_redirects=True)
        assert listing.status_code == 200 and listing.headers["metadata-flavor"] == "Google"
        assert "service-accounts/" in listing.text.splitlines()
        assert httpx.get(f"{handle.url}/computeMetadata/v1/instance/").status_code == 403  # no Metadata-Flavor
