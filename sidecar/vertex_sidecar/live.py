"""The Live API relay: one caller WebSocket ↔ one Vertex AI Live WebSocket.

Callers connect to ``/vertex_ai/live`` (query ``vertex_project``, ``vertex_location``,
``model``) or to the path google-genai derives from its base URL,
``/vertex_ai/ws/google.cloud.aiplatform.{v1|v1beta1}.LlmBidiService/BidiGenerateContent``.

1. The caller is accepted and its first message must be ``{"setup": {"model": ...}}``.
   The model is completed to ``projects/P/locations/L/publishers/X/models/M`` (query, then
   route, then top-level defaults; route aliases apply) and the routes are applied to it
   exactly as to REST paths (`policy.matches`, first match wins).
2. The sidecar dials the location's host (design §3 host table) with the route's
   credential, sends the setup (rewritten only when the model was completed), and from
   then on relays every message, text or binary, as received, in both directions.
3. Nothing is kept: each direction holds at most one message in hand, the upstream
   client's receive queue is bounded and both sockets exert back-pressure, so memory is
   flat however long the session runs.
4. Server messages that mention ``usageMetadata``/``turnComplete`` (a C-speed substring
   test; audio chunks never do) are parsed and each turn's usage is reported when the
   turn completes.
5. The first side to close ends both; its close code and reason are relayed to the
   other. Refusals close the caller with a code and a reason (≤ 123 bytes, the protocol
   limit) that say what happened; the full story is logged.

Pure parts (endpoint and setup parsing, model completion, route choice, turn
accounting) come first and are unit-tested; the I/O (`LiveRelay`) follows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Mapping, Protocol
from urllib.parse import parse_qsl

import websockets
from websockets.asyncio.client import ClientConnection, connect as websocket_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.frames import EXTERNAL_CLOSE_CODES

from . import __version__
from .config import Config, Defaults, LiveLimits, Route
from .credentials import CredentialError, TokenSource
from .errors import SidecarError, error_body, error_headers
from .headers import header_value, upstream_request_headers
from .limits import RouteLimiter
from .observe import AccessLog, RequestRecord
from .policy import matches
from .proxy import Receive, Scope, Send
from .routing import PROJECT_SEGMENT_RE, RoutingError, Target, is_valid_location, resolve
from .segments import SegmentError, check_segment
from .strict_json import DuplicateKey, loads_unique
from .state import SidecarState, Snapshot
from .usage import Usage, usage_from_live_message

if TYPE_CHECKING:
    from .tracing import LiveTrace, Tracer

log = logging.getLogger("vertex_sidecar.live")

LIVE_METHOD = "BidiGenerateContent"
SETUP_TIMEOUT_S = 30.0  # a caller that never sends its setup is dropped after this
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # one Live message (uvicorn's ws_max_size is the same)
UPSTREAM_QUEUE = 8  # upstream messages buffered before the Google socket is paused
CLOSE_TIMEOUT_S = 5.0
MAX_REASON_BYTES = 123  # RFC 6455 §5.5: control frames carry ≤ 125 bytes, 2 of them the code

# Close codes (RFC 6455 §7.4.1 and the IANA registry).
NORMAL, GOING_AWAY, INVALID_DATA, POLICY = 1000, 1001, 1007, 1008
INTERNAL_ERROR, TRY_AGAIN_LATER, BAD_GATEWAY = 1011, 1013, 1014

_PREFIXES = ("/vertex_ai/", "/vertex-ai/")
_SDK_PATH = re.compile(r"^ws/google\.cloud\.aiplatform\.(v1|v1beta1)\.LlmBidiService/BidiGenerateContent$")
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
_PUBLISHER = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# The caller's WebSocket handshake is its own; the upstream one is made by the client library.
_HANDSHAKE_HEADERS = frozenset({
    b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions", b"sec-websocket-protocol",
    b"sec-websocket-accept", b"origin", b"user-agent", b"cookie",
})
# Upstream handshake refusal (HTTP status) → close code for the caller.
_HANDSHAKE_CLOSE = {400: INVALID_DATA, 401: INTERNAL_ERROR, 403: POLICY, 404: POLICY, 429: TRY_AGAIN_LATER}

Frame = str | bytes


# =========================================================================== pure parts


class LiveRefused(Exception):
    """The session cannot go on: close the caller with `code` and `reason` (short).

    `detail` is the full explanation for the log; `status` the HTTP-like status for the
    access log (403 policy, 400 bad setup, ...).
    """

    def __init__(self, code: int, reason: str, *, status: int, detail: str | None = None,
                 error: str | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = close_reason(reason)
        self.status = status
        self.detail = detail or reason
        self.error = error


def close_reason(text: str) -> str:
    """`text` cut to what a close frame can carry (123 UTF-8 bytes), on a character boundary.

    A lone surrogate (a caller's JSON may escape one into a key or value that a reason
    quotes) cannot be sent as UTF-8: it becomes "?".
    """
    data = text.encode("utf-8", "replace")
    if len(data) <= MAX_REASON_BYTES:
        return data.decode("utf-8")
    return data[: MAX_REASON_BYTES - 3].decode("utf-8", "ignore") + "..."


@dataclass(frozen=True, slots=True)
class LiveEndpoint:
    """Which Live path the caller used; `api_version` None = the configured default."""

    api_version: str | None
    sdk_path: bool


def live_endpoint(path: str) -> LiveEndpoint | None:
    """The Live endpoint a WebSocket path names, or None (not a Live path)."""
    for prefix in _PREFIXES:
        if path.startswith(prefix):
            rest = path[len(prefix):].lstrip("/")  # a base URL with a trailing slash doubles it
            if rest in ("live", "live/"):
                return LiveEndpoint(None, False)
            match = _SDK_PATH.match(rest)
            if match:
                return LiveEndpoint(match.group(1), True)
    return None


@dataclass(frozen=True, slots=True)
class LiveQuery:
    """``/vertex_ai/live`` query parameters: defaults for completing the setup's model."""

    project: str | None = None
    location: str | None = None
    model: str | None = None

    @classmethod
    def parse(cls, query_string: bytes) -> "LiveQuery":
        values: dict[str, str] = {}
        for key, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=False):
            values.setdefault(key, value)  # the first occurrence wins
        return cls(values.get("vertex_project"), values.get("vertex_location"), values.get("model"))

    @property
    def defaults(self) -> Defaults:
        return Defaults(project=self.project, location=self.location)


def parse_setup(frame: Frame) -> dict[str, Any]:
    """The caller's first message as a dict; it must be ``{"setup": {...}}``."""
    try:
        message = loads_unique(frame)
    except DuplicateKey as exc:  # judged by one value, served by another: refused (strict_json.py)
        raise LiveRefused(INVALID_DATA, f"the setup message is ambiguous: {exc}", status=400,
                          error="INVALID_SETUP") from None
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise LiveRefused(INVALID_DATA, "the first message must be JSON: {\"setup\": {\"model\": ...}}",
                          status=400, error="INVALID_SETUP") from None
    if not isinstance(message, dict) or not isinstance(message.get("setup"), dict):
        keys = ", ".join(sorted(message)[:3]) if isinstance(message, dict) else type(message).__name__
        raise LiveRefused(INVALID_DATA, f"the first message must be a setup message, got {keys or 'empty'}",
                          status=400, error="INVALID_SETUP")
    return message


def setup_model(message: dict[str, Any]) -> str | None:
    model = message["setup"].get("model")
    if model is None or model == "":
        return None
    if not isinstance(model, str):
        raise LiveRefused(INVALID_DATA, "setup.model must be a string", status=400, error="INVALID_SETUP")
    return model


@dataclass(frozen=True, slots=True)
class ModelName:
    """A model as the caller wrote it, split; project/location None = take from defaults."""

    project: str | None
    location: str | None
    publisher: str
    model: str


class MissingDefaults(Exception):
    """The model lacks a project or location and no default supplies it."""


def split_model(text: str) -> ModelName:
    """``M``, ``models/M``, ``publishers/X/models/M`` or the full
    ``projects/P/locations/L/publishers/X/models/M``; anything else is refused."""
    parts = text.split("/")
    for part in parts:  # as for REST paths: no dot segment, however it is escaped (segments.py)
        try:
            check_segment(part)
        except SegmentError as exc:
            raise LiveRefused(INVALID_DATA, f"setup.model is refused: {exc}", status=400,
                              error="INVALID_PATH") from None
    if len(parts) == 1:
        project = location = None
        publisher, model = "google", parts[0]
    elif len(parts) == 2 and parts[0] == "models":
        project = location = None
        publisher, model = "google", parts[1]
    elif len(parts) == 4 and parts[0] == "publishers" and parts[2] == "models":
        project = location = None
        publisher, model = parts[1], parts[3]
    elif (len(parts) == 8 and parts[0] == "projects" and parts[2] == "locations"
          and parts[4] == "publishers" and parts[6] == "models"):
        project, location, publisher, model = parts[1], parts[3], parts[5], parts[7]
    else:
        raise LiveRefused(INVALID_DATA, f"setup.model {text[:60]!r} is not a model name; use e.g. "
                          "projects/P/locations/L/publishers/google/models/M or just M",
                          status=400, error="INVALID_MODEL")
    if not _MODEL_ID.match(model) or not _PUBLISHER.match(publisher):
        raise LiveRefused(INVALID_DATA, f"setup.model {text[:60]!r} is not a valid model name",
                          status=400, error="INVALID_MODEL")
    return ModelName(project, location, publisher, model)


def complete_model(text: str, *, aliases: Mapping[str, str], defaults: Defaults) -> ModelName:
    """Resolve an alias (by model id, whatever form the caller used) and fill in project and
    location from `defaults`.

    A project and location the caller named are kept (never rewritten, as for REST); an
    alias that is a full resource name pins them only for a caller that named none.
    """
    name = split_model(text)
    alias = aliases.get(name.model) if aliases else None
    if alias is not None:
        aliased = split_model(alias)
        if name.project is not None:
            aliased = ModelName(name.project, name.location, aliased.publisher, aliased.model)
        name = aliased
    project = name.project or defaults.project
    location = name.location or defaults.location
    if not project or not location:
        raise MissingDefaults()
    return ModelName(project, location, name.publisher, name.model)


@dataclass(frozen=True, slots=True)
class LiveDecision:
    route: Route
    project: str
    location: str
    publisher: str
    model: str
    api_version: str
    url: str  # ws(s)://host/ws/google.cloud.aiplatform.{v}.LlmBidiService/BidiGenerateContent
    target: Target  # what the routes are matched against

    @property
    def host(self) -> str:
        return self.target.origin.host

    @property
    def resource(self) -> str:
        return f"projects/{self.project}/locations/{self.location}/publishers/{self.publisher}/models/{self.model}"


def decide_live(requested: str | None, *, query: LiveQuery, endpoint: LiveEndpoint, config: Config) -> LiveDecision:
    """Complete the model and pick the route, as `policy.decide` does for REST paths."""
    requested = requested or query.model
    if not requested:
        raise LiveRefused(INVALID_DATA, "the setup message names no model: set setup.model (or ?model= on "
                          "/vertex_ai/live)", status=400, error="INVALID_SETUP")
    if query.project is not None and not PROJECT_SEGMENT_RE.match(query.project):
        raise LiveRefused(INVALID_DATA, f"vertex_project {query.project[:40]!r} is not a project id",
                          status=400, error="INVALID_PATH")
    if query.location is not None and not is_valid_location(query.location):
        # refused even when the setup names a full model path (and the query would not be used)
        raise LiveRefused(INVALID_DATA, f"vertex_location {query.location[:40]!r} is not a valid location",
                          status=400, error="INVALID_PATH")
    routes = (config.default_route,) if config.allow_all else config.routes
    last: LiveDecision | None = None
    for route in routes:
        defaults = query.defaults.over(route.defaults.over(config.defaults))
        try:
            name = complete_model(requested, aliases=route.aliases, defaults=defaults)
        except MissingDefaults:
            continue
        decision = _resolve(name, route, endpoint.api_version or defaults.api_version or "v1", config)
        if config.allow_all or matches(route.match, decision.target):
            return decision
        last = decision
    if last is None:
        raise LiveRefused(INVALID_DATA, f"model {requested[:40]!r} has no project/location: pass "
                          "?vertex_project=&vertex_location= or set defaults in the sidecar config",
                          status=400, error="INVALID_PATH")
    allowed = sorted({p for r in config.routes for p in r.match.models})
    raise LiveRefused(
        POLICY, f"model {last.model} in {last.project}/{last.location} is not allowed by this sidecar's routes "
                f"(models: {', '.join(allowed)})",
        status=403, error="NO_MATCHING_ROUTE",
        detail=f"no route allows project={last.project} location={last.location} model={last.model}; routes: "
               + "; ".join(f"{r.name}: projects={list(r.match.projects)} locations={list(r.match.locations)} "
                           f"models={list(r.match.models)}" for r in config.routes))


def _resolve(name: ModelName, route: Route, api_version: str, config: Config) -> LiveDecision:
    assert name.project is not None and name.location is not None
    subpath = (f"{api_version}/projects/{name.project}/locations/{name.location}/publishers/{name.publisher}"
               f"/models/{name.model}:{LIVE_METHOD}")
    try:  # validates project and location (no SSRF) and applies the host table
        target = resolve(subpath, service="aiplatform", defaults=config.defaults, upstreams=config.upstreams)
    except RoutingError as exc:
        raise LiveRefused(INVALID_DATA, exc.message, status=exc.code, error="INVALID_PATH") from None
    origin = target.origin
    scheme = "wss" if origin.scheme == "https" else "ws"
    url = (f"{scheme}://{origin.host_header}{origin.prefix}/ws/google.cloud.aiplatform.{api_version}."
           f"LlmBidiService/{LIVE_METHOD}")
    return LiveDecision(route, name.project, name.location, name.publisher, name.model, api_version, url, target)


def setup_frame(original: Frame, message: dict[str, Any], decision: LiveDecision) -> Frame:
    """The setup to send upstream: the caller's bytes when its model was already complete."""
    if message["setup"].get("model") == decision.resource:
        return original
    message["setup"]["model"] = decision.resource
    # ASCII with \u escapes: a lone surrogate the caller escaped in its JSON stays valid (raw, it
    # could not be encoded as UTF-8 for the frame).
    text = json.dumps(message, separators=(",", ":"))
    return text if isinstance(original, str) else text.encode("utf-8")


class TurnMeter:
    """Per-turn usage from Live server messages, in the order they pass.

    Within a turn the last ``usageMetadata`` wins (it is the turn's running total); it is
    reported when ``serverContent.turnComplete`` arrives. A usage that arrives *after*
    its turnComplete is reported at once; one left over when the session ends, by `flush`.
    """

    __slots__ = ("_pending", "_awaiting")

    def __init__(self) -> None:
        self._pending: Usage | None = None
        self._awaiting = False

    def observe(self, frame: Frame) -> Usage | None:
        """The usage of a turn this message completes, else None. Never raises."""
        if isinstance(frame, str):
            has_usage, has_turn = '"usageMetadata"' in frame, '"turnComplete"' in frame
        else:
            has_usage, has_turn = b'"usageMetadata"' in frame, b'"turnComplete"' in frame
        if not (has_usage or has_turn):
            return None  # audio chunks and most other messages: no parse
        try:
            message = json.loads(frame)
        except (ValueError, RecursionError):
            return None
        if not isinstance(message, dict):
            return None
        usage = usage_from_live_message(message) if has_usage else None
        content = message.get("serverContent")
        turn_complete = has_turn and isinstance(content, dict) and content.get("turnComplete") is True
        if usage is not None:
            if self._awaiting and not turn_complete:
                self._awaiting = False
                return usage
            self._pending = usage
        if turn_complete:
            done, self._pending = self._pending, None
            self._awaiting = done is None
            return done
        return None

    def flush(self) -> Usage | None:
        done, self._pending = self._pending, None
        return done


def add_usage(total: Usage, turn: Usage) -> None:
    """Accumulate a turn into the session's total (for the session's log line)."""
    for name in ("input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens", "reasoning_tokens",
                 "tool_use_prompt_tokens", "total_tokens"):
        setattr(total, name, getattr(total, name) + getattr(turn, name))
    for mine, theirs in ((total.input_by_modality, turn.input_by_modality),
                         (total.output_by_modality, turn.output_by_modality)):
        for modality, count in theirs.items():
            mine[modality] = mine.get(modality, 0) + count
    total.found = total.found or turn.found


def relayable_close(code: int | None, reason: str) -> tuple[int, str]:
    """A close code the other side may be sent (1005/1006/1015 exist only locally)."""
    if code is None or code == 1005:
        return NORMAL, ""
    if code in EXTERNAL_CLOSE_CODES or 3000 <= code < 5000:
        return code, close_reason(reason)
    return GOING_AWAY, close_reason(reason)


class _NoRedirects(websocket_connect):
    """`websockets.connect` that never follows a redirect: it would resend the handshake's
    headers — the sidecar's Bearer token on a same-origin one — to wherever it points. The
    redirect surfaces as InvalidStatus, answered to the caller like any refused handshake."""

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


def handshake_refusal(status: int, body: bytes, host: str) -> LiveRefused:
    """Google refused the WebSocket handshake with an HTTP status: tell the caller why."""
    message, google_status = "", ""
    try:
        error = json.loads(body).get("error", {})
        message, google_status = str(error.get("message", "")), str(error.get("status", ""))
    except (ValueError, AttributeError):
        message = body[:200].decode("utf-8", "replace").strip()
    code = _HANDSHAKE_CLOSE.get(status, BAD_GATEWAY)
    what = f"HTTP {status}{' ' + google_status if google_status else ''}"
    if status == 401:
        reason = f"Google refused the sidecar's credentials ({what}); check the pod's Workload Identity binding"
    elif 300 <= status < 400:
        reason = f"Vertex AI answered the Live handshake with a redirect ({what}); the sidecar never follows redirects"
    else:
        reason = f"Vertex AI refused the Live connection: {what}: {message}"
    return LiveRefused(code, reason, status=status, error="UPSTREAM_REFUSED",
                       detail=f"{host} answered the Live handshake with {what}: {message}")


# =========================================================================== the relay


class LiveObserver(Protocol):
    """Telemetry hooks (`telemetry.Telemetry` implements them)."""

    def live_session_started(self, route: str | None) -> None: ...

    def live_session_ended(self, route: str | None, duration_s: float | None = None) -> None: ...

    def live_turn_usage(self, route: str | None, model: str | None, usage: Usage,
                        headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any] | None: ...


class NullLiveObserver:
    def live_session_started(self, route: str | None) -> None:
        pass

    def live_session_ended(self, route: str | None, duration_s: float | None = None) -> None:
        pass

    def live_turn_usage(self, route: str | None, model: str | None, usage: Usage,
                        headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any] | None:
        return None


EndedBy = Literal["client", "upstream", "idle_timeout", "max_duration", "refused", "budget", "rate_limit"]


@dataclass(slots=True)
class _Ending:
    by: EndedBy
    code: int | None
    reason: str
    clean: bool = True  # a close frame was received (False: the connection just dropped)


@dataclass(slots=True)
class _SessionStats:
    messages_in: int = 0  # caller → Google
    messages_out: int = 0  # Google → caller
    turns: int = 0
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    priced: bool = False
    pricing: str | None = None  # "unknown" once any turn's model was not in the pricing table


class LiveRelay:
    """The ASGI WebSocket handler of the sidecar (`Sidecar.websocket_handler`)."""

    def __init__(self, state: SidecarState, *, observer: LiveObserver | None = None,
                 access_log: AccessLog | None = None) -> None:
        self.state = state
        self.observer: LiveObserver = observer or NullLiveObserver()
        self.access_log = access_log or AccessLog()
        self.sessions: dict[str, int] = {}  # open sessions per route name
        self.tracer: Tracer | None = None  # set when tracing is on (cli.build_sidecar)

    async def handle(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        endpoint = live_endpoint(path)
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        if endpoint is None:
            await _refuse_handshake(scope, send, 404, (
                "the sidecar's Live API endpoints are /vertex_ai/live and /vertex_ai/ws/google.cloud.aiplatform."
                f"v1.LlmBidiService/BidiGenerateContent; {path[:100]!r} is neither"), "UNKNOWN_PATH")
            return
        snapshot = self.state.snapshot  # the whole session runs under one config
        record = RequestRecord.for_request(scope["headers"], method="GET", service="aiplatform",
                                           operation=LIVE_METHOD)
        session = _Session(self, snapshot, scope, receive, send, endpoint, record)
        if self.tracer is not None:  # before Google is dialled: its handshake carries our traceparent
            session.trace = self.tracer.live_started(record)
        try:
            if snapshot.keys is not None:
                caller = snapshot.keys.identify_request(scope["headers"])
                if caller is None:  # like REST: refused before anything else happens
                    record.status, record.error_reason = 401, "CALLER_KEY_REQUIRED"
                    await _refuse_handshake(scope, send, 401, snapshot.keys.refusal, "CALLER_KEY_REQUIRED")
                    return
                record.extra["caller"] = caller
            await send({"type": "websocket.accept"})
            await session.run()
        finally:
            record.finish()
            self._log(record, session)
            if session.trace is not None:
                ending = session.ending
                session.trace.finish(session.stats.turns, session.stats.usage, ending.by if ending else None,
                                     ending.code if ending else None)

    def _log(self, record: RequestRecord, session: "_Session") -> None:
        entry = AccessLog.entry(record)
        stats = session.stats
        live: dict[str, Any] = {"messages_in": stats.messages_in, "messages_out": stats.messages_out,
                                "turns": stats.turns}
        if session.ending is not None:
            live.update(ended_by=session.ending.by, close_code=session.ending.code,
                        close_reason=session.ending.reason)
        entry["live"] = live
        if stats.usage.found:
            entry["tokens"] = stats.usage.as_log_dict()
            if stats.priced:
                entry["cost_usd"] = round(stats.cost_usd, 9)
                if stats.pricing is not None:
                    entry["pricing"] = stats.pricing
        self.access_log.write(entry)
        self.access_log.flush()  # one line per session: rare enough to write at once


async def _refuse_handshake(scope: Scope, send: Send, status: int, message: str, reason: str) -> None:
    """An HTTP answer instead of the upgrade, in Google's error shape when the server can."""
    if "websocket.http.response" in scope.get("extensions", {}):
        body = error_body(status, message, reason=reason)
        await send({"type": "websocket.http.response.start", "status": status, "headers": error_headers(body)})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": POLICY, "reason": close_reason(message)})


class _Session:
    """One relayed Live session; `run` returns when both sides are closed."""

    def __init__(self, relay: LiveRelay, snapshot: Snapshot, scope: Scope, receive: Receive, send: Send,
                 endpoint: LiveEndpoint, record: RequestRecord) -> None:
        self.relay = relay
        self.snapshot = snapshot
        self.scope = scope
        self.receive = receive
        self.send = send
        self.endpoint = endpoint
        self.record = record
        self.stats = _SessionStats()
        self.ending: _Ending | None = None
        self.meter = TurnMeter()
        self.decision: LiveDecision | None = None
        self.last_activity = 0.0
        self.budget_crossed: str | None = None
        self.limiter: RouteLimiter | None = None  # the route's per-pod limits (limits.py)
        self.trace: LiveTrace | None = None

    # ------------------------------------------------------------------ setup
    async def run(self) -> None:
        snapshot = self.snapshot
        try:
            frame = await self._first_message()
            if frame is None:
                return
            message = parse_setup(frame)
            query = LiveQuery.parse(self.scope.get("query_string", b""))
            decision = decide_live(setup_model(message), query=query, endpoint=self.endpoint,
                                   config=snapshot.config)
        except LiveRefused as refused:
            await self._refuse(refused)
            return
        self.decision = decision
        route = decision.route
        record = self.record
        record.route, record.project, record.location = route.name, decision.project, decision.location
        record.answered_location, record.model, record.publisher = decision.location, decision.model, decision.publisher
        limits = route.live
        open_now = self.relay.sessions.get(route.name, 0)
        if limits.max_sessions is not None and open_now >= limits.max_sessions:
            await self._refuse(LiveRefused(
                TRY_AGAIN_LATER, f"too many Live sessions on route {route.name} (live.max_sessions="
                                 f"{limits.max_sessions}); try again later", status=429, error="TOO_MANY_SESSIONS"))
            return
        refused = await self._admit(route)  # a session counts as one request; budgets too
        if refused is not None:
            await self._refuse(refused)
            return
        self.relay.sessions[route.name] = open_now + 1
        self.relay.observer.live_session_started(route.name)
        started = time.monotonic()
        try:
            await self._connect_and_relay(snapshot, decision, setup_frame(frame, message, decision), limits)
        except LiveRefused as refused:
            await self._refuse(refused)
        finally:
            remaining = self.relay.sessions.get(route.name, 1) - 1
            if remaining > 0:
                self.relay.sessions[route.name] = remaining
            else:
                self.relay.sessions.pop(route.name, None)
            self._account(self.meter.flush())
            self.relay.observer.live_session_ended(route.name, time.monotonic() - started)

    async def _admit(self, route: Route) -> LiveRefused | None:
        """The route's requests/tokens per minute and budget, as for a REST request (per pod, or
        fleet-wide through the governor); refused at setup, before Google is called."""
        state = self.relay.state
        limiter = self.limiter = state.limiters.for_route(route.name, route.limits)
        governor = state.governor
        try:
            if governor is not None and governor.governs(route):
                await governor.admit(route, limiter)
            elif limiter.active:
                refusal = limiter.admit()
                if refusal is not None:
                    return LiveRefused(TRY_AGAIN_LATER, refusal.message, status=429, error="ROUTE_RATE_LIMITED")
        except SidecarError as exc:  # 429 rate limit or budget, 503 limit store unavailable
            return LiveRefused(TRY_AGAIN_LATER, exc.message, status=exc.code, error=exc.reason)
        return None

    async def _token_limit_reached(self, route: Route) -> str | None:
        """After a turn's tokens were debited: the reason to end the session if the route's
        tokens per minute are used up (fleet-wide through the governor, else this pod's)."""
        governor = self.relay.state.governor
        if governor is not None and governor.governs(route) and governor.counts_fleet_tokens(route):
            return await governor.tokens_spent(route)
        limiter = self.limiter
        refusal = limiter.token_refusal() if limiter is not None else None
        return refusal.message if refusal is not None else None

    def _budget_spent(self, route: Route) -> str | None:
        governor = self.relay.state.governor
        state = governor.budget_state(route) if governor is not None and route.budget is not None else None
        return state.message(route.name) if state is not None else None

    async def _first_message(self) -> Frame | None:
        try:
            message = await asyncio.wait_for(self.receive(), SETUP_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise LiveRefused(POLICY, f"no setup message within {SETUP_TIMEOUT_S:g}s", status=408,
                              error="SETUP_TIMEOUT") from None
        if message["type"] != "websocket.receive":
            self.ending = _Ending("client", message.get("code"), message.get("reason") or "")
            self.record.status, self.record.error_reason = 499, "CLIENT_DISCONNECTED"
            return None
        frame: Frame | None = message.get("text")
        if frame is None:
            frame = message.get("bytes") or b""
        self.stats.messages_in += 1
        self.record.bytes_in += len(frame)
        return frame

    async def _refuse(self, refused: LiveRefused) -> None:
        record = self.record
        if not record.upstream_status:
            record.status = refused.status
        record.error_reason = refused.error
        self.ending = _Ending("refused", refused.code, refused.reason)
        log.warning("Live session %s refused (close %d): %s", record.request_id, refused.code, refused.detail)
        await self._close_client(refused.code, refused.reason)

    async def _close_client(self, code: int, reason: str) -> None:
        try:
            await self.send({"type": "websocket.close", "code": code, "reason": close_reason(reason)})
        except (OSError, RuntimeError):
            pass  # the caller is already gone

    # ---------------------------------------------------------------- upstream
    async def _connect_and_relay(self, snapshot: Snapshot, decision: LiveDecision, setup: Frame,
                                 limits: LiveLimits) -> None:
        route = decision.route
        source: TokenSource | None = snapshot.credentials.get(route.credential)
        forward_caller = snapshot.credentials.specs[route.credential].type == "client"
        token = await self._token(source)
        try:
            upstream = await self._connect(decision, token, forward_caller)
        except InvalidStatus as exc:
            if exc.response.status_code != 401 or source is None or token is None:
                raise self._refusal(exc, decision) from None
            source.invalidate(token)  # revoked or skewed: one fresh token, like the REST proxy
            token = await self._token(source)
            try:
                upstream = await self._connect(decision, token, forward_caller)
            except InvalidStatus as again:
                raise self._refusal(again, decision) from None
        self.record.upstream_status = self.record.status = 101
        try:
            await upstream.send(setup)
            await self._relay(upstream, limits)
        except ConnectionClosed:
            await self._relay_upstream_close(upstream)
        finally:
            await _close_upstream(upstream)

    async def _token(self, source: TokenSource | None) -> str | None:
        if source is None:
            return None
        try:
            return await source.token()
        except CredentialError as exc:
            raise LiveRefused(INTERNAL_ERROR, f"the sidecar has no Google credentials right now "
                                              f"(credential {source.name}); see its log",
                              status=503, error="CREDENTIALS_UNAVAILABLE", detail=str(exc)) from None

    async def _connect(self, decision: LiveDecision, token: str | None, forward_caller: bool) -> ClientConnection:
        keys = self.snapshot.keys
        headers = upstream_request_headers(
            self.scope["headers"], bearer_token=token, quota_project=decision.route.quota_project,
            forward_caller_credentials=forward_caller,
            extra_drop=_HANDSHAKE_HEADERS | {keys.header} if keys is not None else _HANDSHAKE_HEADERS)
        user_agent = header_value(self.scope["headers"], b"user-agent")
        try:
            return await _NoRedirects(
                decision.url,
                additional_headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers],
                user_agent_header=(user_agent.decode("latin-1") if user_agent
                                   else f"vertex-passthrough-sidecar/{__version__}"),
                open_timeout=decision.route.timeouts.connect_s,
                close_timeout=CLOSE_TIMEOUT_S,
                max_size=MAX_MESSAGE_BYTES,
                max_queue=UPSTREAM_QUEUE,
            )
        except InvalidStatus:
            raise
        except InvalidURI as exc:
            raise LiveRefused(INTERNAL_ERROR, "the sidecar's upstream URL for this location is invalid",
                              status=500, error="UPSTREAM_FAILED", detail=str(exc)) from None
        except (asyncio.TimeoutError, TimeoutError):
            raise LiveRefused(BAD_GATEWAY, f"timed out connecting to Vertex AI ({decision.host}) after "
                                           f"{decision.route.timeouts.connect_s:g}s",
                              status=504, error="UPSTREAM_TIMEOUT") from None
        except (OSError, InvalidHandshake) as exc:
            raise LiveRefused(BAD_GATEWAY, f"cannot reach Vertex AI at {decision.host}: {type(exc).__name__}",
                              status=503, error="UPSTREAM_UNREACHABLE", detail=f"{decision.url}: {exc}") from None

    def _refusal(self, exc: InvalidStatus, decision: LiveDecision) -> LiveRefused:
        self.record.upstream_status = exc.response.status_code
        self.record.status = exc.response.status_code
        return handshake_refusal(exc.response.status_code, bytes(exc.response.body or b""), decision.host)

    # ------------------------------------------------------------------- relay
    async def _relay(self, upstream: ClientConnection, limits: LiveLimits) -> None:
        loop = asyncio.get_running_loop()
        self.last_activity = started = loop.time()
        to_upstream = asyncio.ensure_future(self._client_to_upstream(upstream))
        to_client = asyncio.ensure_future(self._upstream_to_client(upstream))
        pumps = {to_upstream, to_client}
        ending: _Ending | None = None
        try:
            while ending is None:
                wake = _next_wake(self.last_activity, started, limits)
                done, _ = await asyncio.wait(pumps, timeout=None if wake is None else max(wake - loop.time(), 0),
                                             return_when=asyncio.FIRST_COMPLETED)
                if done:
                    ending = _first_ending(to_upstream, to_client)
                else:
                    ending = _limit_ending(loop.time(), self.last_activity, started, limits, self.decision)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        self.ending = ending
        await self._finish(upstream, ending)

    async def _client_to_upstream(self, upstream: ClientConnection) -> _Ending:
        receive, stats, record, loop = self.receive, self.stats, self.record, asyncio.get_running_loop()
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":  # websocket.disconnect
                code = message.get("code")
                return _Ending("client", code, message.get("reason") or "", clean=code != 1006)
            data: Frame | None = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            self.last_activity = loop.time()
            if self.trace is not None:
                self.trace.client_message()
            stats.messages_in += 1
            record.bytes_in += len(data)
            try:
                await upstream.send(data)  # waits while Google's socket is backed up
            except ConnectionClosed:
                return _upstream_ending(upstream)

    async def _upstream_to_client(self, upstream: ClientConnection) -> _Ending:
        send, stats, record, meter = self.send, self.stats, self.record, self.meter
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await upstream.recv()
            except ConnectionClosed:
                return _upstream_ending(upstream)
            self.last_activity = loop.time()
            if self.trace is not None:
                self.trace.server_message()
            stats.messages_out += 1
            record.bytes_out += len(data)
            if record.first_byte_s is None:
                record.mark_first_byte()
            try:
                # waits while the caller reads slowly (uvicorn pauses on its socket's buffer)
                if isinstance(data, str):
                    await send({"type": "websocket.send", "text": data})
                else:
                    await send({"type": "websocket.send", "bytes": data})
            except (OSError, RuntimeError):
                return _Ending("client", 1006, "", clean=False)
            usage = meter.observe(data)
            if usage is not None:
                self._account(usage)
                if self.budget_crossed is None and self.decision is not None:
                    limited = await self._token_limit_reached(self.decision.route)
                    if limited is not None:  # closed cleanly at the end of the turn that used them up
                        return _Ending("rate_limit", TRY_AGAIN_LATER, close_reason(limited))
            if self.budget_crossed is not None:  # closed cleanly at the end of the turn that spent it
                return _Ending("budget", TRY_AGAIN_LATER, close_reason(self.budget_crossed))

    def _account(self, usage: Usage | None) -> None:
        if usage is None:
            return
        stats = self.stats
        stats.turns += 1
        add_usage(stats.usage, usage)
        if self.trace is not None:
            self.trace.turn(usage)
        if self.limiter is not None and self.limiter.counts_tokens:
            self.limiter.record_tokens(usage.total_tokens)  # per pod, as the REST proxy does
        decision = self.decision
        try:
            fields = self.relay.observer.live_turn_usage(
                decision.route.name if decision else None, decision.model if decision else None, usage,
                self.scope["headers"])
        except Exception:  # accounting must never break the relay
            log.exception("live_turn_usage failed")
            return
        governor = self.relay.state.governor
        if governor is not None and decision is not None and governor.governs(decision.route):
            cost = fields.get("cost_usd") if fields else None
            governor.spent(decision.route, usage.total_tokens, cost if isinstance(cost, (int, float)) else 0.0)
            self.budget_crossed = self._budget_spent(decision.route)
        if fields and isinstance(fields.get("cost_usd"), (int, float)):
            stats.cost_usd += fields["cost_usd"]
            stats.priced = True
            if stats.pricing != "unknown":  # like REST: cost 0 of an unpriced model is not "free"
                stats.pricing = fields.get("pricing")

    async def _finish(self, upstream: ClientConnection, ending: _Ending) -> None:
        """Close the side that did not end the session, relaying code and reason."""
        if ending.by == "client":
            code, reason = relayable_close(ending.code, ending.reason)
            if not ending.clean:
                code, reason = GOING_AWAY, "the caller went away"
            await _close_upstream(upstream, code, reason)
            return
        if ending.by == "upstream":
            await self._relay_upstream_close(upstream, ending)
            return
        # A limit: both sides are told (at once: Google's close reply may take a while).
        assert ending.code is not None
        await asyncio.gather(_close_upstream(upstream, NORMAL, ending.reason),
                             self._close_client(ending.code, ending.reason))

    async def _relay_upstream_close(self, upstream: ClientConnection, ending: _Ending | None = None) -> None:
        ending = ending or _upstream_ending(upstream)
        self.ending = ending
        if ending.clean:
            code, reason = relayable_close(ending.code, ending.reason)
        else:
            code, reason = BAD_GATEWAY, "the connection to Vertex AI was lost"
        await self._close_client(code, reason)


def _upstream_ending(upstream: ClientConnection) -> _Ending:
    received = upstream.protocol.close_rcvd
    if received is None:
        return _Ending("upstream", 1006, "", clean=False)
    return _Ending("upstream", received.code, received.reason)


def _first_ending(*pumps: asyncio.Future[_Ending]) -> _Ending:
    for pump in pumps:
        if pump.done() and not pump.cancelled():
            exc = pump.exception()
            if exc is None:
                return pump.result()
            log.error("Live relay failed: %s: %s", type(exc).__name__, exc)
            return _Ending("upstream", INTERNAL_ERROR, "the sidecar's relay failed", clean=True)
    return _Ending("upstream", INTERNAL_ERROR, "the sidecar's relay failed")


def _next_wake(last_activity: float, started: float, limits: LiveLimits) -> float | None:
    times = []
    if limits.idle_timeout_s is not None:
        times.append(last_activity + limits.idle_timeout_s)
    if limits.max_duration_s is not None:
        times.append(started + limits.max_duration_s)
    return min(times) if times else None


def _limit_ending(now: float, last_activity: float, started: float, limits: LiveLimits,
                  decision: LiveDecision | None) -> _Ending | None:
    route = decision.route.name if decision else "default"
    if limits.max_duration_s is not None and now >= started + limits.max_duration_s:
        return _Ending("max_duration", POLICY, close_reason(
            f"the Live session reached its maximum duration ({limits.max_duration_s:g}s, route {route} "
            "live.max_duration)"))
    if limits.idle_timeout_s is not None and now >= last_activity + limits.idle_timeout_s:
        return _Ending("idle_timeout", GOING_AWAY, close_reason(
            f"the Live session was idle for {limits.idle_timeout_s:g}s (route {route} live.idle_timeout)"))
    return None  # activity moved the deadline: wait again


async def _close_upstream(upstream: ClientConnection, code: int = NORMAL, reason: str = "") -> None:
    try:
        await upstream.close(code, close_reason(reason))  # waits ≤ CLOSE_TIMEOUT_S for Google's reply
    except Exception:  # the connection is already gone; close() must not mask the session's end
        pass
