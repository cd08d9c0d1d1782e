"""Zero-code-change mode: real clients, only environment variables changed, through the
sidecar's forward proxy (`proxy_listen`) to the emulators.

The app side sets exactly what the webhook injects: HTTPS_PROXY, the CA bundle variables
(SSL_CERT_FILE, REQUESTS_CA_BUNDLE), and the SDK's own GOOGLE_* settings. Its Google
credentials are its own (a service-account key whose tokens the emulator issues): they must
never reach the upstream, where the sidecar's token is expected instead. The sidecar
reaches the emulator through its `upstreams` override, so the host names the apps dial are
Google's real ones, answered by the sidecar's TLS termination.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import socketserver
import ssl
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
import requests
import websockets
import yaml
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from tests.emulators.live import create_live_app
from tests.emulators.oauth import make_service_account_key
from tests.emulators.serve import ServerHandle, create_combined_app, running_server
from tests.harness.sidecar_process import SidecarProcess, start_sidecar

from .conftest import adc_env, upstreams_for
from .test_live import wait_until

PROJECT = "emu-project"
LOCATION = "us-central1"
GEN_PATH = f"/v1/projects/{PROJECT}/locations/{LOCATION}/publishers/google/models/gemini-2.5-flash:generateContent"
PROMPT = {"contents": [{"role": "user", "parts": [{"text": "through the proxy"}]}]}


@pytest.fixture(scope="module")
def emulator() -> Iterator[ServerHandle]:
    """Metadata, OAuth, Vertex REST and the Live endpoint on one port (shared by the module)."""
    with running_server(create_live_app(fallback=create_combined_app(project_id=PROJECT))) as handle:
        yield handle


def proxy_config(tmp_path: Path, **config: Any) -> dict[str, Any]:
    bundle = tmp_path / "shared" / "ca-bundle.pem"
    return {"proxy_listen": "127.0.0.1:0",
            "tls": {"state_dir": str(tmp_path / "tls-state"), "ca_bundle_path": str(bundle)}, **config}


@pytest.fixture(scope="module")
def shared(emulator: ServerHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    """One allow-all proxy sidecar for the tests that only read (each looks at its own requests)."""
    tmp_path = tmp_path_factory.mktemp("proxy")
    sidecar = start_sidecar(proxy_config(tmp_path, upstreams=upstreams_for(emulator)), tmp_path,
                            env=adc_env(emulator))
    yield sidecar
    sidecar.terminate()


@pytest.fixture
def start(emulator: ServerHandle, tmp_path: Path) -> Iterator[Callable[..., SidecarProcess]]:
    started: list[SidecarProcess] = []

    def _start(**config: Any) -> SidecarProcess:
        sidecar = start_sidecar(proxy_config(tmp_path, upstreams=upstreams_for(emulator), **config), tmp_path,
                                env=adc_env(emulator), name=f"sidecar-{len(started)}.yaml")
        started.append(sidecar)
        return sidecar

    yield _start
    for sidecar in started:
        sidecar.terminate()


def new_log_lines(sidecar: SidecarProcess, before: int, count: int) -> list[dict[str, Any]]:
    return wait_until(lambda: len(sidecar.access_log()) >= before + count and sidecar.access_log()[before:],
                      what=f"{count} new access-log line(s)")


def proxy_url(sidecar: SidecarProcess) -> str:
    return f"http://{sidecar.listening['proxy_listen']}"


def app_env(sidecar: SidecarProcess, monkeypatch: pytest.MonkeyPatch, emulator: ServerHandle, tmp_path: Path) -> str:
    """What the webhook sets on an app container, plus the app's own Google credentials.
    Returns the app's own access token (which must never reach Google)."""
    bundle = sidecar.listening["ca_bundle"]
    for name in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(name, proxy_url(sidecar))
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        monkeypatch.setenv(name, bundle)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setenv("GOOGLE_GENAI_USE_VERTEXAI", "true")
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", PROJECT)
    monkeypatch.setenv("GOOGLE_CLOUD_LOCATION", LOCATION)
    key = make_service_account_key(f"{emulator.url}/token", tmp_path / "app-sa.json", keys=emulator.app.state.keys,
                                   client_email=f"app@{PROJECT}.iam.gserviceaccount.com")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "app-sa.json"))
    import google.auth
    import google.auth.transport.requests

    credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    credentials.refresh(google.auth.transport.requests.Request())
    assert key["client_email"] in (credentials.service_account_email or "")
    return str(credentials.token)


def upstream_requests(emulator: ServerHandle) -> list[dict[str, Any]]:
    return list(emulator.app.state.requests)


def assert_sidecar_token(entry: dict[str, Any], app_token: str) -> None:
    auth = entry["headers"].get("authorization", "")
    assert auth.startswith("Bearer ") and app_token not in auth
    assert app_token not in json.dumps(entry["headers"])


# --------------------------------------------------------------------------- the SDK, bare


def test_bare_genai_client_generate_and_stream(shared: SidecarProcess, emulator: ServerHandle, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    sidecar = shared
    before = len(sidecar.access_log())
    app_token = app_env(sidecar, monkeypatch, emulator, tmp_path)
    client = genai.Client()  # no base URL, no credentials: everything from the environment

    response = client.models.generate_content(model="gemini-2.5-flash", contents="hello proxy")
    assert "hello proxy" in (response.text or "")
    entry = upstream_requests(emulator)[-1]
    assert entry["upstream_host"] == "us-central1-aiplatform.googleapis.com"
    assert entry["path"].startswith(f"/v1beta1/projects/{PROJECT}/locations/{LOCATION}/publishers/google/models/")
    assert_sidecar_token(entry, app_token)

    chunks = list(client.models.generate_content_stream(model="gemini-2.5-flash", contents="streamed"))
    assert "streamed" in "".join(c.text or "" for c in chunks) and len(chunks) > 1

    log = new_log_lines(sidecar, before, 2)
    assert len(log) == 2 and all(e["status"] == 200 and e["route"] == "default" for e in log)
    assert all(e["tokens"]["input_tokens"] > 0 for e in log)
    assert all(e["via_proxy"] == "us-central1-aiplatform.googleapis.com" for e in log)
    metrics = httpx.get(f"{sidecar.admin_url}/metrics").text
    assert re.search(r'vertex_sidecar_requests_total\{[^}]*model="gemini-2.5-flash"[^}]*\} [1-9]', metrics), metrics
    assert re.search(r'vertex_sidecar_proxy_connects_total\{outcome="intercepted",reason="intercepted"\} [1-9]',
                     metrics)


def test_policy_refusal_is_the_sidecars_403(start: Callable[..., SidecarProcess], emulator: ServerHandle,
                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sidecar = start(routes=[{"name": "flash-only", "match": {"models": ["gemini-2.5-flash"]}}])
    app_env(sidecar, monkeypatch, emulator, tmp_path)
    client = genai.Client()
    with pytest.raises(genai_errors.ClientError) as refused:
        client.models.generate_content(model="gemini-2.5-pro", contents="not allowed")
    assert refused.value.code == 403 and "gemini-2.5-pro" in (refused.value.message or "")
    assert not [e for e in upstream_requests(emulator) if "gemini-2.5-pro" in e["path"]]  # never reached Google
    assert "ok" in (client.models.generate_content(model="gemini-2.5-flash", contents="ok").text or "")


# ----------------------------------------------------------- other clients, their own URLs


def test_httpx_requests_openai_and_anthropic_sdks(shared: SidecarProcess, emulator: ServerHandle, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import anthropic
    import openai

    sidecar = shared
    before = len(sidecar.access_log())
    app_token = app_env(sidecar, monkeypatch, emulator, tmp_path)
    host = f"https://{LOCATION}-aiplatform.googleapis.com"
    auth = {"Authorization": f"Bearer {app_token}"}

    with httpx.Client() as client:  # trust_env: HTTPS_PROXY and SSL_CERT_FILE
        response = client.post(host + GEN_PATH, json=PROMPT, headers=auth)
    assert response.status_code == 200 and "through the proxy" in response.text
    assert_sidecar_token(upstream_requests(emulator)[-1], app_token)

    response = requests.post(host + GEN_PATH, json=PROMPT, headers=auth, timeout=10)  # REQUESTS_CA_BUNDLE
    assert response.status_code == 200 and "through the proxy" in response.text
    assert_sidecar_token(upstream_requests(emulator)[-1], app_token)

    # The OpenAI SDK on Vertex's OpenAI-compatible endpoint, as Google documents it.
    oai = openai.OpenAI(base_url=f"{host}/v1/projects/{PROJECT}/locations/{LOCATION}/endpoints/openapi",
                        api_key=app_token)
    completion = oai.chat.completions.create(model="google/gemini-2.5-flash",
                                             messages=[{"role": "user", "content": "openai via proxy"}])
    assert "openai via proxy" in (completion.choices[0].message.content or "")
    assert upstream_requests(emulator)[-1]["path"].endswith("/endpoints/openapi/chat/completions")
    assert_sidecar_token(upstream_requests(emulator)[-1], app_token)
    oai.close()

    # AnthropicVertex: its own google-auth ADC (the app's key) and Google's regional host.
    claude = anthropic.AnthropicVertex(region=LOCATION, project_id=PROJECT)
    message = claude.messages.create(model="claude-sonnet-4-5@20250929", max_tokens=32,
                                     messages=[{"role": "user", "content": "claude via proxy"}])
    assert "claude via proxy" in "".join(getattr(block, "text", "") for block in message.content)
    entry = upstream_requests(emulator)[-1]
    assert entry["path"].endswith("/publishers/anthropic/models/claude-sonnet-4-5@20250929:rawPredict")
    assert_sidecar_token(entry, app_token)
    claude.close()

    log = new_log_lines(sidecar, before, 4)
    assert [e["status"] for e in log] == [200, 200, 200, 200]
    assert log[3]["model"] == "claude-sonnet-4-5@20250929" and log[3]["tokens"]["output_tokens"] > 0


def test_the_same_clients_in_base_url_mode(shared: SidecarProcess, emulator: ServerHandle) -> None:
    """The README's other column: each client pointed at the sidecar's base URL instead (no proxy)."""
    import anthropic
    import openai

    placeholder = "placeholder-the-sidecar-replaces-it"
    base = shared.base_url  # http://127.0.0.1:PORT/vertex_ai
    response = requests.post(base + GEN_PATH, json=PROMPT, timeout=10)
    assert response.status_code == 200 and "through the proxy" in response.text
    oai = openai.OpenAI(base_url=f"{base}/v1/projects/{PROJECT}/locations/{LOCATION}/endpoints/openapi",
                        api_key=placeholder)
    completion = oai.chat.completions.create(model="google/gemini-2.5-flash",
                                             messages=[{"role": "user", "content": "openai via base url"}])
    assert "openai via base url" in (completion.choices[0].message.content or "")
    oai.close()
    claude = anthropic.AnthropicVertex(base_url=f"{base}/v1", region=LOCATION, project_id=PROJECT,
                                       access_token=placeholder)
    message = claude.messages.create(model="claude-sonnet-4-5@20250929", max_tokens=32,
                                     messages=[{"role": "user", "content": "claude via base url"}])
    assert "claude via base url" in "".join(getattr(block, "text", "") for block in message.content)
    claude.close()
    assert_sidecar_token(upstream_requests(emulator)[-1], placeholder)


def test_location_of_the_host_must_match_the_path(shared: SidecarProcess, emulator: ServerHandle, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    sidecar = shared
    app_env(sidecar, monkeypatch, emulator, tmp_path)
    with httpx.Client() as client:
        wrong = client.post("https://europe-west4-aiplatform.googleapis.com" + GEN_PATH, json=PROMPT)
        global_host = client.post("https://aiplatform.googleapis.com" + GEN_PATH, json=PROMPT)
        right_global = client.post("https://aiplatform.googleapis.com" + GEN_PATH.replace(LOCATION, "global"),
                                   json=PROMPT)
        discovery = client.get(f"https://eu-discoveryengine.googleapis.com/v1/projects/{PROJECT}/locations/eu/"
                               "collections/default_collection/dataStores")
    for response in (wrong, global_host):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["status"] == "INVALID_ARGUMENT" and error["details"][0]["reason"] == "LOCATION_MISMATCH"
    assert "europe-west4" in wrong.json()["error"]["message"]
    assert right_global.status_code == 200
    assert upstream_requests(emulator)[-2]["upstream_host"] == "aiplatform.googleapis.com"
    assert discovery.status_code != 400 and upstream_requests(emulator)[-1]["upstream_host"] == (
        "eu-discoveryengine.googleapis.com")


async def test_live_api_over_the_tunnel(shared: SidecarProcess, emulator: ServerHandle, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    sidecar = shared
    app_token = app_env(sidecar, monkeypatch, emulator, tmp_path)
    client = genai.Client()
    config = types.LiveConnectConfig(response_modalities=[types.Modality.TEXT])
    async with client.aio.live.connect(model="gemini-live-2.5-flash", config=config) as session:
        await session.send_client_content(
            turns=types.Content(role="user", parts=[types.Part(text="live through the proxy")]), turn_complete=True)
        text = ""
        async for message in session.receive():
            text += message.text or ""
    assert "live through the proxy" in text
    record = wait_until(lambda: next((s for s in emulator.app.state.live.sessions if s.ended), None),
                        what="upstream session end")
    assert record.upstream_host == "us-central1-aiplatform.googleapis.com"
    assert record.headers["authorization"].startswith("Bearer ") and app_token not in json.dumps(record.headers)
    entry = wait_until(lambda: [e for e in sidecar.access_log() if e.get("operation") == "BidiGenerateContent"],
                       what="the session's log line")[-1]
    assert entry["status"] == 101 and entry["live"]["turns"] == 1 and entry["tokens"]["input_tokens"] > 0

    # A setup naming another location than the host's is refused before Google is dialled.
    sessions_before = len(emulator.app.state.live.sessions)
    url = f"wss://{LOCATION}-aiplatform.googleapis.com/ws/google.cloud.aiplatform.v1beta1.LlmBidiService/" \
          "BidiGenerateContent"
    context = ssl.create_default_context(cafile=shared.listening["ca_bundle"])
    async with websockets.connect(url, ssl=context) as ws:  # HTTPS_PROXY from the environment
        await ws.send(json.dumps({"setup": {"model": f"projects/{PROJECT}/locations/europe-west4/publishers/google/"
                                                     "models/gemini-live-2.5-flash"}}))
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
    assert ws.close_code == 1008 and "europe-west4" in (ws.close_reason or "")
    assert len(emulator.app.state.live.sessions) == sessions_before


# ------------------------------------------------------- other hosts: tunnel, deny, SSRF


class EchoServer(socketserver.ThreadingTCPServer):
    """A TCP server that sends back what it receives and keeps a copy: a blind tunnel's far end."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.received = bytearray()
        super().__init__(("127.0.0.1", 0), _EchoHandler)


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.server.received += data  # type: ignore[attr-defined]
            self.request.sendall(data)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def proxy_request(sidecar: SidecarProcess, line: str) -> tuple[socket.socket, int, bytes]:
    """Send one proxy request head; returns the socket, the status and what followed the head."""
    host, port = sidecar.listening["proxy_listen"].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(line.encode() + b"\r\nUser-Agent: test\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(65536)
        if not chunk:
            break
        head += chunk
    status_line, _, rest = head.partition(b"\r\n")
    return sock, int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def refusal(sidecar: SidecarProcess, line: str) -> tuple[int, dict[str, Any]]:
    sock, status, body = proxy_request(sidecar, line)
    with sock:
        while chunk := sock.recv(65536):
            body += chunk
    return status, json.loads(body)["error"]


def pod_address() -> str:
    """This machine's (the pod's) own non-loopback address."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.254", 9))  # no packet is sent: this only picks the outbound address
        return str(probe.getsockname()[0])


def test_other_hosts_tunnelled_untouched_or_denied_and_never_into_the_pod(
        start: Callable[..., SidecarProcess], echo: EchoServer, tmp_path: Path) -> None:
    pinned = f"127.0.0.1:{echo.server_address[1]}"
    sidecar = start(proxy={"resolve": {"api.example.com:443": pinned}})

    sock, status, early = proxy_request(sidecar, "CONNECT api.example.com:443 HTTP/1.1")
    assert status == 200 and early == b""
    payload = bytes(range(256)) * 64 + b"GET / HTTP/1.1\r\nAuthorization: Bearer app-own\r\n\r\n"
    with sock:
        sock.sendall(payload)
        back = b""
        while len(back) < len(payload):
            back += sock.recv(65536)
    assert back == payload and bytes(echo.received) == payload  # not a byte added, removed or read
    tunnel = wait_until(lambda: [json.loads(line) for line in sidecar.stdout_lines if '"event":"tunnel"' in line],
                        what="the tunnel's log line")[0]
    assert tunnel["target"] == "api.example.com:443" and tunnel["bytes_up"] == len(payload)

    # Never into the pod or to the metadata server, however the address is written or resolved.
    for target in ("127.0.0.1:443", "[::1]:443", "localhost:443", "169.254.169.254:443", "[::ffff:127.0.0.1]:443",
                   "[::ffff:169.254.169.254]:443", "0.0.0.0:443", f"{pod_address()}:443", "127.1.2.3:443"):
        status, error = refusal(sidecar, f"CONNECT {target} HTTP/1.1")
        assert status == 403 and error["details"][0]["reason"] == "PROXY_TARGET_FORBIDDEN", (target, error)
    status, error = refusal(sidecar, "CONNECT api.example.com:22 HTTP/1.1")
    assert status == 403 and error["details"][0]["reason"] == "PROXY_PORT_DENIED"
    # A Vertex region the CA does not cover is neither intercepted nor tunnelled with the app's own token.
    status, error = refusal(sidecar, "CONNECT mars-north1-aiplatform.googleapis.com:443 HTTP/1.1")
    assert status == 403 and "proxy.extra_locations" in error["message"]
    status, error = refusal(sidecar, "GET http://api.example.com/ HTTP/1.1")
    assert status == 405 and error["details"][0]["reason"] == "PROXY_METHOD_NOT_ALLOWED"
    status, error = refusal(sidecar, "CONNECT not a target HTTP/1.1")
    assert status == 400
    assert len(echo.received) == len(payload)  # nothing else reached the far end
    metrics = httpx.get(f"{sidecar.admin_url}/metrics").text
    assert 'vertex_sidecar_proxy_connects_total{outcome="tunnelled",reason="tunnelled"} 1.0' in metrics
    assert 'vertex_sidecar_proxy_connects_total{outcome="refused",reason="PROXY_TARGET_FORBIDDEN"} 9.0' in metrics
    assert f'vertex_sidecar_proxy_tunnel_bytes_total{{direction="up"}} {float(len(payload))}' in metrics

    # proxy.other_hosts: deny (applied by a config reload) refuses every other host.
    config = yaml.safe_load(sidecar.config_path.read_text())
    config["proxy"]["other_hosts"] = "deny"
    sidecar.config_path.write_text(yaml.safe_dump(config))
    def status_of_connect() -> int:
        sock, status, _ = proxy_request(sidecar, "CONNECT api.example.com:443 HTTP/1.1")
        sock.close()
        return status

    assert wait_until(lambda: status_of_connect() == 403, timeout=10, what="the reload to deny other hosts")
    status, error = refusal(sidecar, "CONNECT api.example.com:443 HTTP/1.1")
    assert error["details"][0]["reason"] == "PROXY_HOST_DENIED" and "NO_PROXY" in error["message"]
