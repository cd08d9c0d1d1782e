"""Vertex AI Live API emulator (`LlmBidiService/BidiGenerateContent` over WebSocket).

Path: ``/ws/google.cloud.aiplatform.{v1|v1beta1}.LlmBidiService/BidiGenerateContent`` on
the location's host (a ``/_upstream/<host>`` prefix is stripped by `UpstreamPrefix`).
Wire behaviour, as google-genai and the Vertex docs show it:

- Handshake: a bearer token checked like REST; a missing, unknown or expired token gets
  the HTTP 401 (Google's JSON error) instead of the upgrade. Knob `refuse_next` (HTTP
  statuses) refuses the next handshakes the same way (403 → permission denied, 404, ...);
  `redirect_next` (URLs) answers the next handshakes with a 302 to that Location.
- The first message must be ``{"setup": {"model": "projects/P/locations/L/publishers/
  google/models/M", ...}}``: a wrong shape closes 1007, an unknown model, a denied
  project or a location other than the host's closes 1008, each with Google's wording.
  Otherwise the server answers ``{"setupComplete": {}}``.
- ``clientContent`` with ``turnComplete``, ``realtimeInput`` (``text``; ``audio`` /
  ``mediaChunks`` until ``audioStreamEnd`` / ``activityEnd``, or every
  `turn_every_audio_chunks` chunks) and ``toolResponse`` each start a model turn:
  `chunks` ``serverContent.modelTurn`` messages (text, or 24 kHz PCM ``inlineData`` when
  the setup asks for AUDIO), ``{"serverContent": {"generationComplete": true}}``, then
  ``{"serverContent": {"turnComplete": true}, "usageMetadata": {...}}``. Each turn's
  prompt is the whole context so far (Live bills the context every turn).
- Server messages are JSON in binary frames, like Google's (`text_frames` → text).
- ``goAway`` (``{"goAway": {"timeLeft": "1s"}}``) after `go_away_after_s`, then a close
  when the time is up; `close_after_turns` = (turns, code, reason) closes after a turn.

Knobs and the session log live in `LiveKnobs` at ``app.state.live`` (created on first
use). `live_routes()` mounts the endpoint into any Starlette app whose state has
``registry``; `create_live_app(registry, fallback=...)` serves it in front of another app
(e.g. the combined emulator) on one port.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import fnmatch
import json
import re
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import Response
from starlette.routing import Mount, WebSocketRoute
from starlette.types import ASGIApp
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from . import google_errors
from .google_json import GOOGLE_JSON, encode_json
from .tokens import TokenRegistry
from .upstream import UPSTREAM_HOST_KEY, RequestLog, UpstreamPrefix, scope_headers
from .vertex_auth import CLOUD_PLATFORM_SCOPES

__all__ = ["LIVE_PATH", "LiveKnobs", "LiveSessionRecord", "create_live_app", "live_knobs", "live_routes"]

LIVE_PATH = "/ws/google.cloud.aiplatform.{version}.LlmBidiService/BidiGenerateContent"
LIVE_VERSIONS = frozenset({"v1", "v1beta1"})
_MODEL = re.compile(r"^projects/([^/]+)/locations/([^/]+)/publishers/([^/]+)/models/([^/]+)$")
_DEFAULT_MODELS = ("gemini-*",)
_AUDIO_IN_BYTES_PER_TOKEN = 1000  # 16 kHz PCM16 = 32 kB/s, billed at 32 tokens/s
_AUDIO_OUT_BYTES_PER_TOKEN = 1500  # 24 kHz PCM16 = 48 kB/s
_MAX_REASON = 123


@dataclass
class LiveSessionRecord:
    path: str
    version: str
    upstream_host: str | None
    headers: dict[str, str]
    setup: dict[str, Any] | None = None
    messages_in: int = 0
    messages_out: int = 0
    last_message: str | bytes | None = None  # the client's last message, as received
    audio_bytes_in: int = 0
    turns: int = 0
    client_close: tuple[int, str] | None = None  # what the client sent
    server_close: tuple[int, str] | None = None  # what the emulator sent
    ended: bool = False


@dataclass
class LiveKnobs:
    refuse_next: collections.deque[int] = field(default_factory=collections.deque)
    redirect_next: collections.deque[str] = field(default_factory=collections.deque)
    chunks: int = 3
    chunk_delay_s: float = 0.0
    text_frames: bool = False
    go_away_after_s: float | None = None
    go_away_time_left_s: float = 1.0
    close_after_turns: tuple[int, int, str] | None = None
    turn_every_audio_chunks: int = 0
    audio_reply_bytes: int = 9600  # per chunk: 0.2 s of 24 kHz PCM16
    sessions: collections.deque[LiveSessionRecord] = field(default_factory=lambda: collections.deque(maxlen=200))
    open_sessions: int = 0


def live_knobs(app: Any) -> LiveKnobs:
    knobs = getattr(app.state, "live", None)
    if knobs is None:
        knobs = app.state.live = LiveKnobs()
    return knobs


def _field(message: Any, camel: str) -> Any:
    """A field by its JSON name or its proto name: Google's JSON parser takes both, and
    google-genai sends ``client_content`` around camelCase contents."""
    if not isinstance(message, dict):
        return None
    if camel in message:
        return message[camel]
    return message.get("".join("_" + c.lower() if c.isupper() else c for c in camel))


def _reason(text: str) -> str:
    data = text.encode()
    return text if len(data) <= _MAX_REASON else data[: _MAX_REASON - 3].decode("utf-8", "ignore") + "..."


def _host_location(host: str | None) -> str | None:
    """The location a Vertex host serves (None: not a Google host name, e.g. a bare test URL)."""
    if not host:
        return None
    if host == "aiplatform.googleapis.com":
        return "global"
    match = re.fullmatch(r"([a-z0-9-]+)-aiplatform\.googleapis\.com", host) or re.fullmatch(
        r"aiplatform\.([a-z]+)\.rep\.googleapis\.com", host)
    return match.group(1) if match else None


# ------------------------------------------------------------------------ handshake


def _auth_failure(websocket: WebSocket) -> tuple[int, dict[str, Any]] | None:
    registry: TokenRegistry | None = getattr(websocket.app.state, "registry", None)
    if registry is None:
        return None
    method = f"google.cloud.aiplatform.{websocket.path_params['version']}.LlmBidiService.BidiGenerateContent"
    service = "aiplatform.googleapis.com"
    authorization = websocket.headers.get("authorization")
    if authorization is None:
        return 401, google_errors.missing_credentials(method, service)
    scheme, _, token = authorization.partition(" ")
    record = registry.lookup(token.strip()) if scheme.lower() == "bearer" else None
    if record is None:
        return 401, google_errors.invalid_credentials(method, service, expired=False)
    if record.expires_at <= registry.now():
        return 401, google_errors.invalid_credentials(method, service, expired=True)
    if record.scopes and not CLOUD_PLATFORM_SCOPES.intersection(record.scopes):
        return 403, google_errors.insufficient_scopes(method, service)
    return None


def _canned_refusal(status: int) -> dict[str, Any]:
    return google_errors.canned_error(
        status, resource="projects/-/locations/-", service="aiplatform.googleapis.com",
        method="google.cloud.aiplatform.v1.LlmBidiService.BidiGenerateContent")


async def _deny(websocket: WebSocket, status: int, body: dict[str, Any]) -> None:
    await websocket.send_denial_response(Response(encode_json(body), status, media_type=GOOGLE_JSON))


# -------------------------------------------------------------------------- session


class _Conversation:
    """One session's protocol state: setup, context size, pending audio."""

    def __init__(self, websocket: WebSocket, knobs: LiveKnobs, record: LiveSessionRecord) -> None:
        self.ws = websocket
        self.knobs = knobs
        self.record = record
        self.model = ""
        self.audio_out = False
        self.context_tokens = 0
        self.pending_text: list[str] = []
        self.pending_audio_bytes = 0
        self.audio_chunks = 0
        self.closed = False
        self.send_lock = asyncio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message, separators=(",", ":"))
        async with self.send_lock:
            if self.closed:
                return
            if self.knobs.text_frames:
                await self.ws.send_text(data)
            else:
                await self.ws.send_bytes(data.encode())
            self.record.messages_out += 1

    async def close(self, code: int, reason: str) -> None:
        async with self.send_lock:
            if self.closed:
                return
            self.closed = True
            self.record.server_close = (code, _reason(reason))
            await self.ws.close(code, _reason(reason))

    def check_setup(self, message: Any) -> tuple[int, str] | None:
        """(close code, reason) when the setup is refused."""
        if not isinstance(message, dict) or set(message) != {"setup"} or not isinstance(message["setup"], dict):
            return 1007, "Invalid JSON payload received. The first message must be a setup message."
        setup = message["setup"]
        model = setup.get("model")
        match = _MODEL.match(model) if isinstance(model, str) else None
        if match is None:
            return 1007, f"Invalid resource field value in the request: model {str(model)[:60]!r}."
        project, location, publisher, model_id = match.groups()
        state = self.ws.app.state
        patterns = getattr(state, "known_models", {}).get(publisher, _DEFAULT_MODELS if publisher == "google" else ())
        if project in getattr(state, "denied_projects", set()):
            return 1008, (f"Permission 'aiplatform.endpoints.predict' denied on resource "
                          f"'//aiplatform.googleapis.com/{model}'.")
        host_location = _host_location(self.record.upstream_host)
        if host_location is not None and host_location != location:
            return 1008, f"Location {location} does not match the endpoint's location {host_location}."
        if not any(fnmatch.fnmatchcase(model_id, p) for p in patterns):
            return 1008, f"Publisher Model `{model}` was not found or your project does not have access to it."
        self.model = model_id
        modalities = _field(_field(setup, "generationConfig") or {}, "responseModalities") or ["AUDIO"]
        self.audio_out = "AUDIO" in modalities
        return None

    async def handle(self, message: dict[str, Any]) -> bool:
        """Act on one client message; False when the session must end."""
        content = _field(message, "clientContent")
        if content is not None:
            for turn in content.get("turns") or []:
                self.pending_text += [p["text"] for p in (turn.get("parts") or []) if isinstance(p.get("text"), str)]
            if _field(content, "turnComplete"):
                return await self.turn()
            return True
        realtime = _field(message, "realtimeInput")
        if realtime is not None:
            return await self.realtime(realtime or {})
        if _field(message, "toolResponse") is not None:
            self.pending_text.append("tool response received")
            return await self.turn()
        if "setup" in message:
            await self.close(1007, "Invalid JSON payload received. Setup may only be sent once.")
            return False
        await self.close(1007, f"Invalid JSON payload received. Unknown name {next(iter(message), '')!r}.")
        return False

    async def realtime(self, realtime: dict[str, Any]) -> bool:
        chunks = list(_field(realtime, "mediaChunks") or [])
        for key in ("audio", "video"):
            if isinstance(realtime.get(key), dict):
                chunks.append(realtime[key])
        for chunk in chunks:
            data = chunk.get("data") or ""
            size = len(data) * 3 // 4  # base64
            self.pending_audio_bytes += size
            self.record.audio_bytes_in += size
            self.audio_chunks += 1
        if isinstance(realtime.get("text"), str):
            self.pending_text.append(realtime["text"])
            return await self.turn()
        every = self.knobs.turn_every_audio_chunks
        if _field(realtime, "audioStreamEnd") or _field(realtime, "activityEnd") is not None or (
                every and chunks and self.audio_chunks % every == 0):
            return await self.turn()
        return True

    async def turn(self) -> bool:
        knobs = self.knobs
        text_in = " ".join(self.pending_text)
        text_tokens = len(text_in.split())
        audio_tokens = self.pending_audio_bytes // _AUDIO_IN_BYTES_PER_TOKEN
        self.pending_text, self.pending_audio_bytes = [], 0
        answer = f"You said: {text_in}" if text_in else "I heard you."
        words = answer.split()
        per_chunk = max(1, -(-len(words) // max(knobs.chunks, 1)))
        out_tokens = 0
        for i in range(max(knobs.chunks, 1)):
            part: dict[str, Any]
            if self.audio_out:
                pcm = bytes(knobs.audio_reply_bytes)
                out_tokens += len(pcm) // _AUDIO_OUT_BYTES_PER_TOKEN
                part = {"inlineData": {"mimeType": "audio/pcm;rate=24000", "data": base64.b64encode(pcm).decode()}}
            else:
                text = " ".join(words[i * per_chunk:(i + 1) * per_chunk])
                if not text:
                    break
                out_tokens += len(text.split())
                part = {"text": text + (" " if i < knobs.chunks - 1 else "")}
            await self.send({"serverContent": {"modelTurn": {"role": "model", "parts": [part]}}})
            if knobs.chunk_delay_s:
                await asyncio.sleep(knobs.chunk_delay_s)
        prompt = self.context_tokens + text_tokens + audio_tokens
        self.context_tokens = prompt + out_tokens
        out_modality = "AUDIO" if self.audio_out else "TEXT"
        prompt_details = [{"modality": "TEXT", "tokenCount": self.context_tokens - out_tokens - audio_tokens}]
        if audio_tokens:
            prompt_details.append({"modality": "AUDIO", "tokenCount": audio_tokens})
        await self.send({"serverContent": {"generationComplete": True}})
        await self.send({
            "serverContent": {"turnComplete": True},
            "usageMetadata": {
                "promptTokenCount": prompt,
                "candidatesTokenCount": out_tokens,
                "totalTokenCount": prompt + out_tokens,
                "trafficType": "ON_DEMAND",
                "promptTokensDetails": prompt_details,
                "candidatesTokensDetails": [{"modality": out_modality, "tokenCount": out_tokens}],
            },
        })
        self.record.turns += 1
        if knobs.close_after_turns and self.record.turns >= knobs.close_after_turns[0]:
            _, code, reason = knobs.close_after_turns
            await self.close(code, reason)
            return False
        return True

    async def go_away(self, after_s: float, time_left_s: float) -> None:
        await asyncio.sleep(after_s)
        await self.send({"goAway": {"timeLeft": f"{time_left_s:g}s"}})
        await asyncio.sleep(time_left_s)
        await self.close(1000, "Session duration limit reached.")


async def _live(websocket: WebSocket) -> None:
    knobs = live_knobs(websocket.app)
    version = websocket.path_params["version"]
    record = LiveSessionRecord(websocket.url.path, version, websocket.scope.get(UPSTREAM_HOST_KEY),
                               scope_headers(websocket.scope))
    knobs.sessions.append(record)
    if version not in LIVE_VERSIONS:
        await _deny(websocket, 404, google_errors.not_found())
        return
    if knobs.redirect_next:
        await websocket.send_denial_response(Response(b"", 302, headers={"location": knobs.redirect_next.popleft()}))
        return
    failure = _auth_failure(websocket)
    if failure is None and knobs.refuse_next:
        status = knobs.refuse_next.popleft()
        failure = status, _canned_refusal(status)
    if failure is not None:
        await _deny(websocket, *failure)
        return
    await websocket.accept()
    knobs.open_sessions += 1
    conversation = _Conversation(websocket, knobs, record)
    go_away: asyncio.Task[None] | None = None
    try:
        first = await websocket.receive()
        if first["type"] == "websocket.disconnect":
            record.client_close = (first.get("code", 1005), first.get("reason") or "")
            return
        try:
            setup = json.loads(first.get("text") or first.get("bytes") or b"")
        except ValueError:
            setup = None
        refusal = conversation.check_setup(setup)
        if refusal is not None:
            await conversation.close(*refusal)
            return
        record.setup = setup
        await conversation.send({"setupComplete": {}})
        if knobs.go_away_after_s is not None:
            go_away = asyncio.create_task(conversation.go_away(knobs.go_away_after_s, knobs.go_away_time_left_s))
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                record.client_close = (message.get("code", 1005), message.get("reason") or "")
                return
            record.messages_in += 1
            raw = message.get("text")
            record.last_message = raw if raw is not None else message.get("bytes")
            try:
                parsed = json.loads(record.last_message or b"")
            except ValueError:
                await conversation.close(1007, "Invalid JSON payload received.")
                return
            if not isinstance(parsed, dict) or not await conversation.handle(parsed):
                if not conversation.closed:
                    await conversation.close(1007, "Invalid JSON payload received.")
                return
    except (WebSocketDisconnect, OSError, RuntimeError):
        pass  # the client vanished mid-send
    finally:
        if go_away is not None:
            go_away.cancel()
            await asyncio.gather(go_away, return_exceptions=True)
        if not conversation.closed and websocket.application_state == WebSocketState.CONNECTED \
                and record.client_close is None:
            await conversation.close(1011, "Internal error encountered.")
        knobs.open_sessions -= 1
        record.ended = True


def live_routes() -> list[WebSocketRoute]:
    """The Live endpoint, for an app whose `state.registry` checks tokens (None: no auth)."""
    return [WebSocketRoute(LIVE_PATH, _live)]


def create_live_app(registry: TokenRegistry | None = None, *, fallback: ASGIApp | None = None,
                    log: RequestLog | None = None) -> Starlette:
    """The Live endpoint alone, or in front of `fallback` (which serves everything else).

    In front of the combined emulator it looks like it: `registry` (unless given),
    `requests`, `metadata_app`, `oauth_app`, `vertex_app`, `keys` and the Vertex knobs
    `known_models` / `denied_projects` are the combined app's own objects.
    """
    shared = getattr(fallback, "state", None)
    if log is None:
        log = getattr(shared, "requests", None) if shared is not None else None
    log = log if log is not None else RequestLog()
    routes: list[Any] = list(live_routes())
    if fallback is not None:
        routes.append(Mount("", app=fallback))
    app = Starlette(routes=routes, middleware=[Middleware(UpstreamPrefix, log=log)])
    if shared is not None:
        for name in ("registry", "keys", "metadata_app", "oauth_app", "vertex_app"):
            if hasattr(shared, name):
                setattr(app.state, name, getattr(shared, name))
        vertex: Any = getattr(shared, "vertex_app", fallback)
        for name in ("known_models", "denied_projects"):
            if hasattr(vertex.state, name):
                setattr(app.state, name, getattr(vertex.state, name))
    if registry is not None or not hasattr(app.state, "registry"):
        app.state.registry = registry
    app.state.requests = log
    app.state.live = LiveKnobs()
    return app
