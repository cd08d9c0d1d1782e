"""The real google-genai SDK as a client of the real sidecar, against the emulator."""

from __future__ import annotations

import pytest
from google import genai
from google.genai import errors, types
from google.oauth2.credentials import Credentials

from tests.emulators.serve import ServerHandle
from tests.harness.sidecar_process import SidecarProcess

# The SDK insists on credentials of its own; the sidecar drops them and injects its token.
PLACEHOLDER = "placeholder-app-token"


def make_client(base_url: str | None = None, **options: object) -> genai.Client:
    http_options = types.HttpOptions(base_url=base_url, **options) if base_url else None  # type: ignore[arg-type]
    return genai.Client(vertexai=True, project="emu-project", location="us-central1",
                        credentials=Credentials(token=PLACEHOLDER), http_options=http_options)


def vertex_requests(emulator: ServerHandle) -> list[dict]:
    return [r for r in emulator.app.state.requests if "/projects/" in r["path"]]


def test_generate_stream_count_embed_with_base_url(sidecar: SidecarProcess, emulator: ServerHandle) -> None:
    client = make_client(sidecar.base_url)
    response = client.models.generate_content(model="gemini-2.5-flash", contents="hello sidecar")
    assert "hello sidecar" in response.text
    assert response.usage_metadata is not None and response.usage_metadata.prompt_token_count

    chunks = list(client.models.generate_content_stream(model="gemini-2.5-flash", contents="stream me please"))
    assert len(chunks) > 1
    assert "stream me please" in "".join(c.text or "" for c in chunks)

    count = client.models.count_tokens(model="gemini-2.5-flash", contents="one two three")
    assert count.total_tokens and count.total_tokens > 0

    embedding = client.models.embed_content(model="text-embedding-005", contents=["alpha", "beta"])
    assert embedding.embeddings is not None and len(embedding.embeddings) == 2

    seen = vertex_requests(emulator)
    assert {r["upstream_host"] for r in seen} == {"us-central1-aiplatform.googleapis.com"}
    for request in seen:
        # The app's own credential never reaches Google; the sidecar's (from ADC) does.
        assert PLACEHOLDER not in request["headers"]["authorization"]
        assert request["headers"]["authorization"].startswith("Bearer ya29.")
        assert request["path"].startswith("/v1beta1/projects/emu-project/locations/us-central1/")


def test_env_var_base_url(sidecar: SidecarProcess, emulator: ServerHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_VERTEX_BASE_URL", sidecar.base_url)
    client = make_client()
    response = client.models.generate_content(model="gemini-2.5-flash", contents="via the environment")
    assert "via the environment" in response.text
    assert vertex_requests(emulator)[-1]["upstream_host"] == "us-central1-aiplatform.googleapis.com"


def test_collection_scope_is_completed_from_defaults(sidecar: SidecarProcess, emulator: ServerHandle) -> None:
    client = make_client(sidecar.base_url, base_url_resource_scope=types.ResourceScope.COLLECTION)
    response = client.models.generate_content(model="gemini-2.5-flash", contents="collection form")
    assert "collection form" in response.text
    assert vertex_requests(emulator)[-1]["path"] == (
        "/v1/projects/emu-project/locations/us-central1/publishers/google/models/gemini-2.5-flash:generateContent")


async def test_async_client_streams(sidecar: SidecarProcess) -> None:
    client = make_client(sidecar.base_url)
    text = ""
    async for chunk in await client.aio.models.generate_content_stream(model="gemini-2.5-flash",
                                                                        contents="async stream"):
        text += chunk.text or ""
    assert "async stream" in text


def test_upstream_errors_become_sdk_exceptions(sidecar: SidecarProcess) -> None:
    client = make_client(sidecar.base_url)
    with pytest.raises(errors.ClientError) as info:
        client.models.generate_content(model="error-429", contents="x")
    assert info.value.code == 429 and info.value.status == "RESOURCE_EXHAUSTED"


def test_sidecar_errors_become_sdk_exceptions(start) -> None:  # type: ignore[no-untyped-def]
    sidecar = start({"routes": [{"name": "flash-only", "match": {"models": ["gemini-2.5-flash"]}}]})
    client = make_client(sidecar.base_url)
    with pytest.raises(errors.ClientError) as info:
        client.models.generate_content(model="gemini-2.5-pro", contents="x")
    assert info.value.code == 403 and info.value.status == "PERMISSION_DENIED"
    assert "flash-only" in (info.value.message or "")
